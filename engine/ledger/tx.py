"""The SQLite ledger's transaction: what a group-committed operation may do.

An operation (``SQLiteStore.transact``) gets a ``LedgerTx`` inside the writer's transaction,
on the writer's thread or the event loop's, between BEGIN IMMEDIATE and COMMIT: every read
sees every other process's committed writes, and nothing can change underneath. It offers
one repository per record kind (``tx.events``, ``tx.holds``, ``tx.policies``, ``tx.alerting``,
``tx.decision_log``, ``tx.prices``) and, for the budget book's hot path and the engine, the same
operations as methods of its own (``protocol.Transaction`` lists them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from engine.ledger.dbapi import Connection
from engine.ledger.repos import LedgerView
from engine.ledger.repos.alerts import Alerts
from engine.ledger.repos.decisions import Decisions
from engine.ledger.repos.events import Events
from engine.ledger.repos.holds import Holds
from engine.ledger.repos.policies import Policies
from engine.ledger.repos.prices import Prices
from engine.ledger.results import (
    AlertRow,
    BudgetDecision,
    ClosedHold,
    Delivery,
    EventRow,
    JournalRow,
    MinuteSums,
    OvershootRow,
    PoliciesVersion,
    RecordResult,
    UsageSums,
)
from engine.models import UsageEvent

if TYPE_CHECKING:
    from engine.ledger.writer import GroupWriter


class LedgerTx(LedgerView):
    """What a group-committed operation may do inside the writer's transaction."""

    def __init__(self, writer: GroupWriter, conn: Connection, fresh: dict[tuple[str, ...], int],
                 quiet: bool = False) -> None:
        super().__init__(conn)  # the repositories of the domain modules: tx.tokens, tx.approvals, ...
        self._writer = writer
        self.conn = conn
        # Nothing was written to the ledger since this store's last operation batch, by another
        # connection or by this one outside a batch: what that batch left in memory is current.
        self.quiet = quiet
        self._fresh = fresh
        self._events: Events | None = None
        self._holds: Holds | None = None
        self._policies: Policies | None = None
        self._alerting: Alerts | None = None
        self._decision_log: Decisions | None = None
        self._prices: Prices | None = None

    # ---- the repositories, each made when first used (a batch mostly needs one or two)

    @property
    def events(self) -> Events:
        if self._events is None:
            self._events = Events(self.conn, self._writer.series, self._fresh)
        return self._events

    @property
    def holds(self) -> Holds:
        if self._holds is None:
            self._holds = Holds(self.conn)
        return self._holds

    @property
    def policies(self) -> Policies:
        if self._policies is None:
            self._policies = Policies(self.conn)
        return self._policies

    @property
    def alerting(self) -> Alerts:
        """Alerts, overshoots, webhooks and their deliveries."""
        if self._alerting is None:
            self._alerting = Alerts(self.conn)
        return self._alerting

    @property
    def decision_log(self) -> Decisions:
        if self._decision_log is None:
            self._decision_log = Decisions(self.conn)
        return self._decision_log

    @property
    def prices(self) -> Prices:
        if self._prices is None:
            self._prices = Prices(self.conn)
        return self._prices

    @property
    def last_journal_id(self) -> int:
        """The id of the last hold journal row this transaction wrote."""
        return self._holds.last_journal_id if self._holds is not None else 0

    @property
    def appended_id(self) -> int:
        """The id of the event the last append() of one event wrote (0: none, or unknown;
        ``PENDING_ID``: sent ahead, its id known once the batch's queued writes are sent)."""
        return self._events.appended_id if self._events is not None else 0

    @property
    def last_event_id(self) -> int:
        """The highest id of an event this transaction appended (0: none), once sent."""
        return self._events.last_id if self._events is not None else 0

    def probe_write(self) -> None:
        """A real write that changes nothing, to learn whether the ledger takes writes again
        (``GroupWriter.probe_write``: each backend's own)."""
        self._writer.probe_write(self.conn)

    # ---- events

    def append(self, events: list[UsageEvent]) -> list[RecordResult]:
        _, new_ids = self.events.append(events)
        return [RecordResult(e.request_id, new_ids is not None and e.request_id not in new_ids,
                             e.cost_nanos or 0, e.cost_source) for e in events]

    def max_event_id(self) -> int:
        return self.events.max_id()

    def events_since(self, last_id: int) -> list[EventRow]:
        return self.events.since(last_id)

    def events_between(self, start_ms: int, end_ms: int, where: Mapping[str, str]) -> UsageSums:
        return self.events.sums_between(start_ms, end_ms, where)

    def rollup_between(self, start_ms: int, end_ms: int, where: Mapping[str, str]) -> UsageSums:
        return self.events.rollup_sums(start_ms, end_ms, where)

    def minute_sums(self, start_ms: int, end_ms: int, where: Mapping[str, str],
                    *, raw: bool = False) -> list[MinuteSums]:
        return self.events.minute_sums(start_ms, end_ms, where, raw=raw)

    # ---- holds

    def open_hold(self, hold_id: str, request_id: str, now_ms: int, expires_ms: int, context: str,
                  lines: Sequence[tuple[str, int]]) -> None:
        self.holds.open(hold_id, request_id, now_ms, expires_ms, context, lines)

    def close_hold(self, hold_id: str, state: str, now_ms: int,
                   expected: Sequence[tuple[str, int]] | None = None) -> ClosedHold | None:
        return self.holds.close(hold_id, state, now_ms, expected)

    def settle_hold(self, event: UsageEvent, hold_id: str, now_ms: int,
                    expected: Sequence[tuple[str, int]] | None = None) -> tuple[RecordResult, ClosedHold | None]:
        """A call's event appended and its hold closed as settled (``close_hold``): on
        PostgreSQL in one statement."""
        if not self.events.settles_in_one(event):
            (result,) = self.append([event])
            return result, self.close_hold(hold_id, "settled", now_ms, expected)
        new, closed = self.events.append_closing(event, self.holds, hold_id, "settled", now_ms,
                                                 None if expected is None else list(expected))
        return RecordResult(event.request_id, not new, event.cost_nanos or 0, event.cost_source), closed

    def hold_state(self, hold_id: str) -> str | None:
        return self.holds.state(hold_id)

    def expired_holds(self, now_ms: int) -> list[str]:
        return self.holds.expired(now_ms)

    def held_totals(self) -> dict[str, int]:
        return self.holds.held_totals()

    def open_hold_count(self) -> int:
        return self.holds.open_count()

    def max_journal_id(self) -> int:
        return self.holds.max_journal_id()

    def journal_since(self, last_id: int) -> list[JournalRow]:
        return self.holds.journal_since(last_id)

    # ---- policies and prices

    def policy_specs(self) -> list[str]:
        return self.policies.specs()

    def policies_version(self) -> PoliciesVersion:
        return self.policies.version()

    def save_policy(self, policy_id: str, spec: str, now_ms: int, *, deleted: bool = False) -> None:
        self._writer.policies_changed()  # the next batch is not quiet: it reads the policies again
        self.policies.save(policy_id, spec, now_ms, deleted=deleted)

    def save_prices(self, rows: Sequence[tuple[str, str, int, str, str, str, int]]) -> None:
        self.prices.save(rows)

    # ---- alerts, overshoots, webhooks, decisions

    def raise_alert(self, policy_id: str, window_start_ms: int, kind: str, threshold: int, now_ms: int,
                    value: int, message: str) -> int | None:
        return self.alerting.raise_once(policy_id, window_start_ms, kind, threshold, now_ms, value, message)

    def alerts(self, *, include_acked: bool, limit: int) -> list[AlertRow]:
        return self.alerting.listing(include_acked=include_acked, limit=limit)

    def ack_alert(self, alert_id: int, actor: str, now_ms: int) -> bool | None:
        return self.alerting.ack(alert_id, actor, now_ms)

    def record_overshoot(self, now_ms: int, request_id: str, hold_id: str, policy_id: str, held: int,
                         settled: int) -> int:
        return self.alerting.add_overshoot(now_ms, request_id, hold_id, policy_id, held, settled)

    def overshoots(self, since_ms: int = 0) -> list[OvershootRow]:
        return self.alerting.overshoots(since_ms)

    def add_webhook(self, webhook_id: str, url: str, kind: str, now_ms: int) -> None:
        self.alerting.add_webhook(webhook_id, url, kind, now_ms)

    def remove_webhook(self, webhook_id: str) -> tuple[str, str] | None:
        return self.alerting.remove_webhook(webhook_id)

    def webhooks(self) -> list[tuple[str, str, str]]:
        """``Webhook`` rows (id, url, kind) of the enabled webhooks. The URL is a secret."""
        return [*self.alerting.webhooks()]

    def log_deliveries(self, rows: Sequence[tuple[int, str, int, int, int, str]]) -> None:
        self.alerting.log_deliveries(rows)

    def deliveries(self, alert_id: int) -> list[Delivery]:
        return self.alerting.deliveries(alert_id)

    def record_decision(self, ts_ms: int, request_id: str, policy_id: str, decision: str, mode: str) -> None:
        self.decision_log.record(ts_ms, request_id, policy_id, decision, mode)

    def decisions(self, limit: int) -> list[BudgetDecision]:
        return self.decision_log.recent(limit)
