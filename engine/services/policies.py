"""Budget policies: adding, editing and removing them (changes), their status, forecasts,
backtests and timelines.

A service of ``Engine`` (``engine.services.core``): the engine's methods of the same names
delegate here."""

from __future__ import annotations

import json
from collections.abc import Iterable

from engine.budgets import (
    CONTEXT_COLUMNS,
    METRICS,
    Backtest,
    Forecast,
    Outcome,
    Overshoot,
    Policy,
    Scope,
    Window,
    consumption_series,
    forecast,
    window_bounds,
)
from engine.budgets import backtest as replay
from engine.clock import HOUR_MS, period_range
from engine.ledger import LedgerTx
from engine.ledger.results import BudgetDecision
from engine.models import ROLLUP_DIMENSIONS, FieldError
from engine.services.core import Changed, Core, Journal, Service
from engine.services.usage import UsageService


class PolicyService(Service):
    def __init__(self, core: Core, usage: UsageService) -> None:
        super().__init__(core)
        self.usage = usage

    async def add_policy(self, policy: Policy) -> Policy:
        """Store a new policy (its id must be new)."""
        def op(tx: LedgerTx) -> Changed[Policy]:
            if any(json.loads(spec)["id"] == policy.id for spec in tx.policy_specs()):
                raise FieldError("id", f"a policy {policy.id} already exists")
            tx.save_policy(policy.id, json.dumps(policy.to_json()), self.now_ms())
            return policy, Journal(f"policy:{policy.id}", None, policy.to_json())

        return await self._change("edit_policies", "policy.add", op)

    async def update_policy(self, policy: Policy) -> Policy:
        def op(tx: LedgerTx) -> Changed[Policy]:
            before = next((json.loads(spec) for spec in tx.policy_specs() if json.loads(spec)["id"] == policy.id), None)
            if before is None:
                raise FieldError("id", f"no policy {policy.id}")
            tx.save_policy(policy.id, json.dumps(policy.to_json()), self.now_ms())
            return policy, Journal(f"policy:{policy.id}", before, policy.to_json())

        return await self._change("edit_policies", "policy.edit", op)

    async def remove_policy(self, policy_id: str) -> Policy:
        policy = await self.policy(policy_id)

        def op(tx: LedgerTx) -> Changed[Policy]:
            tx.save_policy(policy.id, json.dumps(policy.to_json()), self.now_ms(), deleted=True)
            return policy, Journal(f"policy:{policy.id}", policy.to_json(), None)

        return await self._change("edit_policies", "policy.remove", op)

    async def policies(self) -> list[Policy]:
        specs = await self._tx(lambda tx: tx.policy_specs())
        return [Policy.from_json(json.loads(spec)) for spec in specs]

    async def policy(self, policy_id: str) -> Policy:
        for policy in await self.policies():
            if policy.id == policy_id:
                return policy
        raise FieldError("id", f"no policy {policy_id!r}; 'budgeteer policy list' shows them")

    async def policy_status(self) -> list[Outcome]:
        """Every policy as it stands now: consumed and held in its current window."""
        return await self._tx(self.budgets.snapshot)

    async def overshoots(self, since_ms: int = 0) -> list[Overshoot]:
        """Calls settled above their hold on a policy since ``since_ms``, oldest first."""
        rows = await self._tx(lambda tx: tx.overshoots(since_ms))
        return [Overshoot(*row) for row in rows]

    async def spend_forecast(self, lookback_ms: int = HOUR_MS) -> Forecast:
        """All spend this calendar month (UTC), forecast as ``forecasts`` forecasts a dollar budget
        per month on everything, with no limit: the burn per hour over the last ``lookback_ms``
        and the spend at the month's end at that pace (the dashboard's "Burn, month-end")."""
        now = self.now_ms()
        month = await self.usage.totals(*period_range("month", now))
        recent = await self.usage.totals(now - lookback_ms, now + 1)
        everything = Policy(id="", name="all spend", scope=Scope(), metric="usd", window=Window("month"),
                            hard=2**63 - 1)  # no limit: the most a ledger's integer holds
        return forecast(everything, month.cost_nanos, recent.cost_nanos, lookback_ms, now)

    async def forecasts(self, lookback_ms: int = HOUR_MS) -> list[Forecast]:
        """Each policy's burn rate over the last ``lookback_ms`` and where it leads."""
        now = self.now_ms()

        def op(tx: LedgerTx) -> list[Forecast]:
            out = []
            for status in self.budgets.snapshot(tx):
                policy = status.policy
                where = {CONTEXT_COLUMNS[kind]: value for kind, value in policy.scope.parts}
                raw = any(c in ("session", "agent") for c in where)
                sums = (tx.events_between if raw else tx.rollup_between)(now - lookback_ms, now + 1, where)
                recent = sums[METRICS.index(policy.metric)]
                out.append(forecast(policy, status.consumed, recent, lookback_ms, now))
            return out

        return await self._tx(op)

    async def backtest(self, policy: Policy, start_ms: int, end_ms: int) -> Backtest:
        """Replay [start, end) of the ledger against a draft policy (nothing is stored)."""
        where = {CONTEXT_COLUMNS[kind]: value for kind, value in policy.scope.parts}
        replayed: Backtest = await self.store.fold_usage(
            start_ms, end_ms, where, lambda rows: replay(policy, rows, start_ms, end_ms))
        return replayed

    async def policy_timeline(self, policy: Policy, start_ms: int, end_ms: int,
                              bucket_ms: int) -> list[tuple[int, int]]:
        """The policy's consumption at each bucket of [start, end), as its window saw it, to
        draw against its soft and hard limits. Dollar policies over rollup dimensions read
        the rollups; the rest count raw events the way the evaluator does (blocked calls
        use no tokens and make no request)."""
        first = start_ms - start_ms % bucket_ms
        lead = (first - window_bounds(policy.window, first)[0] if policy.window.calendar
                else policy.window.rolling_ms)
        fetch_start = first - lead - (first - lead) % bucket_ms
        where = {CONTEXT_COLUMNS[kind]: value for kind, value in policy.scope.parts}
        amounts: dict[int, int] = {}
        if policy.metric == "usd" and all(column in ROLLUP_DIMENSIONS for column in where):
            for point in await self.usage.timeline(fetch_start, end_ms, bucket_ms, filters=where,
                                                   fields=("cost_nanos",)):
                amounts[point.bucket_ms] = point.totals.cost_nanos
        else:
            metric = policy.metric

            def fold(rows: Iterable[tuple[int, int, int, str]]) -> dict[int, int]:
                for ts, cost, tokens, status in rows:
                    amount = cost if metric == "usd" else 0 if status == "blocked" else (
                        tokens if metric == "tokens" else 1)
                    b = ts - ts % bucket_ms
                    amounts[b] = amounts.get(b, 0) + amount
                return amounts

            await self.store.fold_usage(fetch_start, end_ms, where, fold)
        return consumption_series(policy, amounts, start_ms, end_ms, bucket_ms)

    async def would_blocks(self, limit: int = 100) -> list[BudgetDecision]:
        """(ts_ms, request_id, policy_id, decision, mode) of recent dry_run and suggest verdicts."""
        return await self._tx(lambda tx: tx.decisions(limit))
