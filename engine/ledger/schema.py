"""The ledger's schema: its numbered migrations, and opening a connection to it.

SQLite in WAL mode. ``usage_events`` is append-only and ``request_id`` is unique, so a
retried write is a no-op reported as a duplicate. A *series* is one combination of the
rollup dimensions; events and rollups refer to it by a small integer, so rollup keys are two
integers and upserts stay cheap. Everything here is synchronous: it runs on a connection's
own thread (``worker.Worker``).
"""

from __future__ import annotations

import sqlite3
from dataclasses import fields
from pathlib import Path
from typing import Final

from engine.clock import DAY_MS, HOUR_MS, MINUTE_MS
from engine.ledger.errors import SchemaTooNewError, StoreError
from engine.ledger.results import Totals
from engine.models import ROLLUP_DIMENSIONS

#: The SQLite library the ledger runs on (benchmarks print it beside their figures).
SQLITE_VERSION: Final = sqlite3.sqlite_version
LIVE_GATEWAY_MS: Final = 10_000  # a gateway whose heartbeat (every 2 s) is this recent is running
WAL_SIZE_LIMIT: Final = 64 * 1024 * 1024  # bytes of log file kept when the log starts again
BUSY_TIMEOUT_MS: Final = 30_000

EVENT_COLUMNS: Final = (
    "ts_ms", "request_id", "series_id", "session", "agent", "input_tokens", "cached_input_tokens",
    "cache_write_tokens", "cache_write_1h_tokens", "output_tokens", "reasoning_tokens", "cost_nanos",
    "cost_source", "latency_ms", "status", "tags",
)
DIMS_SQL: Final = ", ".join(ROLLUP_DIMENSIONS)
#: The rollup columns of schema 1 (its migration must create exactly these, forever).
_V1_SUM_COLUMNS: Final = (
    "requests", "errors", "blocked", "input_tokens", "cached_input_tokens", "cache_write_tokens",
    "output_tokens", "reasoning_tokens", "cost_nanos", "unpriced", "estimated", "latency_ms",
)
#: Every rollup column, in the order of ``Totals``; later schemas append (schema 8: one-hour cache writes).
SUM_COLUMNS: Final = (*_V1_SUM_COLUMNS, "cache_write_1h_tokens")
assert tuple(f.name for f in fields(Totals)) == SUM_COLUMNS, "Totals sums the rollup columns, in order"
ROLLUP_TABLES: Final = {"minute": MINUTE_MS, "hour": HOUR_MS, "day": DAY_MS}


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
    UNIQUE ({DIMS_SQL})
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
    + "".join(_rollup_table_sql(name) for name in ROLLUP_TABLES)
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
              for name in ROLLUP_TABLES),
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
    # Rate limits shared by every process on the ledger (engine.ratelimits): what each key took,
    # a row per take, and the sum of each key's rows (kept by triggers: a take is one INSERT),
    # so that a window is read at a constant cost. Tables only added: older processes are
    # unaffected (they keep their limits in memory).
    """
CREATE TABLE rate_log (
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    ts_ms INTEGER NOT NULL,
    amount INTEGER NOT NULL
);
CREATE INDEX rate_log_window ON rate_log (key, kind, ts_ms);
CREATE TABLE rate_totals (
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    total INTEGER NOT NULL,
    PRIMARY KEY (key, kind)
) WITHOUT ROWID;
CREATE TRIGGER rate_log_added AFTER INSERT ON rate_log
BEGIN
    INSERT INTO rate_totals (key, kind, total) VALUES (new.key, new.kind, new.amount)
    ON CONFLICT (key, kind) DO UPDATE SET total = total + excluded.total;
END;
CREATE TRIGGER rate_log_removed AFTER DELETE ON rate_log
BEGIN
    UPDATE rate_totals SET total = total - old.amount WHERE key = old.key AND kind = old.kind;
END;
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



def connect(path: Path, durable: bool, any_thread: bool = False) -> sqlite3.Connection:
    """A connection to the ledger at ``path`` in WAL mode (not migrated). ``any_thread``: the
    connection may be used from the event loop's thread as well as its own (never both at
    once: the writer's lock sees to that)."""
    try:
        conn = sqlite3.connect(str(path), isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000,
                               check_same_thread=not any_thread)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open the ledger at {path}: {exc}") from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # Takes effect only when the file is created. Small pages: a call's hold and settlement
        # touch a dozen B-trees, and each commit writes every page it changed to the log (16 KiB
        # pages made the gateway's commits four times the bytes; bulk imports were 6 % faster).
        conn.execute("PRAGMA page_size = 4096")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if not mode or str(mode[0]).lower() != "wal":
            raise StoreError(f"the ledger at {path} cannot use write-ahead logging (journal mode {mode})")
        conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
        conn.execute("PRAGMA cache_size = -65536")
        conn.execute("PRAGMA temp_store = MEMORY")
        conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StoreError(f"the file at {path} is not a Budgeteer ledger ({exc})") from None
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(conn: sqlite3.Connection, path: Path, now_ms: int) -> None:
    """Bring the ledger's schema to ``SCHEMA_VERSION`` (``now_ms``: the store's clock, to tell
    a running gateway of an older Budgeteer)."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise SchemaTooNewError(
            f"the ledger at {path} has schema version {version}, newer than this Budgeteer "
            f"understands ({SCHEMA_VERSION}); upgrade Budgeteer to open it")
    if version == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Another process may have migrated while we waited for the lock.
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version == 0:
            other = conn.execute("SELECT count(*) FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'").fetchone()
            if other and other[0]:
                raise StoreError(f"the file at {path} is an SQLite database but not a Budgeteer ledger")
        if 6 <= version < 7:
            # Schema 7 moves a hold's lines into its row: a gateway of the older Budgeteer still
            # serving on this ledger would fail on its next hold and settlement, and lose the
            # usage of the calls it has under way. Refuse while one has been seen lately.
            live = conn.execute("SELECT pid FROM gateways WHERE stopped_ms IS NULL AND seen_ms > ?",
                                (now_ms - LIVE_GATEWAY_MS,)).fetchall()
            if live:
                raise StoreError(
                    f"the ledger at {path} is in use by a running gateway of an older Budgeteer (pid "
                    f"{', '.join(str(pid) for (pid,) in live)}); stop it, and every other Budgeteer process on "
                    "this ledger, before this version upgrades the ledger's schema")
        for number in range(version, SCHEMA_VERSION):
            for statement in _statements(MIGRATIONS[number]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number + 1}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
