"""The PostgreSQL ledger: one ledger for several gateways, dashboards and hosts.

The same parts as the SQLite store (``store.Store``): a group-commit writer and a reader, each an
asyncpg connection driven from a thread of its own (``conn.PgConnection``), the same repositories
and the same SQL. What differs:

- **One writer at a time, across machines.** Every writing transaction begins by raising the
  counter of ``ledger_version``'s one row: the row lock is the ledger's write lock, held to the
  commit, so batches of different processes run one after another exactly as SQLite's do on
  one machine. A decision therefore reads every hold and every settlement committed before it
  (the budget book's ``begin`` hook folds them in) and no other process can commit between that
  read and its own hold. Ids are given under the lock, so "every row after the last id I saw"
  misses nothing. There is one lock, so there is no order to get wrong and no deadlock.
- **The database's clock.** The same statement returns the database's time; ``now_ms`` is the
  local clock corrected by the difference last measured, so windows, hold expiry and grants are
  judged by one clock for every gateway, whatever its own clock says.
- **Group commit per process** as on SQLite: a batch is one transaction, one commit.
- **Changes pushed.** A transaction that changes a policy, a token, an approval, prices, a
  provider or a member notifies the channel ``budgeteer`` (``engine.ledger.changes``); each store
  listens on a connection of its own on the application's event loop (``listen.Listener``) and
  hands each kind to its subscribers (``Store.on_change``) within milliseconds of the commit.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from engine.clock import Clock
from engine.ledger.dbapi import Connection
from engine.ledger.errors import StoreError, in_one_line
from engine.ledger.files import local_name, redacted
from engine.ledger.pg.conn import PgConnection
from engine.ledger.pg.listen import Listener
from engine.ledger.pg.schema import NOW_MS_SQL, TEMP_TABLES, migrate, schema_version
from engine.ledger.reads import Reads
from engine.ledger.store import Store
from engine.ledger.worker import Worker
from engine.ledger.writer import GroupWriter

if TYPE_CHECKING:
    from engine.ledger.protocol import Ledger

#: The first statement of every writing transaction: the write lock, the version, the time.
#: (The third value: how long the statement waited for the lock, in ms, which the clock's
#: measure of the round trip leaves out.)
BEGIN_WRITE: Final = (f"UPDATE ledger_version SET n = n + 1 RETURNING n, {NOW_MS_SQL}, "
                      "(extract(epoch from clock_timestamp() - statement_timestamp()) * 1000)::bigint")
log = logging.getLogger("budgeteer")


class DatabaseClock:
    """The database's clock, read from the local one: the difference between the two is
    measured when the store opens and again at every write batch's first statement."""

    def __init__(self) -> None:
        self.offset_ms = 0

    def observe(self, database_ms: int, sent_ns: int, received_ns: int, waited_ms: int = 0) -> None:
        """The database said ``database_ms`` between sending and receiving, after waiting
        ``waited_ms`` of that time (for the write lock) before it read its clock: the clock was
        read half the rest of the round trip before the answer came."""
        travel_ns = max(0, received_ns - sent_ns - waited_ms * 1_000_000)
        self.offset_ms = database_ms - (received_ns - travel_ns // 2) // 1_000_000

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000 + self.offset_ms


class PgGroupWriter(GroupWriter):
    """The group-commit writer on PostgreSQL: every batch on the writer's thread, behind the
    ledger's write lock (``BEGIN_WRITE``); no log of its own to sync or checkpoint."""

    inline = False
    optimistic = True  # no savepoint per operation unless one fails (GroupWriter._ops_sync)

    def __init__(self, path: Path, writer: Worker[Any], reader: Worker[Any], clock: DatabaseClock) -> None:
        super().__init__(path, writer, reader, durable=True, sync_interval_s=0.0)
        self.clock = clock

    def _begin(self, conn: Connection, wait: bool = True) -> tuple[int, int]:
        assert isinstance(conn, PgConnection)
        conn.begin()
        try:
            sent = time.time_ns()
            version, database_ms, waited_ms = conn.execute(BEGIN_WRITE).fetchone()
            self.clock.observe(int(database_ms), sent, time.time_ns(), int(waited_ms))
        except BaseException:
            self._rollback_sync()
            raise
        return int(version) - 1, int(version)

    # Each statement is a round trip to the server, so a batch's operations run with no
    # savepoint unless one of them fails (``optimistic``), and then their savepoints go in as
    # few round trips as they can: the previous operation's RELEASE with the next SAVEPOINT
    # (one simple query), and none after the last (the COMMIT releases it).

    def _ops_sync(self, ops: list[Any], sync: bool = True, wait: bool = True) -> list[tuple[bool, Any]]:
        """As GroupWriter's, each operation ending with its deferred write sent, or queued
        (``PgConnection.end_operation``), so that if that fails, it is the operation's failure."""
        return super()._ops_sync([partial(_flushed, op) for op in ops], sync, wait)

    def _commit(self, conn: Connection) -> None:
        """With operations already waiting for the next batch, its transaction begins with this
        one's commit (``PgConnection.commit``'s chain): one round trip fewer a batch under load.
        An idle writer commits plainly, leaving no transaction open."""
        assert isinstance(conn, PgConnection)
        conn.commit(chain=bool(self._ops))

    def _pipeline(self, conn: Connection, on: bool) -> None:
        assert isinstance(conn, PgConnection)
        conn.pipelining = on

    def _send_ahead(self, conn: Connection) -> None:
        assert isinstance(conn, PgConnection)
        conn.flush()

    def _savepoint(self, conn: Connection, released: bool) -> None:
        conn.execute("SAVEPOINT op" if released else "RELEASE op; SAVEPOINT op")

    def _undo_op(self, conn: Connection) -> None:
        conn.execute("ROLLBACK TO op; RELEASE op")

    def _release(self, conn: Connection) -> None:
        """The commit that follows releases it."""

    def probe_write(self, conn: Connection) -> None:
        """Nothing more: the batch's first statement (the write lock) was a real write already."""

    def _synchronous(self, sync: bool, wait: bool = True) -> None:
        """Durability is the server's (``synchronous_commit``)."""

    def _wrote(self, count: int) -> None:
        """Nothing to checkpoint: the server keeps its own log."""

    async def _checkpoint(self) -> None:
        return None


def _flushed(op: Any, tx: Any) -> Any:
    result = op(tx)
    tx.conn.end_operation()
    return result


class PgReads(Reads):
    def schema_version(self) -> int:
        return schema_version(self.conn)

    def data_version(self) -> int:
        """The ledger's write counter: it moves with every writing transaction of any process."""
        return int(self.conn.execute("SELECT n FROM ledger_version").fetchone()[0])


def _setup(conn: PgConnection) -> None:
    """What each new connection (and each one made again) needs: the rollups' scratch tables."""
    for sql in TEMP_TABLES:
        conn.execute(sql)


def _open_writer(dsn: str, where: str) -> PgConnection:
    """The writer's connection, the schema migrated first (on the writer's thread)."""
    conn = PgConnection(dsn)
    try:
        migrate(conn, where)
        _setup(conn)
    except BaseException:
        conn.close()
        raise
    conn._setup = _setup
    return conn


def _session_user(conn: PgConnection) -> str:
    """The role this connection logged in as (not ``current_user``, which SET ROLE changes)."""
    return str(conn.execute("SELECT session_user").fetchone()[0])


def _login_role(conn: PgConnection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = ? AND rolcanlogin", (name,)).fetchone() is not None


def _now_ms(conn: PgConnection) -> tuple[int, int, int]:
    sent = time.time_ns()
    value = int(conn.execute(f"SELECT {NOW_MS_SQL}").fetchone()[0])
    return value, sent, time.time_ns()


class PostgresStore(Store):
    """The PostgreSQL ledger. Open with ``await PostgresStore.open(dsn)``."""

    def __init__(self, dsn: str, path: Path, writer: Worker[Any], reader: Worker[Any], clock: Clock,
                 database_clock: DatabaseClock, listener: Listener | None = None) -> None:
        super().__init__(path, writer, reader, PgGroupWriter(path, writer, reader, database_clock),
                         PgReads(reader.conn), clock)
        self.dsn = dsn
        self.listener = listener or Listener(dsn, redacted(dsn))
        self.listener.deliver = self._changed

    @property
    def location(self) -> str:
        return self.dsn

    @property
    def notifies(self) -> bool:
        return self.listener.listening

    async def close(self) -> None:
        await self.listener.close()
        await super().close()

    async def login_role_exists(self, name: str) -> bool | None:
        return await self._reader.run(_login_role, self._reader.conn, name)

    @classmethod
    async def open(cls, dsn: str, *, home: Path, clock: Clock | None = None) -> PostgresStore:
        """Open (creating the schema if the database is empty) the ledger at ``dsn``; ``home``:
        the folder of this machine's files for it. ``clock``: a clock that overrides the
        database's (tests); by default ``now_ms`` is the database's time."""
        where = redacted(dsn)
        database_clock = DatabaseClock()
        try:
            writer = await Worker.open("ledger-pg-writer", partial(_open_writer, dsn, where))
        except (OSError, TimeoutError) as exc:
            raise StoreError(f"cannot reach the ledger's database at {where}: {exc}") from None
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"cannot open the ledger's database at {where}: {in_one_line(exc)}") from None
        # Listening from the start: a change committed after this store read what it keeps
        # reaches it. It connects while the reader does (what it hears before the store exists
        # concerns nothing read yet).
        listener = Listener(dsn, where)
        listener.start_soon()
        try:
            database_clock.observe(*await writer.run(_now_ms, writer.conn))
            session_user = await writer.run(_session_user, writer.conn)
            reader = await Worker.open("ledger-pg-reader", partial(PgConnection, dsn))
        except BaseException:
            await listener.close()
            await writer.close()
            raise
        path = local_name(dsn, home)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            await listener.close()
            await writer.close()
            await reader.close()
            raise StoreError(f"cannot create the folder {path.parent} for the ledger's local files: "
                             f"{exc.strerror}") from None
        store = cls(dsn, path, writer, reader, clock or database_clock, database_clock, listener)
        store.session_user = session_user
        try:  # a listener that cannot connect yet goes on trying in the background
            listening = await listener.start()
        except BaseException:
            await store.close()
            raise
        if not listening:
            log.warning("not listening for ledger changes at %s yet (retrying): changes other processes "
                        "make reach this one at its next read", where)
        return store


if TYPE_CHECKING:  # mypy holds the store to the interface
    def _implements(store: PostgresStore) -> Ledger:
        return store
