"""The ledger's interface: what the engine needs from a backend, whichever it is.

``Ledger`` is what ``SQLiteStore`` implements and a PostgreSQL store (issue 20) will: what a
budget decision needs (``transact``, the hooks that keep the budget book current, the time
the store says it is), what recording usage needs (``record``, ``record_many``,
``bulk_record``), what a dashboard reads (totals, timelines, breakdowns, the ledger's tail),
and how it ends. ``Transaction`` is what an operation may do inside ``transact``: plain values
in, typed results out (``engine.ledger.results``); no connection, cursor or row crosses either.

A transaction is synchronous: the budget book decides in plain Python, under the ledger's
write lock, with no await between reading the counters and writing the hold. SQLite gives that
directly (one writer; an operation runs on the writer's thread, or on the event loop when the
ledger is free). A PostgreSQL store keeps the same shape with asyncpg: a batch of operations
runs in a worker thread, and each statement a repository issues there is handed to the event
loop (``asyncio.run_coroutine_threadsafe``) and run on the batch's connection, inside one
transaction. Before a decision reads a policy's consumption, the transaction locks the rows of
the policies it touches (``SELECT ... FOR UPDATE``), always in the order of their ids, so two
gateways deciding on the same policy serialize and never deadlock; the budget book's ``begin``
hook then folds in what other gateways committed (events and hold journal rows after the ids it
has seen) before the operations run. Group commit stays per process: a batch is one
transaction, one round trip to commit. ``now_ms`` is the database's clock there (the
transaction's ``now()``), so a gateway whose clock is off can neither overspend nor expire
another's holds early; SQLite answers from the clock it is given.

The domain modules (tokens, members, approvals, audit, providers) reach their rows through a
``LedgerView`` (``read_with``'s argument; a transaction is one too): repositories with plain values
in and typed records out. The SQLite store builds them on its connection; a PostgreSQL store
supplies repositories with the same methods on its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Protocol, TypeVar

from engine.ledger.repos import LedgerView
from engine.ledger.results import (
    AlertRow,
    BreakdownRow,
    BudgetDecision,
    ClosedHold,
    Delivery,
    EventRow,
    JournalRow,
    Metric,
    MinuteSums,
    OvershootRow,
    PoliciesVersion,
    RecordResult,
    TimelinePoint,
    Totals,
    UsageSums,
)
from engine.models import UsageEvent

T = TypeVar("T")


class Transaction(Protocol):
    """What an operation may do inside ``Ledger.transact`` (all of it in one transaction)."""

    #: Nothing was written since this store's last batch: what the budget book holds is current.
    quiet: bool

    @property
    def last_journal_id(self) -> int:
        """The id of the last hold journal row this transaction wrote."""

    @property
    def appended_id(self) -> int:
        """The id of the event the last ``append`` of one new event wrote (0: none, or unknown;
        ``PENDING_ID``: sent ahead, so nothing came between; its id known at the batch's end)."""

    @property
    def last_event_id(self) -> int:
        """The highest id of an event this transaction appended (0: none), once sent."""

    def probe_write(self) -> None:
        """A write that changes nothing: whether the ledger takes writes again."""

    # events and their sums
    def append(self, events: list[UsageEvent]) -> list[RecordResult]: ...
    def max_event_id(self) -> int: ...
    def events_since(self, last_id: int) -> list[EventRow]: ...
    def events_between(self, start_ms: int, end_ms: int, where: Mapping[str, str]) -> UsageSums: ...
    def rollup_between(self, start_ms: int, end_ms: int, where: Mapping[str, str]) -> UsageSums: ...
    def minute_sums(self, start_ms: int, end_ms: int, where: Mapping[str, str],
                    *, raw: bool = False) -> list[MinuteSums]: ...

    # holds and their journal
    def open_hold(self, hold_id: str, request_id: str, now_ms: int, expires_ms: int, context: str,
                  lines: Sequence[tuple[str, int]]) -> None: ...
    def close_hold(self, hold_id: str, state: str, now_ms: int,
                   expected: Sequence[tuple[str, int]] | None = None) -> ClosedHold | None: ...
    def settle_hold(self, event: UsageEvent, hold_id: str, now_ms: int,
                    expected: Sequence[tuple[str, int]] | None = None) -> tuple[RecordResult, ClosedHold | None]: ...
    def hold_state(self, hold_id: str) -> str | None: ...
    def expired_holds(self, now_ms: int) -> list[str]: ...
    def held_totals(self) -> dict[str, int]: ...
    def open_hold_count(self) -> int: ...
    def max_journal_id(self) -> int: ...
    def journal_since(self, last_id: int) -> list[JournalRow]: ...

    # policies and prices
    def policy_specs(self) -> list[str]: ...
    def policies_version(self) -> PoliciesVersion: ...
    def save_policy(self, policy_id: str, spec: str, now_ms: int, *, deleted: bool = False) -> None: ...
    def save_prices(self, rows: Sequence[tuple[str, str, int, str, str, str, int]]) -> None: ...

    # alerts, overshoots, webhooks, budget decisions
    def raise_alert(self, policy_id: str, window_start_ms: int, kind: str, threshold: int, now_ms: int,
                    value: int, message: str) -> int | None: ...
    def alerts(self, *, include_acked: bool, limit: int) -> list[AlertRow]: ...
    def ack_alert(self, alert_id: int, actor: str, now_ms: int) -> bool | None: ...
    def record_overshoot(self, now_ms: int, request_id: str, hold_id: str, policy_id: str, held: int,
                         settled: int) -> int: ...
    def overshoots(self, since_ms: int = 0) -> list[OvershootRow]: ...
    def add_webhook(self, webhook_id: str, url: str, kind: str, now_ms: int) -> None: ...
    def remove_webhook(self, webhook_id: str) -> tuple[str, str] | None: ...
    def webhooks(self) -> list[tuple[str, str, str]]: ...  # Webhook rows: id, url (a secret), kind
    def log_deliveries(self, rows: Sequence[tuple[int, str, int, int, int, str]]) -> None: ...
    def deliveries(self, alert_id: int) -> list[Delivery]: ...
    def record_decision(self, ts_ms: int, request_id: str, policy_id: str, decision: str, mode: str) -> None: ...
    def decisions(self, limit: int) -> list[BudgetDecision]: ...


class Ledger(Protocol):
    """A ledger backend. Money is integer nano-dollars throughout."""

    # ---- the clock that decides (windows, expiry)

    def now_ms(self) -> int:
        """The store's time: the clock it was given (SQLite), the database's (PostgreSQL)."""

    # ---- a budget decision

    async def transact(self, op: Callable[[Transaction], T], *, sync: bool = True) -> T:
        """Run ``op`` inside a write transaction, group-committed with other operations; its
        result once committed. A failing op is undone alone and its error raised to its caller.
        ``sync=False``: the change need not survive a power cut."""

    def add_transaction_hooks(self, begin: Callable[[Transaction], None], abort: Callable[[], None],
                              end: Callable[[Transaction], None] | None = None) -> None:
        """``begin`` first in every batch, ``end`` last before its commit, ``abort`` if undone."""

    @property
    def policies_saved(self) -> bool:
        """This store changed a policy that no batch has read back yet."""

    # ---- changes other processes made (engine.ledger.changes)

    def on_change(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call ``callback(kind)`` on the event loop when a transaction of any process commits a
        change of ``kind`` (``changes.KINDS``; ``changes.ANY`` after a gap); what unsubscribes.
        PostgreSQL pushes them (LISTEN/NOTIFY); SQLite never calls it."""

    @property
    def notifies(self) -> bool:
        """Changes are pushed to this store as they commit (listening now)."""

    # ---- recording usage

    async def record(self, event: UsageEvent) -> RecordResult:
        """Append one event once committed; concurrent calls share a commit."""

    async def record_many(self, events: Iterable[UsageEvent]) -> list[RecordResult]:
        """Append events in one transaction: all or none."""

    async def bulk_record(self, events: Iterable[UsageEvent], *, chunk: int = ..., atomic: bool = False,
                          prepare: Callable[[UsageEvent], object] | None = None,
                          journal: Callable[[LedgerView, int, int], None] | None = None) -> tuple[int, int]:
        """Append a large stream in chunks (or one transaction, ``atomic``); (recorded, duplicates).
        ``journal(view, recorded, duplicates)`` runs last in each transaction, before its commit."""

    async def read_with(self, fn: Callable[[LedgerView], T]) -> T:
        """Run ``fn`` on the ledger's records as a read sees them (never waits for the writer)."""

    async def flush(self) -> None:
        """Wait until every pending record and operation is committed."""

    # ---- what a dashboard reads

    async def totals(self, start_ms: int, end_ms: int, filters: Mapping[str, str] | None = None) -> Totals: ...
    async def timeline(self, start_ms: int, end_ms: int, bucket_ms: int,
                       filters: Mapping[str, str] | None = None,
                       group_by: str | None = None,
                       fields: Sequence[str] = ...) -> list[TimelinePoint]: ...
    async def breakdown(self, start_ms: int, end_ms: int, by: str, *, limit: int = 10,
                        order: Metric = "cost",
                        filters: Mapping[str, str] | None = None) -> list[BreakdownRow]: ...
    async def dimension_values(self, dim: str) -> list[str]: ...
    async def event_count(self) -> int: ...
    async def time_span(self) -> tuple[int, int] | None: ...
    def iter_events(self, start_ms: int, end_ms: int, batch: int = 5000) -> AsyncIterator[UsageEvent]: ...
    async def recent_events(self, after_id: int, limit: int,
                            status: str | None = None) -> list[tuple[int, UsageEvent]]: ...
    async def fold_usage(self, start_ms: int, end_ms: int, where: Mapping[str, str],
                         fn: Callable[[Iterable[tuple[int, int, int, str]]], T]) -> T: ...
    async def load_prices(self) -> list[str]: ...

    async def data_version(self) -> int:
        """A number that changes whenever another process commits (cheap change detection)."""

    async def schema_version(self) -> int: ...

    async def close(self) -> None: ...
