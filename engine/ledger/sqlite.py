"""The ledger store: the one place that knows the SQL.

SQLite through aiosqlite, in WAL mode, with numbered migrations. ``usage_events`` is
append-only and ``request_id`` is unique, so a retried write is a no-op reported as a
duplicate. Rollups per minute, hour and day are written in the same transaction as the
events they sum, and every dashboard read is served from them. Writes are
group-committed: concurrent ``record()`` calls share one transaction, and each returns
only once its event is committed.

``LedgerStore`` is the interface the rest of the engine codes against, so another
backend (PostgreSQL for several gateway machines) can stand in later.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from itertools import islice
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import aiosqlite

from engine.clock import DAY_MS, HOUR_MS, MINUTE_MS
from engine.errors import LedgerUnavailable
from engine.models import ROLLUP_DIMENSIONS, FieldError, UsageEvent

#: At most this many events go into one group-committed transaction.
MAX_BATCH: Final = 4096
#: Bulk writes commit in chunks of this many events (each chunk all-or-nothing).
BULK_CHUNK: Final = 50_000
INLINE_BATCH: Final = 64  # an operation batch this small runs on the event loop when the ledger is free
CHECKPOINT_EVERY: Final = 1_000  # operations and events written between two checkpoints of the log
LIVE_GATEWAY_MS: Final = 10_000  # a gateway whose heartbeat (every 2 s) is this recent is running
WAL_SIZE_LIMIT: Final = 64 * 1024 * 1024  # bytes of log file kept when the log starts again
BUSY_TIMEOUT_MS: Final = 30_000


class StoreError(LedgerUnavailable, RuntimeError):
    """The ledger cannot be opened or written; the message says why in one sentence."""


class SchemaTooNewError(StoreError):
    pass


class LedgerRefusing(StoreError):
    """The ledger refuses writes for now (``refusal`` says why); a later write may succeed."""


#: The SQLite errors by which a ledger refuses a write for now, with what they mean.
_REFUSALS: Final = {
    sqlite3.SQLITE_FULL: "the disk is full", sqlite3.SQLITE_IOERR: "an I/O error",
    sqlite3.SQLITE_BUSY: "another connection held the write lock too long",
    sqlite3.SQLITE_LOCKED: "the ledger is locked", sqlite3.SQLITE_READONLY: "the ledger is read-only",
    sqlite3.SQLITE_CANTOPEN: "a file of the ledger cannot be opened",
}


def refusal(exc: BaseException) -> str | None:
    """Why the ledger refused a write, when ``exc`` says it did for a passing reason (a full
    disk, an I/O error, a lock held too long): a short reason; None for any other error."""
    if isinstance(exc, LedgerRefusing):
        return str(exc)
    if isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) is not None:
        reason = _REFUSALS.get(exc.sqlite_errorcode & 0xFF)
        return f"{reason} ({exc})" if reason else None
    if isinstance(exc, OSError) and exc.errno is not None:  # the log's fsync, or a file of the ledger
        return f"an I/O error ({exc.strerror or exc})"
    return None


# --------------------------------------------------------------------------- schema

_EVENT_COLUMNS: Final = (
    "ts_ms", "request_id", "series_id", "session", "agent", "input_tokens", "cached_input_tokens",
    "cache_write_tokens", "cache_write_1h_tokens", "output_tokens", "reasoning_tokens", "cost_nanos",
    "cost_source", "latency_ms", "status", "tags",
)
_DIMS_SQL: Final = ", ".join(ROLLUP_DIMENSIONS)
#: The rollup columns of schema 1 (its migration must create exactly these, forever).
_V1_SUM_COLUMNS: Final = (
    "requests", "errors", "blocked", "input_tokens", "cached_input_tokens", "cache_write_tokens",
    "output_tokens", "reasoning_tokens", "cost_nanos", "unpriced", "estimated", "latency_ms",
)
#: Every rollup column, in the order of ``Totals``; later schemas append (schema 8: one-hour cache writes).
_SUM_COLUMNS: Final = (*_V1_SUM_COLUMNS, "cache_write_1h_tokens")
#: What a chart needs: summed by default in timelines.
TIMELINE_FIELDS: Final = ("requests", "errors", "input_tokens", "output_tokens", "cost_nanos")
_ROLLUP_TABLES: Final = {"minute": MINUTE_MS, "hour": HOUR_MS, "day": DAY_MS}


def _rollup_table_sql(name: str) -> str:
    sums = ",\n    ".join(f"{col} INTEGER NOT NULL" for col in _V1_SUM_COLUMNS)
    return f"""
CREATE TABLE rollup_{name} (
    bucket_ms INTEGER NOT NULL,
    series_id INTEGER NOT NULL,
    {sums},
    PRIMARY KEY (bucket_ms, series_id)
) WITHOUT ROWID;
"""


# Each entry is one schema version; never edit a shipped one, append a new one.
# Value rules (non-negative counts, known statuses) are enforced by validate_event and
# asserted in _write; only the money invariant, an integer cost, is also a CHECK here,
# because SQLite evaluates CHECKs per row and they would halve the bulk insert rate.
# A *series* is one combination of the rollup dimensions; events and rollups refer to
# it by a small integer, so rollup keys are two integers and upserts stay cheap.
MIGRATIONS: Final[tuple[str, ...]] = (
    f"""
CREATE TABLE series (
    id INTEGER PRIMARY KEY,
    {", ".join(f"{d} TEXT NOT NULL" for d in ROLLUP_DIMENSIONS)},
    UNIQUE ({_DIMS_SQL})
);
CREATE TABLE usage_events (
    id INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    request_id TEXT NOT NULL UNIQUE,
    series_id INTEGER NOT NULL REFERENCES series (id),
    session TEXT NOT NULL,
    agent TEXT NOT NULL,
    input_tokens INTEGER NOT NULL,
    cached_input_tokens INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL,
    cost_nanos INTEGER NOT NULL CHECK (typeof(cost_nanos) = 'integer'),
    cost_source TEXT NOT NULL,
    latency_ms INTEGER NOT NULL,
    status TEXT NOT NULL,
    tags TEXT NOT NULL DEFAULT '{{}}'
);
CREATE INDEX usage_events_ts ON usage_events (ts_ms);
CREATE TRIGGER usage_events_append_only_update BEFORE UPDATE ON usage_events
BEGIN SELECT RAISE(ABORT, 'usage_events is append-only'); END;
CREATE TRIGGER usage_events_append_only_delete BEFORE DELETE ON usage_events
BEGIN SELECT RAISE(ABORT, 'usage_events is append-only'); END;
"""
    + "".join(_rollup_table_sql(name) for name in _ROLLUP_TABLES)
    + """
CREATE TABLE prices (
    model TEXT NOT NULL,
    workspace TEXT NOT NULL,
    effective_from_ms INTEGER NOT NULL,
    provider TEXT NOT NULL,
    spec TEXT NOT NULL,
    source TEXT NOT NULL,
    imported_at_ms INTEGER NOT NULL,
    PRIMARY KEY (model, workspace, effective_from_ms)
);
""",
    """
CREATE TABLE policies (
    id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE holds (
    id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    state TEXT NOT NULL,
    closed_ms INTEGER,
    context TEXT NOT NULL
);
CREATE INDEX holds_open ON holds (state, expires_ms);
CREATE TABLE hold_lines (
    hold_id TEXT NOT NULL REFERENCES holds (id),
    policy_id TEXT NOT NULL,
    amount INTEGER NOT NULL CHECK (typeof(amount) = 'integer' AND amount >= 0),
    PRIMARY KEY (hold_id, policy_id)
);
-- Every change to what is held, in order: how other processes learn of holds.
CREATE TABLE hold_journal (
    id INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    hold_id TEXT NOT NULL,
    policy_id TEXT NOT NULL,
    delta INTEGER NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE override_requests (
    id TEXT PRIMARY KEY,
    policy_id TEXT NOT NULL,
    requester TEXT NOT NULL,
    status TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    amount INTEGER NOT NULL,
    evaluation TEXT NOT NULL,
    policy_snapshot TEXT NOT NULL
);
CREATE UNIQUE INDEX override_requests_one_pending ON override_requests (policy_id, requester)
    WHERE status = 'pending';
""",
    """
CREATE TABLE alerts (
    id INTEGER PRIMARY KEY,
    policy_id TEXT NOT NULL,
    window_start_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    threshold INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL,
    value INTEGER NOT NULL,
    message TEXT NOT NULL,
    acked_by TEXT,
    acked_ms INTEGER,
    UNIQUE (policy_id, window_start_ms, kind, threshold)
);
CREATE TABLE webhooks (
    id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    kind TEXT NOT NULL,
    enabled INTEGER NOT NULL DEFAULT 1,
    created_ms INTEGER NOT NULL
);
CREATE TABLE budget_decisions (
    id INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    policy_id TEXT NOT NULL,
    decision TEXT NOT NULL,
    mode TEXT NOT NULL
);
CREATE TABLE webhook_deliveries (
    id INTEGER PRIMARY KEY,
    alert_id INTEGER NOT NULL REFERENCES alerts (id),
    webhook_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    detail TEXT NOT NULL
);
""",
    """
ALTER TABLE override_requests ADD COLUMN subject TEXT NOT NULL DEFAULT '';
ALTER TABLE override_requests ADD COLUMN reason TEXT NOT NULL DEFAULT '';
ALTER TABLE override_requests ADD COLUMN duration_ms INTEGER NOT NULL DEFAULT 3600000;
ALTER TABLE override_requests ADD COLUMN expires_ms INTEGER;
ALTER TABLE override_requests ADD COLUMN decided_by TEXT;
ALTER TABLE override_requests ADD COLUMN decided_ms INTEGER;
ALTER TABLE override_requests ADD COLUMN decision_reason TEXT;
ALTER TABLE override_requests ADD COLUMN granted INTEGER;
ALTER TABLE override_requests ADD COLUMN grant_expires_ms INTEGER;
ALTER TABLE override_requests ADD COLUMN grant_used INTEGER NOT NULL DEFAULT 0;
CREATE INDEX override_requests_grants ON override_requests (policy_id, requester, status);
ALTER TABLE holds ADD COLUMN grant_id TEXT;
ALTER TABLE holds ADD COLUMN grant_amount INTEGER NOT NULL DEFAULT 0;
CREATE TABLE members (
    workspace TEXT NOT NULL,
    user TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('owner', 'admin', 'operator', 'viewer')),
    added_ms INTEGER NOT NULL,
    added_by TEXT NOT NULL,
    PRIMARY KEY (workspace, user)
);
CREATE TABLE api_tokens (
    id TEXT PRIMARY KEY,
    prefix TEXT NOT NULL UNIQUE,
    hash BLOB NOT NULL,
    name TEXT NOT NULL,
    workspace TEXT NOT NULL,
    principal TEXT NOT NULL,
    team TEXT NOT NULL,
    scopes TEXT NOT NULL,
    rpm INTEGER,
    tpm INTEGER,
    created_ms INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    expires_ms INTEGER,
    last_used_ms INTEGER,
    revoked_ms INTEGER,
    revoked_by TEXT,
    rotated_from TEXT,
    replaced_by TEXT
);
CREATE TABLE audit_journal (
    id INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    subject TEXT NOT NULL,
    before TEXT NOT NULL,
    after TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
""",
    """
CREATE TABLE providers (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('openai-compatible', 'anthropic')),
    base_url TEXT NOT NULL,
    credential TEXT NOT NULL DEFAULT '',
    vendor TEXT NOT NULL DEFAULT '',
    models TEXT NOT NULL DEFAULT '[]',
    enabled INTEGER NOT NULL DEFAULT 1,
    created_ms INTEGER NOT NULL,
    created_by TEXT NOT NULL
);
CREATE TABLE provider_breakers (
    provider TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('closed', 'open', 'half_open')),
    since_ms INTEGER NOT NULL,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE TABLE routing_decisions (
    id INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    principal TEXT NOT NULL,
    mode TEXT NOT NULL,
    requested TEXT NOT NULL,
    chosen TEXT NOT NULL,
    applied TEXT NOT NULL,
    score REAL NOT NULL,
    requested_cost INTEGER NOT NULL,
    chosen_cost INTEGER NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX routing_decisions_ts ON routing_decisions (ts_ms);
""",
    """
CREATE TABLE gateways (
    id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_ms INTEGER NOT NULL,
    seen_ms INTEGER NOT NULL,
    stopped_ms INTEGER,
    requests INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    requests_last_min INTEGER NOT NULL DEFAULT 0,
    errors_last_min INTEGER NOT NULL DEFAULT 0
);
""",
    # A hold is one row: its lines ([[policy, amount], ...], JSON) in it rather than in a table
    # of their own, the table clustered on the id (ids begin with their creation time, so new
    # holds go at the end), and only open holds in the expiry index. A call's two commits
    # wrote 17 pages of the log; now 12.
    """
CREATE TABLE holds_v7 (
    id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    state TEXT NOT NULL,
    closed_ms INTEGER,
    context TEXT NOT NULL,
    grant_id TEXT,
    grant_amount INTEGER NOT NULL DEFAULT 0,
    lines TEXT NOT NULL
) WITHOUT ROWID;
INSERT INTO holds_v7 (id, request_id, created_ms, expires_ms, state, closed_ms, context, grant_id, grant_amount, lines)
SELECT h.id, h.request_id, h.created_ms, h.expires_ms, h.state, h.closed_ms, h.context, h.grant_id, h.grant_amount,
       coalesce((SELECT json_group_array(json_array(l.policy_id, l.amount)) FROM hold_lines l WHERE l.hold_id = h.id),
                '[]')
FROM holds h;
DROP TABLE hold_lines;
DROP TABLE holds;
ALTER TABLE holds_v7 RENAME TO holds;
CREATE INDEX holds_open ON holds (expires_ms) WHERE state = 'held';
""",
    # Anthropic's one-hour cache writes, a part of cache_write_tokens charged at their own rate.
    # Only columns added (with a default): a process of the previous version keeps working on it.
    """
ALTER TABLE usage_events ADD COLUMN cache_write_1h_tokens INTEGER NOT NULL DEFAULT 0;
"""
    + "".join(f"ALTER TABLE rollup_{name} ADD COLUMN cache_write_1h_tokens INTEGER NOT NULL DEFAULT 0;\n"
              for name in _ROLLUP_TABLES),
    # A call that settled above its hold on a policy (the provider counted more than the bound
    # held): the amounts in the policy's metric. A table only added: older processes are unaffected.
    """
CREATE TABLE overshoots (
    id INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    hold_id TEXT NOT NULL,
    policy_id TEXT NOT NULL,
    held INTEGER NOT NULL,
    settled INTEGER NOT NULL CHECK (settled > held)
);
CREATE INDEX overshoots_policy ON overshoots (policy_id, ts_ms);
""",
    # The audit journal becomes append-only to SQL, and its chain keyed by a key in the vault
    # named after the ledger's own id (engine.audit). ``audit_anchor_posts``: the days an anchor
    # was posted to the webhooks (one process a day posts it).
    """
CREATE TRIGGER audit_journal_no_update BEFORE UPDATE ON audit_journal
BEGIN SELECT RAISE(ABORT, 'the audit journal is append-only: an entry cannot be changed'); END;
CREATE TRIGGER audit_journal_no_delete BEFORE DELETE ON audit_journal
BEGIN SELECT RAISE(ABORT, 'the audit journal is append-only: an entry cannot be removed'); END;
CREATE TABLE ledger_identity (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    ledger_id TEXT NOT NULL
);
INSERT INTO ledger_identity (id, ledger_id) VALUES (1, lower(hex(randomblob(8))));
CREATE TRIGGER ledger_identity_no_update BEFORE UPDATE ON ledger_identity
BEGIN SELECT RAISE(ABORT, 'the ledger id cannot be changed'); END;
CREATE TRIGGER ledger_identity_no_delete BEFORE DELETE ON ledger_identity
BEGIN SELECT RAISE(ABORT, 'the ledger id cannot be removed'); END;
CREATE TABLE audit_anchor_posts (
    day INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    entry INTEGER NOT NULL,
    hash TEXT NOT NULL
);
""",
)
SCHEMA_VERSION: Final = len(MIGRATIONS)


def _statements(script: str) -> list[str]:
    """Split a migration into statements (triggers keep their inner semicolons)."""
    out: list[str] = []
    current = ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                out.append(current.strip())
            current = ""
    if current.strip():
        raise ValueError("migration ends in an incomplete statement")
    return out


# --------------------------------------------------------------------------- results


@dataclass(slots=True, frozen=True)
class ClosedHold:
    """What closing a hold gives back: its lines (policy, amount) and the override grant it drew on."""

    lines: list[tuple[str, int]]
    grant_id: str | None
    grant_amount: int


@dataclass(slots=True, frozen=True)
class RecordResult:
    request_id: str
    duplicate: bool
    cost_nanos: int
    cost_source: str


@dataclass(slots=True)
class Totals:
    """Sums over a set of rollup rows. Money is integer nano-dollars."""

    requests: int = 0
    errors: int = 0
    blocked: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost_nanos: int = 0
    unpriced: int = 0
    estimated: int = 0
    latency_ms: int = 0
    cache_write_1h_tokens: int = 0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def mean_latency_ms(self) -> float:
        return self.latency_ms / self.requests if self.requests else 0.0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_row(cls, row: Sequence[Any], offset: int = 0) -> Totals:
        return cls(*(int(v or 0) for v in row[offset:offset + len(_SUM_COLUMNS)]))


@dataclass(slots=True, frozen=True)
class TimelinePoint:
    bucket_ms: int
    group: str
    totals: Totals


@dataclass(slots=True, frozen=True)
class BreakdownRow:
    key: str
    totals: Totals


Metric = Literal["cost", "tokens", "requests", "errors"]
_ORDER: Final[Mapping[str, str]] = {  # columns of a per-series segment select, by position
    "cost": "sum(r.c8)",
    "tokens": "sum(r.c3) + sum(r.c6)",
    "requests": "sum(r.c0)",
    "errors": "sum(r.c1)",
}


class LedgerStore(Protocol):
    """What the engine needs from a ledger backend."""

    async def record(self, event: UsageEvent) -> RecordResult: ...
    async def record_many(self, events: Iterable[UsageEvent]) -> list[RecordResult]: ...
    async def totals(self, start_ms: int, end_ms: int,
                     filters: Mapping[str, str] | None = None) -> Totals: ...
    async def timeline(self, start_ms: int, end_ms: int, bucket_ms: int,
                       filters: Mapping[str, str] | None = None,
                       group_by: str | None = None,
                       fields: Sequence[str] = ...) -> list[TimelinePoint]: ...
    async def breakdown(self, start_ms: int, end_ms: int, by: str, *, limit: int = 10,
                        order: Metric = "cost",
                        filters: Mapping[str, str] | None = None) -> list[BreakdownRow]: ...
    async def close(self) -> None: ...


# --------------------------------------------------------------------------- helpers


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
    f"INSERT INTO usage_events ({', '.join(_EVENT_COLUMNS)}) VALUES ({', '.join('?' * len(_EVENT_COLUMNS))}) "
    "ON CONFLICT (request_id) DO NOTHING"
)
_JOURNAL_ROW: Final = "INSERT INTO hold_journal (ts_ms, hold_id, policy_id, delta, reason) VALUES (?, ?, ?, ?, ?)"
_INSERT_SERIES: Final = (
    f"INSERT INTO series ({_DIMS_SQL}) VALUES ({', '.join('?' * len(ROLLUP_DIMENSIONS))}) "
    f"ON CONFLICT ({_DIMS_SQL}) DO NOTHING"
)
_FIND_SERIES: Final = "SELECT id FROM series WHERE " + " AND ".join(f"{d} = ?" for d in ROLLUP_DIMENSIONS)


#: Each rollup column (_SUM_COLUMNS) as a sum over raw events.
_EVENT_SUMS: Final = (
    "count(*)", "sum(status = 'error')", "sum(status = 'blocked')", "sum(input_tokens)",
    "sum(cached_input_tokens)", "sum(cache_write_tokens)", "sum(output_tokens)", "sum(reasoning_tokens)",
    "sum(cost_nanos)", "sum(cost_source = 'unpriced')", "sum(cost_source = 'estimated')", "sum(latency_ms)",
    "sum(cache_write_1h_tokens)",
)
#: Columns of usage_events only (no rollup has them): reads by them sum raw events.
EVENT_DIMENSIONS: Final = ("agent", "session")
#: Every dimension the usage reads group and filter by.
READ_DIMENSIONS: Final = (*ROLLUP_DIMENSIONS, *EVENT_DIMENSIONS)


def _rollup_statements() -> tuple[tuple[str, bool], ...]:
    """The statements that fold a batch of new events (ids in (lo, hi]) into every rollup.

    The batch is summed once per minute into a temporary table, the minute sums once
    per hour into another; each rollup is then an upsert of already-grouped rows.
    Each statement comes with whether it takes the (lo, hi) parameters.
    """
    event_sums = _EVENT_SUMS
    columns = ", ".join(_SUM_COLUMNS)
    resum = ", ".join(f"sum({c})" for c in _SUM_COLUMNS)
    update = ", ".join(f"{c} = {c} + excluded.{c}" for c in _SUM_COLUMNS)

    def upsert(table: str, select: str) -> str:
        return (f"INSERT INTO rollup_{table} (bucket_ms, series_id, {columns}) {select} "
                f"ON CONFLICT (bucket_ms, series_id) DO UPDATE SET {update}")

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


_ROLLUP_STATEMENTS: Final = _rollup_statements()
SMALL_BATCH: Final = 16  # up to this many new events fold into the rollups from Python: three statements, not seven
_UPSERT_ROLLUP: Final = {
    name: f"INSERT INTO rollup_{name} (bucket_ms, series_id, {', '.join(_SUM_COLUMNS)}) VALUES "
          f"({', '.join('?' * (2 + len(_SUM_COLUMNS)))}) ON CONFLICT (bucket_ms, series_id) DO UPDATE SET "
          + ", ".join(f"{c} = {c} + excluded.{c}" for c in _SUM_COLUMNS)
    for name in _ROLLUP_TABLES
}


def _sums(e: UsageEvent) -> list[int]:
    """One event's contribution to each rollup column (_SUM_COLUMNS), as the rollup SQL sums it."""
    return [1, int(e.status == "error"), int(e.status == "blocked"), e.input_tokens, e.cached_input_tokens,
            e.cache_write_tokens, e.output_tokens, e.reasoning_tokens, e.cost_nanos or 0,
            int(e.cost_source == "unpriced"), int(e.cost_source == "estimated"), e.latency_ms,
            e.cache_write_1h_tokens]


def _fold_small(conn: sqlite3.Connection, events: list[UsageEvent], series_ids: list[int]) -> None:
    """Fold a few new events into every rollup (a settlement's one event, mostly)."""
    for table, size in _ROLLUP_TABLES.items():
        buckets: dict[tuple[int, int], list[int]] = {}
        for e, series_id in zip(events, series_ids, strict=True):
            key = (e.ts_ms - e.ts_ms % size, series_id)
            add = _sums(e)
            if (sums := buckets.get(key)) is None:
                buckets[key] = add
            else:
                buckets[key] = [a + b for a, b in zip(sums, add, strict=True)]
        conn.executemany(_UPSERT_ROLLUP[table], [(*key, *sums) for key, sums in buckets.items()])
_TEMP_TABLES: Final = tuple(
    f"CREATE TEMP TABLE IF NOT EXISTS batch_{name} (bucket_ms INTEGER, series_id INTEGER, "
    f"{', '.join(f'{c} INTEGER' for c in _SUM_COLUMNS)})" for name in ("minute", "hour"))


def _floor(ms: int, size: int) -> int:
    return ms - ms % size


def _ceil(ms: int, size: int) -> int:
    return -((-ms) // size) * size


def range_segments(start_ms: int, end_ms: int) -> list[tuple[str, int, int]]:
    """Cover [start, end) with as few rollup rows as possible: days inside, hours and minutes at the edges.

    Both ends are widened to whole minutes (the finest rollup), so the current
    minute's events are included.
    """
    start = _floor(start_ms, MINUTE_MS)
    end = _ceil(end_ms, MINUTE_MS)
    if end <= start:
        return []
    segments: list[tuple[str, int, int]] = []
    h0, h1 = _ceil(start, HOUR_MS), _floor(end, HOUR_MS)
    if h0 >= h1:
        return [("minute", start, end)]
    d0, d1 = _ceil(h0, DAY_MS), _floor(h1, DAY_MS)
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


def _filter_sql(filters: Mapping[str, str] | None) -> tuple[str, list[Any]]:
    if not filters:
        return "", []
    clauses, params = [], []
    for dim, value in filters.items():
        if dim not in ROLLUP_DIMENSIONS:
            raise FieldError("filter", f"cannot filter by {dim!r}; use one of {', '.join(ROLLUP_DIMENSIONS)}")
        clauses.append(f"{dim} = ?")
        params.append(value)
    return f" AND series_id IN (SELECT id FROM series WHERE {' AND '.join(clauses)})", params


def _needs_events(filters: Mapping[str, str] | None, *groups: str | None) -> bool:
    """Whether a read names an event-only dimension, so it must sum raw events."""
    return any(d in EVENT_DIMENSIONS for d in (*(filters or {}), *groups))


def _check_dimension(dim: str, field: str) -> None:
    if dim not in READ_DIMENSIONS:
        raise FieldError(field, f"must be one of {', '.join(READ_DIMENSIONS)} (got {dim!r})")


def _event_column(dim: str) -> str:
    return f"e.{dim}" if dim in EVENT_DIMENSIONS else f"s.{dim}"


def _events_sql(start_ms: int, end_ms: int, filters: Mapping[str, str] | None, *, bucket_ms: int = 0,
                group_by: str | None = None, fields: Sequence[str] = _SUM_COLUMNS) -> tuple[str, list[Any]]:
    """Sums (of ``fields``; the others are 0) of raw events in [start, end), widened to whole
    minutes as the rollups are, per (bucket, group): ``SELECT b, g, c0, c1, ...``. For reads by
    agent or session, which the rollups do not keep: bounded by the time index, one pass over
    the period's events."""
    clauses = ["e.ts_ms >= ?", "e.ts_ms < ?"]
    params: list[Any] = [_floor(start_ms, MINUTE_MS), _ceil(end_ms, MINUTE_MS)]
    for dim, value in (filters or {}).items():
        _check_dimension(dim, "filter")
        clauses.append(f"{_event_column(dim)} = ?")
        params.append(value)
    bucket = f"e.ts_ms - e.ts_ms % {bucket_ms}" if bucket_ms else "0"
    group = _event_column(group_by) if group_by else "''"
    join = " JOIN series s ON s.id = e.series_id" if any(
        d not in EVENT_DIMENSIONS for d in (*(filters or {}), *([group_by] if group_by else []))) else ""
    sums = ", ".join(f"{expr if column in fields else 0} AS c{i}"
                     for i, (expr, column) in enumerate(zip(_EVENT_SUMS, _SUM_COLUMNS, strict=True)))
    return (f"SELECT {bucket} AS b, {group} AS g, {sums} FROM usage_events e{join} "
            f"WHERE {' AND '.join(clauses)} GROUP BY b, g"), params


def _sum_select() -> str:
    return ", ".join(f"sum({c})" for c in _SUM_COLUMNS)


def _segments_sql(start_ms: int, end_ms: int, filters: Mapping[str, str] | None,
                  *, per_series: bool) -> tuple[str, list[Any]]:
    """A UNION ALL over the rollup segments covering [start, end); sums are named c0, c1, ..."""
    where, params = _filter_sql(filters)
    aliased = ", ".join(f"sum({c}) AS c{i}" for i, c in enumerate(_SUM_COLUMNS))
    head = f"SELECT series_id, {aliased}" if per_series else f"SELECT {aliased}"
    tail = " GROUP BY series_id" if per_series else ""
    parts, args = [], []
    for table, lo, hi in range_segments(start_ms, end_ms):
        parts.append(f"{head} FROM rollup_{table} WHERE bucket_ms >= ? AND bucket_ms < ?{where}{tail}")
        args += [lo, hi, *params]
    return " UNION ALL ".join(parts), args


# --------------------------------------------------------------------------- transactions


class LedgerTx:
    """What a group-committed operation may do inside the writer's transaction.

    Used only on the writer's thread, between BEGIN IMMEDIATE and COMMIT, so every read
    sees every other process's committed writes and nothing can change underneath.
    """

    def __init__(self, store: SQLiteStore, conn: sqlite3.Connection, fresh: dict[tuple[str, ...], int],
                 quiet: bool = False) -> None:
        self.store = store
        self.conn = conn
        self._fresh = fresh
        # Nothing was written to the ledger since this store's last operation batch, by another
        # connection or by this one outside a batch: what that batch left in memory is current.
        self.quiet = quiet
        self.last_journal_id = 0  # the id of the last hold journal row this transaction wrote
        self.appended_id = 0  # the id of the event the last append() of one event wrote (0: none, or unknown)

    def _journal(self, rows: Sequence[tuple[int, str, str, int, str]]) -> None:
        """Append hold journal rows (ts, hold, policy, delta, reason) in one statement."""
        if not rows:
            return
        if len(rows) > 500:  # past SQLite's limit on the parameters of one statement
            self.conn.executemany(_JOURNAL_ROW, rows)
            self.last_journal_id = self.max_journal_id()
            return
        cursor = self.conn.execute(_JOURNAL_ROW + ", (?, ?, ?, ?, ?)" * (len(rows) - 1),
                                   [value for row in rows for value in row])
        self.last_journal_id = int(cursor.lastrowid or self.max_journal_id())

    def probe_write(self) -> None:
        """Write the schema version as it is: a real write (a page of the log) that changes
        nothing, to learn whether the ledger takes writes again."""
        version = int(self.conn.execute("PRAGMA user_version").fetchone()[0])
        self.conn.execute(f"PRAGMA user_version = {version}")

    def max_event_id(self) -> int:
        return int(self.conn.execute("SELECT coalesce(max(id), 0) FROM usage_events").fetchone()[0])

    def max_journal_id(self) -> int:
        return int(self.conn.execute("SELECT coalesce(max(id), 0) FROM hold_journal").fetchone()[0])

    def events_since(self, last_id: int) -> list[tuple[Any, ...]]:
        """(id, ts_ms, workspace, team, principal, token_id, provider, model, session, agent,
        input_tokens, output_tokens, cost_nanos, status) of every event after ``last_id``."""
        return self.conn.execute(
            "SELECT e.id, e.ts_ms, s.workspace, s.team, s.principal, s.token_id, s.provider, s.model, e.session, "
            "e.agent, e.input_tokens, e.output_tokens, e.cost_nanos, e.status FROM usage_events e "
            "JOIN series s ON s.id = e.series_id WHERE e.id > ? ORDER BY e.id", (last_id,)).fetchall()

    def events_between(self, start_ms: int, end_ms: int, where: Mapping[str, str]) -> tuple[int, int, int]:
        """(cost, tokens, requests) of raw events in [start, end) matching ``where`` (any event column)."""
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
        return int(row[0]), int(row[1]), int(row[2])

    def rollup_between(self, start_ms: int, end_ms: int, where: Mapping[str, str]) -> tuple[int, int, int]:
        """(cost, tokens, requests) over [start, end) from the rollups (minute precision)."""
        sql, args = _segments_sql(start_ms, end_ms, where or None, per_series=False)
        if not sql:
            return 0, 0, 0
        # c0 requests, c2 blocked, c3 input, c6 output, c8 cost
        row = self.conn.execute(
            f"SELECT coalesce(sum(c8), 0), coalesce(sum(c3) + sum(c6), 0), coalesce(sum(c0) - sum(c2), 0) "
            f"FROM ({sql})", args).fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    def minute_sums(self, start_ms: int, end_ms: int, where: Mapping[str, str],
                    *, raw: bool = False) -> list[tuple[int, int, int, int]]:
        """(minute, cost, tokens, requests) per minute over [start, end), from the minute
        rollups, or from raw events when ``where`` names a session or an agent."""
        if raw:
            clauses = ["e.ts_ms >= ?", "e.ts_ms < ?"]
            params: list[Any] = [start_ms, end_ms]
            for column, value in where.items():
                clauses.append(f"{'e' if column in ('session', 'agent') else 's'}.{column} = ?")
                params.append(value)
            sql = ("SELECT e.ts_ms - e.ts_ms % 60000 AS m, sum(e.cost_nanos), sum(e.input_tokens + e.output_tokens), "
                   "sum(e.status != 'blocked') FROM usage_events e JOIN series s ON s.id = e.series_id "
                   f"WHERE {' AND '.join(clauses)} GROUP BY m")
            rows = self.conn.execute(sql, params).fetchall()
        else:
            filt, fparams = _filter_sql(where or None)
            rows = self.conn.execute(
                "SELECT bucket_ms, sum(cost_nanos), sum(input_tokens) + sum(output_tokens), sum(requests) - "
                f"sum(blocked) FROM rollup_minute WHERE bucket_ms >= ? AND bucket_ms < ?{filt} GROUP BY bucket_ms",
                [start_ms, end_ms, *fparams]).fetchall()
        return [(int(m), int(c), int(t), int(r)) for m, c, t, r in rows]

    def append(self, events: list[UsageEvent]) -> list[RecordResult]:
        self.store.appended_id = 0
        _, new_ids = self.store._append(self.conn, events, self._fresh)
        self.appended_id = self.store.appended_id
        return [RecordResult(e.request_id, new_ids is not None and e.request_id not in new_ids,
                             e.cost_nanos or 0, e.cost_source) for e in events]

    def journal_since(self, last_id: int) -> list[tuple[int, str, int]]:
        return self.conn.execute(
            "SELECT id, policy_id, delta FROM hold_journal WHERE id > ? ORDER BY id", (last_id,)).fetchall()

    def open_hold(self, hold_id: str, request_id: str, now_ms: int, expires_ms: int, context: str,
                  lines: Sequence[tuple[str, int]]) -> int:
        """Record a hold and its lines (policy, amount); returns the last journal id written."""
        for _, amount in lines:
            if type(amount) is not int or amount < 0:
                raise ValueError(f"hold {hold_id}: an amount must be a non-negative integer, not {amount!r}")
        self.conn.execute("INSERT INTO holds (id, request_id, created_ms, expires_ms, state, context, lines) "
                          "VALUES (?, ?, ?, ?, 'held', ?, ?)",
                          (hold_id, request_id, now_ms, expires_ms, context, json.dumps(lines)))
        self._journal([(now_ms, hold_id, p, a, "hold") for p, a in lines])
        return self.last_journal_id if lines else self.max_journal_id()

    def close_hold(self, hold_id: str, state: str, now_ms: int) -> ClosedHold | None:
        """Close an open hold (settled, released or expired): its lines and grant, or None if
        it was not open (then nothing was written). An UPDATE, then a SELECT of the row it
        changed: five times quicker than one UPDATE ... RETURNING (11 us against 2)."""
        if not self.conn.execute("UPDATE holds SET state = ?, closed_ms = ? WHERE id = ? AND state = 'held'",
                                 (state, now_ms, hold_id)).rowcount:
            return None
        row = self.conn.execute("SELECT lines, grant_id, grant_amount FROM holds WHERE id = ?", (hold_id,)).fetchone()
        lines = [(str(p), int(a)) for p, a in json.loads(row[0])]
        self._journal([(now_ms, hold_id, p, -a, state) for p, a in lines])
        return ClosedHold(lines, row[1], int(row[2]))

    def hold_state(self, hold_id: str) -> str | None:
        row = self.conn.execute("SELECT state FROM holds WHERE id = ?", (hold_id,)).fetchone()
        return None if row is None else str(row[0])

    def expired_holds(self, now_ms: int) -> list[str]:
        return [str(r[0]) for r in self.conn.execute(
            "SELECT id FROM holds WHERE state = 'held' AND expires_ms <= ?", (now_ms,))]

    def held_totals(self) -> dict[str, int]:
        """What the open holds hold, per policy."""
        totals: dict[str, int] = {}
        for (lines,) in self.conn.execute("SELECT lines FROM holds WHERE state = 'held'"):
            for policy_id, amount in json.loads(lines):
                totals[policy_id] = totals.get(policy_id, 0) + int(amount)
        return totals

    def policy_specs(self) -> list[str]:
        return [str(r[0]) for r in self.conn.execute("SELECT spec FROM policies WHERE deleted = 0 ORDER BY id")]

    def policies_version(self) -> tuple[int, int]:
        row = self.conn.execute("SELECT count(*), coalesce(max(updated_ms), 0) FROM policies").fetchone()
        return int(row[0]), int(row[1])

    def save_policy(self, policy_id: str, spec: str, now_ms: int, *, deleted: bool = False) -> None:
        self.store._policies_saved = True  # the next batch is not quiet: it reads the policies again
        self.conn.execute(
            "INSERT INTO policies (id, spec, deleted, updated_ms) VALUES (?, ?, ?, ?) ON CONFLICT (id) DO UPDATE "
            "SET spec = excluded.spec, deleted = excluded.deleted, updated_ms = excluded.updated_ms",
            (policy_id, spec, int(deleted), now_ms))

    def raise_alert(self, policy_id: str, window_start_ms: int, kind: str, threshold: int, now_ms: int,
                    value: int, message: str) -> int | None:
        """Store an alert once per policy, window, kind and threshold; its id, or None if already
        there. A threshold alert is not stored either when a higher threshold of the policy has
        fired in the window (a lower one never fires after it)."""
        cur = self.conn.execute(
            "INSERT INTO alerts (policy_id, window_start_ms, kind, threshold, ts_ms, value, message) "
            "SELECT ?, ?, ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM alerts WHERE policy_id = ? "
            "AND window_start_ms = ? AND kind = 'threshold' AND ? = 'threshold' AND threshold > ?) "
            "ON CONFLICT (policy_id, window_start_ms, kind, threshold) DO NOTHING",
            (policy_id, window_start_ms, kind, threshold, now_ms, value, message, policy_id, window_start_ms, kind,
             threshold))
        return cur.lastrowid if cur.rowcount else None


    def record_overshoot(self, now_ms: int, request_id: str, hold_id: str, policy_id: str, held: int,
                         settled: int) -> int:
        """Record a call settled above its hold on a policy; the overshoot's id."""
        cur = self.conn.execute("INSERT INTO overshoots (ts_ms, request_id, hold_id, policy_id, held, settled) "
                                "VALUES (?, ?, ?, ?, ?, ?)", (now_ms, request_id, hold_id, policy_id, held, settled))
        return int(cur.lastrowid or 0)

    def overshoots(self, since_ms: int = 0) -> list[tuple[int, int, str, str, int, int]]:
        """(id, ts, request id, policy, held, settled) of each overshoot since ``since_ms``, oldest first."""
        return self.conn.execute("SELECT id, ts_ms, request_id, policy_id, held, settled FROM overshoots "
                                 "WHERE ts_ms >= ? ORDER BY id", (since_ms,)).fetchall()

    def alerts(self, *, include_acked: bool, limit: int) -> list[tuple[Any, ...]]:
        where = "" if include_acked else "WHERE acked_ms IS NULL"
        return self.conn.execute(
            "SELECT id, policy_id, window_start_ms, kind, threshold, ts_ms, value, message, acked_by, acked_ms "
            f"FROM alerts {where} ORDER BY ts_ms DESC, id DESC LIMIT ?", (limit,)).fetchall()

    def ack_alert(self, alert_id: int, actor: str, now_ms: int) -> bool | None:
        """Acknowledge an alert (once): True if acknowledged now, False if it already was, None
        if there is no such alert."""
        row = self.conn.execute("SELECT acked_ms FROM alerts WHERE id = ?", (alert_id,)).fetchone()
        if row is None:
            return None
        if row[0] is None:
            self.conn.execute("UPDATE alerts SET acked_by = ?, acked_ms = ? WHERE id = ?", (actor, now_ms, alert_id))
        return row[0] is None

    def add_webhook(self, webhook_id: str, url: str, kind: str, now_ms: int) -> None:
        self.conn.execute("INSERT INTO webhooks (id, url, kind, enabled, created_ms) VALUES (?, ?, ?, 1, ?)",
                          (webhook_id, url, kind, now_ms))

    def remove_webhook(self, webhook_id: str) -> tuple[str, str] | None:
        """Disable an enabled webhook and forget its URL (a secret); its (url, kind), or None if
        there is no such webhook. The row stays for its deliveries."""
        row = self.conn.execute("SELECT url, kind FROM webhooks WHERE id = ? AND enabled = 1",
                                (webhook_id,)).fetchone()
        if row is not None:
            self.conn.execute("UPDATE webhooks SET enabled = 0, url = '' WHERE id = ?", (webhook_id,))
        return (str(row[0]), str(row[1])) if row else None

    def save_prices(self, rows: Sequence[tuple[str, str, int, str, str, str, int]]) -> None:
        """Store price versions (model, workspace, effective_from_ms, provider, spec, source, imported_at)."""
        self.conn.executemany(
            "INSERT INTO prices (model, workspace, effective_from_ms, provider, spec, source, imported_at_ms)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (model, workspace, effective_from_ms) DO UPDATE SET"
            " provider = excluded.provider, spec = excluded.spec, source = excluded.source,"
            " imported_at_ms = excluded.imported_at_ms", rows)

    def webhooks(self) -> list[tuple[str, str, str]]:
        """(id, url, kind) of enabled webhooks. The URL is a secret: callers redact it."""
        return [(str(i), str(u), str(k)) for i, u, k in self.conn.execute(
            "SELECT id, url, kind FROM webhooks WHERE enabled = 1 ORDER BY created_ms")]

    def log_deliveries(self, rows: Sequence[tuple[int, str, int, int, int, str]]) -> None:
        self.conn.executemany("INSERT INTO webhook_deliveries (alert_id, webhook_id, attempt, ts_ms, ok, detail) "
                              "VALUES (?, ?, ?, ?, ?, ?)", rows)

    def deliveries(self, alert_id: int) -> list[tuple[str, int, bool, str]]:
        return [(str(w), int(a), bool(ok), str(d)) for w, a, ok, d in self.conn.execute(
            "SELECT webhook_id, attempt, ok, detail FROM webhook_deliveries WHERE alert_id = ? ORDER BY id",
            (alert_id,))]

    def open_hold_count(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM holds WHERE state = 'held'").fetchone()[0])

    def record_decision(self, ts_ms: int, request_id: str, policy_id: str, decision: str, mode: str) -> None:
        """Keep a would-block verdict of a dry_run or suggest policy, for the operator to review."""
        self.conn.execute("INSERT INTO budget_decisions (ts_ms, request_id, policy_id, decision, mode) "
                          "VALUES (?, ?, ?, ?, ?)", (ts_ms, request_id, policy_id, decision, mode))

    def decisions(self, limit: int) -> list[tuple[int, str, str, str, str]]:
        return [(int(t), str(r), str(p), str(d), str(m)) for t, r, p, d, m in self.conn.execute(
            "SELECT ts_ms, request_id, policy_id, decision, mode FROM budget_decisions ORDER BY id DESC LIMIT ?",
            (limit,))]


TxOp = Callable[[LedgerTx], Any]


# --------------------------------------------------------------------------- the store


class SQLiteStore:
    """The SQLite ledger. Open with ``await SQLiteStore.open(path)``."""

    def __init__(self, path: Path, writer: aiosqlite.Connection, reader: aiosqlite.Connection,
                 durable: bool = True, sync_interval_s: float = 0.0) -> None:
        self.path = path
        self._writer = writer
        self._reader = reader
        self._pending: list[tuple[UsageEvent, asyncio.Future[RecordResult]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        self._closed = False
        self.commits = 0  # group-commit transactions so far (for benchmarks and tests)
        self.appended_id = 0  # set by _append when it writes one event: that event's id
        self._series: dict[tuple[str, ...], int] = {}  # dimension combination -> series id
        self._ops: list[tuple[TxOp, asyncio.Future[Any], bool]] = []
        self.durable = durable  # a batch of operations that need no fsync commits without one
        self._synced = durable  # the writer's synchronous setting is FULL
        self._op_flusher: asyncio.Task[None] | None = None
        # With sync_interval_s, operations that need an fsync are committed without one (safe
        # from a process crash at once) and the log is fsynced within that many seconds.
        self.sync_interval_s = sync_interval_s if durable else 0.0
        self._seen: tuple[int, int] | None = None  # (data_version, commits) after the last batch
        self._policies_saved = False  # a batch changed a policy (see LedgerTx.quiet)
        self._waits = True  # the writer's busy timeout is set: BEGIN waits for another process
        self._written = 0  # operations and events written since the last checkpoint was started
        self._checkpointing: asyncio.Future[Any] | None = None
        self.checkpoints = 0  # checkpoints of the log made (for tests)
        self._deferred = 0  # commits made without an fsync (counted on the writer's thread only)
        self._synced_upto = 0  # how many of those an fsync has covered (set on the event loop only)
        self._syncer: asyncio.TimerHandle | None = None
        self._syncing: asyncio.Task[None] | None = None
        self.syncs = 0  # fsyncs of the log made for deferred commits (for tests and benchmarks)
        self._hooks: list[tuple[Callable[[LedgerTx], None], Callable[[], None]]] = []
        self._end_hooks: list[Callable[[LedgerTx], None]] = []

    # ---- opening

    @classmethod
    async def open(cls, path: str | Path, *, durable: bool = True, sync_interval_s: float = 0.0) -> SQLiteStore:
        """Open (creating and migrating if needed) the ledger at ``path``.

        ``durable`` makes every commit reach the disk (synchronous=FULL); group commit
        keeps that affordable. Without it a commit survives a process crash but not
        a power cut.

        ``sync_interval_s`` > 0 (the gateway's choice) bounds instead of removes the fsync's
        cost for ``transact``: a commit is acknowledged once it is in the log (it survives
        the process being killed), and the log reaches the disk within that many seconds, so
        a power cut loses at most that long of acknowledged operations, never a half of one.
        """
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the ledger's folder {path.parent}: {exc.strerror}") from None
        writer = await _connect(path, durable, any_thread=True)
        try:
            await _migrate(writer, path)
            # The writer never checkpoints the log itself: its commits may run on the event loop,
            # which must not stall copying megabytes. The reader does it, on its own thread.
            await writer.execute("PRAGMA wal_autocheckpoint = 0")
            # A log that grew long (an import, a reader that kept an old snapshot) is cut back
            # to this when it next starts again, rather than keep its size on the disk for ever.
            await writer.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            for sql in _TEMP_TABLES:
                await writer.execute(sql)
            reader = await _connect(path, durable)
        except BaseException:
            await writer.close()
            raise
        return cls(path, writer, reader, durable, sync_interval_s)

    async def close(self) -> None:
        if self._closed:
            return
        await self.flush()
        self._closed = True
        if self._syncer is not None:
            self._syncer.cancel()
        await self._sync_log()
        if self._checkpointing is not None:
            await asyncio.gather(self._checkpointing, return_exceptions=True)
        if self._written:  # what this store wrote since its last checkpoint (another may keep the log open)
            await self._checkpoint()
        await self._writer.close()
        await self._reader.close()

    async def schema_version(self) -> int:
        async with self._reader.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    @property
    def policies_saved(self) -> bool:
        """This store changed a policy that no batch has read back yet."""
        return self._policies_saved

    async def data_version(self) -> int:
        """A number that changes whenever another connection commits (cheap change detection)."""
        async with self._reader.execute("PRAGMA data_version") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    # ---- writing

    async def record(self, event: UsageEvent) -> RecordResult:
        """Append one event; returns once it is committed. Concurrent calls share a transaction."""
        if self._closed:
            raise StoreError("the ledger is closed")
        future: asyncio.Future[RecordResult] = asyncio.get_running_loop().create_future()
        self._pending.append((event, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop())
        return await future

    def add_transaction_hooks(self, begin: Callable[[LedgerTx], None], abort: Callable[[], None],
                              end: Callable[[LedgerTx], None] | None = None) -> None:
        """``begin`` runs first in every operation batch (to catch up with other processes),
        ``end`` last before the commit, and ``abort`` when a batch is rolled back."""
        self._hooks.append((begin, abort))
        if end is not None:
            self._end_hooks.append(end)

    async def transact(self, op: TxOp, *, sync: bool = True) -> Any:
        """Run ``op`` on the writer's thread inside a write transaction, group-committed with
        other operations; returns its result once committed. A failing op is rolled back
        to its savepoint alone and its error raised to its caller.

        ``sync=False``: the change need not survive a power cut (a hold for a call under way:
        the call would not survive it either). It is committed, visible to every process and
        safe from a process crash, but a batch of such operations alone skips the fsync; the
        next durable commit makes it durable too, as the log is written in order."""
        if self._closed:
            raise StoreError("the ledger is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._ops.append((op, future, sync))
        if self._op_flusher is None or self._op_flusher.done():
            self._op_flusher = asyncio.create_task(self._op_loop())
        return await future

    async def _op_loop(self) -> None:
        while self._ops:
            batch, self._ops = self._ops[:MAX_BATCH], self._ops[MAX_BATCH:]
            try:
                ops, sync = [op for op, _, _ in batch], any(sync for _, _, sync in batch)
                async with self._write_lock:
                    # A small batch runs here, on the event loop: two thread hand-offs cost more
                    # than its work. If another process holds the ledger, or the batch is large,
                    # it runs on the writer's thread, which may wait without stalling the loop.
                    results = None
                    if len(ops) <= INLINE_BATCH:
                        try:
                            results = self._ops_sync(ops, sync, wait=False)
                        except _Busy:
                            pass
                    if results is None:
                        results = await self._writer._execute(self._ops_sync, ops, sync)  # type: ignore[no-untyped-call]
                self._wrote(len(ops))
            except Exception as exc:
                for _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            if self._deferred != self._synced_upto and self._syncer is None:
                self._syncer = asyncio.get_running_loop().call_later(self.sync_interval_s, self._start_sync)
            for (_, fut, _), (ok, value) in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)

    def _start_sync(self) -> None:
        self._syncer = None
        if self._syncing is None or self._syncing.done():
            self._syncing = asyncio.ensure_future(self._sync_log())

    async def _sync_log(self) -> None:
        """fsync the write-ahead log: every commit made before this call is then on the disk.
        On another thread, so neither the event loop nor the writer waits for the disk."""
        upto = self._deferred
        if upto == self._synced_upto:
            return
        await asyncio.to_thread(_fsync, Path(f"{self.path}-wal"))
        self._synced_upto = upto  # commits made meanwhile wait for the next sync
        self.syncs += 1
        if self._deferred != upto and self._syncer is None and not self._closed:
            self._syncer = asyncio.get_running_loop().call_later(self.sync_interval_s, self._start_sync)

    def _wrote(self, count: int) -> None:
        """Count what was written; past CHECKPOINT_EVERY, checkpoint the log on the reader's
        thread (a passive checkpoint: it copies what is committed and never blocks a writer)."""
        self._written += count
        if self._written < CHECKPOINT_EVERY or (self._checkpointing is not None and not self._checkpointing.done()):
            return
        self._written = 0
        self._checkpointing = asyncio.ensure_future(self._checkpoint())

    async def _checkpoint(self) -> None:
        """Copy the log into the database, so that the next write starts the log again from its
        beginning. A passive checkpoint copies what was committed when it began; this store's
        writers go on meanwhile, so a second one copies the rest while they wait (briefly: the
        rest is what they wrote during the first). Without it a log under steady load is never
        wholly copied and never restarted: it grew by 55 MB every thousand gateway calls, and
        each commit cost more as it did. The second runs on the writer's own thread, idle while
        the lock is held: on the reader's it would wait behind whatever reports are queued
        there, and every write with it."""
        try:
            commits = self.commits
            async with self._reader.execute("PRAGMA wal_checkpoint(PASSIVE)") as cur:
                await cur.fetchone()
            if self.commits != commits:  # this store wrote meanwhile: copy that too
                async with self._write_lock:
                    await self._writer._execute(_checkpoint_sync, self._writer._conn)  # type: ignore[no-untyped-call]
        except sqlite3.Error:  # a busy or failed checkpoint: the next one copies what this did not
            return
        self.checkpoints += 1

    def _ops_sync(self, ops: list[TxOp], sync: bool = True, wait: bool = True) -> list[tuple[bool, Any]]:
        """One operation batch in one transaction; ``wait=False`` raises _Busy at once, and
        starts nothing, if another connection holds the ledger's write lock."""
        conn: sqlite3.Connection = self._writer._conn
        fresh: dict[tuple[str, ...], int] = {}
        tx = LedgerTx(self, conn, fresh)
        results: list[tuple[bool, Any]] = []
        deferred = sync and self.sync_interval_s > 0
        self._synchronous(sync and not deferred, wait)
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if not wait and exc.sqlite_errorcode == sqlite3.SQLITE_BUSY:
                raise _Busy from None
            raise
        seen, self._seen, self._policies_saved = self._seen, None, False
        try:
            # data_version moves when another connection commits; self.commits when this store
            # writes outside a batch (record, bulk_record).
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            tx.quiet = seen == (version, self.commits)
            for begin, _ in self._hooks:
                begin(tx)
            if len(ops) == 1:  # no savepoint: if it fails, the batch is undone whole (below), which is the same
                results.append((True, ops[0](tx)))
            else:
                for op in ops:
                    conn.execute("SAVEPOINT op")
                    try:
                        results.append((True, op(tx)))
                        conn.execute("RELEASE op")
                    except Exception as exc:  # this op alone is undone; the others go on
                        conn.execute("ROLLBACK TO op")
                        conn.execute("RELEASE op")
                        results.append((False, exc))
            for end in self._end_hooks:
                end(tx)
            conn.execute("COMMIT")
        except BaseException:
            self._rollback_sync()
            for _, abort in self._hooks:
                abort()
            raise
        self._series.update(fresh)
        self.commits += 1
        self._seen = None if self._policies_saved else (version, self.commits)
        if deferred:
            self._deferred += 1
        return results

    def _synchronous(self, sync: bool, wait: bool = True) -> None:
        """Wherever the writer runs: whether the next commit waits for the disk (a durable
        store's commits do unless the operation said it need not), and whether the next BEGIN
        waits for another process's write lock (else it fails at once). Set only on change."""
        if self.durable and sync != self._synced:
            self._writer._conn.execute(f"PRAGMA synchronous = {'FULL' if sync else 'NORMAL'}")
            self._synced = sync
        if wait != self._waits:
            self._writer._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS if wait else 0}")
            self._waits = wait

    async def flush(self) -> None:
        """Wait until every pending ``record()`` and operation is committed."""
        for task in (self._flusher, self._op_flusher):
            while task is not None and not task.done():
                await asyncio.shield(task)

    async def _flush_loop(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            try:
                results = await self._write([e for e, _ in batch])
            except Exception as exc:  # every caller of this batch learns of the failure
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)

    async def record_many(self, events: Iterable[UsageEvent]) -> list[RecordResult]:
        """Append many events in one transaction: all are written or none is."""
        return await self._write(list(events))

    async def bulk_record(self, events: Iterable[UsageEvent], *, chunk: int = BULK_CHUNK, atomic: bool = False,
                          prepare: Callable[[UsageEvent], object] | None = None,
                          journal: Callable[[sqlite3.Connection, int, int], None] | None = None) -> tuple[int, int]:
        """Append a large stream; returns (recorded, duplicates).

        Each chunk of ``chunk`` events is one transaction, so a long import does not hold
        the write lock against live traffic for its whole length; ``atomic`` makes the
        whole stream one transaction instead (all or nothing). ``prepare`` (pricing) runs on
        the writer's thread just before each chunk is written: Python work on two threads
        at once would only fight over the GIL. ``journal(conn, recorded, duplicates)`` runs
        last in each transaction, before its commit (with that transaction's counts); if it
        raises, that transaction is undone and the error raised.
        """
        run = self._writer._execute
        source = iter(events)
        fresh: dict[tuple[str, ...], int] = {}
        recorded = duplicates = 0
        async with self._write_lock:
            if atomic:
                await run(self._synchronous, True)  # type: ignore[no-untyped-call]
                await run(self._writer._conn.execute, "BEGIN IMMEDIATE")  # type: ignore[no-untyped-call]
            pending: asyncio.Future[tuple[int, int]] | None = None
            try:
                while True:
                    batch = list(islice(source, chunk))
                    if pending is not None:
                        done, pending = pending, None
                        r, d = await done
                        recorded, duplicates = recorded + r, duplicates + d
                        self._wrote(r + d)
                    if not batch:
                        break
                    pending = asyncio.ensure_future(run(  # type: ignore[no-untyped-call]
                        self._bulk_chunk_sync, batch, fresh, atomic, prepare, journal))
                if atomic:
                    if journal is not None:
                        await run(journal, self._writer._conn, recorded, duplicates)  # type: ignore[no-untyped-call]
                    await run(self._commit_sync, fresh)  # type: ignore[no-untyped-call]
            except BaseException:
                if pending is not None:
                    await asyncio.gather(pending, return_exceptions=True)
                if atomic:
                    await run(self._rollback_sync)  # type: ignore[no-untyped-call]
                raise
        return recorded, duplicates

    async def _write(self, events: list[UsageEvent]) -> list[RecordResult]:
        if not events:
            return []
        async with self._write_lock:
            # One hop to the connection's thread for the whole transaction (aiosqlite's
            # own queue), instead of a hop per statement.
            results: list[RecordResult] = await self._writer._execute(  # type: ignore[no-untyped-call]
                self._write_sync, events)
        self._wrote(len(events))
        return results

    def _write_sync(self, events: list[UsageEvent]) -> list[RecordResult]:
        """Runs on the writer's thread: one transaction holding SQLite's write lock."""
        conn: sqlite3.Connection = self._writer._conn
        fresh: dict[tuple[str, ...], int] = {}
        self._synchronous(True)
        conn.execute("BEGIN IMMEDIATE")
        try:
            _, new_ids = self._append(conn, events, fresh)
            conn.execute("COMMIT")
        except BaseException:
            self._rollback_sync()
            raise
        self._series.update(fresh)  # only once committed: a rolled-back id must not be reused
        self.commits += 1
        results = []
        for e in events:
            duplicate = False
            if new_ids is not None:
                duplicate = e.request_id not in new_ids
                new_ids.discard(e.request_id)  # a repeat inside the same batch is a duplicate too
            results.append(RecordResult(e.request_id, duplicate, e.cost_nanos or 0, e.cost_source))
        return results

    def _bulk_chunk_sync(self, events: list[UsageEvent], fresh: dict[tuple[str, ...], int],
                         in_transaction: bool, prepare: Callable[[UsageEvent], object] | None,
                         journal: Callable[[sqlite3.Connection, int, int], None] | None) -> tuple[int, int]:
        conn: sqlite3.Connection = self._writer._conn
        if prepare is not None:
            for event in events:
                prepare(event)
        if in_transaction:
            inserted, _ = self._append(conn, events, fresh, want_ids=False)
        else:
            self._synchronous(True)
            conn.execute("BEGIN IMMEDIATE")
            try:
                inserted, _ = self._append(conn, events, fresh, want_ids=False)
                if journal is not None:
                    journal(conn, inserted, len(events) - inserted)
                conn.execute("COMMIT")
            except BaseException:
                self._rollback_sync()
                raise
            self._series.update(fresh)
            self.commits += 1
        return inserted, len(events) - inserted

    def _commit_sync(self, fresh: dict[tuple[str, ...], int]) -> None:
        self._writer._conn.execute("COMMIT")
        self._series.update(fresh)
        self.commits += 1

    def _rollback_sync(self) -> None:
        conn: sqlite3.Connection = self._writer._conn
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def _append(self, conn: sqlite3.Connection, events: list[UsageEvent], fresh: dict[tuple[str, ...], int],
                *, want_ids: bool = True) -> tuple[int, set[str] | None]:
        """Insert events and fold them into the rollups, inside the caller's transaction.

        Returns how many were new and, when some were duplicates and ``want_ids``, the
        request ids that were new.
        """
        _check_costs(events)
        keys = [_series_key(e) for e in events]
        series = self._series
        missing = set(keys).difference(series).difference(fresh)
        if missing:
            conn.executemany(_INSERT_SERIES, sorted(missing))
            for k in missing:
                fresh[k] = int(conn.execute(_FIND_SERIES, k).fetchone()[0])
        series_ids = [series.get(k) or fresh[k] for k in keys]
        if len(events) == 1:  # a settlement's event: its id is known without asking
            cursor = conn.execute(_INSERT_EVENT, _event_row(events[0], series_ids[0]))
            inserted = cursor.rowcount
            self.appended_id = int(cursor.lastrowid or 0) if inserted else 0
        else:
            before = conn.total_changes
            conn.executemany(_INSERT_EVENT, map(_event_row, events, series_ids))
            inserted = conn.total_changes - before
        if not inserted:
            return 0, set() if want_ids else None
        if inserted == len(events) <= SMALL_BATCH and all(e.ts_ms >= 0 for e in events):  # SQL's % truncates
            _fold_small(conn, events, series_ids)
            return inserted, None
        # The new rows' ids are consecutive (an append-only table, one writer): they end at the last.
        hi = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
        lo = hi - inserted
        for sql, ranged in _ROLLUP_STATEMENTS:
            conn.execute(sql, (lo, hi) if ranged else ())
        if inserted == len(events) or not want_ids:
            return inserted, None
        return inserted, {r[0] for r in conn.execute(
            "SELECT request_id FROM usage_events WHERE id > ? AND id <= ?", (lo, hi))}

    # ---- reading (rollups only)

    async def totals(self, start_ms: int, end_ms: int, filters: Mapping[str, str] | None = None) -> Totals:
        """Sums over [start, end), from the coarsest rollups that cover it exactly (from raw
        events when ``filters`` name an agent or a session)."""
        if _needs_events(filters):
            sql, args = _events_sql(start_ms, end_ms, filters)
            row = await self._fetchone(sql, args)
            return Totals.from_row(row, 2) if row else Totals()
        sql, args = _segments_sql(start_ms, end_ms, filters, per_series=False)
        if not sql:
            return Totals()
        outer = ", ".join(f"sum(c{i})" for i in range(len(_SUM_COLUMNS)))
        row = await self._fetchone(f"SELECT {outer} FROM ({sql})", args)
        return Totals.from_row(row) if row else Totals()

    async def timeline(self, start_ms: int, end_ms: int, bucket_ms: int,
                       filters: Mapping[str, str] | None = None,
                       group_by: str | None = None,
                       fields: Sequence[str] = TIMELINE_FIELDS) -> list[TimelinePoint]:
        """Sums per bucket of ``bucket_ms`` (aligned to the epoch, UTC), optionally per group.

        Only ``fields`` are summed (each costs a pass over the rows); the others stay 0.
        """
        if bucket_ms <= 0 or bucket_ms % MINUTE_MS:
            raise FieldError("bucket", "must be a positive whole number of minutes")
        if group_by is not None:
            _check_dimension(group_by, "group_by")
        unknown = set(fields) - set(_SUM_COLUMNS)
        if unknown:
            raise FieldError("fields", f"unknown: {', '.join(sorted(unknown))}")
        if _needs_events(filters, group_by):
            sql, args = _events_sql(start_ms, end_ms, filters, bucket_ms=bucket_ms, group_by=group_by,
                                    fields=fields)
            rows = await self._fetchall(sql + " ORDER BY b, g", args)
            return [TimelinePoint(int(r[0]), str(r[1]), Totals(**{
                c: int(r[2 + i]) for i, c in enumerate(_SUM_COLUMNS) if c in fields})) for r in rows]
        wanted = [c for c in _SUM_COLUMNS if c in fields]
        table = "day" if bucket_ms % DAY_MS == 0 else "hour" if bucket_ms % HOUR_MS == 0 else "minute"
        start, end = _floor(start_ms, bucket_ms), _ceil(end_ms, MINUTE_MS)
        where, params = _filter_sql(filters)
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
        rows = await self._fetchall(sql, [start, end, *params])
        return [TimelinePoint(int(r[0]), str(r[1]), Totals(**dict(zip(wanted, map(int, r[2:]), strict=True))))
                for r in rows]

    async def breakdown(self, start_ms: int, end_ms: int, by: str, *, limit: int = 10,
                        order: Metric = "cost",
                        filters: Mapping[str, str] | None = None) -> list[BreakdownRow]:
        """The top ``limit`` values of dimension ``by`` over [start, end), largest first."""
        _check_dimension(by, "by")
        if order not in _ORDER:
            raise FieldError("order", f"must be one of {', '.join(_ORDER)}")
        if _needs_events(filters, by):
            sql, args = _events_sql(start_ms, end_ms, filters, group_by=by)
            outer = ", ".join(f"sum(r.c{i})" for i in range(len(_SUM_COLUMNS)))
            rows = await self._fetchall(f"SELECT r.g, {outer} FROM ({sql}) r GROUP BY r.g "
                                        f"ORDER BY {_ORDER[order]} DESC, r.g LIMIT ?", [*args, max(1, limit)])
            return [BreakdownRow(str(r[0]), Totals.from_row(r, 1)) for r in rows]
        sql, args = _segments_sql(start_ms, end_ms, filters, per_series=True)
        if not sql:
            return []
        outer = ", ".join(f"sum(r.c{i})" for i in range(len(_SUM_COLUMNS)))
        sql = (f"SELECT s.{by} AS k, {outer} FROM ({sql}) r JOIN series s ON s.id = r.series_id "
               f"GROUP BY k ORDER BY {_ORDER[order]} DESC, k LIMIT ?")
        rows = await self._fetchall(sql, [*args, max(1, limit)])
        return [BreakdownRow(str(r[0]), Totals.from_row(r, 1)) for r in rows]

    async def dimension_values(self, dim: str) -> list[str]:
        """Every value a dimension has taken (for filters and pickers)."""
        if dim not in ROLLUP_DIMENSIONS:
            raise FieldError("dimension", f"must be one of {', '.join(ROLLUP_DIMENSIONS)}")
        rows = await self._fetchall(f"SELECT DISTINCT {dim} FROM series ORDER BY 1", [])
        return [str(r[0]) for r in rows]

    async def event_count(self) -> int:
        row = await self._fetchone("SELECT count(*) FROM usage_events", [])
        return int(row[0]) if row else 0

    async def time_span(self) -> tuple[int, int] | None:
        """The first and last event time in the ledger, or None when it is empty."""
        row = await self._fetchone("SELECT min(bucket_ms), max(bucket_ms) FROM rollup_day", [])
        if not row or row[0] is None:
            return None
        first = await self._fetchone("SELECT min(ts_ms) FROM usage_events WHERE ts_ms >= ?", [row[0]])
        last = await self._fetchone("SELECT max(ts_ms) FROM usage_events WHERE ts_ms >= ?", [row[1]])
        return int(first[0]), int(last[0])

    async def iter_events(self, start_ms: int, end_ms: int, batch: int = 5000) -> AsyncIterator[UsageEvent]:
        """Raw events in [start, end), oldest first (for export and replay, not for dashboards)."""
        cols = ", ".join(f"e.{c}" for c in _EVENT_COLUMNS if c != "series_id")
        dims = ", ".join(f"s.{d}" for d in ROLLUP_DIMENSIONS)
        cursor = (start_ms, 0)
        while True:
            rows = await self._fetchall(
                f"SELECT e.id, {cols}, {dims} FROM usage_events e JOIN series s ON s.id = e.series_id "
                "WHERE e.ts_ms < ? AND (e.ts_ms > ? OR (e.ts_ms = ? AND e.id > ?)) "
                "ORDER BY e.ts_ms, e.id LIMIT ?",
                [end_ms, cursor[0], cursor[0], cursor[1], batch] if cursor[1] else
                [end_ms, start_ms - 1, start_ms - 1, 0, batch],
            )
            if not rows:
                return
            for r in rows:
                yield _row_event(r[1:])
            cursor = (int(rows[-1][1]), int(rows[-1][0]))

    async def recent_events(self, after_id: int, limit: int, status: str | None = None) -> list[tuple[int, UsageEvent]]:
        """The newest ``limit`` events recorded after event ``after_id`` (of one ``status``, or
        all), newest first, with their ids. Read by the primary key from the ledger's end: as
        cheap on a million events as on ten (a status reads back to ``after_id`` at most), and
        no event recorded late (a spill replayed, another process's import with older times)
        is skipped, as a cursor on time would."""
        if status is None:
            rows = await self._fetchall(RECENT_EVENTS_SQL, [after_id, limit])
        else:
            rows = await self._fetchall(RECENT_EVENTS_OF_STATUS_SQL, [after_id, status, limit])
        return [(int(r[0]), _row_event(r[1:])) for r in rows]

    async def fold_usage(self, start_ms: int, end_ms: int, where: Mapping[str, str],
                         fn: Callable[[Iterable[tuple[int, int, int, str]]], Any]) -> Any:
        """Run ``fn`` over (ts_ms, cost_nanos, tokens, status) of raw events in [start, end)
        matching ``where``, oldest first, streamed on the reader's thread (for backtests)."""
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

        def run() -> Any:
            return fn(self._reader._conn.execute(sql, params))

        return await self._reader._execute(run)  # type: ignore[no-untyped-call]

    async def read_with(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``fn`` on the read connection (never waits for the writer)."""
        def run() -> Any:
            return fn(self._reader._conn)

        return await self._reader._execute(run)  # type: ignore[no-untyped-call]

    # ---- prices

    async def load_prices(self) -> list[str]:
        rows = await self._fetchall(
            "SELECT spec FROM prices ORDER BY model, workspace, effective_from_ms", [])
        return [str(r[0]) for r in rows]

    # ---- plumbing

    async def _fetchone(self, sql: str, params: Sequence[Any]) -> Any:
        async with self._reader.execute(sql, params) as cur:
            return await cur.fetchone()

    async def _fetchall(self, sql: str, params: Sequence[Any]) -> list[Any]:
        async with self._reader.execute(sql, params) as cur:
            return list(await cur.fetchall())


#: The ledger's tail after an event id, newest first (``recent_events``): a search by the primary key.
RECENT_EVENTS_SQL: Final = (
    f"SELECT e.id, {', '.join(f'e.{c}' for c in _EVENT_COLUMNS if c != 'series_id')}, "
    f"{', '.join(f's.{d}' for d in ROLLUP_DIMENSIONS)} FROM usage_events e JOIN series s ON s.id = e.series_id "
    "WHERE e.id > ? ORDER BY e.id DESC LIMIT ?")
RECENT_EVENTS_OF_STATUS_SQL: Final = RECENT_EVENTS_SQL.replace("WHERE e.id > ?", "WHERE e.id > ? AND e.status = ?")
_ROW_FIELDS: Final = tuple(c for c in _EVENT_COLUMNS if c != "series_id") + ROLLUP_DIMENSIONS


def _row_event(r: Sequence[Any]) -> UsageEvent:
    values = dict(zip(_ROW_FIELDS, r, strict=True))
    values["tags"] = json.loads(values["tags"]) if values["tags"] != "{}" else {}
    return UsageEvent(**values)


def _checkpoint_sync(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()


def _fsync(path: Path) -> None:
    """Flush a file's written pages to the disk (any descriptor of the file will do on Linux,
    and on the other systems SQLite supports, for data written through another)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # no log: nothing was written since the last checkpoint
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Busy(Exception):
    """Another connection holds the ledger's write lock."""


async def _connect(path: Path, durable: bool, any_thread: bool = False) -> aiosqlite.Connection:
    """``any_thread``: the connection may be used from the event loop's thread as well as its
    own (never both at once: the store's write lock sees to that)."""
    try:
        conn = await aiosqlite.connect(str(path), isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000,
                                       check_same_thread=not any_thread)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open the ledger at {path}: {exc}") from None
    try:
        await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # Takes effect only when the file is created. Small pages: a call's hold and settlement
        # touch a dozen B-trees, and each commit writes every page it changed to the log (16 KiB
        # pages made the gateway's commits four times the bytes; bulk imports were 6 % faster).
        await conn.execute("PRAGMA page_size = 4096")
        async with conn.execute("PRAGMA journal_mode = WAL") as cur:
            mode = await cur.fetchone()
        if not mode or str(mode[0]).lower() != "wal":
            raise StoreError(f"the ledger at {path} cannot use write-ahead logging (journal mode {mode})")
        await conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
        await conn.execute("PRAGMA cache_size = -65536")
        await conn.execute("PRAGMA temp_store = MEMORY")
        await conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.DatabaseError as exc:
        await conn.close()
        raise StoreError(f"the file at {path} is not a Budgeteer ledger ({exc})") from None
    except BaseException:
        await conn.close()
        raise
    return conn


async def _migrate(conn: aiosqlite.Connection, path: Path) -> None:
    async with conn.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    version = int(row[0]) if row else 0
    if version > SCHEMA_VERSION:
        raise SchemaTooNewError(
            f"the ledger at {path} has schema version {version}, newer than this Budgeteer "
            f"understands ({SCHEMA_VERSION}); upgrade Budgeteer to open it")
    if version == SCHEMA_VERSION:
        return
    await conn.execute("BEGIN IMMEDIATE")
    try:
        # Another process may have migrated while we waited for the lock.
        async with conn.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version == 0:
            async with conn.execute(
                    "SELECT count(*) FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'") as cur:
                other = await cur.fetchone()
            if other and other[0]:
                raise StoreError(f"the file at {path} is an SQLite database but not a Budgeteer ledger")
        if 6 <= version < 7:
            # Schema 7 moves a hold's lines into its row: a gateway of the older Budgeteer still
            # serving on this ledger would fail on its next hold and settlement, and lose the
            # usage of the calls it has under way. Refuse while one has been seen lately.
            async with conn.execute(
                    "SELECT pid FROM gateways WHERE stopped_ms IS NULL AND seen_ms > ?",
                    (int(time.time() * 1000) - LIVE_GATEWAY_MS,)) as cur:
                live = await cur.fetchall()
            if live:
                raise StoreError(
                    f"the ledger at {path} is in use by a running gateway of an older Budgeteer (pid "
                    f"{', '.join(str(pid) for (pid,) in live)}); stop it, and every other Budgeteer process on "
                    "this ledger, before this version upgrades the ledger's schema")
        for number in range(version, SCHEMA_VERSION):
            for statement in _statements(MIGRATIONS[number]):
                await conn.execute(statement)
            await conn.execute(f"PRAGMA user_version = {number + 1}")
        await conn.execute("COMMIT")
    except BaseException:
        await conn.execute("ROLLBACK")
        raise
