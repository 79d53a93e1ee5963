"""The SQLite ledger: opening it (``SQLiteStore``, the embedded default).

Two connections to one file in WAL mode, each on a thread of its own (``worker``): the writer,
behind the group-commit writer (``writer``), and the reader, which serves every read
(``reads``) and never waits for the writer. The schema and its migrations are in ``schema``,
the rollup SQL in ``rollups``, the transaction an operation gets in ``tx``, one repository per
record kind in ``repos``; what every backend shares is ``store.Store``. ``SQLiteStore``
implements ``protocol.Ledger``.
"""

from __future__ import annotations

import sqlite3
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from engine.clock import Clock, SystemClock
from engine.ledger.errors import StoreError
from engine.ledger.reads import Reads
from engine.ledger.rollups import TEMP_TABLES
from engine.ledger.schema import WAL_SIZE_LIMIT, connect, migrate
from engine.ledger.store import Store
from engine.ledger.tx import LedgerTx
from engine.ledger.worker import Worker
from engine.ledger.writer import GroupWriter

if TYPE_CHECKING:
    from engine.ledger.protocol import Ledger, Transaction

T = TypeVar("T")


class SQLiteStore(Store):
    """The SQLite ledger. Open with ``await SQLiteStore.open(path)``."""

    # ---- opening

    @classmethod
    async def open(cls, path: str | Path, *, durable: bool = True, sync_interval_s: float = 0.0,
                   clock: Clock | None = None) -> SQLiteStore:
        """Open (creating and migrating if needed) the ledger at ``path``.

        ``durable`` makes every commit reach the disk (synchronous=FULL); group commit
        keeps that affordable. Without it a commit survives a process crash but not
        a power cut.

        ``sync_interval_s`` > 0 (the gateway's choice) bounds instead of removes the fsync's
        cost for ``transact``: a commit is acknowledged once it is in the log (it survives
        the process being killed), and the log reaches the disk within that many seconds, so
        a power cut loses at most that long of acknowledged operations, never a half of one.

        ``clock``: what ``now_ms`` answers (the system's by default).
        """
        path = Path(path)
        clock = clock or SystemClock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the ledger's folder {path.parent}: {exc.strerror}") from None
        writer = await Worker.open("ledger-writer", partial(connect, path, durable, any_thread=True))
        try:
            await writer.run(_prepare_writer, writer.conn, path, clock.now_ms())
            reader = await Worker.open("ledger-reader", partial(connect, path, durable))
        except BaseException:
            await writer.close()
            raise
        return cls(path, writer, reader, GroupWriter(path, writer, reader, durable, sync_interval_s),
                   Reads(reader.conn), clock)


def _prepare_writer(conn: sqlite3.Connection, path: Path, now_ms: int) -> None:
    """Migrate the ledger and set the writer's connection up (on the writer's thread)."""
    migrate(conn, path, now_ms)
    # The writer never checkpoints the log itself: its commits may run on the event loop,
    # which must not stall copying megabytes. The reader does it, on its own thread.
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    # A log that grew long (an import, a reader that kept an old snapshot) is cut back
    # to this when it next starts again, rather than keep its size on the disk for ever.
    conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
    for sql in TEMP_TABLES:
        conn.execute(sql)


if TYPE_CHECKING:  # mypy holds the store and its transaction to the interface
    def _implements(store: SQLiteStore) -> Ledger:
        return store

    def _offers(tx: LedgerTx) -> Transaction:
        return tx

