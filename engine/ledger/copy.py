"""Copying a ledger between backends, exact: SQLite to PostgreSQL, PostgreSQL to SQLite (and
SQLite to SQLite, PostgreSQL to PostgreSQL).

``copy_ledger(source, target)`` copies every record the ledger keeps, table by table in a fixed
order (``COPIED_TABLES``: a table before any table that refers to it), each in batches of
``BATCH`` rows read in primary-key order, with the same ids, into an *empty* target:

- **Empty only.** A target that holds anything (an event, a policy, a journal entry, any row
  of any table but the fresh ledger id every new ledger makes) is refused with ``BadInput``
  naming ``TO`` and what it holds, and nothing is written to it. A target that does not exist
  yet (a new SQLite file, an empty PostgreSQL database) is created at the current schema.
- **All or nothing.** Everything is written in one transaction on the target, under the
  target's write lock (``BEGIN IMMEDIATE`` on SQLite; on PostgreSQL the ``ledger_version`` row,
  as every writer takes it). Before the commit the rows of every table and the events' total
  cost are counted again on the target and must equal the source's; then the caller's
  ``finish`` runs in the same transaction (the service appends the copy's journal entry there).
  A failure anywhere rolls the whole copy back: the target is as empty as it was (a SQLite file
  the copy itself created is removed).
- **The ledger's identity travels.** The target's fresh ledger id is replaced by the source's
  (the table's append-only trigger is lifted for that, inside the transaction), so the audit
  journal's chain key (``vault:audit-key.<ledger id>``) names the copy too: the service puts the
  key into the target's vault when that is another vault.
- **Ids.** Generated ids are copied as they are; on PostgreSQL each identity column's sequence
  is then set past the largest copied id (``setval``), so the next row gets the next id.
- **Schemas.** Source and target are both at this Budgeteer's current schema (opening a ledger
  migrates it), each with its own bookkeeping (``schema_migrations``, ``ledger_version`` on
  PostgreSQL; ``user_version`` on SQLite), which is not copied. A table the source has and this
  list does not name fails the copy (a migration that adds a table must add it here).

**A source being written during the copy.** The source is read through a connection of the
copy's own, in one read transaction: a consistent snapshot (SQLite: a ``BEGIN`` whose first read
fixes what the connection sees, WAL mode letting writers go on; PostgreSQL: ``REPEATABLE READ,
READ ONLY``). Writers of the source are not blocked: the copy holds the ledger as it was when
the copy began, and whatever is written afterwards is not in it. Stop the gateways first to
move a ledger that is in use, or copy again into a fresh target.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final

from engine.ledger.dbapi import Connection
from engine.ledger.errors import StoreError, in_one_line
from engine.ledger.files import is_dsn, redacted, remove_ledger
from engine.ledger.repos import LedgerView
from engine.ledger.worker import Worker
from engine.models import FieldError

#: What is copied, in this order: a table before any table that refers to it.
COPIED_TABLES: Final = (
    "ledger_identity", "series", "usage_events", "rollup_minute", "rollup_hour", "rollup_day", "prices",
    "policies", "holds", "hold_journal", "override_requests", "alerts", "webhooks", "webhook_deliveries",
    "budget_decisions", "members", "api_tokens", "audit_journal", "audit_anchor_posts", "providers",
    "provider_breakers", "routing_decisions", "gateways", "overshoots",
)
#: Each backend's own bookkeeping of its schema and its writers, never copied; and the rate
#: limits' sliding windows (a minute long), which start empty on the copy as after a restart.
OWN_TABLES: Final = frozenset({"schema_migrations", "ledger_version", "rate_log", "rate_totals"})
#: Rows read and written at a time.
BATCH: Final = 5000

Progress = Callable[[int, int, str], None]  # rows copied, rows in all, the table being copied


@dataclass(frozen=True, slots=True)
class CopyReport:
    """What a copy wrote: rows per table (in the order copied), the events and their total cost."""

    source: str  # where from, as shown (no password)
    target: str
    tables: dict[str, int]
    events: int
    cost_nanos: int
    ledger_id: str
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(self.tables.values())

    def as_dict(self) -> dict[str, Any]:
        return {"from": self.source, "to": self.target, "ledger_id": self.ledger_id, "events": self.events,
                "cost_nanos": self.cost_nanos, "rows": self.rows, "tables": dict(self.tables),
                "seconds": round(self.seconds, 3), **self.extra}


@dataclass(frozen=True, slots=True)
class _Table:
    name: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    rows: int


# ------------------------------------------------------------------------------ connections


def _connect(location: str | Path) -> Any:
    """A connection of the copy's own to the ledger at ``location`` (on its worker's thread)."""
    if is_dsn(location):
        from engine.ledger.pg.conn import PgConnection

        return PgConnection(str(location))
    from engine.ledger.schema import connect

    return connect(Path(location), durable=True)


async def _worker(name: str, location: str | Path, what: str) -> Worker[Any]:
    try:
        return await Worker.open(name, partial(_connect, location))
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(f"cannot open the ledger {what} {redacted(location)}: {in_one_line(exc)}") from None


def _postgres(conn: Any) -> bool:
    return getattr(conn, "dialect", "") == "postgresql"


def _tables(conn: Any) -> list[str]:
    if _postgres(conn):
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()").fetchall()
    else:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                            "AND name NOT LIKE 'sqlite%'").fetchall()
    return sorted(str(r[0]) for r in rows)


def _columns(conn: Any, table: str) -> tuple[list[str], list[str]]:
    """A table's columns, and its primary key's columns in the key's order."""
    if _postgres(conn):
        columns = [str(r[0]) for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = ? ORDER BY ordinal_position", (table,))]
        key = [str(r[0]) for r in conn.execute(
            "SELECT k.column_name FROM information_schema.table_constraints c "
            "JOIN information_schema.key_column_usage k ON k.constraint_name = c.constraint_name "
            "AND k.table_schema = c.table_schema AND k.table_name = c.table_name "
            "WHERE c.table_schema = current_schema() AND c.table_name = ? AND c.constraint_type = 'PRIMARY KEY' "
            "ORDER BY k.ordinal_position", (table,))]
        return columns, key
    info = conn.execute(f"PRAGMA table_info({table})").fetchall()  # cid, name, type, notnull, default, pk
    return [str(r[1]) for r in info], [str(r[1]) for r in sorted((r for r in info if r[5]), key=lambda r: r[5])]


def _q(column: str) -> str:
    return f'"{column}"'


# ------------------------------------------------------------------------------ the source


def _snapshot(conn: Any, where: str) -> tuple[list[_Table], int, int, str]:
    """Begin the source's read transaction (its snapshot) and plan the copy: the tables with
    their columns, keys and row counts; the events and their total cost; the ledger id."""
    if _postgres(conn):
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    else:
        conn.execute("BEGIN")
    found = set(_tables(conn)) - OWN_TABLES
    unknown = sorted(found - set(COPIED_TABLES))
    if unknown:
        raise StoreError(f"the ledger at {where} has tables this Budgeteer does not know how to copy "
                         f"({', '.join(unknown)}): is it of a newer Budgeteer?")
    missing = sorted(set(COPIED_TABLES) - found)
    if missing:
        raise StoreError(f"the ledger at {where} lacks the tables {', '.join(missing)}: it is not at this "
                         "Budgeteer's schema")
    plan = []
    for name in COPIED_TABLES:
        columns, key = _columns(conn, name)
        count = int(conn.execute(f"SELECT count(*) FROM {name}").fetchone()[0])
        plan.append(_Table(name, tuple(columns), tuple(key), count))
    events, cost = _events(conn)
    row = conn.execute("SELECT ledger_id FROM ledger_identity WHERE id = 1").fetchone()
    if row is None:
        raise StoreError(f"the ledger at {where} has no ledger id")
    return plan, events, cost, str(row[0])


def _events(conn: Connection) -> tuple[int, int]:
    count, cost = conn.execute("SELECT count(*), coalesce(sum(cost_nanos), 0) FROM usage_events").fetchone()
    return int(count), int(cost)


def _page(conn: Connection, table: _Table, after: Sequence[Any] | None, limit: int) -> list[tuple[Any, ...]]:
    """The next ``limit`` rows of ``table`` after the key ``after`` (None: from the first), in key order."""
    columns, key = ", ".join(map(_q, table.columns)), ", ".join(map(_q, table.key))
    if after is None:
        sql = f"SELECT {columns} FROM {table.name} ORDER BY {key} LIMIT {int(limit)}"
        return [tuple(r) for r in conn.execute(sql).fetchall()]
    marks = ", ".join("?" for _ in table.key)
    sql = f"SELECT {columns} FROM {table.name} WHERE ({key}) > ({marks}) ORDER BY {key} LIMIT {int(limit)}"
    return [tuple(r) for r in conn.execute(sql, tuple(after)).fetchall()]


def _end_read(conn: Any) -> None:
    """End the source's read transaction (a connection lost meanwhile has nothing left to end)."""
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except Exception:  # the copy's own outcome, or its error, is what the caller hears
        return


# ------------------------------------------------------------------------------ the target


def _holdings(conn: Any) -> dict[str, int]:
    """The rows the target holds, per table, beyond a fresh ledger id (tables it lacks: none)."""
    present = set(_tables(conn))
    held: dict[str, int] = {}
    for name in COPIED_TABLES:
        if name not in present:
            continue
        count = int(conn.execute(f"SELECT count(*) FROM {name}").fetchone()[0])
        if name == "ledger_identity":
            count = max(0, count - 1)
        if count:
            held[name] = count
    return held


def _refuse_unless_empty(conn: Any, where: str) -> None:
    held = _holdings(conn)
    if held:
        events = held.pop("usage_events", 0)
        others = sum(held.values())
        what = " and ".join(part for part in (f"{events:,} events" if events else "",
                                              f"{others:,} other rows" if others else "") if part)
        raise FieldError("TO", f"the ledger at {where} is not empty (it holds {what}); a ledger is copied only "
                               "into an empty one (a new file, or an empty database): nothing was written")


async def check_target(location: str | Path) -> bool:
    """Refuse (``BadInput`` naming TO) a target that holds anything, before anything is written to
    it; True when it exists already (a file, or a database that holds a ledger's tables)."""
    where = redacted(location)
    if not is_dsn(location):
        path = Path(location)
        if path.is_dir():
            raise FieldError("TO", f"{where} is a folder; name the ledger file to create in it")
        if not path.exists():
            return False
    try:
        probe = await _worker("ledger-copy-probe", location, "to copy into at")
    except StoreError as exc:
        raise FieldError("TO", str(exc)) from None
    try:
        await probe.run(_probe, probe.conn, where)
    finally:
        await probe.close()
    return True


def _probe(conn: Any, where: str) -> None:
    try:
        _refuse_unless_empty(conn, where)
    except sqlite3.DatabaseError as exc:
        raise FieldError("TO", f"{where} is not a Budgeteer ledger ({exc})") from None


def _begin_target(conn: Any, where: str) -> list[str]:
    """The copy's transaction on the target, under its write lock; the target checked empty
    again under that lock, and its fresh ledger id removed (its append-only trigger lifted for
    the transaction). Returns the SQL that puts back what was lifted."""
    if _postgres(conn):
        conn.execute("BEGIN")
        conn.execute("UPDATE ledger_version SET n = n + 1")
    else:
        conn.execute("BEGIN IMMEDIATE")
    _refuse_unless_empty(conn, where)
    if _postgres(conn):
        conn.execute("ALTER TABLE ledger_identity DISABLE TRIGGER USER")
        conn.execute("DELETE FROM ledger_identity")
        return ["ALTER TABLE ledger_identity ENABLE TRIGGER USER"]
    triggers = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger' "
                            "AND tbl_name = 'ledger_identity'").fetchall()
    for name, _ in triggers:
        conn.execute(f'DROP TRIGGER "{name}"')
    conn.execute("DELETE FROM ledger_identity")
    return [str(sql) for _, sql in triggers]


def _write(conn: Any, table: _Table, rows: list[tuple[Any, ...]]) -> None:
    """Append ``rows`` to ``table`` (PostgreSQL: COPY, its fastest way in)."""
    if _postgres(conn):
        conn.run(conn.raw.copy_records_to_table(table.name, records=rows, columns=list(table.columns)))
        return
    marks = ", ".join("?" for _ in table.columns)
    conn.executemany(f"INSERT INTO {table.name} ({', '.join(map(_q, table.columns))}) VALUES ({marks})", rows)


def _finish_target(conn: Any, restore: list[str], plan: list[_Table], report: CopyReport,
                   finish: Callable[[LedgerView, CopyReport], Any] | None, where: str) -> Any:
    """Put back what was lifted, set the sequences past the copied ids, check that the target
    holds what the source held, run ``finish`` in the transaction and commit."""
    for sql in restore:
        conn.execute(sql)
    if _postgres(conn):
        from engine.ledger.pg.conn import SERIAL_TABLES  # the tables whose id is an identity column

        for name in sorted(SERIAL_TABLES):
            conn.execute(f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), "
                         f"coalesce((SELECT max(id) FROM {name}), 0) + 1, false)")
    for table in plan:
        count = int(conn.execute(f"SELECT count(*) FROM {table.name}").fetchone()[0])
        if count != table.rows:
            raise StoreError(f"copying into {where}: {table.name} holds {count:,} rows after the copy where the "
                             f"source holds {table.rows:,}; nothing was written")
    if _events(conn) != (report.events, report.cost_nanos):
        raise StoreError(f"copying into {where}: the events' count or total cost differ from the source's after "
                         "the copy; nothing was written")
    result = finish(LedgerView(conn), report) if finish is not None else None
    conn.execute("COMMIT")
    return result


def _rollback(conn: Any) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


# ------------------------------------------------------------------------------ the copy


async def copy_ledger(source: str | Path, target: str | Path, *, home: Path,
                      prepare: Callable[[], Any] | None = None,
                      finish: Callable[[LedgerView, CopyReport], Any] | None = None,
                      progress: Progress | None = None, batch: int = BATCH) -> tuple[CopyReport, Any]:
    """Copy the ledger at ``source`` into the empty ledger at ``target`` (see the module). Both
    must have been opened by this Budgeteer (its schema); ``home``: this machine's folder for a
    PostgreSQL ledger's local files (``open_ledger``'s). ``prepare()`` is awaited once the
    target is known to be empty and before anything is written to it; ``finish(target, report)`` runs
    inside the copy's transaction before its commit (``report``: what was copied), and its result
    is returned with the report.
    ``progress(rows copied, rows in all, table)`` is told after each batch (on the event loop)."""
    started = time.perf_counter()
    source_shown, target_shown = redacted(source), redacted(target)
    existed = await check_target(target)
    created = not existed and not is_dsn(target)
    try:
        from engine.ledger import open_ledger  # creates the target at the current schema (a file, or the tables)

        try:
            store = await open_ledger(target, home=home, durable=True)
        except StoreError as exc:  # not a ledger, not reachable, of a newer Budgeteer
            raise FieldError("TO", str(exc)) from None
        await store.close()
        if prepare is not None:
            await prepare()
        report, result = await _copy(source, target, source_shown, target_shown, finish, progress, batch)
    except BaseException:
        if created:
            remove_ledger(target)
        raise
    return CopyReport(report.source, report.target, report.tables, report.events, report.cost_nanos,
                      report.ledger_id, time.perf_counter() - started), result


async def _copy(source: str | Path, target: str | Path, source_shown: str, target_shown: str,
                finish: Callable[[LedgerView, CopyReport], Any] | None, progress: Progress | None,
                batch: int) -> tuple[CopyReport, Any]:
    reader = await _worker("ledger-copy-source", source, "to copy from at")
    try:
        writer = await _worker("ledger-copy-target", target, "to copy into at")
    except BaseException:
        await reader.close()
        raise
    try:
        plan, events, cost, ledger_id = await reader.run(_snapshot, reader.conn, source_shown)
        total = sum(t.rows for t in plan)
        restore = await writer.run(_begin_target, writer.conn, target_shown)
        try:
            done = 0
            for table in plan:
                if progress is not None:
                    progress(done, total, table.name)
                if not table.rows:
                    continue
                if not table.key:
                    raise StoreError(f"the table {table.name} at {source_shown} has no primary key to copy it by")
                reading = reader.run(_page, reader.conn, table, None, batch)
                while True:
                    rows = await reading
                    if not rows:
                        break
                    key = [table.columns.index(k) for k in table.key]
                    # The next batch is read on the source's thread while this one is written.
                    reading = reader.run(_page, reader.conn, table, [rows[-1][i] for i in key], batch)
                    try:
                        await writer.run(_write, writer.conn, table, rows)
                    except BaseException:
                        await asyncio.gather(reading, return_exceptions=True)
                        raise
                    done += len(rows)
                    if progress is not None:
                        progress(done, total, table.name)
            report = CopyReport(source_shown, target_shown, {t.name: t.rows for t in plan}, events, cost, ledger_id)
            result = await writer.run(_finish_target, writer.conn, restore, plan, report, finish, target_shown)
        except BaseException as exc:
            await writer.run(_rollback, writer.conn)
            if isinstance(exc, Exception) and not isinstance(exc, StoreError | FieldError) and \
                    type(exc).__module__.split(".")[0] in ("asyncpg", "sqlite3"):
                raise StoreError(f"copying into {target_shown} failed, nothing was written: "
                                 f"{in_one_line(exc)}") from None
            raise
        return report, result
    finally:
        try:
            await reader.run(_end_read, reader.conn)
        finally:
            await reader.close()
            await writer.close()
