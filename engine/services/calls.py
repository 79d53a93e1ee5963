"""Governed calls: what a call hands the engine (``CallRequest``, as the budgets see it), its
worst case, its hold (``authorize``), settlement and release, and the spill journal that keeps
settlements while the ledger refuses writes (a call refused meanwhile is told to wait
RETRY_AFTER_S). Below ``engine.engine`` and the integrations (the governor builds a
``CallRequest``), so neither has to import the other.

A service of ``Engine`` (``engine.services.core``): the engine's methods of the same names
delegate here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from engine import ratelimits
from engine.budgets import DEFAULT_MAX_OUTPUT_TOKENS, Authorization, CallCost, Evaluation
from engine.ledger import LedgerRefusing, LedgerTx, RecordResult, refusal
from engine.models import FieldError, UsageEvent
from engine.money import format_usd
from engine.pricing import ModelPrice, worst_cost_nanos
from engine.ratelimits import Limit, RateDecision
from engine.services.core import Core, Service
from engine.services.usage import UsageService
from engine.spill import SUFFIX as SPILL_SUFFIX
from engine.spill import Spilled, SpillJournal

#: The prefix of a hold made in memory alone, for a call admitted while the ledger refused writes.
DOWN_HOLD_PREFIX = "down-"
RETRY_AFTER_S = 2  # what a call refused meanwhile is told to wait (Retry-After)


@dataclass(frozen=True, slots=True)
class CallRequest:
    """A model call about to be made, as the budgets see it."""

    principal: str
    model: str
    provider: str = ""
    team: str = ""
    workspace: str = "default"
    token_id: str = ""
    session: str = ""
    agent: str = ""
    input_tokens: int = 0
    max_tokens: int | None = None
    request_id: str = field(default_factory=lambda: "req_" + secrets.token_hex(8))
    choices: int = 1  # the request's n: each choice may use all of the output

    def context(self) -> dict[str, str]:
        return {"workspace": self.workspace, "team": self.team, "principal": self.principal,
                "token": self.token_id, "session": self.session, "agent": self.agent,
                "provider": self.provider, "model": self.model}


RETRY_WRITES_S = (0.2, 5.0)  # while the ledger refuses writes: the first wait before trying again, and the longest
log = logging.getLogger("budgeteer")


class _Lazy:
    """An iterable computed on first iteration."""

    def __init__(self, make: Callable[[], Iterable[Any]]) -> None:
        self.make = make

    def __iter__(self) -> Any:
        return iter(self.make())


class CallService(Service):
    def __init__(self, core: Core, usage: UsageService) -> None:
        super().__init__(core)
        self.usage = usage
        # Settlements of answered calls the ledger refused, until it takes them (engine.spill).
        self.spill = SpillJournal(Path(f"{core.store.path}{SPILL_SUFFIX}"))
        self.refusing: str | None = None  # why the ledger refuses writes, while it does
        self._retry_writes: asyncio.Task[None] | None = None
        self._replaying = asyncio.Lock()
        # While the ledger refuses writes: None refuses every new call (fail closed); a number of
        # nano-dollars lets this process admit calls whose worst cases, then their actual costs,
        # add up to no more than it, until the ledger takes writes again (``allow_while_down``).
        self.down_allowance: int | None = None
        self.down_spent = 0  # what calls admitted while the ledger refused writes may cost (held, then actual)
        self._down_holds: dict[str, int] = {}  # local hold id -> its worst case, for calls admitted so
        self.rate_refusals = ratelimits.Refusals()  # request-limit refusals nothing can overturn yet

    def allow_while_down(self, nanos: int | None) -> None:
        """``--when-ledger-down allow``: while the ledger cannot be written, admit calls up to
        ``nanos`` of spend from this process (their settlements spill and are replayed once it
        is back); None: refuse them (503), the default."""
        if nanos is not None and (type(nanos) is not int or nanos < 0):
            raise FieldError("allowance", "must be a whole, non-negative number of nano-dollars")
        self.down_allowance = nanos

    def _authorize_down(self, call: CallRequest, reason: str) -> Authorization:
        """A call while the ledger refuses writes: refused (LedgerRefusing, a 503), or, with an
        allowance, admitted against it alone: no policy can be read or held meanwhile, so the
        allowance is what bounds the spend (each gateway's, for the length of the outage)."""
        cost = self.worst_case(call)
        allowance = self.down_allowance
        if allowance is None:
            raise LedgerRefusing(reason)
        if not cost.priced or self.down_spent + cost.usd > allowance:
            raise LedgerRefusing(f"{reason}; this gateway's allowance while the ledger is down "
                                 f"({format_usd(allowance)}) is spent")
        hold_id = f"{DOWN_HOLD_PREFIX}{secrets.token_hex(8)}"
        self._down_holds[hold_id] = cost.usd
        self.down_spent += cost.usd
        return Authorization(Evaluation("allow"), hold_id, cost, call.request_id)

    def worst_case(self, call: CallRequest) -> CallCost:
        """The most a call can cost: its input bound (``pricing.prompt_bound``) plus
        ``max_tokens`` of output (when absent, the model's most output, else a documented
        default) for each of its choices, at the dearest rates of the model's price
        (``pricing.worst_cost_nanos``)."""
        price = self._price_of(call)
        output = call.max_tokens
        if output is None:
            output = price.max_output_tokens if price and price.max_output_tokens else DEFAULT_MAX_OUTPUT_TOKENS
        output *= max(1, call.choices)
        tokens = call.input_tokens + output
        if price is None:
            return CallCost(usd=0, tokens=tokens, priced=False)
        return CallCost(usd=worst_cost_nanos(price, call.input_tokens, output), tokens=tokens)

    def _price_of(self, call: CallRequest) -> ModelPrice | None:
        return self.prices.lookup(call.model, self.now_ms(), call.workspace, call.provider or None)

    def _context(self, call: CallRequest) -> dict[str, str]:
        context = call.context()
        if not context["provider"]:  # a call that does not name its provider gets the price table's
            price = self._price_of(call)
            context["provider"] = price.provider if price else ""
        return context

    async def authorize(self, call: CallRequest) -> Authorization:
        """Check every applicable policy and, if the call may go, hold its worst case on all of them.
        LedgerRefusing while the ledger refuses writes (``settle_call``): no call starts then."""
        _, auth = await self.authorize_limited(call, ())
        assert auth is not None  # no limit to refuse it
        return auth

    async def authorize_limited(self, call: CallRequest,
                                limits: Sequence[Limit]) -> tuple[RateDecision, Authorization | None]:
        """``authorize``, the call's rate limits taken first in the same operation (one
        transaction, under the ledger's write lock, ``ratelimits.take``): (the rate decision, the
        authorization), the authorization None when a rate limit refused the call (then no
        policy was asked and nothing held). A request-limit refusal the process remembers
        answers at once (``ratelimits.Refusals``)."""
        allowed = RateDecision(True, None, 0, 0, 0)
        if limits and (known := self.rate_refusals.refusal(limits, self.now_ms())) is not None:
            return known, None
        if self.refusing is not None:
            return allowed, self._authorize_down(call, self.refusing)
        cost = self.worst_case(call)
        context = self._context(call)
        alternatives = _Lazy(lambda: self._cheaper_models(call, cost))  # worked out only for a downgrade

        def op(tx: LedgerTx) -> tuple[RateDecision, Authorization | None]:
            decision = ratelimits.take(tx, limits, self.now_ms()) if limits else allowed
            if not decision.allowed:
                return decision, None
            return decision, self.budgets.authorize(tx, context, cost, call.request_id, alternatives)

        try:
            decision, auth = await self._tx(op, sync=False)
        except Exception as exc:
            if (why := refusal(exc)) is None:
                raise
            self._refused(why)
            # No rate limit can be read meanwhile either: an admitted call is bounded by the allowance.
            return allowed, self._authorize_down(call, why)
        if not decision.allowed:
            self.rate_refusals.remember(decision, self.now_ms())
        return decision, auth

    async def adjust_rate(self, key: str, kind: str, delta: int) -> None:
        """Correct what a call took from a rate limit once its true amount is known (its tokens,
        estimated before the call): the correction joins the ledger's log. Never raises: the
        call was answered; a correction the ledger refuses is lost, and said."""
        if not delta or self.refusing is not None:
            return
        try:
            await self._tx(lambda tx: ratelimits.adjust(tx, key, kind, delta, self.now_ms()), sync=False)
        except Exception as exc:
            log.warning("the rate limit %s (%s) was not corrected by %+d: %s", key, kind, delta, exc)

    def _cheaper_models(self, call: CallRequest, cost: CallCost) -> list[tuple[str, str, CallCost]]:
        """Models of the same kind whose worst case is cheaper, the dearest first (the closest to
        what was asked), the same provider before others. Routing (a later piece) refines this."""
        requested = self._price_of(call)
        if requested is None:
            return []
        out = []
        for price in self.prices.models(self.now_ms(), call.workspace):
            if price.mode != requested.mode or price.model == requested.model or "/" in price.model:
                continue
            alt = self.worst_case(replace(call, model=price.model, provider=price.provider))
            if alt.priced and alt.usd < cost.usd:
                out.append((price.model, price.provider, alt))
        out.sort(key=lambda m: (m[1] != requested.provider, -m[2].usd, m[0]))
        return out

    async def check(self, call: CallRequest) -> Evaluation:
        """What ``authorize`` would decide now, without holding anything."""
        cost = self.worst_case(call)
        context = self._context(call)
        return await self._tx(
            lambda tx: self.budgets.evaluate(tx, context, cost, self.now_ms()))

    async def settle(self, hold_id: str, event: UsageEvent,
                     rate: tuple[str, str, int] | None = None) -> RecordResult:
        """Post the call's actual usage to the ledger and release its hold, at once; ``rate``
        (key, kind, delta): a rate limit's correction, in the same operation (``adjust_rate``)."""
        priced = self.usage.priced(event)

        def op(tx: LedgerTx) -> RecordResult:
            if rate is not None:
                ratelimits.adjust(tx, *rate, self.now_ms())
            return self.budgets.settle(tx, hold_id, priced)

        return await self._tx(op)

    async def settle_call(self, hold_id: str | None, event: UsageEvent | None,
                          rate: tuple[str, str, int] | None = None) -> bool:
        """Settle a call that was made: ``settle`` (or ``record`` when it had no hold), or with
        ``event`` None release its hold. If the ledger refuses the write (``store.refusal``), or
        has refused writes and not yet taken one again, the settlement goes to the spill journal
        instead, to be replayed once the ledger takes writes: the caller's answer never waits
        for the disk to come back. True when written to the ledger now. ``rate`` (key, kind,
        delta): a rate limit's correction, written with the settlement (``adjust_rate``); one the
        ledger refuses is lost, never spilled."""
        priced = self.usage.priced(event) if event is not None else None
        if hold_id is not None and hold_id in self._down_holds:  # admitted while the ledger was down
            worst = self._down_holds.pop(hold_id)
            self.down_spent += (priced.cost_nanos or 0 if priced is not None else 0) - worst
            hold_id = None  # nothing was held in the ledger: the usage is recorded, or spilled
            if priced is None:
                return self.refusing is None
        if self.refusing is None:
            try:
                if priced is None:
                    if hold_id:
                        await self.release(hold_id)
                elif hold_id:
                    await self.settle(hold_id, priced, rate)
                    rate = None
                else:
                    await self.usage.record(priced)
                if rate is not None:
                    await self.adjust_rate(*rate)
                return True
            except Exception as exc:
                if (why := refusal(exc)) is None:
                    raise
                self._refused(why)
        self.spill.append(Spilled(hold_id, priced))
        return False

    def _refused(self, reason: str) -> None:
        """The ledger refused a write: said once, and tried again in the background until it
        takes one (``_retry``)."""
        if self.refusing is None:
            self.refusing = reason
            log.warning("ledger refusing writes: %s", reason)
        if self._retry_writes is None or self._retry_writes.done():
            self._retry_writes = asyncio.create_task(self._retry())

    async def _retry(self) -> None:
        delay = RETRY_WRITES_S[0]
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_WRITES_S[1])
            try:
                replayed = await self.replay_spill(probe=True)
            except LedgerRefusing:
                continue
            except Exception as exc:  # not a refusal: said, and tried again like one
                log.warning("replaying the spill journal failed: %s", exc)
                continue
            self.refusing = None
            # What was spilled while that replay ran (refusing was still set) is replayed too, now
            # that new settlements go to the ledger again: else it would wait for the next outage.
            try:
                while self.spill.pending():
                    more = await self.replay_spill()
                    replayed += more
                    if not more:
                        break
            except Exception as exc:  # refused again (said, and tried again), or kept in the journal
                if (why := refusal(exc)) is not None:
                    self._retry_writes = None  # this task ends: _refused starts the next
                    self._refused(why)
                    return
                log.warning("replaying the spill journal failed: %s", exc)
            self.down_spent = sum(self._down_holds.values())  # what was spent meanwhile is in the ledger now
            log.warning("ledger writable again, replayed %d settlements", replayed)
            return

    async def replay_spill(self, *, probe: bool = False) -> int:
        """Write the spill journal's settlements into the ledger, each once by its request id
        (one already there is not written again, a hold no longer open is not closed again);
        how many were replayed. ``probe``: with nothing to replay, make one real write all the
        same. LedgerRefusing if the ledger still refuses (what it refused stays spilled)."""
        async with self._replaying:
            taken = self.spill.take()
            results = await asyncio.gather(*map(self._replay_one, taken.records), return_exceptions=True)
            keep, refused = [], None
            for record, result in zip(taken.records, results, strict=True):
                if isinstance(result, BaseException):
                    keep.append(record)
                    if (why := refusal(result)) is not None:
                        refused = why
                    else:
                        log.warning("a spilled settlement (%s) cannot be replayed, kept: %s", record.key, result)
            self.spill.done(taken, keep)
            if refused is None and probe and not taken.records:
                try:
                    await self._tx(lambda tx: tx.probe_write())
                except Exception as exc:
                    if (refused := refusal(exc)) is None:
                        raise
            if refused is not None:
                raise LedgerRefusing(refused)
            return len(taken.records) - len(keep)

    async def _replay_one(self, record: Spilled) -> None:
        if record.hold_id is not None and await self._tx(partial(self._replay_hold, record.hold_id, record)):
            return
        if record.event is not None:  # no hold, or closed already: a repeat writes nothing
            await self.store.record(record.event)

    def _replay_hold(self, hold_id: str, record: Spilled, tx: LedgerTx) -> bool:
        """Close the record's hold if it still waits for it (or expired waiting): True if done so."""
        state = tx.hold_state(hold_id)
        if record.event is None:
            if state == "held":
                self.budgets.release(tx, hold_id)
            return True
        if state in ("held", "expired"):
            self.budgets.settle(tx, hold_id, record.event)
            return True
        return False

    def _keep_spilled(self) -> None:
        """At close: settlements still only in memory go to the journal's file if it takes
        them now; what it does not is said, with the request ids (the process is ending)."""
        if not self.spill.memory:
            return
        held, self.spill.memory = self.spill.memory, []
        for record in held:
            self.spill.append(record)
        if self.spill.memory:
            log.error("%d settlements the ledger refused could not be kept (the spill journal %s cannot be "
                      "written): %s", len(self.spill.memory), self.spill.path,
                      ", ".join(r.key for r in self.spill.memory))

    async def release(self, hold_id: str) -> None:
        """Give back the hold of a call that failed."""
        if hold_id in self._down_holds:  # held in memory alone, while the ledger was down
            self.down_spent -= self._down_holds.pop(hold_id)
            return
        await self._tx(lambda tx: self.budgets.release(tx, hold_id), sync=False)

    async def expire_holds(self) -> None:
        """Expire holds past their time to live now (write transactions also do, once a second)."""
        await self._tx(self.budgets.expire)

    async def open_holds(self) -> int:
        return await self._tx(lambda tx: tx.open_hold_count())

    async def close(self) -> None:
        if (retry := self._retry_writes) is not None:
            retry.cancel()
            await asyncio.wait([retry])
        if self.spill.pending():  # a last try; what the ledger still refuses stays in the journal's file
            with contextlib.suppress(LedgerRefusing):
                await self.replay_spill()
            self._keep_spilled()
