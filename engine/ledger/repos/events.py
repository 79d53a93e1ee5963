"""Usage events and the rollups they fold into, as a write transaction sees them.

``append`` is the ledger's one way in for an event: the integer-cost invariant checked, its
series found or made, the row inserted (a repeated ``request_id`` is a duplicate, not an
error), and the rollups updated in the same transaction. The sums read here are what the
budget book loads its counters from.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from engine.ledger.dbapi import Connection, pipeline
from engine.ledger.errors import PipelineFailed
from engine.ledger.repos.holds import PG_CLOSE_PARTS, PG_CLOSED, Holds, pg_close_params
from engine.ledger.results import PENDING_ID, ClosedHold, EventRow, MinuteSums, UsageSums
from engine.ledger.rollups import (
    ROLLUP_STATEMENTS,
    SMALL_BATCH,
    count_sql,
    filter_sql,
    fold_small,
    pg_append_one_parts,
    pg_append_one_sql,
    pg_fold_one_params,
    segments_sql,
)
from engine.ledger.schema import DIMS_SQL, EVENT_COLUMNS
from engine.models import ROLLUP_DIMENSIONS, FieldError, UsageEvent


def _series_key(e: UsageEvent) -> tuple[str, ...]:
    return (e.workspace, e.team, e.principal, e.token_id, e.provider, e.model)


def _check_costs(events: list[UsageEvent]) -> None:
    """The ledger's invariant, checked before anything is written: an integer cost, never a float."""
    for e in events:
        if type(e.cost_nanos) is not int or e.cost_nanos < 0:
            raise ValueError(f"event {e.request_id} has no integer nano-dollar cost: {e.cost_nanos!r}")


def _event_row(e: UsageEvent, series_id: int) -> tuple[Any, ...]:
    return (
        e.ts_ms, e.request_id, series_id, e.session, e.agent, e.input_tokens, e.cached_input_tokens,
        e.cache_write_tokens, e.cache_write_1h_tokens, e.output_tokens, e.reasoning_tokens, e.cost_nanos,
        e.cost_source,
        e.latency_ms, e.status,
        json.dumps(e.tags, separators=(",", ":"), sort_keys=True) if e.tags else "{}",
    )


_INSERT_EVENT: Final = (
    f"INSERT INTO usage_events ({', '.join(EVENT_COLUMNS)}) VALUES ({', '.join('?' * len(EVENT_COLUMNS))}) "
    "ON CONFLICT (request_id) DO NOTHING"
)
_INSERT_SERIES: Final = (
    f"INSERT INTO series ({DIMS_SQL}) VALUES ({', '.join('?' * len(ROLLUP_DIMENSIONS))}) "
    f"ON CONFLICT ({DIMS_SQL}) DO NOTHING"
)
_PG_APPEND_ONE: Final = pg_append_one_sql(_INSERT_EVENT)
#: A settlement on PostgreSQL: its event appended and folded, and its hold closed, in one
#: statement; always one row: the new event's id (NULL: a duplicate), then ``PG_CLOSED``
#: (NULLs: the hold was not open).
_PG_SETTLE: Final = (f"WITH {', '.join([*pg_append_one_parts(_INSERT_EVENT), *PG_CLOSE_PARTS])} "
                     f"SELECT (SELECT id FROM new_event), {PG_CLOSED} FROM (SELECT 1) AS one LEFT JOIN closed ON true")
_UNBLOCKED: Final = count_sql("e.status != 'blocked'")
_FIND_SERIES: Final = "SELECT id FROM series WHERE " + " AND ".join(f"{d} = ?" for d in ROLLUP_DIMENSIONS)


class Events:
    """Usage events inside the writer's transaction. ``series`` is the store's cache of series
    ids (committed ones only); ``fresh`` gathers the ids this transaction made, which the
    writer adds to the cache once it commits (a rolled-back id must not be reused)."""

    __slots__ = ("appended_id", "conn", "fresh", "last_id", "series")

    def __init__(self, conn: Connection, series: dict[tuple[str, ...], int],
                 fresh: dict[tuple[str, ...], int]) -> None:
        self.conn = conn
        self.series = series
        self.fresh = fresh
        self.appended_id = 0  # the id of the event the last append() of one new event wrote (0: none)
        self.last_id = 0  # the highest id of an event appended through this object (0: none)

    def append(self, events: list[UsageEvent], *, want_ids: bool = True) -> tuple[int, set[str] | None]:
        """Insert events and fold them into the rollups, inside the caller's transaction.

        Returns how many were new and, when some were duplicates and ``want_ids``, the
        request ids that were new.
        """
        conn = self.conn
        self.appended_id = 0
        _check_costs(events)
        series_ids = self._series_ids(events)
        if len(events) == 1 and events[0].ts_ms >= 0 and getattr(conn, "dialect", "sqlite") == "postgresql":
            # One event on PostgreSQL: inserted and folded in one round trip.
            parameters = (*_event_row(events[0], series_ids[0]), *pg_fold_one_params(events[0], series_ids[0]))
            row = conn.execute(_PG_APPEND_ONE, parameters).fetchone()
            if row is None:
                return 0, set() if want_ids else None
            self.appended_id = self.last_id = int(row[0])
            return 1, None
        if len(events) == 1:  # a settlement's event: its id is known without asking
            cursor = conn.execute(_INSERT_EVENT, _event_row(events[0], series_ids[0]))
            inserted = cursor.rowcount
            self.appended_id = int(cursor.lastrowid or 0) if inserted else 0
            if not inserted:
                return 0, set() if want_ids else None
            lo, hi = self.appended_id - 1, self.appended_id  # (lo, hi]: the new rows' ids
            self.last_id = max(self.last_id, hi)
        else:
            # One writer at a time (SQLite's write lock, PostgreSQL's ledger lock): the new rows
            # are the ones past the last id before the insert. Not hi - inserted: PostgreSQL
            # spends a sequence value on a duplicate too, so ids may skip.
            lo = self.max_id()
            conn.executemany(_INSERT_EVENT, map(_event_row, events, series_ids))
            inserted, hi = conn.execute("SELECT count(*), coalesce(max(id), ?) FROM usage_events WHERE id > ?",
                                        (lo, lo)).fetchone()
            if not inserted:
                return 0, set() if want_ids else None
            self.last_id = max(self.last_id, int(hi))
        if inserted == len(events) <= SMALL_BATCH and all(e.ts_ms >= 0 for e in events):  # SQL's % truncates
            fold_small(conn, events, series_ids)
            return inserted, None
        for sql, ranged in ROLLUP_STATEMENTS:
            conn.execute(sql, (lo, hi) if ranged else ())
        if inserted == len(events) or not want_ids:
            return inserted, None
        return inserted, {r[0] for r in conn.execute(
            "SELECT request_id FROM usage_events WHERE id > ? AND id <= ?", (lo, hi))}

    def _series_ids(self, events: list[UsageEvent]) -> list[int]:
        """The series id of each event, the ones not seen yet made."""
        keys = [_series_key(e) for e in events]
        series, fresh = self.series, self.fresh
        missing = set(keys).difference(series).difference(fresh)
        if missing:
            self.conn.executemany(_INSERT_SERIES, sorted(missing))
            for k in missing:
                fresh[k] = int(self.conn.execute(_FIND_SERIES, k).fetchone()[0])
        return [series.get(k) or fresh[k] for k in keys]

    def settles_in_one(self, event: UsageEvent) -> bool:
        """``append_closing`` takes this event (PostgreSQL, and a time its rollups' SQL folds)."""
        return event.ts_ms >= 0 and getattr(self.conn, "dialect", "sqlite") == "postgresql"

    def append_closing(self, event: UsageEvent, holds: Holds, hold_id: str, state: str, now_ms: int,
                       expected: list[tuple[str, int]] | None) -> tuple[bool, ClosedHold | None]:
        """PostgreSQL (``settles_in_one``): append a call's event and close its hold in one
        statement; (whether the event was new, what the closing gave back: None if the hold was
        not open). ``expected``: as ``Holds.close``'s; in a pipelined batch the statement is
        then sent ahead, the event taken to be new and the hold as opened."""
        _check_costs([event])
        (series_id,) = self._series_ids([event])
        parameters = (*_event_row(event, series_id), *pg_fold_one_params(event, series_id),
                      *pg_close_params(hold_id, state, now_ms))
        if expected is not None and (ahead := pipeline(self.conn)) is not None:
            lines = [(str(p), int(a)) for p, a in expected]

            def check(rows: list[tuple[object, ...]]) -> None:
                (row,) = rows
                if row[0] is None:
                    raise PipelineFailed(f"the event of {event.request_id} was in the ledger already")
                self._appended(rows)
                holds.check_closed(hold_id, lines, row[1:])

            ahead.queue(_PG_SETTLE, parameters, rows_each=1, check=check)
            self.appended_id = PENDING_ID
            return True, ClosedHold(lines, None, 0)
        row = self.conn.execute(_PG_SETTLE, parameters).fetchone()
        self.appended_id = 0 if row[0] is None else int(row[0])
        self.last_id = max(self.last_id, self.appended_id)
        return row[0] is not None, holds.closed(row[1:])

    def _appended(self, rows: list[tuple[object, ...]]) -> None:
        """The id of an event a pipelined statement wrote."""
        self.last_id = max(self.last_id, int(str(rows[0][0])))

    def max_id(self) -> int:
        return int(self.conn.execute("SELECT coalesce(max(id), 0) FROM usage_events").fetchone()[0])

    def since(self, last_id: int) -> list[EventRow]:
        """Every event after ``last_id``, oldest first."""
        return list(map(EventRow._make, self.conn.execute(
            "SELECT e.id, e.ts_ms, s.workspace, s.team, s.principal, s.token_id, s.provider, s.model, e.session, "
            "e.agent, e.input_tokens, e.output_tokens, e.cost_nanos, e.status FROM usage_events e "
            "JOIN series s ON s.id = e.series_id WHERE e.id > ? ORDER BY e.id", (last_id,))))

    def sums_between(self, start_ms: int, end_ms: int, where: Mapping[str, str]) -> UsageSums:
        """The sums of raw events in [start, end) matching ``where`` (any event column)."""
        clauses = ["e.ts_ms >= ?", "e.ts_ms < ?", "e.status != 'blocked'"]
        params: list[Any] = [start_ms, end_ms]
        for column, value in where.items():
            table = "e" if column in ("session", "agent") else "s"
            if column not in (*ROLLUP_DIMENSIONS, "session", "agent"):
                raise FieldError("scope", f"cannot sum by {column!r}")
            clauses.append(f"{table}.{column} = ?")
            params.append(value)
        row = self.conn.execute(
            "SELECT coalesce(sum(e.cost_nanos), 0), coalesce(sum(e.input_tokens + e.output_tokens), 0), count(*) "
            f"FROM usage_events e JOIN series s ON s.id = e.series_id WHERE {' AND '.join(clauses)}",
            params).fetchone()
        return UsageSums(int(row[0]), int(row[1]), int(row[2]))

    def rollup_sums(self, start_ms: int, end_ms: int, where: Mapping[str, str]) -> UsageSums:
        """The sums over [start, end) from the rollups (minute precision)."""
        sql, args = segments_sql(start_ms, end_ms, where or None, per_series=False)
        if not sql:
            return UsageSums(0, 0, 0)
        # c0 requests, c2 blocked, c3 input, c6 output, c8 cost
        row = self.conn.execute(
            f"SELECT coalesce(sum(c8), 0), coalesce(sum(c3) + sum(c6), 0), coalesce(sum(c0) - sum(c2), 0) "
            f"FROM ({sql}) AS segments", args).fetchone()
        return UsageSums(int(row[0]), int(row[1]), int(row[2]))

    def minute_sums(self, start_ms: int, end_ms: int, where: Mapping[str, str],
                    *, raw: bool = False) -> list[MinuteSums]:
        """The sums per minute over [start, end), from the minute rollups, or from raw events
        when ``where`` names a session or an agent."""
        if raw:
            clauses = ["e.ts_ms >= ?", "e.ts_ms < ?"]
            params: list[Any] = [start_ms, end_ms]
            for column, value in where.items():
                clauses.append(f"{'e' if column in ('session', 'agent') else 's'}.{column} = ?")
                params.append(value)
            sql = ("SELECT e.ts_ms - e.ts_ms % 60000 AS m, sum(e.cost_nanos), sum(e.input_tokens + e.output_tokens), "
                   f"{_UNBLOCKED} FROM usage_events e JOIN series s ON s.id = e.series_id "
                   f"WHERE {' AND '.join(clauses)} GROUP BY m")
            rows = self.conn.execute(sql, params).fetchall()
        else:
            filt, fparams = filter_sql(where or None)
            rows = self.conn.execute(
                "SELECT bucket_ms, sum(cost_nanos), sum(input_tokens) + sum(output_tokens), sum(requests) - "
                f"sum(blocked) FROM rollup_minute WHERE bucket_ms >= ? AND bucket_ms < ?{filt} GROUP BY bucket_ms",
                [start_ms, end_ms, *fparams]).fetchall()
        return [MinuteSums(int(m), int(c), int(t), int(r)) for m, c, t, r in rows]
