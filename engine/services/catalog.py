"""The catalog: prices, the models calls can go to, routing a call to the cheapest capable model,
and the record of routing decisions.

A service of ``Engine`` (``engine.services.core``): the engine's methods of the same names
delegate here."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import Any, cast

from engine import providers as prov
from engine import routing
from engine.budgets import CallCost
from engine.ledger import LedgerTx
from engine.ledger.errors import PipelineFailed
from engine.models import FieldError
from engine.pricing import ModelPrice, parse_litellm, uncached_cost_nanos, uncached_costs
from engine.services.core import Changed, Core, Journal, Service
from engine.services.gateways import GatewayService

DECISION_WAIT_S = 0.05  # how long a routing decision waits for an operation to ride with
log = logging.getLogger("budgeteer")


def _cheapest_first(indices: list[int], rank: Callable[[int], tuple[int, str]]) -> Iterator[int]:
    """``indices`` by ``rank``, sorted only past the first (which is most often the last asked)."""
    if indices:
        first = min(indices, key=rank)
        yield first
        yield from sorted((i for i in indices if i != first), key=rank)


class CatalogService(Service):
    def __init__(self, core: Core, gateways: GatewayService) -> None:
        super().__init__(core)
        self.gateways = gateways
        self._catalog_cache: tuple[float, list[prov.CatalogModel]] | None = None
        self._forgotten = 0  # how often the catalog was forgotten (a read begun before is not kept)
        # the cached catalog's prices and each model's first place in it (for routing)
        self._catalog_index: tuple[list[ModelPrice], dict[str, int]] = ([], {})
        self._shortlists: dict[tuple[frozenset[str], int, frozenset[str]], routing.Shortlist] = {}
        self._unhealthy: tuple[object, dict[str, str], frozenset[str]] = (None, {}, frozenset())
        self._decision_rows: list[routing.Recorded] = []  # routing decisions not yet written
        self._decision_flush: asyncio.Task[None] | None = None

    def price_for(self, model: str, *, workspace: str = "", provider: str | None = None,
                  at_ms: int | None = None) -> ModelPrice | None:
        return self.prices.lookup(model, self.now_ms() if at_ms is None else at_ms, workspace, provider)

    async def import_prices(self, data: Any, *, effective_from_ms: int | None = None,
                            workspace: str = "", source: str = "") -> tuple[int, list[str]]:
        """Add price versions from a LiteLLM-format table; returns (stored, skipped reasons).

        Versions apply from ``effective_from_ms`` (default: now), so events already in
        the ledger keep the price of their own day.
        """
        effective = self.now_ms() if effective_from_ms is None else effective_from_ms
        if effective < 0:
            raise FieldError("effective_from", "must not be before 1970")
        prices, skipped = parse_litellm(data, effective_from_ms=effective, source=source)
        prices = [replace(p, workspace=workspace) for p in prices]
        now = self.now_ms()

        def op(tx: LedgerTx) -> Changed[None]:
            tx.save_prices([(p.model, p.workspace, p.effective_from_ms, p.provider, json.dumps(p.to_json()),
                             p.source, now) for p in prices])
            return None, Journal(f"prices:{source or 'import'}", None, {
                "workspace": workspace, "effective_from_ms": effective, "stored": len(prices),
                "models": sorted({p.model for p in prices})})

        await self._change("manage_prices", "prices.import", op)
        self.prices.extend(prices)
        return len(prices), skipped

    def _catalog_if_fresh(self, max_age_s: float = 5.0) -> list[prov.CatalogModel] | None:
        cached = self._catalog_cache
        return cached[1] if cached is not None and time.monotonic() - cached[0] < max_age_s else None

    async def catalog(self, max_age_s: float = 5.0) -> list[prov.CatalogModel]:
        """The models calls can go to (kept for a few seconds: a gateway asks on every call)."""
        if (fresh := self._catalog_if_fresh(max_age_s)) is not None:
            return fresh
        forgotten = self._forgotten
        registered = await self.gateways.providers()
        found = prov.catalog(self.prices.models(self.now_ms()), registered)
        if forgotten != self._forgotten:  # providers read before a change they may not show
            return found
        self._catalog_cache = (time.monotonic(), found)
        self._catalog_index = ([m.price for m in found], {m.model: i for i, m in reversed(list(enumerate(found)))})
        self._shortlists = {}
        return found

    async def route(self, request: Mapping[str, Any], *, principal: str, model: str, mode: str = "suggest",
                    team: str = "", workspace: str = "default", token_id: str = "", session: str = "",
                    agent: str = "", max_tokens: int | None = None, request_id: str | None = None,
                    record: bool = True, input_tokens: int | None = None) -> routing.Decision:
        """Score the request, filter the catalog (capabilities, context, health, budgets) and
        choose; the decision is recorded unless ``record`` is False (an explain).
        ``input_tokens``: the prompt's estimate (``estimate_message_tokens``) if already made."""
        parsed_mode = routing.parse_mode(mode)
        score = routing.score(request, input_tokens)
        catalog = self._catalog_if_fresh() or await self.catalog()
        if (breakers := self.gateways._routing_breakers()) is None:  # a process's first call
            breakers = await self.gateways._refresh_health()
        if self._unhealthy[0] is not breakers:  # worked out once per look at the breakers
            out = {name: b.reason for name, b in breakers.items() if b.state != "closed"}
            self._unhealthy = (breakers, out, frozenset(out))
        _, unhealthy, unhealthy_names = self._unhealthy
        output = max_tokens or routing.DEFAULT_OUTPUT_TOKENS
        cached = self._catalog_cache
        if cached is not None and cached[1] is catalog:
            (prices, first_at), shortlists = self._catalog_index, self._shortlists
        else:  # a catalog read across a change (not kept): its own index, not the kept one's
            prices, first_at = [m.price for m in catalog], {m.model: i for i, m in reversed(list(enumerate(catalog)))}
            shortlists = {}
        needed, tier = score.input_tokens + output, score.tier_needed
        requested_at = first_at.get(model)
        key = (score.needs, tier, unhealthy_names)
        if (short := shortlists.get(key)) is None:
            short = shortlists[key] = routing.shortlist(catalog, score.needs, tier, unhealthy)
        if record and not self.budgets.tells_models_apart:
            # What a gateway's call takes: no budget can tell the models apart, so the cheapest
            # usable model is chosen from the shortlist, pricing only its frontier and the
            # requested model.
            found, cost_of = routing.cheapest(catalog, short, score.input_tokens, output, requested_at)
            best = routing.Candidate(catalog[found], cost_of[found], True, "") if found is not None else None
            entry = None
            if requested_at is not None:
                m = catalog[requested_at]
                entry = routing.Candidate(m, cost_of[requested_at], requested_at in short.usable and not (
                    m.context and needed > m.context), "")
            decision = routing.decision(score, model, parsed_mode, best, entry, ())
            self._note_decision(self.now_ms(), request_id, principal, decision)
            return decision
        # Budgets are asked only as far as needed: the capable candidates cheapest first until
        # one fits, and the requested model.
        costs = uncached_costs(prices, score.input_tokens, output)
        usable = [i for i in short.usable if not (catalog[i].context and needed > catalog[i].context)]

        def rank(i: int) -> tuple[int, str]:
            return costs[i], catalog[i].model

        requested = catalog[requested_at] if requested_at is not None else None
        requested_usable = requested_at in usable
        requested_cost = costs[requested_at] if requested_at is not None else 0
        explain = not record
        now = self.now_ms()
        # who calls, as CallRequest.context() has it; each candidate adds its model and provider
        who = {"workspace": workspace, "team": team, "principal": principal, "token": token_id, "session": session,
               "agent": agent}

        def decide(tx: LedgerTx | None) -> routing.Decision | None:
            """The choice, with the budgets asked from memory (``tx`` None: None if they cannot
            answer there) or under the write lock."""
            blocked: dict[str, str] = {}
            asked: set[tuple[str, str]] = set()

            def refused(m: prov.CatalogModel) -> bool | None:
                asked.add((m.model, m.provider))
                price = self.prices.lookup(m.model, now, workspace, m.provider)  # a workspace's own price first
                cost = CallCost(usd=uncached_cost_nanos(price, score.input_tokens, output), tokens=needed) \
                    if price is not None else CallCost(usd=0, tokens=needed, priced=False)
                context = {**who, "model": m.model, "provider": m.provider}
                evaluation = self.budgets.evaluate(tx, context, cost, now) if tx is not None else \
                    self.budgets.evaluate_in_memory(context, cost, now)
                if evaluation is None:
                    return None
                # A call that needs an approval is refused until it has one: blocked all the same.
                if evaluation.decision in ("block", "needs_approval") and evaluation.deciding is not None:
                    o = evaluation.deciding
                    fmt = o.policy.format_amount
                    blocked[m.model] = (f"{o.policy.name} ({fmt(o.consumed + o.held)} of {fmt(o.policy.hard)} "
                                        f"this {o.policy.window} spent or held)") if explain else o.policy.name
                    return True
                return False

            found: int | None = None  # the cheapest usable model the budgets allow
            # Budgets are asked only where they can change the choice: some policy names a model or a
            # provider (see BudgetBook.tells_models_apart), and a model other than the requested is
            # usable. An explain asks them all the same, to show every candidate's verdict.
            ask_budgets = explain or (self.budgets.tells_models_apart
                                      and any(catalog[i].model != model for i in usable))
            if ask_budgets:
                for i in _cheapest_first(usable, rank):
                    if catalog[i].model in blocked:
                        continue
                    if (no := refused(catalog[i])) is None:
                        return None
                    if not no:
                        found = i
                        break
            elif usable:
                found = min(usable, key=rank)
            # The requested model's own verdict decides only if it could stay: usable, and no
            # dearer than the cheapest allowed (an explain shows it whatever it is).
            if ask_budgets and requested is not None and (requested.model, requested.provider) not in asked and (
                    explain or (requested_usable and found is not None and requested_cost <= costs[found])) \
                    and refused(requested) is None:
                return None
            if explain:
                return routing.choose(score, catalog, requested=model, mode=parsed_mode, max_tokens=max_tokens,
                                      unhealthy=unhealthy, blocked=blocked, costs=costs)
            # The same choice as ``choose`` makes, without an explanation of every candidate.
            best = routing.Candidate(catalog[found], costs[found], True, "") if found is not None else None
            entry = routing.Candidate(requested, requested_cost, requested_usable and requested.model not in blocked,
                                      "") if requested is not None else None
            return routing.decision(score, model, parsed_mode, best, entry, ())

        # Routing a call is advice, and the hold that follows decides under the write lock: the
        # budgets' counters as the last batch left them answer it, with no transaction of its own,
        # unless they are not loaded yet (a process's first call), a window has just ended or this
        # process changed a policy since. An explain (``record`` False) always asks the ledger.
        decision = (decide(None) if record and not self.store.policies_saved else None) \
            or cast(routing.Decision, await self._tx(decide, sync=False))  # with a transaction, never None
        if record:
            self._note_decision(now, request_id, principal, decision)
        return decision

    def _note_decision(self, now: int, request_id: str | None, principal: str, decision: routing.Decision) -> None:
        """Keep a routing decision for the ledger. It is written with the next operation this
        engine sends (a routed call's hold follows at once, so it is committed before that call
        is settled), or, if none comes within DECISION_WAIT_S, on its own."""
        self._decision_rows.append(routing.Recorded(
            now, request_id or "route_" + secrets.token_hex(8), principal, decision.mode, decision.requested,
            decision.chosen, decision.applied, round(decision.score.value, 4), decision.requested_cost or 0,
            decision.chosen_cost or 0, decision.reason))
        if self._decision_flush is None:
            self._decision_flush = asyncio.create_task(self._flush_decisions())

    def _carrying_decisions(self, op: Callable[[LedgerTx], Any]) -> Callable[[LedgerTx], Any]:
        rows, self._decision_rows = self._decision_rows, []
        loop = asyncio.get_running_loop()

        def carried(tx: LedgerTx) -> Any:
            try:
                tx.routing.record(rows)
                return op(tx)
            except PipelineFailed:  # another's write sent ahead: the batch runs again, and this operation with it
                raise
            except BaseException:  # undone with the operation: they go with a later one
                loop.call_soon_threadsafe(self._requeue_decisions, rows)
                raise

        return carried

    def _requeue_decisions(self, rows: list[routing.Recorded]) -> None:
        self._decision_rows[:0] = rows
        if self._decision_flush is None:
            self._decision_flush = asyncio.create_task(self._flush_decisions())

    async def _flush_decisions(self) -> None:
        try:
            await asyncio.sleep(DECISION_WAIT_S)
            for _ in range(3):  # a failed write puts them back; three tries, then they are given up
                if not self._decision_rows:
                    return
                try:
                    await self._tx(lambda tx: None, sync=False)  # carries them
                except Exception as exc:  # the calls went on; only their routing record waits
                    log.warning("%d routing decisions not recorded yet: %s", len(self._decision_rows), exc)
            if self._decision_rows:
                log.warning("%d routing decisions not recorded", len(self._decision_rows))
                self._decision_rows = []
        finally:
            self._decision_flush = None

    async def _decisions_written(self) -> None:
        if self._decision_rows:
            await self._tx(lambda tx: None, sync=False)

    async def routing_decisions(self, limit: int = 100) -> list[routing.Recorded]:
        await self._decisions_written()
        return await self._tx(lambda tx: tx.routing.newest(limit))

    async def routing_summary(self, since_ms: int) -> routing.Summary:
        """How often routing changed the model since ``since_ms``, and what that saved (applied,
        under enforced) or would have saved (suggest and dry_run)."""
        await self._decisions_written()
        return await self._tx(lambda tx: tx.routing.summary(since_ms))

    def forget(self) -> None:
        """The providers or prices changed: the catalog is read again at its next use."""
        self._catalog_cache = None
        self._forgotten += 1

    def carry(self, op: Callable[[LedgerTx], Any]) -> Callable[[LedgerTx], Any]:
        """``op``, taking along the routing decisions not yet written (``Core.carry``)."""
        return self._carrying_decisions(op) if self._decision_rows else op

    async def close(self) -> None:
        if (flush := self._decision_flush) is not None:
            flush.cancel()
            await asyncio.wait([flush])
        with contextlib.suppress(Exception):  # logged; closing goes on
            await self._decisions_written()
