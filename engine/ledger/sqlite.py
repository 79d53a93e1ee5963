"""The SQLite ledger: the store that assembles the ledger's parts.

Two connections to one file in WAL mode, each on a thread of its own (``worker``): the writer,
behind the group-commit writer (``writer``), and the reader, which serves every read
(``reads``) and never waits for the writer. The schema and its migrations are in ``schema``,
the rollup SQL in ``rollups``, the transaction an operation gets in ``tx``, one repository per
record kind in ``repos``. ``SQLiteStore`` implements ``protocol.Ledger``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from engine.clock import Clock, SystemClock
from engine.ledger.errors import StoreError
from engine.ledger.reads import Reads
from engine.ledger.repos import LedgerView
from engine.ledger.repos.prices import Prices
from engine.ledger.results import TIMELINE_FIELDS, BreakdownRow, Metric, RecordResult, TimelinePoint, Totals
from engine.ledger.rollups import TEMP_TABLES
from engine.ledger.schema import WAL_SIZE_LIMIT, connect, migrate
from engine.ledger.tx import LedgerTx
from engine.ledger.worker import Worker
from engine.ledger.writer import BULK_CHUNK, GroupWriter
from engine.models import UsageEvent

if TYPE_CHECKING:
    from engine.ledger.protocol import Ledger, Transaction

T = TypeVar("T")


class SQLiteStore:
    """The SQLite ledger. Open with ``await SQLiteStore.open(path)``."""

    def __init__(self, path: Path, writer: Worker, reader: Worker, durable: bool = True,
                 sync_interval_s: float = 0.0, clock: Clock | None = None) -> None:
        self.path = path
        self._writer = writer
        self._reader = reader
        self._writes = GroupWriter(path, writer, reader, durable, sync_interval_s)
        self._reads = Reads(reader.conn)
        self._clock = clock or SystemClock()

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
        return cls(path, writer, reader, durable, sync_interval_s, clock)

    async def close(self) -> None:
        if self._writes.closed:
            return
        await self._writes.close()
        await self._writer.close()
        await self._reader.close()

    def now_ms(self) -> int:
        return self._clock.now_ms()

    # ---- what the writer counts (for tests and benchmarks)

    @property
    def commits(self) -> int:
        """Group-commit transactions so far."""
        return self._writes.commits

    @property
    def syncs(self) -> int:
        """fsyncs of the log made for deferred commits."""
        return self._writes.syncs

    @property
    def checkpoints(self) -> int:
        """Checkpoints of the log made."""
        return self._writes.checkpoints

    @property
    def policies_saved(self) -> bool:
        """This store changed a policy that no batch has read back yet."""
        return self._writes.policies_saved

    # ---- writing

    def record(self, event: UsageEvent) -> Coroutine[Any, Any, RecordResult]:
        """Append one event; returns once it is committed. Concurrent calls share a transaction."""
        return self._writes.record(event)

    def record_many(self, events: Iterable[UsageEvent]) -> Coroutine[Any, Any, list[RecordResult]]:
        """Append many events in one transaction: all are written or none is."""
        return self._writes.record_many(events)

    def bulk_record(self, events: Iterable[UsageEvent], *, chunk: int = BULK_CHUNK, atomic: bool = False,
                    prepare: Callable[[UsageEvent], object] | None = None,
                    journal: Callable[[LedgerView, int, int], None] | None = None
                    ) -> Coroutine[Any, Any, tuple[int, int]]:
        """Append a large stream; returns (recorded, duplicates) (``GroupWriter.bulk_record``)."""
        return self._writes.bulk_record(events, chunk=chunk, atomic=atomic, prepare=prepare, journal=journal)

    def transact(self, op: Callable[[LedgerTx], T], *, sync: bool = True) -> Coroutine[Any, Any, T]:
        """Run ``op`` inside a write transaction, group-committed (``GroupWriter.transact``)."""
        return self._writes.transact(op, sync=sync)

    def add_transaction_hooks(self, begin: Callable[[LedgerTx], None], abort: Callable[[], None],
                              end: Callable[[LedgerTx], None] | None = None) -> None:
        """``begin`` runs first in every operation batch (to catch up with other processes),
        ``end`` last before the commit, and ``abort`` when a batch is rolled back."""
        self._writes.add_transaction_hooks(begin, abort, end)

    async def flush(self) -> None:
        """Wait until every pending ``record()`` and operation is committed."""
        await self._writes.flush()

    # ---- reading (on the reader's thread, one hop each)

    async def schema_version(self) -> int:
        return await self._reader.run(self._reads.schema_version)

    async def data_version(self) -> int:
        """A number that changes whenever another connection commits (cheap change detection)."""
        return await self._reader.run(self._reads.data_version)

    async def totals(self, start_ms: int, end_ms: int, filters: Mapping[str, str] | None = None) -> Totals:
        """Sums over [start, end), from the coarsest rollups that cover it exactly (from raw
        events when ``filters`` name an agent or a session)."""
        return await self._reader.run(self._reads.totals, start_ms, end_ms, filters)

    async def timeline(self, start_ms: int, end_ms: int, bucket_ms: int,
                       filters: Mapping[str, str] | None = None,
                       group_by: str | None = None,
                       fields: Sequence[str] = TIMELINE_FIELDS) -> list[TimelinePoint]:
        """Sums per bucket of ``bucket_ms`` (aligned to the epoch, UTC), optionally per group;
        only ``fields`` are summed, the others stay 0."""
        return await self._reader.run(self._reads.timeline, start_ms, end_ms, bucket_ms, filters, group_by, fields)

    async def breakdown(self, start_ms: int, end_ms: int, by: str, *, limit: int = 10,
                        order: Metric = "cost",
                        filters: Mapping[str, str] | None = None) -> list[BreakdownRow]:
        """The top ``limit`` values of dimension ``by`` over [start, end), largest first."""
        return await self._reader.run(partial(self._reads.breakdown, start_ms, end_ms, by, limit=limit,
                                              order=order, filters=filters))

    async def dimension_values(self, dim: str) -> list[str]:
        """Every value a dimension has taken (for filters and pickers)."""
        return await self._reader.run(self._reads.dimension_values, dim)

    async def event_count(self) -> int:
        return await self._reader.run(self._reads.event_count)

    async def time_span(self) -> tuple[int, int] | None:
        """The first and last event time in the ledger, or None when it is empty."""
        return await self._reader.run(self._reads.time_span)

    async def iter_events(self, start_ms: int, end_ms: int, batch: int = 5000) -> AsyncIterator[UsageEvent]:
        """Raw events in [start, end), oldest first (for export and replay, not for dashboards)."""
        after = (start_ms - 1, 0)
        while True:
            page = await self._reader.run(self._reads.events_page, end_ms, after, batch)
            if not page:
                return
            for _, event in page:
                yield event
            after = (page[-1][1].ts_ms, page[-1][0])

    async def recent_events(self, after_id: int, limit: int, status: str | None = None) -> list[tuple[int, UsageEvent]]:
        """The newest ``limit`` events recorded after event ``after_id`` (of one ``status``, or
        all), newest first, with their ids (``Reads.recent_events``)."""
        return await self._reader.run(self._reads.recent_events, after_id, limit, status)

    async def fold_usage(self, start_ms: int, end_ms: int, where: Mapping[str, str],
                         fn: Callable[[Iterable[tuple[int, int, int, str]]], T]) -> T:
        """Run ``fn`` over (ts_ms, cost_nanos, tokens, status) of raw events in [start, end)
        matching ``where``, oldest first, streamed on the reader's thread (for backtests)."""
        return await self._reader.run(self._reads.fold_usage, start_ms, end_ms, where, fn)

    async def read_with(self, fn: Callable[[LedgerView], T]) -> T:
        """Run ``fn`` on the ledger's records as the read connection sees them (never waits for the writer)."""
        return await self._reader.run(lambda: fn(LedgerView(self._reader.conn)))

    async def load_prices(self) -> list[str]:
        return await self._reader.run(lambda: Prices(self._reader.conn).specs())


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

