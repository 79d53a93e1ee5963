"""The group-commit writer: every write of the store goes through it.

Concurrent ``record()`` calls share one transaction, and each returns only once its event is
committed; ``transact`` operations likewise share one, each in a savepoint of its own. A small
operation batch runs on the event loop when the ledger is free (two thread hand-offs cost more
than its work); a large one, or one that must wait for another process's write lock, runs on
the writer's thread. Commits that need no fsync skip it (``sync=False``, or ``sync_interval_s``
which bounds instead of removes the fsync's cost), and the log is checkpointed by the reader
as writes accumulate.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable, Iterable
from itertools import islice
from pathlib import Path
from typing import Any, Final, TypeVar

from engine.ledger.dbapi import Connection
from engine.ledger.errors import PipelineFailed, StoreError
from engine.ledger.repos import LedgerView
from engine.ledger.repos.events import Events
from engine.ledger.results import RecordResult
from engine.ledger.schema import BUSY_TIMEOUT_MS
from engine.ledger.tx import LedgerTx
from engine.ledger.worker import Worker
from engine.models import UsageEvent

T = TypeVar("T")

#: At most this many events go into one group-committed transaction.
MAX_BATCH: Final = 4096
#: Bulk writes commit in chunks of this many events (each chunk all-or-nothing).
BULK_CHUNK: Final = 50_000
INLINE_BATCH: Final = 64  # an operation batch this small runs on the event loop when the ledger is free
CHECKPOINT_EVERY: Final = 1_000  # operations and events written between two checkpoints of the log

TxOp = Callable[[LedgerTx], Any]


class GroupWriter:
    """The store's writes, on the writer connection (``writer``); ``reader`` checkpoints the log."""

    def __init__(self, path: Path, writer: Worker[Any], reader: Worker[Any], durable: bool = True,
                 sync_interval_s: float = 0.0) -> None:
        self.path = path
        self._worker = writer
        self._reader = reader
        self._pending: list[tuple[UsageEvent, asyncio.Future[RecordResult]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        self._closed = False
        self.commits = 0  # group-commit transactions so far (for benchmarks and tests)
        self.series: dict[tuple[str, ...], int] = {}  # dimension combination -> series id (committed)
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

    #: A small batch may run on the event loop's thread (SQLite: a connection's calls are
    #: plain function calls there; a PostgreSQL connection's need its worker's own loop).
    inline = True

    @property
    def conn(self) -> Connection:
        conn: Connection = self._worker.conn
        return conn

    async def close(self) -> None:
        """Commit what is pending, fsync what was deferred, checkpoint what this store wrote."""
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

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def policies_saved(self) -> bool:
        """This store changed a policy that no batch has read back yet."""
        return self._policies_saved

    def policies_changed(self) -> None:
        """A policy was saved: the next batch is not quiet (see LedgerTx.quiet)."""
        self._policies_saved = True

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

    async def transact(self, op: Callable[[LedgerTx], T], *, sync: bool = True) -> T:
        """Run ``op`` on the writer's thread inside a write transaction, group-committed with
        other operations; returns its result once committed. A failing op is rolled back
        to its savepoint alone and its error raised to its caller.

        ``sync=False``: the change need not survive a power cut (a hold for a call under way:
        the call would not survive it either). It is committed, visible to every process and
        safe from a process crash, but a batch of such operations alone skips the fsync; the
        next durable commit makes it durable too, as the log is written in order."""
        if self._closed:
            raise StoreError("the ledger is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
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
                    if self.inline and len(ops) <= INLINE_BATCH:
                        try:
                            results = self._ops_sync(ops, sync, wait=False)
                        except _Busy:
                            pass
                    if results is None:
                        results = await self._worker.run(self._ops_sync, ops, sync)
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
            await self._reader.run(_checkpoint_sync, self._reader.conn)
            if self.commits != commits:  # this store wrote meanwhile: copy that too
                async with self._write_lock:
                    await self._worker.run(_checkpoint_sync, self.conn)
        except sqlite3.Error:  # a busy or failed checkpoint: the next one copies what this did not
            return
        self.checkpoints += 1

    #: Run a batch's operations without a savepoint each first, and only if one fails undo the
    #: batch and run it again with savepoints (``_ops_sync``): for a database where each
    #: statement is a round trip (PostgreSQL); SQLite's savepoints cost next to nothing.
    optimistic = False

    def _ops_sync(self, ops: list[TxOp], sync: bool = True, wait: bool = True) -> list[tuple[bool, Any]]:
        """One operation batch in one transaction; ``wait=False`` raises _Busy at once, and
        starts nothing, if another connection holds the ledger's write lock.

        ``optimistic``: the operations run with no savepoint between them; if one fails, the
        whole batch is undone (the abort hooks reset what memory kept of it) and run again with
        a savepoint for each operation, but the failed one, whose error is its result: it
        failed after the same operations as it follows again, so that is what it would have
        done. It is not run twice (what it did outside the transaction on failing, it did once)."""
        failed: _OpFailed | None = None
        if self.optimistic and len(ops) > 1:
            try:
                return self._batch_sync(ops, sync, wait, savepoints=False)
            except _OpFailed as failure:
                if not isinstance(failure.error, PipelineFailed):  # else no operation is to blame yet
                    failed = failure
            except PipelineFailed:  # a write sent ahead failed, or came back other than foretold
                pass
        return self._batch_sync(ops, sync, wait, savepoints=True, failed=failed)

    def _batch_sync(self, ops: list[TxOp], sync: bool, wait: bool, *, savepoints: bool,
                    failed: _OpFailed | None = None) -> list[tuple[bool, Any]]:
        conn = self.conn
        fresh: dict[tuple[str, ...], int] = {}
        tx = LedgerTx(self, conn, fresh)
        results: list[tuple[bool, Any]] = []
        deferred = sync and self.sync_interval_s > 0
        self._synchronous(sync and not deferred, wait)
        before, after = self._begin(conn, wait)
        seen, self._seen, self._policies_saved = self._seen, None, False
        try:
            # The ledger's version moves when another connection commits; self.commits when
            # this store writes outside a batch (record, bulk_record).
            tx.quiet = seen == (before, self.commits)
            for begin, _ in self._hooks:
                begin(tx)
            if len(ops) == 1:  # no savepoint: if it fails, the batch is undone whole (below), which is the same
                results.append((True, ops[0](tx)))
            elif not savepoints:
                self._pipeline(conn, True)
                try:
                    for index, op in enumerate(ops):
                        try:
                            results.append((True, op(tx)))
                        except Exception as exc:  # the batch is undone (below) and run again with savepoints
                            raise _OpFailed(index, exc) from exc
                    self._send_ahead(conn)  # what was queued, before the end hooks read the ledger
                finally:
                    self._pipeline(conn, False)
            else:
                released = True  # no savepoint is open
                for index, op in enumerate(ops):
                    if failed is not None and index == failed.index:
                        results.append((False, failed.error))
                        continue
                    self._savepoint(conn, released)
                    made = len(fresh)  # series ids so far; fresh only grows, in order
                    try:
                        results.append((True, op(tx)))
                        released = False
                    except Exception as exc:  # this op alone is undone; the others go on
                        self._undo_op(conn)
                        for key in list(fresh)[made:]:  # the series it made are undone with it
                            del fresh[key]
                        released = True
                        results.append((False, exc))
                if not released:
                    self._release(conn)
            for end in self._end_hooks:
                end(tx)
            self._commit(conn)
        except BaseException:
            try:
                self._rollback_sync()
            finally:  # the book forgets what it folded in, even if the rollback itself failed
                for _, abort in self._hooks:
                    abort()
            raise
        self.series.update(fresh)
        self.commits += 1
        self._seen = None if self._policies_saved else (after, self.commits)
        if deferred:
            self._deferred += 1
        return results

    def _commit(self, conn: Connection) -> None:
        """Commit an operation batch."""
        conn.execute("COMMIT")

    def _pipeline(self, conn: Connection, on: bool) -> None:
        """Whether the operations now running may queue writes (``PgConnection.queue``): only a
        database where each statement is a round trip does."""

    def _send_ahead(self, conn: Connection) -> None:
        """Send what the operations queued (raises ``PipelineFailed`` if it is not as foretold)."""

    def _savepoint(self, conn: Connection, released: bool) -> None:
        """Before each operation of a batch: release the previous one's savepoint (unless
        ``released``) and open the next."""
        if not released:
            conn.execute("RELEASE op")
        conn.execute("SAVEPOINT op")

    def _undo_op(self, conn: Connection) -> None:
        """An operation failed: undo it alone, and close its savepoint."""
        conn.execute("ROLLBACK TO op")
        conn.execute("RELEASE op")

    def _release(self, conn: Connection) -> None:
        """After the batch's last operation (the end hooks and the commit follow)."""
        conn.execute("RELEASE op")

    def _begin(self, conn: Connection, wait: bool = True) -> tuple[int, int]:
        """Begin a write transaction holding the ledger's write lock; the ledger's version
        before and after this transaction (SQLite's data_version, which a connection's own
        commits leave alone). ``wait=False``: raise _Busy at once if another connection holds it."""
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if not wait and exc.sqlite_errorcode == sqlite3.SQLITE_BUSY:
                raise _Busy from None
            raise
        try:
            version = int(conn.execute("PRAGMA data_version").fetchone()[0])
        except BaseException:
            self._rollback_sync()
            raise
        return version, version

    def probe_write(self, conn: Connection) -> None:
        """Inside a batch: write the schema version as it is, a real write (a page of the log)
        that changes nothing."""
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        conn.execute(f"PRAGMA user_version = {version}")

    def _synchronous(self, sync: bool, wait: bool = True) -> None:
        """Wherever the writer runs: whether the next commit waits for the disk (a durable
        store's commits do unless the operation said it need not), and whether the next BEGIN
        waits for another process's write lock (else it fails at once). Set only on change."""
        if self.durable and sync != self._synced:
            self.conn.execute(f"PRAGMA synchronous = {'FULL' if sync else 'NORMAL'}")
            self._synced = sync
        if wait != self._waits:
            self.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS if wait else 0}")
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
                          journal: Callable[[LedgerView, int, int], None] | None = None) -> tuple[int, int]:
        """Append a large stream; returns (recorded, duplicates).

        Each chunk of ``chunk`` events is one transaction, so a long import does not hold
        the write lock against live traffic for its whole length; ``atomic`` makes the
        whole stream one transaction instead (all or nothing). ``prepare`` (pricing) runs on
        the writer's thread just before each chunk is written: Python work on two threads
        at once would only fight over the GIL. ``journal(view, recorded, duplicates)`` runs
        last in each transaction, before its commit (with that transaction's counts); if it
        raises, that transaction is undone and the error raised.
        """
        run = self._worker.run
        source = iter(events)
        fresh: dict[tuple[str, ...], int] = {}
        recorded = duplicates = 0
        async with self._write_lock:
            if atomic:
                await run(self._synchronous, True)
                await run(self._begin, self.conn)
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
                    pending = asyncio.ensure_future(run(
                        self._bulk_chunk_sync, batch, fresh, atomic, prepare, journal))
                if atomic:
                    if journal is not None:
                        await run(journal, LedgerView(self.conn), recorded, duplicates)
                    await run(self._commit_sync, fresh)
            except BaseException:
                if pending is not None:
                    await asyncio.gather(pending, return_exceptions=True)
                if atomic:
                    await run(self._rollback_sync)
                raise
        return recorded, duplicates

    async def _write(self, events: list[UsageEvent]) -> list[RecordResult]:
        if not events:
            return []
        async with self._write_lock:
            # One hop to the connection's thread for the whole transaction, instead of a hop
            # per statement.
            results = await self._worker.run(self._write_sync, events)
        self._wrote(len(events))
        return results

    def _write_sync(self, events: list[UsageEvent]) -> list[RecordResult]:
        """Runs on the writer's thread: one transaction holding SQLite's write lock."""
        conn = self.conn
        fresh: dict[tuple[str, ...], int] = {}
        self._synchronous(True)
        self._begin(conn)
        try:
            _, new_ids = Events(conn, self.series, fresh).append(events)
            conn.execute("COMMIT")
        except BaseException:
            self._rollback_sync()
            raise
        self.series.update(fresh)  # only once committed: a rolled-back id must not be reused
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
                         journal: Callable[[LedgerView, int, int], None] | None) -> tuple[int, int]:
        conn = self.conn
        appending = Events(conn, self.series, fresh)
        if prepare is not None:
            for event in events:
                prepare(event)
        if in_transaction:
            inserted, _ = appending.append(events, want_ids=False)
        else:
            self._synchronous(True)
            self._begin(conn)
            try:
                inserted, _ = appending.append(events, want_ids=False)
                if journal is not None:
                    journal(LedgerView(conn), inserted, len(events) - inserted)
                conn.execute("COMMIT")
            except BaseException:
                self._rollback_sync()
                raise
            self.series.update(fresh)
            self.commits += 1
        return inserted, len(events) - inserted

    def _commit_sync(self, fresh: dict[tuple[str, ...], int]) -> None:
        self.conn.execute("COMMIT")
        self.series.update(fresh)
        self.commits += 1

    def _rollback_sync(self) -> None:
        conn = self.conn
        if conn.in_transaction:
            conn.execute("ROLLBACK")


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


class _OpFailed(Exception):
    """An operation of an optimistic batch failed (``GroupWriter._ops_sync``)."""

    def __init__(self, index: int, error: Exception) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error
