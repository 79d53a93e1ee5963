"""The ledger assembled: a group-commit writer, a reader and the store's clock, whichever the database.

``Store`` is what ``SQLiteStore`` (``engine.ledger.sqlite``) and ``PostgresStore``
(``engine.ledger.pg.store``) share: every method of the ``Ledger`` interface, delegated to the
writer (``writer.GroupWriter``) or run on the reader's thread (``reads.Reads``). A backend opens
its connections, migrates its schema and hands them over.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from engine.clock import Clock
from engine.ledger.changes import Subscribers
from engine.ledger.reads import Reads
from engine.ledger.repos import LedgerView
from engine.ledger.repos.prices import Prices
from engine.ledger.results import TIMELINE_FIELDS, BreakdownRow, Metric, RecordResult, TimelinePoint, Totals
from engine.ledger.tx import LedgerTx
from engine.ledger.worker import Worker
from engine.ledger.writer import BULK_CHUNK, GroupWriter
from engine.models import UsageEvent

T = TypeVar("T")


class Store:
    """A ledger: its writes through ``writes``, its reads through ``reads`` on ``reader``'s thread.
    ``path``: where this machine keeps what belongs to the ledger (the SQLite file itself; for
    PostgreSQL, a local name beside which the spill journal and the vault live)."""

    def __init__(self, path: Path, writer: Worker[Any], reader: Worker[Any], writes: GroupWriter, reads: Reads,
                 clock: Clock) -> None:
        self.path = path
        self._writer = writer
        self._reader = reader
        self._writes = writes
        self._reads = reads
        self.clock = clock
        self._subscribers = Subscribers()
        #: The database role this process connects as (PostgreSQL's ``session_user``, read once
        #: at open): who the command line and the dashboard act as there. None on SQLite, whose
        #: file has no notion of who opens it.
        self.session_user: str | None = None

    @property
    def location(self) -> str:
        """What ``Engine.open`` was given to open this ledger (a file, or a database's address)."""
        return str(self.path)

    async def close(self) -> None:
        if self._writes.closed:
            return
        await self._writes.close()
        await self._writer.close()
        await self._reader.close()

    def now_ms(self) -> int:
        return self.clock.now_ms()

    # ---- changes other processes made (engine.ledger.changes)

    def on_change(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call ``callback(kind)`` on the event loop whenever a transaction of any process
        commits a change of ``kind`` (``changes.KINDS``; ``changes.ANY``: anything may have
        changed, the store having missed what was sent for a while). Returns what unsubscribes.
        Only a store that ``notifies`` ever calls it: SQLite sends nothing, and its readers
        notice changes by reading (the budget book's version check, the dashboard's timer)."""
        return self._subscribers.add(callback)

    @property
    def notifies(self) -> bool:
        """Changes are pushed to this store as they are committed (listening now)."""
        return False

    def _changed(self, kind: str) -> None:
        """Hand ``kind`` to every subscriber (on the event loop); one that fails is logged, the
        others still hear of it."""
        self._subscribers.tell(kind)

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

    async def login_role_exists(self, name: str) -> bool | None:
        """Whether the database has a login role ``name`` (PostgreSQL, where members are roles);
        None where nobody logs in (SQLite)."""
        return None

    async def read_with(self, fn: Callable[[LedgerView], T]) -> T:
        """Run ``fn`` on the ledger's records as the read connection sees them (never waits for the writer)."""
        return await self._reader.run(lambda: fn(LedgerView(self._reader.conn)))

    async def load_prices(self) -> list[str]:
        return await self._reader.run(lambda: Prices(self._reader.conn).specs())


