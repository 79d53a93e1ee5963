"""The rollups: the SQL that folds new events into the per-minute, hour and day sums, and the
SQL that reads them back over a range (segments of the coarsest rollups that cover it exactly),
by dimension and filter. Rollups are written in the same transaction as the events they sum,
and every dashboard read is served from them (from raw events when a read names an agent or a
session, which no rollup keeps)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from engine.clock import DAY_MS, HOUR_MS, MINUTE_MS
from engine.ledger.dbapi import Connection
from engine.ledger.schema import ROLLUP_TABLES, SUM_COLUMNS
from engine.models import ROLLUP_DIMENSIONS, FieldError, UsageEvent

ORDER: Final[Mapping[str, str]] = {  # columns of a per-series segment select, by position
    "cost": "sum(r.c8)",
    "tokens": "sum(r.c3) + sum(r.c6)",
    "requests": "sum(r.c0)",
    "errors": "sum(r.c1)",
}

def count_sql(condition: str) -> str:
    """How many rows meet ``condition``, in SQL both SQLite and PostgreSQL take (PostgreSQL
    does not sum a comparison)."""
    return f"sum(CASE WHEN {condition} THEN 1 ELSE 0 END)"


_count = count_sql
#: Each rollup column (SUM_COLUMNS) as a sum over raw events.
_EVENT_SUMS: Final = (
    "count(*)", _count("status = 'error'"), _count("status = 'blocked'"), "sum(input_tokens)",
    "sum(cached_input_tokens)", "sum(cache_write_tokens)", "sum(output_tokens)", "sum(reasoning_tokens)",
    "sum(cost_nanos)", _count("cost_source = 'unpriced'"), _count("cost_source = 'estimated'"), "sum(latency_ms)",
    "sum(cache_write_1h_tokens)",
)
#: Columns of usage_events only (no rollup has them): reads by them sum raw events.
EVENT_DIMENSIONS: Final = ("agent", "session")
#: Every dimension the usage reads group and filter by.
READ_DIMENSIONS: Final = (*ROLLUP_DIMENSIONS, *EVENT_DIMENSIONS)


def _added(table: str) -> str:
    """An upsert's sums: the row's (named by its table: PostgreSQL would not know which ``c``) plus the new."""
    return ", ".join(f"{c} = rollup_{table}.{c} + excluded.{c}" for c in SUM_COLUMNS)


def _rollup_statements() -> tuple[tuple[str, bool], ...]:
    """The statements that fold a batch of new events (ids in (lo, hi]) into every rollup.

    The batch is summed once per minute into a temporary table, the minute sums once
    per hour into another; each rollup is then an upsert of already-grouped rows.
    Each statement comes with whether it takes the (lo, hi) parameters.
    """
    event_sums = _EVENT_SUMS
    columns = ", ".join(SUM_COLUMNS)
    resum = ", ".join(f"sum({c})" for c in SUM_COLUMNS)
    def upsert(table: str, select: str) -> str:
        return (f"INSERT INTO rollup_{table} (bucket_ms, series_id, {columns}) {select} "
                f"ON CONFLICT (bucket_ms, series_id) DO UPDATE SET {_added(table)}")

    return (
        (f"INSERT INTO temp.batch_minute SELECT ts_ms - ts_ms % {MINUTE_MS}, series_id, "
         f"{', '.join(event_sums)} FROM usage_events WHERE id > ? AND id <= ? GROUP BY 1, 2", True),
        (upsert("minute", "SELECT * FROM temp.batch_minute WHERE true"), False),
        (f"INSERT INTO temp.batch_hour SELECT bucket_ms - bucket_ms % {HOUR_MS}, series_id, {resum} "
         "FROM temp.batch_minute GROUP BY 1, 2", False),
        (upsert("hour", "SELECT * FROM temp.batch_hour WHERE true"), False),
        (upsert("day", f"SELECT bucket_ms - bucket_ms % {DAY_MS}, series_id, {resum} FROM temp.batch_hour "
                       "GROUP BY 1, 2"), False),
        ("DELETE FROM temp.batch_minute", False),
        ("DELETE FROM temp.batch_hour", False),
    )


ROLLUP_STATEMENTS: Final = _rollup_statements()
SMALL_BATCH: Final = 16  # up to this many new events fold into the rollups from Python: three statements, not seven
_UPSERT_ROLLUP: Final = {
    name: f"INSERT INTO rollup_{name} (bucket_ms, series_id, {', '.join(SUM_COLUMNS)}) VALUES "
          f"({', '.join('?' * (2 + len(SUM_COLUMNS)))}) ON CONFLICT (bucket_ms, series_id) DO UPDATE SET "
          + _added(name)
    for name in ROLLUP_TABLES
}


def pg_append_one_parts(insert_event: str) -> list[str]:
    """PostgreSQL: ``insert_event`` (an INSERT ... ON CONFLICT DO NOTHING of one event) and its
    fold into every rollup, as the parts of one statement's WITH (one round trip instead of
    four): ``new_event`` (the new event's id, or no row), then each rollup's upsert, which
    takes its row from the inserted event's, so a duplicate folds nothing. Parameters: the
    event's, then ``pg_fold_one_params``."""
    columns = ", ".join(SUM_COLUMNS)
    values = ", ".join("?::bigint" for _ in range(2 + len(SUM_COLUMNS)))
    parts = [f"new_event AS ({insert_event} RETURNING id)"]
    parts += [f"fold_{name} AS (INSERT INTO rollup_{name} (bucket_ms, series_id, {columns}) SELECT {values} "
              f"FROM new_event ON CONFLICT (bucket_ms, series_id) DO UPDATE SET {_added(name)})"
              for name in ROLLUP_TABLES]
    return parts


def pg_append_one_sql(insert_event: str) -> str:
    """``pg_append_one_parts`` as a statement: returns the new event's id, or no row."""
    return "WITH " + ", ".join(pg_append_one_parts(insert_event)) + " SELECT id FROM new_event"


def pg_fold_one_params(e: UsageEvent, series_id: int) -> list[int]:
    """The rollup rows of one event (ts_ms >= 0), for ``pg_append_one_sql``."""
    sums = _sums(e)
    return [value for size in ROLLUP_TABLES.values() for value in (e.ts_ms - e.ts_ms % size, series_id, *sums)]


def _sums(e: UsageEvent) -> list[int]:
    """One event's contribution to each rollup column (SUM_COLUMNS), as the rollup SQL sums it."""
    return [1, int(e.status == "error"), int(e.status == "blocked"), e.input_tokens, e.cached_input_tokens,
            e.cache_write_tokens, e.output_tokens, e.reasoning_tokens, e.cost_nanos or 0,
            int(e.cost_source == "unpriced"), int(e.cost_source == "estimated"), e.latency_ms,
            e.cache_write_1h_tokens]


def fold_small(conn: Connection, events: list[UsageEvent], series_ids: list[int]) -> None:
    """Fold a few new events into every rollup (a settlement's one event, mostly)."""
    for table, size in ROLLUP_TABLES.items():
        buckets: dict[tuple[int, int], list[int]] = {}
        for e, series_id in zip(events, series_ids, strict=True):
            key = (e.ts_ms - e.ts_ms % size, series_id)
            add = _sums(e)
            if (sums := buckets.get(key)) is None:
                buckets[key] = add
            else:
                buckets[key] = [a + b for a, b in zip(sums, add, strict=True)]
        conn.executemany(_UPSERT_ROLLUP[table], [(*key, *sums) for key, sums in buckets.items()])


TEMP_TABLES: Final = tuple(
    f"CREATE TEMP TABLE IF NOT EXISTS batch_{name} (bucket_ms INTEGER, series_id INTEGER, "
    f"{', '.join(f'{c} INTEGER' for c in SUM_COLUMNS)})" for name in ("minute", "hour"))


def floor_ms(ms: int, size: int) -> int:
    return ms - ms % size


def ceil_ms(ms: int, size: int) -> int:
    return -((-ms) // size) * size


def range_segments(start_ms: int, end_ms: int) -> list[tuple[str, int, int]]:
    """Cover [start, end) with as few rollup rows as possible: days inside, hours and minutes at the edges.

    Both ends are widened to whole minutes (the finest rollup), so the current
    minute's events are included.
    """
    start = floor_ms(start_ms, MINUTE_MS)
    end = ceil_ms(end_ms, MINUTE_MS)
    if end <= start:
        return []
    segments: list[tuple[str, int, int]] = []
    h0, h1 = ceil_ms(start, HOUR_MS), floor_ms(end, HOUR_MS)
    if h0 >= h1:
        return [("minute", start, end)]
    d0, d1 = ceil_ms(h0, DAY_MS), floor_ms(h1, DAY_MS)
    if start < h0:
        segments.append(("minute", start, h0))
    if d0 < d1:
        if h0 < d0:
            segments.append(("hour", h0, d0))
        segments.append(("day", d0, d1))
        if d1 < h1:
            segments.append(("hour", d1, h1))
    else:
        segments.append(("hour", h0, h1))
    if h1 < end:
        segments.append(("minute", h1, end))
    return segments


def filter_sql(filters: Mapping[str, str] | None) -> tuple[str, list[Any]]:
    if not filters:
        return "", []
    clauses, params = [], []
    for dim, value in filters.items():
        if dim not in ROLLUP_DIMENSIONS:
            raise FieldError("filter", f"cannot filter by {dim!r}; use one of {', '.join(ROLLUP_DIMENSIONS)}")
        clauses.append(f"{dim} = ?")
        params.append(value)
    return f" AND series_id IN (SELECT id FROM series WHERE {' AND '.join(clauses)})", params


def needs_events(filters: Mapping[str, str] | None, *groups: str | None) -> bool:
    """Whether a read names an event-only dimension, so it must sum raw events."""
    return any(d in EVENT_DIMENSIONS for d in (*(filters or {}), *groups))


def check_dimension(dim: str, field: str) -> None:
    if dim not in READ_DIMENSIONS:
        raise FieldError(field, f"must be one of {', '.join(READ_DIMENSIONS)} (got {dim!r})")


def _event_column(dim: str) -> str:
    return f"e.{dim}" if dim in EVENT_DIMENSIONS else f"s.{dim}"


def events_sql(start_ms: int, end_ms: int, filters: Mapping[str, str] | None, *, bucket_ms: int = 0,
                group_by: str | None = None, fields: Sequence[str] = SUM_COLUMNS) -> tuple[str, list[Any]]:
    """Sums (of ``fields``; the others are 0) of raw events in [start, end), widened to whole
    minutes as the rollups are, per (bucket, group): ``SELECT b, g, c0, c1, ...``. For reads by
    agent or session, which the rollups do not keep: bounded by the time index, one pass over
    the period's events."""
    clauses = ["e.ts_ms >= ?", "e.ts_ms < ?"]
    params: list[Any] = [floor_ms(start_ms, MINUTE_MS), ceil_ms(end_ms, MINUTE_MS)]
    for dim, value in (filters or {}).items():
        check_dimension(dim, "filter")
        clauses.append(f"{_event_column(dim)} = ?")
        params.append(value)
    bucket = f"e.ts_ms - e.ts_ms % {bucket_ms}" if bucket_ms else "0"
    group = _event_column(group_by) if group_by else "''"
    join = " JOIN series s ON s.id = e.series_id" if any(
        d not in EVENT_DIMENSIONS for d in (*(filters or {}), *([group_by] if group_by else []))) else ""
    sums = ", ".join(f"{expr if column in fields else 0} AS c{i}"
                     for i, (expr, column) in enumerate(zip(_EVENT_SUMS, SUM_COLUMNS, strict=True)))
    return (f"SELECT {bucket} AS b, {group} AS g, {sums} FROM usage_events e{join} "
            f"WHERE {' AND '.join(clauses)} GROUP BY b, g"), params


def segments_sql(start_ms: int, end_ms: int, filters: Mapping[str, str] | None,
                  *, per_series: bool) -> tuple[str, list[Any]]:
    """A UNION ALL over the rollup segments covering [start, end); sums are named c0, c1, ..."""
    where, params = filter_sql(filters)
    aliased = ", ".join(f"sum({c}) AS c{i}" for i, c in enumerate(SUM_COLUMNS))
    head = f"SELECT series_id, {aliased}" if per_series else f"SELECT {aliased}"
    tail = " GROUP BY series_id" if per_series else ""
    parts, args = [], []
    for table, lo, hi in range_segments(start_ms, end_ms):
        parts.append(f"{head} FROM rollup_{table} WHERE bucket_ms >= ? AND bucket_ms < ?{where}{tail}")
        args += [lo, hi, *params]
    return " UNION ALL ".join(parts), args

