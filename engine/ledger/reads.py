"""What a dashboard reads: sums over a period (from the rollups, or raw events for an agent
or a session), timelines, breakdowns, the ledger's tail, raw events for export and backtests.

Synchronous, on the reader connection's own thread (``SQLiteStore`` hands each read over in
one hop); it never waits for the writer (WAL: a reader sees the last commit).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, TypeVar

from engine.clock import DAY_MS, HOUR_MS, MINUTE_MS
from engine.ledger.dbapi import Connection
from engine.ledger.results import TIMELINE_FIELDS, BreakdownRow, Metric, TimelinePoint, Totals
from engine.ledger.rollups import (
    ORDER,
    ceil_ms,
    check_dimension,
    events_sql,
    filter_sql,
    floor_ms,
    needs_events,
    segments_sql,
)
from engine.ledger.schema import EVENT_COLUMNS, SUM_COLUMNS
from engine.models import ROLLUP_DIMENSIONS, FieldError, UsageEvent

T = TypeVar("T")

#: The ledger's tail after an event id, newest first (``recent_events``): a search by the primary key.
RECENT_EVENTS_SQL: Final = (
    f"SELECT e.id, {', '.join(f'e.{c}' for c in EVENT_COLUMNS if c != 'series_id')}, "
    f"{', '.join(f's.{d}' for d in ROLLUP_DIMENSIONS)} FROM usage_events e JOIN series s ON s.id = e.series_id "
    "WHERE e.id > ? ORDER BY e.id DESC LIMIT ?")
RECENT_EVENTS_OF_STATUS_SQL: Final = RECENT_EVENTS_SQL.replace("WHERE e.id > ?", "WHERE e.id > ? AND e.status = ?")
_ROW_FIELDS: Final = tuple(c for c in EVENT_COLUMNS if c != "series_id") + ROLLUP_DIMENSIONS


def _row_event(r: Sequence[Any]) -> UsageEvent:
    values = dict(zip(_ROW_FIELDS, r, strict=True))
    values["tags"] = json.loads(values["tags"]) if values["tags"] != "{}" else {}
    return UsageEvent(**values)


class Reads:
    """The usage reads, on one connection (the store's reader)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def data_version(self) -> int:
        """A number that changes whenever another connection commits (cheap change detection)."""
        return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    def totals(self, start_ms: int, end_ms: int, filters: Mapping[str, str] | None = None) -> Totals:
        """Sums over [start, end), from the coarsest rollups that cover it exactly (from raw
        events when ``filters`` name an agent or a session)."""
        if needs_events(filters):
            sql, args = events_sql(start_ms, end_ms, filters)
            row = self._fetchone(sql, args)
            return Totals.from_row(row, 2) if row else Totals()
        sql, args = segments_sql(start_ms, end_ms, filters, per_series=False)
        if not sql:
            return Totals()
        outer = ", ".join(f"sum(c{i})" for i in range(len(SUM_COLUMNS)))
        row = self._fetchone(f"SELECT {outer} FROM ({sql}) AS segments", args)
        return Totals.from_row(row) if row else Totals()

    def timeline(self, start_ms: int, end_ms: int, bucket_ms: int,
                 filters: Mapping[str, str] | None = None,
                 group_by: str | None = None,
                 fields: Sequence[str] = TIMELINE_FIELDS) -> list[TimelinePoint]:
        """Sums per bucket of ``bucket_ms`` (aligned to the epoch, UTC), optionally per group.

        Only ``fields`` are summed (each costs a pass over the rows); the others stay 0.
        """
        if bucket_ms <= 0 or bucket_ms % MINUTE_MS:
            raise FieldError("bucket", "must be a positive whole number of minutes")
        if group_by is not None:
            check_dimension(group_by, "group_by")
        unknown = set(fields) - set(SUM_COLUMNS)
        if unknown:
            raise FieldError("fields", f"unknown: {', '.join(sorted(unknown))}")
        if needs_events(filters, group_by):
            sql, args = events_sql(start_ms, end_ms, filters, bucket_ms=bucket_ms, group_by=group_by,
                                   fields=fields)
            rows = self._fetchall(sql + " ORDER BY b, g", args)
            return [TimelinePoint(int(r[0]), str(r[1]), Totals(**{
                c: int(r[2 + i]) for i, c in enumerate(SUM_COLUMNS) if c in fields})) for r in rows]
        wanted = [c for c in SUM_COLUMNS if c in fields]
        table = "day" if bucket_ms % DAY_MS == 0 else "hour" if bucket_ms % HOUR_MS == 0 else "minute"
        start, end = floor_ms(start_ms, bucket_ms), ceil_ms(end_ms, MINUTE_MS)
        where, params = filter_sql(filters)
        # Rollup buckets of the chosen table are already aligned when the sizes are equal.
        native = {"day": DAY_MS, "hour": HOUR_MS, "minute": MINUTE_MS}[table] == bucket_ms
        bucket = "bucket_ms" if native else f"bucket_ms - bucket_ms % {bucket_ms}"
        sums = ", ".join(f"sum({c})" for c in wanted)
        if group_by is None:
            sql = (f"SELECT {bucket} AS b, '', {sums} FROM rollup_{table} "
                   f"WHERE bucket_ms >= ? AND bucket_ms < ?{where} GROUP BY b ORDER BY b")
        else:
            aliased = ", ".join(f"sum({c}) AS {c}" for c in wanted)
            sql = (f"SELECT r.b, s.{group_by} AS g, {sums} FROM ("
                   f"SELECT {bucket} AS b, series_id, {aliased} FROM rollup_{table} "
                   f"WHERE bucket_ms >= ? AND bucket_ms < ?{where} GROUP BY b, series_id"
                   f") r JOIN series s ON s.id = r.series_id GROUP BY r.b, g ORDER BY r.b, g")
        rows = self._fetchall(sql, [start, end, *params])
        return [TimelinePoint(int(r[0]), str(r[1]), Totals(**dict(zip(wanted, map(int, r[2:]), strict=True))))
                for r in rows]

    def breakdown(self, start_ms: int, end_ms: int, by: str, *, limit: int = 10,
                  order: Metric = "cost",
                  filters: Mapping[str, str] | None = None) -> list[BreakdownRow]:
        """The top ``limit`` values of dimension ``by`` over [start, end), largest first."""
        check_dimension(by, "by")
        if order not in ORDER:
            raise FieldError("order", f"must be one of {', '.join(ORDER)}")
        if needs_events(filters, by):
            sql, args = events_sql(start_ms, end_ms, filters, group_by=by)
            outer = ", ".join(f"sum(r.c{i})" for i in range(len(SUM_COLUMNS)))
            rows = self._fetchall(f"SELECT r.g, {outer} FROM ({sql}) r GROUP BY r.g "
                                  f"ORDER BY {ORDER[order]} DESC, r.g LIMIT ?", [*args, max(1, limit)])
            return [BreakdownRow(str(r[0]), Totals.from_row(r, 1)) for r in rows]
        sql, args = segments_sql(start_ms, end_ms, filters, per_series=True)
        if not sql:
            return []
        outer = ", ".join(f"sum(r.c{i})" for i in range(len(SUM_COLUMNS)))
        sql = (f"SELECT s.{by} AS k, {outer} FROM ({sql}) r JOIN series s ON s.id = r.series_id "
               f"GROUP BY k ORDER BY {ORDER[order]} DESC, k LIMIT ?")
        rows = self._fetchall(sql, [*args, max(1, limit)])
        return [BreakdownRow(str(r[0]), Totals.from_row(r, 1)) for r in rows]

    def dimension_values(self, dim: str) -> list[str]:
        """Every value a dimension has taken (for filters and pickers)."""
        if dim not in ROLLUP_DIMENSIONS:
            raise FieldError("dimension", f"must be one of {', '.join(ROLLUP_DIMENSIONS)}")
        rows = self._fetchall(f"SELECT DISTINCT {dim} FROM series ORDER BY 1", [])
        return [str(r[0]) for r in rows]

    def event_count(self) -> int:
        row = self._fetchone("SELECT count(*) FROM usage_events", [])
        return int(row[0]) if row else 0

    def time_span(self) -> tuple[int, int] | None:
        """The first and last event time in the ledger, or None when it is empty."""
        row = self._fetchone("SELECT min(bucket_ms), max(bucket_ms) FROM rollup_day", [])
        if not row or row[0] is None:
            return None
        first = self._fetchone("SELECT min(ts_ms) FROM usage_events WHERE ts_ms >= ?", [row[0]])
        last = self._fetchone("SELECT max(ts_ms) FROM usage_events WHERE ts_ms >= ?", [row[1]])
        return int(first[0]), int(last[0])

    def events_page(self, end_ms: int, after: tuple[int, int], batch: int) -> list[tuple[int, UsageEvent]]:
        """Up to ``batch`` raw events before ``end_ms`` and after ``after`` (time, id), oldest
        first, with their ids: a page of ``SQLiteStore.iter_events``."""
        cols = ", ".join(f"e.{c}" for c in EVENT_COLUMNS if c != "series_id")
        dims = ", ".join(f"s.{d}" for d in ROLLUP_DIMENSIONS)
        rows = self._fetchall(
            f"SELECT e.id, {cols}, {dims} FROM usage_events e JOIN series s ON s.id = e.series_id "
            "WHERE e.ts_ms < ? AND (e.ts_ms > ? OR (e.ts_ms = ? AND e.id > ?)) "
            "ORDER BY e.ts_ms, e.id LIMIT ?", [end_ms, after[0], after[0], after[1], batch])
        return [(int(r[0]), _row_event(r[1:])) for r in rows]

    def recent_events(self, after_id: int, limit: int, status: str | None = None) -> list[tuple[int, UsageEvent]]:
        """The newest ``limit`` events recorded after event ``after_id`` (of one ``status``, or
        all), newest first, with their ids. Read by the primary key from the ledger's end: as
        cheap on a million events as on ten (a status reads back to ``after_id`` at most), and
        no event recorded late (a spill replayed, another process's import with older times)
        is skipped, as a cursor on time would."""
        if status is None:
            rows = self._fetchall(RECENT_EVENTS_SQL, [after_id, limit])
        else:
            rows = self._fetchall(RECENT_EVENTS_OF_STATUS_SQL, [after_id, status, limit])
        return [(int(r[0]), _row_event(r[1:])) for r in rows]

    def fold_usage(self, start_ms: int, end_ms: int, where: Mapping[str, str],
                   fn: Callable[[Iterable[tuple[int, int, int, str]]], T]) -> T:
        """Run ``fn`` over (ts_ms, cost_nanos, tokens, status) of raw events in [start, end)
        matching ``where``, oldest first, streamed (for backtests)."""
        clauses = ["e.ts_ms >= ?", "e.ts_ms < ?"]
        params: list[Any] = [start_ms, end_ms]
        for column, value in where.items():
            if column not in (*ROLLUP_DIMENSIONS, "session", "agent"):
                raise FieldError("scope", f"cannot select events by {column!r}")
            clauses.append(f"{'e' if column in ('session', 'agent') else 's'}.{column} = ?")
            params.append(value)
        join = " JOIN series s ON s.id = e.series_id" if any(c in ROLLUP_DIMENSIONS for c in where) else ""
        sql = (f"SELECT e.ts_ms, e.cost_nanos, e.input_tokens + e.output_tokens, e.status FROM usage_events e{join} "
               f"WHERE {' AND '.join(clauses)} ORDER BY e.ts_ms, e.id")
        return fn(self.conn.execute(sql, params))

    def _fetchone(self, sql: str, params: Sequence[Any]) -> Any:
        return self.conn.execute(sql, params).fetchone()

    def _fetchall(self, sql: str, params: Sequence[Any]) -> list[Any]:
        return self.conn.execute(sql, params).fetchall()
