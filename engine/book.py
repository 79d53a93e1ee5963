"""The budget book: live counters of every policy's window, holds, settlement and the
alerts they raise, kept in step with the ledger's write transactions (``LedgerTx``).
The rules it applies are ``engine.rules``'s pure functions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

from engine import approvals
from engine.alerts import crossed, crossing_message, overshoot_message
from engine.clock import MINUTE_MS
from engine.errors import Refused
from engine.ledger import PENDING_ID, ClosedHold, LedgerTx, RecordResult
from engine.models import UsageEvent, unique_hex
from engine.rules import METRICS, CallCost, Evaluation, Outcome, Policy, decide, outcome, window_bounds

# ----------------------------------------------------------------------------- live state and holds

#: Call-context keys, as scopes name them, and the ledger columns they come from.
CONTEXT_COLUMNS: Final = {"workspace": "workspace", "team": "team", "principal": "principal", "token": "token_id",
                          "session": "session", "agent": "agent", "provider": "provider", "model": "model"}
DEFAULT_HOLD_TTL_MS: Final = 10 * MINUTE_MS
EXPIRY_CHECK_MS: Final = 1_000  # how often decision batches look for holds past their time to live
ALERTED_KEPT: Final = 10_000  # alerts a budget book remembers as stored (a rolling policy makes one a window)
OPENED_KEPT: Final = 100_000  # holds a budget book remembers opening (to close them without asking the ledger)


class HoldError(Refused, ValueError):
    """A hold that cannot be settled or released as asked (unknown, or already closed)."""

    http_status = 409
    code = "hold_closed"


@dataclass(slots=True)
class _Counter:
    """What one policy has consumed and holds, kept current inside write transactions."""

    policy: Policy
    held: int = 0
    consumed: int = 0  # calendar windows: the sum within [start, end)
    start_ms: int = 0
    end_ms: int = 0
    minutes: dict[int, int] = field(default_factory=dict)  # rolling windows: amount per minute
    rolling_total: int = 0

    def amount(self, cost: int, tokens: int, status: str) -> int:
        metric = self.policy.metric
        if metric == "usd":
            return cost
        if status == "blocked":
            return 0
        return tokens if metric == "tokens" else 1

    def consumed_at(self, now_ms: int, *, prune: bool = True) -> int:
        """What the window holds at ``now_ms``. ``prune=False`` changes nothing: for a look from
        outside the ledger's transactions (``evaluate_in_memory``, on the event loop), which on
        PostgreSQL run on the writer's thread at the same time."""
        if self.policy.window.calendar:
            return self.consumed
        cutoff = now_ms - self.policy.window.rolling_ms
        cutoff -= cutoff % MINUTE_MS  # the oldest minute counts whole: never under-count
        if not prune:
            return self.rolling_total - sum(v for m, v in list(self.minutes.items()) if m < cutoff)
        # Minutes arrive in order, so the first key is the oldest; a late event's older
        # minute is caught by the same sweep whenever the window moves.
        if self.minutes and next(iter(self.minutes)) < cutoff:
            for minute in [m for m in self.minutes if m < cutoff]:
                self.rolling_total -= self.minutes.pop(minute)
        return self.rolling_total


@dataclass(frozen=True, slots=True)
class Overshoot:
    """A call that settled above its hold on a policy, in the policy's metric."""

    id: int
    ts_ms: int
    request_id: str
    policy_id: str
    held: int
    settled: int

    @property
    def excess(self) -> int:
        return self.settled - self.held


@dataclass(frozen=True, slots=True)
class Authorization:
    """The answer to a call: its evaluation and, if it may go ahead, the hold placed for it."""

    evaluation: Evaluation
    hold_id: str | None
    cost: CallCost
    request_id: str
    override_request_id: str | None = None
    model: str | None = None  # set when a downgrade moved the call to a cheaper model
    grant_id: str | None = None  # the approved override request whose headroom let the call through

    @property
    def allowed(self) -> bool:
        return self.evaluation.allowed or (self.hold_id is not None and (self.model is not None
                                                                         or self.grant_id is not None))


class BudgetBook:
    """In-memory counters for every policy, rebuilt from the ledger and kept exact.

    Every method taking a ``tx`` runs on the ledger's writer thread inside a write
    transaction (see ``SQLiteStore.transact``): ``begin`` first folds in whatever other
    processes committed since the last batch, so each decision sees the whole ledger
    and every hold, and two calls can never both spend the last dollar.
    """

    def __init__(self, now_ms: Callable[[], int], hold_ttl_ms: int = DEFAULT_HOLD_TTL_MS,
                 pending_ttl_ms: int = approvals.DEFAULT_PENDING_TTL_MS) -> None:
        self._now = now_ms
        self.hold_ttl_ms = hold_ttl_ms
        self.pending_ttl_ms = pending_ttl_ms  # how long an override request waits for a decision
        self._counters: dict[str, _Counter] = {}
        self._last_event = 0
        self._last_journal = 0
        self._policies_version: tuple[int, int] | None = None
        self._stale = True
        self._dirty: set[str] = set()  # policies whose consumption moved in this batch
        self._raising: list[int] = []
        self._alerted: set[tuple[str, int, str, int]] = set()  # (policy, window, kind, threshold) stored
        self._batch_mark = 0
        self._expiry_due = 0  # when the next batch looks for holds past their time to live
        #: Holds this book opened, with no grant, and their lines: closing one, the ledger is
        #: told what it will find (``LedgerTx.close_hold``'s ``expected``), which lets
        #: PostgreSQL send the closing ahead with the batch's other writes.
        self._opened: dict[str, list[tuple[str, int]]] = {}
        self._opened_now: set[str] = set()  # of those, the ones the running batch opened
        self._sent_ahead = False  # the running batch folded a settlement's event sent ahead (id unknown)
        #: Some policy names a model or a provider. Only such a policy can refuse one model and
        #: allow another for the same call: any other counts the same tokens and requests for
        #: every model and fewer dollars for a cheaper one, so it fits the cheapest whenever it
        #: fits any (routing need not ask it which model to choose).
        self.tells_models_apart = True

    # ---- transaction hooks

    def begin(self, tx: LedgerTx) -> None:
        self._batch_mark = len(self._raising)
        self._opened_now.clear()
        self._sent_ahead = False
        now = self._now()
        if self._stale or not tx.quiet:  # else nothing was written since the last batch but by it
            version = tx.policies_version()
            if self._stale or version != self._policies_version:
                self._rebuild(tx, now, version)
            elif not self._counters:  # no policy to fold events into: only note how far the ledger goes
                self._last_event = tx.max_event_id()
                self._last_journal = tx.max_journal_id()
            else:
                for row in tx.events_since(self._last_event):
                    self._fold_event(row)
                for journal_id, policy_id, delta in tx.journal_since(self._last_journal):
                    counter = self._counters.get(policy_id)
                    if counter is not None:
                        counter.held += delta
                    self._last_journal = journal_id
        for counter in list(self._counters.values()):
            self._current(tx, counter, now)  # windows that ended start again from the ledger
        if now >= self._expiry_due:  # a hold is released at most EXPIRY_CHECK_MS after its time to live
            self.expire(tx)
        self.end(tx)  # crossings from what others wrote are visible to this batch's operations

    def forget(self) -> None:
        """Another process changed a policy (``engine.ledger.changes``): the next batch reads
        every policy again, and until then routing's advice asks the ledger rather than the
        counters in memory (``evaluate_in_memory``). Called on the event loop; a batch running
        meanwhile on the writer's thread read the change already (it was committed before that
        batch took the write lock), so at worst the policies are read once more."""
        self._stale = True

    def expire(self, tx: LedgerTx) -> None:
        """Close every hold past its time to live now."""
        now = self._now()
        self._expiry_due = now + EXPIRY_CHECK_MS
        for hold_id in tx.expired_holds(now):
            self._close(tx, hold_id, "expired", now)

    def abort(self) -> None:
        self._stale = True
        del self._raising[self._batch_mark:]  # alerts of a rolled-back batch were never stored

    def end(self, tx: LedgerTx) -> None:
        """Note how far the ledger's events and hold journal now go (this batch wrote them:
        in a pipelined batch, their ids are known only now), and store the alerts whose
        thresholds consumption has now reached (first and last in a batch)."""
        self._last_event = max(self._last_event, tx.last_event_id)
        self._last_journal = max(self._last_journal, tx.last_journal_id)
        if not self._dirty:
            return
        now = self._now()
        for policy_id in sorted(self._dirty):
            counter = self._counters.get(policy_id)
            if counter is None:
                continue
            consumed = counter.consumed_at(now)
            window = counter.policy.window
            key = counter.start_ms if window.calendar else now - now % window.rolling_ms
            for kind, threshold in crossed(counter.policy, consumed):
                # Once stored (or found stored), an alert is not asked for again in its window:
                # a policy past 80 % would otherwise cost two INSERTs on every call.
                if (mark := (policy_id, key, kind, threshold)) in self._alerted:
                    continue
                message = crossing_message(counter.policy, kind, threshold, consumed)
                alert_id = tx.raise_alert(policy_id, key, kind, threshold, now, consumed, message)
                if len(self._alerted) >= ALERTED_KEPT:  # past windows' marks: the ledger remembers them
                    self._alerted.clear()
                self._alerted.add(mark)
                if alert_id is not None:
                    self._raising.append(alert_id)
        self._dirty.clear()

    def committed(self) -> list[int]:
        """Alert ids raised by the last committed batch (taken once)."""
        out, self._raising = self._raising, []
        return out

    def _rebuild(self, tx: LedgerTx, now: int, version: tuple[int, int]) -> None:
        self._counters = {}
        self._alerted.clear()  # the ledger's own uniqueness says again what was stored
        for spec in tx.policy_specs():
            policy = Policy.from_json(json.loads(spec))
            self._counters[policy.id] = self._load(tx, policy, now)
        held = tx.held_totals()
        for policy_id, amount in held.items():
            if policy_id in self._counters:
                self._counters[policy_id].held = amount
        self._last_event = tx.max_event_id()
        self._last_journal = tx.max_journal_id()
        self._policies_version = version
        self._expiry_due = 0
        self._stale = False
        self._dirty.update(self._counters)  # thresholds already passed are stored (once) now
        self.tells_models_apart = any(kind in ("model", "provider") for counter in self._counters.values()
                                      for kind, _ in counter.policy.scope.parts)

    def _load(self, tx: LedgerTx, policy: Policy, now: int) -> _Counter:
        counter = _Counter(policy)
        where = {CONTEXT_COLUMNS[kind]: value for kind, value in policy.scope.parts}
        raw = any(column in ("session", "agent") for column in where)
        metric_index = METRICS.index(policy.metric)
        if policy.window.calendar:
            counter.start_ms, counter.end_ms = window_bounds(policy.window, now)
            sums = (tx.events_between if raw else tx.rollup_between)(counter.start_ms, counter.end_ms, where)
            counter.consumed = sums[metric_index]
        else:
            start = now - policy.window.rolling_ms
            start -= start % MINUTE_MS
            for row in tx.minute_sums(start, now + MINUTE_MS, where, raw=raw):
                amount = row[1 + metric_index]
                if amount:
                    counter.minutes[row[0]] = amount
                    counter.rolling_total += amount
        return counter

    def _fold_event(self, row: Sequence[Any]) -> None:
        (event_id, ts, workspace, team, principal, token_id, provider, model, session, agent,
         input_tokens, output_tokens, cost, status) = row
        context = {"workspace": workspace, "team": team, "principal": principal, "token": token_id,
                   "provider": provider, "model": model, "session": session, "agent": agent}
        for counter in self._counters.values():
            if not counter.policy.scope.matches(context):
                continue
            amount = counter.amount(cost, input_tokens + output_tokens, status)
            if not amount:
                continue
            self._dirty.add(counter.policy.id)
            if counter.policy.window.calendar:
                if counter.start_ms <= ts < counter.end_ms:
                    counter.consumed += amount
            else:
                minute = ts - ts % MINUTE_MS
                counter.minutes[minute] = counter.minutes.get(minute, 0) + amount
                counter.rolling_total += amount
        self._last_event = max(self._last_event, event_id)

    # ---- decisions

    def counters_for(self, tx: LedgerTx | None, context: Mapping[str, str], now: int) -> list[_Counter]:
        matched = []
        for counter in list(self._counters.values()):
            policy = counter.policy
            if policy.enabled and policy.scope.matches(context):
                matched.append(self._current(tx, counter, now))
        matched.sort(key=lambda c: (-c.policy.scope.level, c.policy.id))
        return matched

    def evaluate(self, tx: LedgerTx | None, context: Mapping[str, str], cost: CallCost, now: int) -> Evaluation:
        outcomes = []
        for counter in self.counters_for(tx, context, now):
            policy = counter.policy
            bounds = (counter.start_ms, counter.end_ms) if policy.window.calendar else window_bounds(policy.window, now)
            outcomes.append(outcome(policy, counter.consumed_at(now, prune=tx is not None), counter.held,
                                    cost.of(policy.metric), bounds, priced=cost.priced))
        return decide(outcomes)

    def evaluate_in_memory(self, context: Mapping[str, str], cost: CallCost, now: int) -> Evaluation | None:
        """What ``evaluate`` says from the counters as the last batch left them, without the
        ledger; None when they are not loaded yet or a window that ended needs the ledger. For
        advice (routing); a hold is only ever decided under the write lock."""
        if self._stale:
            return None
        try:
            return self.evaluate(None, context, cost, now)
        except RuntimeError:  # a calendar window ended: its new counter needs the ledger
            return None

    def authorize(self, tx: LedgerTx, context: Mapping[str, str], cost: CallCost, request_id: str,
                  alternatives: Iterable[tuple[str, str, CallCost]] = ()) -> Authorization:
        """Decide, and if the call may go ahead place one hold on every applicable policy at once.

        When the deciding policy's action is ``downgrade``, ``alternatives`` (model,
        provider, worst case; preferred first) are tried in the same transaction and the
        first that every policy allows is held instead; they are only iterated then, so the
        caller may pass a lazy iterable.
        """
        now = self._now()
        evaluation = self.evaluate(tx, context, cost, now)
        if evaluation.decision == "downgrade":
            for model, provider, alt_cost in alternatives:
                alt_context = {**context, "model": model, "provider": provider}
                alt = self.evaluate(tx, alt_context, alt_cost, now)
                if alt.allowed:
                    hold_id = self._hold(tx, alt, request_id, alt_context, now)
                    return Authorization(evaluation, hold_id, alt_cost, request_id, model=model)
        if not evaluation.allowed:
            override = None
            if evaluation.decision == "needs_approval" and evaluation.deciding is not None:
                requester = context.get("principal", "")
                granted = self._granted(tx, evaluation, requester, now)
                if granted is not None:
                    allowed, grant_id, amount = granted
                    hold_id = self._hold(tx, allowed, request_id, context, now)
                    approvals.attach_grant(tx, hold_id, grant_id, amount)
                    self._opened.pop(hold_id, None)  # its closing gives back to the grant: asked of the ledger
                    return Authorization(allowed, hold_id, cost, request_id, grant_id=grant_id)
                deciding = evaluation.deciding
                request, _ = approvals.open_request(
                    tx, policy_id=deciding.policy.id, policy_snapshot=deciding.policy.to_json(),
                    requester=requester, amount=max(deciding.cost, 1), duration_ms=approvals.DEFAULT_GRANT_MS,
                    reason=f"blocked call: {deciding.message}", evaluation=evaluation.as_dict(), now_ms=now,
                    pending_ttl_ms=self.pending_ttl_ms)
                override = request.id
            return Authorization(evaluation, None, cost, request_id, override)
        if evaluation.decision == "would_block":
            for o in evaluation.outcomes:
                if o.status == "over" and o.policy.mode != "enforced":
                    tx.record_decision(now, request_id, o.policy.id, "would_block", o.policy.mode)
        return Authorization(evaluation, self._hold(tx, evaluation, request_id, context, now), cost, request_id)

    def _granted(self, tx: LedgerTx, evaluation: Evaluation, requester: str,
                 now: int) -> tuple[Evaluation, str, int] | None:
        """The call allowed by the requester's approved override on the one approval policy
        it is over, when the grant has the call's worst case left: (evaluation, grant, amount)."""
        over = [o for o in evaluation.outcomes if o.status == "over" and o.policy.mode == "enforced"]
        if len(over) != 1 or over[0].policy.action != "approval_required" or not over[0].priced:
            return None
        target = over[0]
        grant = approvals.active_grant(tx, target.policy.id, requester, now, target.cost)
        if grant is None:
            return None
        allowed = decide([replace(o, status="ok") if o is target else o for o in evaluation.outcomes])
        return (allowed, grant.id, target.cost) if allowed.allowed else None

    def _hold(self, tx: LedgerTx, evaluation: Evaluation, request_id: str, context: Mapping[str, str],
              now: int) -> str:
        # The time first: a new hold goes at the end of the ledger's holds, not somewhere within.
        hold_id = f"hold_{max(now, 0):011x}{unique_hex()}"
        lines = [(o.policy.id, o.cost) for o in evaluation.outcomes]
        tx.open_hold(hold_id, request_id, now, now + self.hold_ttl_ms, json.dumps(dict(context)), lines)
        if len(self._opened) >= OPENED_KEPT:  # holds others closed (expired): the ledger is asked about all
            self._opened.clear()
        self._opened[hold_id] = lines
        self._opened_now.add(hold_id)
        for policy_id, amount in lines:
            self._counters[policy_id].held += amount
        return hold_id

    def settle(self, tx: LedgerTx, hold_id: str, event: UsageEvent) -> RecordResult:
        """Post the call's actual usage and release its hold, in one transaction. A hold that
        expired meanwhile has nothing left to release: the usage is posted all the same.

        Everything that can fail (the append, the close) comes before the counters in memory
        change: a failed operation is rolled back to its savepoint alone, and memory must not
        keep what the ledger does not."""
        now = self._now()
        actual = {"usd": event.cost_nanos or 0, "tokens": event.input_tokens + event.output_tokens,
                  "requests": 0 if event.status == "blocked" else 1}
        result, closing = tx.settle_hold(event, hold_id, now, self._expected(hold_id))
        closed = self._closed(tx, hold_id, closing, actual)
        if closed is None:
            state = tx.hold_state(hold_id)
            if state is None:
                raise HoldError(f"hold {hold_id} does not exist")
            if state in ("settled", "released"):
                raise HoldError(f"hold {hold_id} is already {state}")
        else:
            self._overshoots(tx, hold_id, event, closed.lines, actual, now)
        appended = tx.appended_id
        if appended == PENDING_ID:
            self._sent_ahead = True
        elif self._sent_ahead:
            # The events sent ahead earlier in this batch, folded already, went out before this
            # settlement's statement: their ids, unknown to the watermark, are below this one's.
            self._last_event = max(self._last_event, appended - 1 if appended > 0 else tx.last_event_id)
        if appended == PENDING_ID or appended == self._last_event + 1:  # nothing came between: fold from here
            self._fold_event((max(appended, 0), event.ts_ms, event.workspace, event.team, event.principal,
                              event.token_id, event.provider, event.model, event.session, event.agent,
                              event.input_tokens, event.output_tokens, event.cost_nanos or 0, event.status))
        else:
            for row in tx.events_since(self._last_event):
                self._fold_event(row)
        return result

    def _overshoots(self, tx: LedgerTx, hold_id: str, event: UsageEvent, lines: Sequence[tuple[str, int]],
                    actual: Mapping[str, int], now: int) -> None:
        """Record, and alert on, each policy the call settled above its hold on: the provider
        counted more than the hold's bound, so the hard limit may be passed by the difference."""
        for policy_id, held in lines:
            counter = self._counters.get(policy_id)
            if counter is None or (settled := actual[counter.policy.metric]) <= held:
                continue
            overshoot_id = tx.record_overshoot(now, event.request_id, hold_id, policy_id, held, settled)
            alert_id = tx.raise_alert(policy_id, now, "overshoot", overshoot_id, now, settled - held,
                                      overshoot_message(counter.policy, event, held, settled))
            if alert_id is not None:
                self._raising.append(alert_id)

    def release(self, tx: LedgerTx, hold_id: str) -> None:
        """Give a hold back (the call failed before costing anything)."""
        if self._close(tx, hold_id, "released", self._now()) is None:
            state = tx.hold_state(hold_id)
            raise HoldError(f"hold {hold_id} does not exist" if state is None else f"hold {hold_id} is already {state}")

    def _close(self, tx: LedgerTx, hold_id: str, state: str, now: int) -> ClosedHold | None:
        """Close the hold if it is open, giving its grant back all it took (the call did not run)."""
        return self._closed(tx, hold_id, tx.close_hold(hold_id, state, now, self._expected(hold_id)))

    def _expected(self, hold_id: str) -> list[tuple[str, int]] | None:
        """The lines of a hold this book opened (without a grant) in an earlier batch, which
        it is closing now: what the ledger will find (``LedgerTx.close_hold``)."""
        expected = self._opened.pop(hold_id, None)
        return None if hold_id in self._opened_now else expected  # this batch's: maybe not sent yet

    def _closed(self, tx: LedgerTx, hold_id: str, closed: ClosedHold | None,
                actual: dict[str, int] | None = None) -> ClosedHold | None:
        """A hold just closed (None: it was not open): give its grant back what the call did
        not use (``actual`` None: all of it) and take it off the counters."""
        if closed is None:
            return None
        if closed.grant_id is not None:
            approvals.settle_grant(tx, hold_id, closed.grant_id, closed.grant_amount, actual)
        for policy_id, amount in closed.lines:
            counter = self._counters.get(policy_id)
            if counter is not None:
                counter.held -= amount
        return closed

    def snapshot(self, tx: LedgerTx) -> list[Outcome]:
        """Every policy as it stands now (a call of no cost): consumed, held, window, status."""
        now = self._now()
        out = []
        for policy_id in sorted(self._counters):
            counter = self._current(tx, self._counters[policy_id], now)
            policy = counter.policy
            bounds = (counter.start_ms, counter.end_ms) if policy.window.calendar else window_bounds(policy.window, now)
            out.append(outcome(policy, counter.consumed_at(now), counter.held, 0, bounds))
        return out

    def _current(self, tx: LedgerTx | None, counter: _Counter, now: int) -> _Counter:
        """The counter for the window containing ``now``; a calendar window that has ended
        starts again from the ledger."""
        policy = counter.policy
        if policy.window.calendar and now >= counter.end_ms:
            if tx is None:
                raise RuntimeError("a new budget window needs the ledger")
            fresh = self._load(tx, policy, now)
            fresh.held = counter.held
            self._counters[policy.id] = counter = fresh
            self._dirty.add(policy.id)
        return counter

    def held(self, policy_id: str) -> int:
        counter = self._counters.get(policy_id)
        return counter.held if counter else 0
