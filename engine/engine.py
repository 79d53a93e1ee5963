"""Engine: opens a ledger, wires the modules, and is the one public entry point.

The command line, the dashboard and the integrations all go through an ``Engine``;
none of them touches SQL or builds a store of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httpx
import platformdirs

from engine.alerts import RETRY_DELAYS_S, WEBHOOK_KINDS, Alert, deliver, forecast_message, redact_url
from engine.budgets import (
    CONTEXT_COLUMNS,
    DEFAULT_MAX_OUTPUT_TOKENS,
    METRICS,
    Authorization,
    Backtest,
    BudgetBook,
    CallCost,
    Evaluation,
    Forecast,
    Outcome,
    Policy,
    consumption_series,
    forecast,
    window_bounds,
)
from engine.budgets import backtest as replay
from engine.clock import HOUR_MS, Clock, SystemClock, period_range
from engine.models import ROLLUP_DIMENSIONS, FieldError, Usage, UsageEvent
from engine.pricing import ModelPrice, PriceBook, bundled_prices, cost_nanos, parse_litellm
from engine.store import (
    TIMELINE_FIELDS,
    BreakdownRow,
    LedgerTx,
    Metric,
    RecordResult,
    SQLiteStore,
    TimelinePoint,
    Totals,
)

LEDGER_FILENAME = "ledger.db"


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

    def context(self) -> dict[str, str]:
        return {"workspace": self.workspace, "team": self.team, "principal": self.principal,
                "token": self.token_id, "session": self.session, "agent": self.agent,
                "provider": self.provider, "model": self.model}


def default_db_path() -> Path:
    """``BUDGETEER_DB``, else ``$BUDGETEER_HOME/ledger.db``, else the user data directory."""
    if os.environ.get("BUDGETEER_DB"):
        return Path(os.environ["BUDGETEER_DB"]).expanduser()
    if os.environ.get("BUDGETEER_HOME"):
        return Path(os.environ["BUDGETEER_HOME"]).expanduser() / LEDGER_FILENAME
    return Path(platformdirs.user_data_dir("budgeteer", appauthor=False)) / LEDGER_FILENAME


class Engine:
    """A ledger with its prices. Open with ``async with await Engine.open(path) as engine``."""

    def __init__(self, store: SQLiteStore, prices: PriceBook, clock: Clock) -> None:
        self.store = store
        self.prices = prices
        self.clock = clock
        self.budgets = BudgetBook(clock.now_ms)
        store.add_transaction_hooks(self.budgets.begin, self.budgets.abort, self.budgets.end)
        self._deliveries: set[asyncio.Task[None]] = set()
        self.webhook_retry_delays: tuple[float, ...] = RETRY_DELAYS_S

    async def _tx(self, op: Callable[[LedgerTx], Any]) -> Any:
        """A group-committed ledger operation; alerts it raised are delivered after the commit."""
        result = await self.store.transact(op)
        raised = self.budgets.committed()
        if raised:
            task = asyncio.create_task(self._deliver(raised))
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)
        return result

    @classmethod
    async def open(cls, db: str | Path | None = None, *, clock: Clock | None = None,
                   durable: bool = True) -> Engine:
        store = await SQLiteStore.open(Path(db) if db else default_db_path(), durable=durable)
        try:
            prices = PriceBook()
            prices.extend(bundled_prices().all_versions())
            prices.extend(ModelPrice.from_json(json.loads(spec)) for spec in await store.load_prices())
        except BaseException:
            await store.close()
            raise
        return cls(store, prices, clock or SystemClock())

    @property
    def path(self) -> Path:
        return self.store.path

    async def close(self) -> None:
        if self._deliveries:
            await asyncio.wait(self._deliveries, timeout=30)
        await self.store.close()

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def now_ms(self) -> int:
        return self.clock.now_ms()

    # ------------------------------------------------------------------ writing

    def priced(self, event: UsageEvent) -> UsageEvent:
        """Settle the event's cost in place and return it: the provider's if given, else from
        the price table of the event's own day, else marked ``unpriced`` (never a silent $0)."""
        if event.cost_nanos is None:
            event.cost_nanos, event.cost_source = self.prices.price_event(event)
        return event

    async def record(self, event: UsageEvent) -> RecordResult:
        """Append one event (group-committed); returns once it is durable."""
        return await self.store.record(self.priced(event))

    async def record_many(self, events: Iterable[UsageEvent]) -> list[RecordResult]:
        """Append events in one transaction: all or none."""
        return await self.store.record_many([self.priced(e) for e in events])

    async def bulk_record(self, events: Iterable[UsageEvent], *, atomic: bool = False) -> tuple[int, int]:
        """Append a large stream; returns (recorded, duplicates). ``atomic``: one transaction."""
        return await self.store.bulk_record(events, atomic=atomic, prepare=self.priced)

    # ------------------------------------------------------------------ reading

    def period(self, period: str | None) -> tuple[int, int]:
        return period_range(period, self.now_ms())

    async def totals(self, start_ms: int, end_ms: int, filters: Mapping[str, str] | None = None) -> Totals:
        return await self.store.totals(start_ms, end_ms, filters)

    async def timeline(self, start_ms: int, end_ms: int, bucket_ms: int, *,
                       filters: Mapping[str, str] | None = None,
                       group_by: str | None = None,
                       fields: Sequence[str] = TIMELINE_FIELDS) -> list[TimelinePoint]:
        return await self.store.timeline(start_ms, end_ms, bucket_ms, filters, group_by, fields)

    async def breakdown(self, start_ms: int, end_ms: int, by: str, *, limit: int = 10,
                        order: Metric = "cost",
                        filters: Mapping[str, str] | None = None) -> list[BreakdownRow]:
        return await self.store.breakdown(start_ms, end_ms, by, limit=limit, order=order, filters=filters)

    async def usage_report(self, period: str | None, by: str, limit: int = 50) -> dict[str, Any]:
        """What ``budgeteer usage`` prints: totals and a breakdown for a period."""
        start, end = self.period(period)
        totals = await self.totals(start, end)
        rows = await self.breakdown(start, end, by, limit=limit)
        return {"period": period or "all", "start_ms": start, "end_ms": end, "by": by,
                "totals": totals, "rows": rows}

    async def event_count(self) -> int:
        return await self.store.event_count()

    def iter_events(self, start_ms: int, end_ms: int) -> AsyncIterator[UsageEvent]:
        return self.store.iter_events(start_ms, end_ms)

    async def data_version(self) -> int:
        return await self.store.data_version()

    # ------------------------------------------------------------------ budgets

    async def add_policy(self, policy: Policy) -> Policy:
        """Store a new policy (its id must be new)."""
        def op(tx: LedgerTx) -> None:
            if any(json.loads(spec)["id"] == policy.id for spec in tx.policy_specs()):
                raise FieldError("id", f"a policy {policy.id} already exists")
            tx.save_policy(policy.id, json.dumps(policy.to_json()), self.now_ms())

        await self._tx(op)
        return policy

    async def update_policy(self, policy: Policy) -> Policy:
        def op(tx: LedgerTx) -> None:
            if not any(json.loads(spec)["id"] == policy.id for spec in tx.policy_specs()):
                raise FieldError("id", f"no policy {policy.id}")
            tx.save_policy(policy.id, json.dumps(policy.to_json()), self.now_ms())

        await self._tx(op)
        return policy

    async def remove_policy(self, policy_id: str) -> Policy:
        policy = await self.policy(policy_id)

        def op(tx: LedgerTx) -> None:
            tx.save_policy(policy.id, json.dumps(policy.to_json()), self.now_ms(), deleted=True)

        await self._tx(op)
        return policy

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
        return await self._tx(self.budgets.snapshot)  # type: ignore[no-any-return]

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

        return await self._tx(op)  # type: ignore[no-any-return]

    async def backtest(self, policy: Policy, start_ms: int, end_ms: int) -> Backtest:
        """Replay [start, end) of the ledger against a draft policy (nothing is stored)."""
        where = {CONTEXT_COLUMNS[kind]: value for kind, value in policy.scope.parts}
        return await self.store.fold_usage(  # type: ignore[no-any-return]
            start_ms, end_ms, where, lambda rows: replay(policy, rows, start_ms, end_ms))

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
            for point in await self.timeline(fetch_start, end_ms, bucket_ms, filters=where, fields=("cost_nanos",)):
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

    def worst_case(self, call: CallRequest) -> CallCost:
        """The most a call can cost: its input estimate plus ``max_tokens`` of output (a
        documented default when absent), all at the uncached rates of the model's price."""
        output = call.max_tokens if call.max_tokens is not None else DEFAULT_MAX_OUTPUT_TOKENS
        price = self._price_of(call)
        tokens = call.input_tokens + output
        if price is None:
            return CallCost(usd=0, tokens=tokens, priced=False)
        return CallCost(usd=cost_nanos(price, Usage(input_tokens=call.input_tokens, output_tokens=output)),
                        tokens=tokens)

    def _price_of(self, call: CallRequest) -> ModelPrice | None:
        return self.prices.lookup(call.model, self.now_ms(), call.workspace, call.provider or None)

    def _context(self, call: CallRequest) -> dict[str, str]:
        context = call.context()
        if not context["provider"]:  # a call that does not name its provider gets the price table's
            price = self._price_of(call)
            context["provider"] = price.provider if price else ""
        return context

    async def authorize(self, call: CallRequest) -> Authorization:
        """Check every applicable policy and, if the call may go, hold its worst case on all of them."""
        cost = self.worst_case(call)
        context = self._context(call)
        alternatives = self._cheaper_models(call, cost)
        return await self._tx(  # type: ignore[no-any-return]
            lambda tx: self.budgets.authorize(tx, context, cost, call.request_id, alternatives))

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
        return await self._tx(  # type: ignore[no-any-return]
            lambda tx: self.budgets.evaluate(tx, context, cost, self.now_ms()))

    async def settle(self, hold_id: str, event: UsageEvent) -> RecordResult:
        """Post the call's actual usage to the ledger and release its hold, at once."""
        priced = self.priced(event)
        return await self._tx(  # type: ignore[no-any-return]
            lambda tx: self.budgets.settle(tx, hold_id, priced))

    async def release(self, hold_id: str) -> None:
        """Give back the hold of a call that failed."""
        await self._tx(lambda tx: self.budgets.release(tx, hold_id))

    async def expire_holds(self) -> None:
        """Expire holds past their time to live (every write transaction also does this)."""
        await self._tx(lambda tx: None)

    async def open_holds(self) -> int:
        return await self._tx(lambda tx: tx.open_hold_count())  # type: ignore[no-any-return]

    async def open_override_requests(self) -> int:
        return await self._tx(lambda tx: tx.pending_override_count())  # type: ignore[no-any-return]

    async def would_blocks(self, limit: int = 100) -> list[tuple[int, str, str, str, str]]:
        """(ts_ms, request_id, policy_id, decision, mode) of recent dry_run and suggest verdicts."""
        return await self._tx(lambda tx: tx.decisions(limit))  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ alerts

    async def alerts(self, *, include_acked: bool = False, limit: int = 200) -> list[Alert]:
        """Alerts, newest first (the ledger is caught up first, so crossings are current)."""
        rows = await self._tx(lambda tx: tx.alerts(include_acked=include_acked, limit=limit))
        return [Alert(*row) for row in rows]

    async def ack_alert(self, alert_id: int, actor: str) -> Alert:
        now = self.now_ms()

        def op(tx: LedgerTx) -> None:
            if not tx.ack_alert(alert_id, actor, now):
                raise FieldError("id", f"no alert {alert_id}")

        await self._tx(op)
        return next(a for a in await self.alerts(include_acked=True, limit=100_000) if a.id == alert_id)

    async def check_forecasts(self) -> list[int]:
        """Raise a projected-overrun alert (once per window) for every policy heading past its limit."""
        forecasts = [f for f in await self.forecasts() if f.overrun]
        now = self.now_ms()

        def op(tx: LedgerTx) -> list[int]:
            ids = []
            for f in forecasts:
                window = f.policy.window
                key = window_bounds(window, now)[0] if window.calendar else now - now % window.rolling_ms
                alert_id = tx.raise_alert(f.policy.id, key, "forecast", 0, now, f.projected, forecast_message(f))
                if alert_id is not None:
                    ids.append(alert_id)
            return ids

        ids: list[int] = await self._tx(op)
        if ids:
            task = asyncio.create_task(self._deliver(ids))
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)
        return ids

    async def add_webhook(self, url: str, kind: str = "generic") -> str:
        if kind not in WEBHOOK_KINDS:
            raise FieldError("kind", f"must be one of {', '.join(WEBHOOK_KINDS)} (got {kind!r})")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FieldError("url", "must be an http:// or https:// address")
        webhook_id = "wh_" + secrets.token_hex(4)
        now = self.now_ms()
        await self._tx(lambda tx: tx.add_webhook(webhook_id, url, kind, now))
        return webhook_id

    async def webhooks(self) -> list[tuple[str, str, str]]:
        """(id, redacted url, kind) of every enabled webhook."""
        rows = await self._tx(lambda tx: tx.webhooks())
        return [(i, redact_url(u), k) for i, u, k in rows]

    async def deliveries(self, alert_id: int) -> list[tuple[str, int, bool, str]]:
        return await self._tx(lambda tx: tx.deliveries(alert_id))  # type: ignore[no-any-return]

    async def _deliver(self, alert_ids: list[int]) -> None:
        hooks: list[tuple[str, str, str]] = await self.store.transact(lambda tx: tx.webhooks())
        if not hooks:
            return
        alerts = {a.id: a for a in await self.alerts(include_acked=True, limit=10_000) if a.id in alert_ids}
        async with httpx.AsyncClient(timeout=10.0) as client:
            for alert in alerts.values():
                for webhook_id, url, kind in hooks:
                    attempts = await deliver(client, url, kind, alert, self.webhook_retry_delays)
                    rows = [(alert.id, webhook_id, n, self.now_ms(), int(ok), detail) for n, ok, detail in attempts]
                    await self.store.transact(partial(LedgerTx.log_deliveries, rows=rows))

    # ------------------------------------------------------------------ prices

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
        await self.store.save_prices([
            (p.model, p.workspace, p.effective_from_ms, p.provider, json.dumps(p.to_json()), p.source, now)
            for p in prices])
        self.prices.extend(prices)
        return len(prices), skipped
