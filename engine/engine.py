"""Engine: opens a ledger, wires the modules, and is the one public entry point.

The command line, the dashboard and the integrations all go through an ``Engine``;
none of them touches SQL or builds a store of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import sqlite3
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import platformdirs

from engine import access, approvals, audit, routing, tokens
from engine import providers as prov
from engine import vault as vault_mod
from engine.alerts import RETRY_DELAYS_S, WEBHOOK_KINDS, Alert, deliver, forecast_message, post_json, redact_url
from engine.approvals import OverrideRequest
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
    Overshoot,
    Policy,
    Scope,
    Window,
    consumption_series,
    forecast,
    window_bounds,
)
from engine.budgets import backtest as replay
from engine.clock import HOUR_MS, Clock, SystemClock, parse_duration_ms, period_range
from engine.ledger import (
    TIMELINE_FIELDS,
    BreakdownRow,
    LedgerRefusing,
    LedgerTx,
    Metric,
    RecordResult,
    SQLiteStore,
    TimelinePoint,
    Totals,
    refusal,
)
from engine.models import ROLLUP_DIMENSIONS, STATUSES, FieldError, SettledCall, UsageEvent
from engine.pricing import (
    ModelPrice,
    PriceBook,
    bundled_prices,
    parse_litellm,
    uncached_cost_nanos,
    uncached_costs,
    worst_cost_nanos,
)
from engine.spill import SUFFIX as SPILL_SUFFIX
from engine.spill import Spilled, SpillJournal
from engine.tokens import Token
from engine.vault import Vault

LEDGER_FILENAME = "ledger.db"
_INSERT_DECISION = ("INSERT INTO routing_decisions (ts_ms, request_id, principal, mode, requested, chosen, applied, "
                    "score, requested_cost, chosen_cost, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
DECISION_WAIT_S = 0.05  # how long a routing decision waits for an operation to ride with
HEALTH_REFRESH_S = 1.0  # how old provider health may be before a call starts a refresh (in the background)
RETRY_WRITES_S = (0.2, 5.0)  # while the ledger refuses writes: the first wait before trying again, and the longest
RETRY_AFTER_S = 2  # what a call refused meanwhile is told to wait (Retry-After)
MAX_RECENT_CALLS = 10_000  # the most calls one read of the ledger's tail returns
log = logging.getLogger("budgeteer")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Journal:
    """One audit journal entry of a change: what it changed, before and after (no secret:
    ``audit.append`` refuses one). ``action`` when not the change's own."""

    subject: str
    before: Mapping[str, Any] | None
    after: Mapping[str, Any] | None
    action: str = ""


#: What a change's operation returns: its result and its journal entries (none when it
#: found nothing to change).
Changed = tuple[T, Journal | Sequence[Journal]]


def _cheapest_first(indices: list[int], rank: Callable[[int], tuple[int, str]]) -> Iterator[int]:
    """``indices`` by ``rank``, sorted only past the first (which is most often the last asked)."""
    if indices:
        first = min(indices, key=rank)
        yield first
        yield from sorted((i for i in indices if i != first), key=rank)


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


def default_db_path() -> Path:
    """``BUDGETEER_DB``, else ``$BUDGETEER_HOME/ledger.db``, else the user data directory."""
    if os.environ.get("BUDGETEER_DB"):
        return Path(os.environ["BUDGETEER_DB"]).expanduser()
    if os.environ.get("BUDGETEER_HOME"):
        return Path(os.environ["BUDGETEER_HOME"]).expanduser() / LEDGER_FILENAME
    return Path(platformdirs.user_data_dir("budgeteer", appauthor=False)) / LEDGER_FILENAME


def local_identity() -> str:
    """Who this process acts as: ``BUDGETEER_USER``, else the login name."""
    return (os.environ.get("BUDGETEER_USER") or os.environ.get("BUDGETEER_ACTOR") or os.environ.get("USER")
            or os.environ.get("USERNAME") or "local")


class Engine:
    """A ledger with its prices. Open with ``async with await Engine.open(path) as engine``.

    Changes are made as ``actor`` (the local identity unless given), checked against the
    permission matrix of ``engine.access`` and written to the audit journal in the same
    transaction as the change itself.
    """

    def __init__(self, store: SQLiteStore, prices: PriceBook, clock: Clock, actor: str | None = None) -> None:
        self.store = store
        self.prices = prices
        self.clock = clock
        self.actor = actor or local_identity()
        pending = os.environ.get("BUDGETEER_APPROVAL_TTL")
        self.budgets = BudgetBook(clock.now_ms, pending_ttl_ms=parse_duration_ms(pending, "BUDGETEER_APPROVAL_TTL")
                                  if pending else approvals.DEFAULT_PENDING_TTL_MS)
        store.add_transaction_hooks(self.budgets.begin, self.budgets.abort, self.budgets.end)
        self._deliveries: set[asyncio.Task[None]] = set()
        # Governed async transports made from this engine: their streams still open are settled
        # before it closes (a caller may leave one unfinished and never close its client).
        self.transports: weakref.WeakSet[Any] = weakref.WeakSet()
        self.webhook_retry_delays: tuple[float, ...] = RETRY_DELAYS_S
        self._vault: Vault | None = None
        self._catalog_cache: tuple[float, list[prov.CatalogModel]] | None = None
        # the cached catalog's prices and each model's first place in it (for routing)
        self._catalog_index: tuple[list[ModelPrice], dict[str, int]] = ([], {})
        self._shortlists: dict[tuple[frozenset[str], int, frozenset[str]], routing.Shortlist] = {}
        self._unhealthy: tuple[object, dict[str, str], frozenset[str]] = (None, {}, frozenset())
        # Provider health in memory: loaded once, then the new events added by one refresh at a
        # time, in the background when a call finds it older than HEALTH_REFRESH_S.
        self._health = prov.HealthBook()
        self._health_last_id: int | None = None
        self._health_at = 0.0  # time.monotonic() of the last refresh's start
        self._health_refresh: asyncio.Task[dict[str, prov.Breaker]] | None = None
        self._breakers: dict[str, prov.Breaker] | None = None
        self._decision_rows: list[tuple[Any, ...]] = []  # routing decisions not yet written
        self._decision_flush: asyncio.Task[None] | None = None
        # Asked when the file vault needs its passphrase and BUDGETEER_VAULT_PASSPHRASE is unset.
        self.vault_passphrase: Callable[[], str] | None = None
        # Settlements of answered calls the ledger refused, until it takes them (engine.spill).
        self.spill = SpillJournal(Path(f"{store.path}{SPILL_SUFFIX}"))
        self.refusing: str | None = None  # why the ledger refuses writes, while it does
        self._retry_writes: asyncio.Task[None] | None = None
        self._replaying = asyncio.Lock()
        self._chain_key: tuple[str, audit.ChainKey] | None = None  # (ledger id, key) once read or made
        self._anchor_day = -1  # the last day this process looked whether the anchor was posted

    async def _tx(self, op: Callable[[LedgerTx], Any], *, sync: bool = True) -> Any:
        """A group-committed ledger operation; alerts it raised are delivered after the commit.
        ``sync=False`` for changes that need not survive a power cut (``SQLiteStore.transact``)."""
        if self._decision_rows:  # routing decisions ride with the next operation (mostly the routed call's hold)
            op = self._carrying_decisions(op)
        result = await self.store.transact(op, sync=sync)
        raised = self.budgets.committed()
        if raised:
            task = asyncio.create_task(self._deliver(raised))
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)
        return result

    def _journal(self, conn: sqlite3.Connection, action: str, entries: Journal | Sequence[Journal]) -> None:
        """Append a change's entries in its transaction (only ``_change`` and ``import_usage``,
        which check the actor first)."""
        now = self.now_ms()
        key = self._audit_key(conn, create=True)
        for e in (entries,) if isinstance(entries, Journal) else entries:
            audit.append(conn, now, self.actor, e.action or action, e.subject, e.before, e.after, key=key)

    async def _change(self, permission: access.Permission, action: str, op: Callable[[LedgerTx], Changed[T]]) -> T:
        """The one path of every change an operator makes (tests/test_permissions.py holds every
        public method to it): in one transaction the actor is checked against the permission
        matrix, ``op`` makes the change, and its journal entries are appended, so a change is
        never made unchecked or unjournaled, nor journaled without being made. A ledger with no
        members lets anyone change anything, and still journals it. Calls authenticated by an
        API token (authorize, settle, record) do not come this way: the gateway checks their
        scopes, and they pay for no member lookup."""
        def run(tx: LedgerTx) -> T:
            access.require(tx.conn, self.actor, permission)  # before op, which may touch more than the ledger
            result, entries = op(tx)
            self._journal(tx.conn, action, entries)
            return result

        return await self._tx(run)  # type: ignore[no-any-return]

    async def _permitted(self, permission: access.Permission) -> None:
        """AccessDenied now, before a long or interactive step (an import, a passphrase);
        the change itself is checked again in its own transaction."""
        await self.store.read_with(lambda conn: access.require(conn, self.actor, permission))

    @classmethod
    async def open(cls, db: str | Path | None = None, *, clock: Clock | None = None,
                   durable: bool = True, sync_interval_s: float = 0.0, actor: str | None = None) -> Engine:
        """Open the ledger at ``db`` (the user data directory's by default); ``durable`` and
        ``sync_interval_s`` as in ``SQLiteStore.open``."""
        store = await SQLiteStore.open(Path(db) if db else default_db_path(), durable=durable,
                                       sync_interval_s=sync_interval_s)
        try:
            prices = PriceBook()
            prices.extend(bundled_prices().all_versions())
            prices.extend(ModelPrice.from_json(json.loads(spec)) for spec in await store.load_prices())
        except BaseException:
            await store.close()
            raise
        engine = cls(store, prices, clock or SystemClock(), actor)
        if engine.spill.pending():  # settlements a process before this one could not write
            try:
                replayed = await engine.replay_spill()
            except LedgerRefusing as exc:
                engine._refused(str(exc))
            else:
                if replayed:
                    log.warning("replayed %d settlements from the spill journal %s", replayed, engine.spill.path)
        return engine

    @property
    def path(self) -> Path:
        return self.store.path

    async def close(self) -> None:
        for transport in list(self.transports):
            await transport.settle_open()
        if (retry := self._retry_writes) is not None:
            retry.cancel()
            await asyncio.wait([retry])
        if self.spill.pending():  # a last try; what the ledger still refuses stays in the journal's file
            with contextlib.suppress(LedgerRefusing):
                await self.replay_spill()
            self._keep_spilled()
        if self._health_refresh is not None:
            await asyncio.wait([self._health_refresh])  # a failure is logged by the task itself
        if (flush := self._decision_flush) is not None:
            flush.cancel()
            await asyncio.wait([flush])
        with contextlib.suppress(Exception):  # logged; closing goes on
            await self._decisions_written()
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

    async def import_usage(self, events: Iterable[UsageEvent], *, atomic: bool = False,
                           source: str = "") -> tuple[int, int]:
        """``bulk_record`` as an operator's import (``budgeteer import``): the actor needs
        import_usage, and each of its transactions (one when ``atomic``, else one per chunk)
        journals what it wrote, in that transaction."""
        await self._permitted("import_usage")  # before the first line is read

        def journal(conn: sqlite3.Connection, recorded: int, duplicates: int) -> None:
            access.require(conn, self.actor, "import_usage")
            self._journal(conn, "usage.import", Journal(f"usage:{source or 'events'}", None,
                                                        {"recorded": recorded, "duplicates": duplicates}))

        return await self.store.bulk_record(events, atomic=atomic, prepare=self.priced, journal=journal)

    async def ingest_otlp(self, payload: Any) -> Any:
        """Record the GenAI spans of an OTLP traces payload (OTLP JSON, or ``otlp.decode``'s of
        protobuf), deduplicated by trace and span id; an ``OtlpReport``. OtlpError, and nothing
        written, if the payload is not OTLP traces. The gateway's ``/v1/traces``, for a token
        scoped for it; an operator's file goes through ``import_otlp``."""
        return await self._ingest_otlp(payload, lambda events: self.bulk_record(events, atomic=True))

    async def import_otlp(self, payload: Any, source: str = "") -> Any:
        """``ingest_otlp`` as an operator's import, held to import_usage and journaled."""
        await self._permitted("import_usage")
        return await self._ingest_otlp(payload, lambda events: self.import_usage(events, atomic=True, source=source))

    async def _ingest_otlp(self, payload: Any, write: Callable[[list[UsageEvent]], Awaitable[tuple[int, int]]]) -> Any:
        from engine.integrations import otlp

        events, report = otlp.read(payload, known=lambda model, vendor: self.prices.resolve(model, vendor) is not None)
        if events:
            report.accepted, report.duplicates = await write(events)
        return report

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

    async def recent_calls(self, after: int = 0, limit: int = 200, status: str | None = None) -> list[SettledCall]:
        """The last ``limit`` calls recorded after call id ``after`` (0: from the start), of one
        ``status`` or all, newest first: the tail of the ledger, for a live view that asks only
        for what is new (a status reads back to ``after`` at most: keep it near the end)."""
        if status is not None and status not in STATUSES:
            raise FieldError("status", f"must be one of {', '.join(STATUSES)} (got {status!r})")
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise FieldError("after", f"must be a call id, a whole number from 0 (got {after!r})")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_RECENT_CALLS:
            raise FieldError("limit", f"must be a whole number from 1 to {MAX_RECENT_CALLS} (got {limit!r})")
        return [SettledCall(i, e) for i, e in await self.store.recent_events(after, limit, status)]

    def iter_events(self, start_ms: int, end_ms: int) -> AsyncIterator[UsageEvent]:
        return self.store.iter_events(start_ms, end_ms)

    async def data_version(self) -> int:
        return await self.store.data_version()

    # ------------------------------------------------------------------ budgets

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
        return await self._tx(self.budgets.snapshot)  # type: ignore[no-any-return]

    async def overshoots(self, since_ms: int = 0) -> list[Overshoot]:
        """Calls settled above their hold on a policy since ``since_ms``, oldest first."""
        rows = await self._tx(lambda tx: tx.overshoots(since_ms))
        return [Overshoot(*row) for row in rows]

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

    async def spend_forecast(self, lookback_ms: int = HOUR_MS) -> Forecast:
        """All spend this calendar month (UTC), forecast as ``forecasts`` forecasts a dollar budget
        per month on everything, with no limit: the burn per hour over the last ``lookback_ms``
        and the spend at the month's end at that pace (the dashboard's "Burn, month-end")."""
        now = self.now_ms()
        month = await self.totals(*period_range("month", now))
        recent = await self.totals(now - lookback_ms, now + 1)
        everything = Policy(id="", name="all spend", scope=Scope(), metric="usd", window=Window("month"),
                            hard=2**63 - 1)  # no limit: the most a ledger's integer holds
        return forecast(everything, month.cost_nanos, recent.cost_nanos, lookback_ms, now)

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
        if self.refusing is not None:
            raise LedgerRefusing(self.refusing)
        cost = self.worst_case(call)
        context = self._context(call)
        alternatives = _Lazy(lambda: self._cheaper_models(call, cost))  # worked out only for a downgrade
        try:
            return await self._tx(  # type: ignore[no-any-return]
                lambda tx: self.budgets.authorize(tx, context, cost, call.request_id, alternatives), sync=False)
        except Exception as exc:
            if (why := refusal(exc)) is None:
                raise
            self._refused(why)
            raise LedgerRefusing(why) from None

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

    async def settle_call(self, hold_id: str | None, event: UsageEvent | None) -> bool:
        """Settle a call that was made: ``settle`` (or ``record`` when it had no hold), or with
        ``event`` None release its hold. If the ledger refuses the write (``store.refusal``), or
        has refused writes and not yet taken one again, the settlement goes to the spill journal
        instead, to be replayed once the ledger takes writes: the caller's answer never waits
        for the disk to come back. True when written to the ledger now."""
        priced = self.priced(event) if event is not None else None
        if self.refusing is None:
            try:
                if priced is None:
                    if hold_id:
                        await self.release(hold_id)
                elif hold_id:
                    await self.settle(hold_id, priced)
                else:
                    await self.record(priced)
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
        if record.hold_id is not None and await self._tx(partial(self._replay_hold, record)):
            return
        if record.event is not None:  # no hold, or closed already: a repeat writes nothing
            await self.store.record(record.event)

    def _replay_hold(self, record: Spilled, tx: LedgerTx) -> bool:
        """Close the record's hold if it still waits for it (or expired waiting): True if done so."""
        state = tx.hold_state(record.hold_id)  # type: ignore[arg-type]
        if record.event is None:
            if state == "held":
                self.budgets.release(tx, record.hold_id)  # type: ignore[arg-type]
            return True
        if state in ("held", "expired"):
            self.budgets.settle(tx, record.hold_id, record.event)  # type: ignore[arg-type]
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
        await self._tx(lambda tx: self.budgets.release(tx, hold_id), sync=False)

    async def expire_holds(self) -> None:
        """Expire holds past their time to live now (write transactions also do, once a second)."""
        await self._tx(self.budgets.expire)

    async def open_holds(self) -> int:
        return await self._tx(lambda tx: tx.open_hold_count())  # type: ignore[no-any-return]

    async def open_override_requests(self) -> int:
        now = self.now_ms()
        return await self._tx(lambda tx: approvals.pending_count(tx.conn, now))  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ override requests

    def _audit_key(self, conn: Any, *, create: bool) -> audit.ChainKey | None:
        """The ledger's chain key from the vault, kept in memory once read or made. None while the
        vault holds none; with ``create`` one is made (its first entry the next) when the vault
        opens without asking anyone (the keyring, a known or environment passphrase), else the
        entry joins the legacy chain. A vault that holds the key but is locked refuses the change
        (no prompt here: this runs under the ledger's write lock)."""
        ledger = audit.ledger_id(conn)
        if self._chain_key is not None and self._chain_key[0] == ledger:
            return self._chain_key[1]
        vault, ref = self.vault(), audit.key_ref(ledger)
        if vault.holds(ref):
            if not vault.open_without_asking:
                unlock = "unlock it (set BUDGETEER_VAULT_PASSPHRASE, or the dashboard's vault screen)"
                if not create:
                    raise vault_mod.VaultError(f"the vault holds the audit journal's key and is locked: {unlock} "
                                               "to verify the chain")
                raise FieldError("vault", f"holds the audit journal's key and is locked: {unlock} to make changes; "
                                          "nothing was changed")
            try:
                key = audit.ChainKey.from_secret(vault.get(ref))
            except ValueError as exc:
                raise vault_mod.VaultError(str(exc)) from None
        elif create and vault.open_without_asking:
            key = audit.ChainKey(secrets.token_bytes(32), audit.next_id(conn))
            vault.backend.set(ref, key.to_secret(), self.now_ms())
        else:
            return None
        self._chain_key = (ledger, key)
        return key

    async def request_override(self, policy_id: str, amount: int, duration_ms: int, reason: str,
                               requester: str | None = None) -> tuple[OverrideRequest, bool]:
        """Ask by hand for headroom on a policy (the requester is the actor unless given);
        returns (request, created): a pending one of the same requester is returned instead."""
        policy = await self.policy(policy_id)
        if not reason.strip():
            raise FieldError("reason", "is empty; say what the headroom is for")
        who = requester or self.actor
        now = self.now_ms()

        def op(tx: LedgerTx) -> Changed[tuple[OverrideRequest, bool]]:
            request, created = approvals.open_request(
                tx.conn, policy_id=policy.id, policy_snapshot=policy.to_json(), requester=who, amount=amount,
                duration_ms=duration_ms, reason=reason.strip(), evaluation={"decision": "requested by hand"},
                now_ms=now, pending_ttl_ms=self.budgets.pending_ttl_ms)
            return (request, created), [Journal(request.subject, None, request.audit_view())] if created else []

        return await self._change("request_overrides", "override.request", op)

    async def override_requests(self, pending: bool | None = True, limit: int = 200) -> list[OverrideRequest]:
        now = self.now_ms()

        def op(tx: LedgerTx) -> list[OverrideRequest]:
            approvals.expire(tx.conn, now)
            return approvals.listing(tx.conn, pending=pending, limit=limit)

        return await self._tx(op)  # type: ignore[no-any-return]

    async def override_request(self, request_id: str) -> OverrideRequest:
        return await self._tx(lambda tx: approvals.get(tx.conn, request_id))  # type: ignore[no-any-return]

    async def _decide(self, action: str, decide: Callable[[LedgerTx, int], tuple[OverrideRequest, OverrideRequest]],
                      permission: access.Permission = "approve_overrides") -> OverrideRequest:
        now = self.now_ms()

        def op(tx: LedgerTx) -> Changed[OverrideRequest]:
            before, after = decide(tx, now)
            return after, Journal(after.subject + f" ({after.id})", before.audit_view(), after.audit_view())

        return await self._change(permission, action, op)

    async def approve(self, request_id: str, amount: int | None = None, duration_ms: int | None = None,
                      reason: str = "") -> OverrideRequest:
        return await self._decide("override.approve", lambda tx, now: approvals.approve(
            tx.conn, request_id, self.actor, now, amount=amount, duration_ms=duration_ms, reason=reason))

    async def deny(self, request_id: str, reason: str) -> OverrideRequest:
        return await self._decide("override.deny", lambda tx, now: approvals.deny(
            tx.conn, request_id, self.actor, now, reason))

    async def undo_decision(self, request_id: str) -> OverrideRequest:
        return await self._decide("override.undo", lambda tx, now: approvals.undo(
            tx.conn, request_id, self.actor, now))

    async def cancel_request(self, request_id: str) -> OverrideRequest:
        return await self._decide("override.cancel", lambda tx, now: approvals.cancel(
            tx.conn, request_id, self.actor, now), permission="request_overrides")

    # ------------------------------------------------------------------ API tokens

    async def create_token(self, *, name: str, principal: str, team: str = "", scopes: Sequence[str] | None = None,
                           rpm: int | None = None, tpm: int | None = None,
                           expires_ms: int | None = None) -> tuple[Token, str]:
        """A new token and its secret, which exists nowhere else afterwards: show it once."""
        parsed = tokens.parse_scopes(list(scopes) if scopes else None)
        now = self.now_ms()

        def op(tx: LedgerTx) -> Changed[tuple[Token, str]]:
            token, secret = tokens.create(tx.conn, name=name, principal=principal, team=team, scopes=parsed,
                                          rpm=rpm, tpm=tpm, expires_ms=expires_ms, now_ms=now, actor=self.actor)
            return (token, secret), Journal(f"token:{token.id}", None, token.as_dict())

        return await self._change("manage_tokens", "token.create", op)

    async def tokens(self) -> list[Token]:
        """Every token with its spend this month (never a secret or a digest)."""
        found: list[Token] = await self._tx(lambda tx: tokens.all_tokens(tx.conn))
        start, end = period_range("month", self.now_ms())
        spend = {r.key: r.totals.cost_nanos for r in await self.breakdown(start, end, "token_id", limit=10_000)}
        return [replace(t, used_this_month=spend.get(t.id, 0)) for t in found]

    async def revoke_token(self, token_id: str) -> Token:
        now = self.now_ms()

        def op(tx: LedgerTx) -> Changed[Token]:
            before, after = tokens.revoke(tx.conn, token_id, now, self.actor)
            return after, Journal(f"token:{after.id}", before.as_dict(), after.as_dict())

        return await self._change("manage_tokens", "token.revoke", op)

    async def rotate_token(self, token_id: str) -> tuple[Token, Token, str]:
        """Revoke a token and issue its successor; (old, new, new secret)."""
        now = self.now_ms()

        def op(tx: LedgerTx) -> Changed[tuple[Token, Token, str]]:
            before = tokens.get(tx.conn, token_id)
            old, new, secret = tokens.rotate(tx.conn, token_id, now, self.actor)
            return (old, new, secret), [Journal(f"token:{old.id}", before.as_dict(), old.as_dict()),
                                        Journal(f"token:{new.id}", None, new.as_dict(), "token.create")]

        return await self._change("manage_tokens", "token.rotate", op)

    async def authenticate(self, secret: str, scope: str | None = None, *, touch: bool = True) -> Token:
        """The token a secret belongs to, if active and scoped for ``scope``; else TokenRefused.
        ``touch=False`` reads only (no write transaction): the caller records the use later
        with ``touch_tokens``, as the gateway does in batches."""
        now = self.now_ms()
        if not touch:
            return await self.store.read_with(  # type: ignore[no-any-return]
                lambda conn: tokens.authenticate(conn, secret, now, scope, touch=False))
        return await self._tx(lambda tx: tokens.authenticate(tx.conn, secret, now, scope))  # type: ignore[no-any-return]

    async def touch_tokens(self, last_used: dict[str, int]) -> None:
        if last_used:
            await self._tx(lambda tx: tokens.touch(tx.conn, last_used), sync=False)

    # ------------------------------------------------------------------ members and roles

    async def members(self) -> list[access.Member]:
        return await self._tx(lambda tx: access.members(tx.conn))  # type: ignore[no-any-return]

    async def role(self, user: str | None = None) -> access.Role | None:
        """The user's role; None when not a member. On a ledger without members everyone is an owner."""
        def op(tx: LedgerTx) -> access.Role | None:
            return "owner" if access.single_user(tx.conn) else access.role_of(tx.conn, user or self.actor)

        return await self._tx(op)  # type: ignore[no-any-return]

    async def may(self, permission: access.Permission) -> bool:
        return access.allowed(await self.role(), permission)

    async def set_member(self, user: str, role: str) -> access.Member:
        parsed = access.parse_role(role)
        now = self.now_ms()

        def op(tx: LedgerTx) -> Changed[access.Member]:
            before, after = access.set_member(tx.conn, self.actor, user, parsed, now)
            return after, Journal(f"member:{after.user}", before.as_dict() if before else None, after.as_dict())

        return await self._change("manage_members", "member.set", op)

    async def remove_member(self, user: str) -> access.Member:
        def op(tx: LedgerTx) -> Changed[access.Member]:
            before = access.remove_member(tx.conn, self.actor, user)
            return before, Journal(f"member:{user}", before.as_dict(), None)

        return await self._change("manage_members", "member.remove", op)

    # ------------------------------------------------------------------ audit journal

    async def audit_entries(self, limit: int = 200, text: str = "") -> list[audit.AuditEntry]:
        return await self._tx(lambda tx: audit.entries(tx.conn, limit=limit, text=text))  # type: ignore[no-any-return]

    async def verify_audit(self, anchor: audit.Anchor | None = None) -> audit.Verification:
        """Walk the chain (keyed entries under the vault's key: VaultError if it cannot be read),
        and with an ``anchor`` check that its entry is still there, unchanged."""
        key = await self.store.read_with(lambda conn: self._audit_key(conn, create=False))
        return await self.store.read_with(lambda conn: audit.verify(conn, key, anchor))  # type: ignore[no-any-return]

    async def audit_anchor(self) -> audit.Anchor | None:
        """The journal's head (None while it is empty), for the operator to keep elsewhere."""
        return await self.store.read_with(audit.head)  # type: ignore[no-any-return]

    async def post_audit_anchor(self) -> bool:
        """Post the anchor to the alert webhooks, once a UTC day across every process on this
        ledger (the first to claim the day posts); True if this call posted it."""
        now = self.now_ms()
        day = now // (24 * HOUR_MS)
        if day == self._anchor_day:
            return False
        anchor = await self.audit_anchor()
        if anchor is None:
            return False
        hooks: list[tuple[str, str, str]] = await self.store.transact(lambda tx: tx.webhooks(), sync=False)
        if not hooks or not await self._tx(lambda tx: audit.claim_anchor_post(tx.conn, day, now, anchor),
                                           sync=False):
            self._anchor_day = day
            return False
        self._anchor_day = day
        body = {"source": "budgeteer", "audit_anchor": {**anchor.as_dict(), "ts_ms": now}}
        async with httpx.AsyncClient(timeout=10.0) as client:
            for _, url, kind in hooks:
                text = f"Budgeteer audit anchor: entry {anchor.entry}, hash {anchor.hash} (ledger {anchor.ledger})"
                attempts = await post_json(client, url, {"text": text} if kind == "slack" else body,
                                           self.webhook_retry_delays)
                if not attempts[-1][1]:
                    log.warning("the audit anchor was not delivered to %s: %s", redact_url(url), attempts[-1][2])
        return True

    async def would_blocks(self, limit: int = 100) -> list[tuple[int, str, str, str, str]]:
        """(ts_ms, request_id, policy_id, decision, mode) of recent dry_run and suggest verdicts."""
        return await self._tx(lambda tx: tx.decisions(limit))  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ alerts

    async def alerts(self, *, include_acked: bool = False, limit: int = 200) -> list[Alert]:
        """Alerts, newest first (the ledger is caught up first, so crossings are current)."""
        rows = await self._tx(lambda tx: tx.alerts(include_acked=include_acked, limit=limit))
        return [Alert(*row) for row in rows]

    async def ack_alert(self, alert_id: int) -> Alert:
        """Acknowledge an alert as the actor (once: a second acknowledgement changes nothing)."""
        now = self.now_ms()

        def op(tx: LedgerTx) -> Changed[None]:
            acked = tx.ack_alert(alert_id, self.actor, now)
            if acked is None:
                raise FieldError("id", f"no alert {alert_id}")
            return None, [Journal(f"alert:{alert_id}", {"acked_by": None}, {"acked_by": self.actor})] if acked else []

        await self._change("ack_alerts", "alert.ack", op)
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

        def op(tx: LedgerTx) -> Changed[str]:  # the URL is a secret: the journal keeps its host
            tx.add_webhook(webhook_id, url, kind, now)
            return webhook_id, Journal(f"webhook:{webhook_id}", None, {"url": redact_url(url), "kind": kind})

        return await self._change("manage_alerts", "webhook.add", op)

    async def remove_webhook(self, webhook_id: str) -> str:
        def op(tx: LedgerTx) -> Changed[str]:
            removed = tx.remove_webhook(webhook_id)
            if removed is None:
                raise FieldError("id", f"no webhook {webhook_id}")
            url, kind = removed
            return webhook_id, Journal(f"webhook:{webhook_id}", {"url": redact_url(url), "kind": kind}, None)

        return await self._change("manage_alerts", "webhook.remove", op)

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

        def op(tx: LedgerTx) -> Changed[None]:
            tx.save_prices([(p.model, p.workspace, p.effective_from_ms, p.provider, json.dumps(p.to_json()),
                             p.source, now) for p in prices])
            return None, Journal(f"prices:{source or 'import'}", None, {
                "workspace": workspace, "effective_from_ms": effective, "stored": len(prices),
                "models": sorted({p.model for p in prices})})

        await self._change("manage_prices", "prices.import", op)
        self.prices.extend(prices)
        return len(prices), skipped

    # ------------------------------------------------------------------ vault

    def vault(self) -> Vault:
        """The credential vault beside this ledger (``BUDGETEER_VAULT_FILE`` moves its file)."""
        if self._vault is None:
            self._vault = Vault(vault_mod.vault_path(self.path), self.vault_passphrase)
        return self._vault

    async def vault_unlock(self, passphrase: str) -> None:
        """Use this passphrase for the file vault from now on, checked first (VaultError if wrong)."""
        vault = Vault(self.vault().path, lambda: passphrase)
        await asyncio.to_thread(vault.unlock)
        self.vault_passphrase = lambda: passphrase
        self._vault = vault

    async def vault_status(self) -> vault_mod.Status:
        return self.vault().status()

    async def vault_entries(self) -> list[vault_mod.Entry]:
        return await asyncio.to_thread(self.vault().entries)

    async def _vault_change(self, action: str, ref: str, change: Callable[[], vault_mod.Entry],
                            created: bool) -> vault_mod.Entry:
        """The vault (a file or the keyring) cannot share the ledger's transaction, and its change
        may ask for the passphrase: it is made on a thread after the actor is checked, and then
        journaled (its reference and fingerprint, never the secret) through ``_change``."""
        await self._permitted("manage_vault")
        before = {e.ref: e for e in await self.vault_entries()}.get(vault_mod.parse_ref(ref))
        entry = await asyncio.to_thread(change)
        return await self._change("manage_vault", action, lambda tx: (entry, Journal(
            f"vault:{entry.ref}", before.as_dict() if before else None, entry.as_dict() if created else None)))

    async def vault_set(self, ref: str, secret: str) -> vault_mod.Entry:
        """Store a credential (only its reference and fingerprint reach the journal)."""
        now = self.now_ms()
        return await self._vault_change("vault.set", ref, lambda: self.vault().set(ref, secret, now), True)

    async def vault_remove(self, ref: str) -> vault_mod.Entry:
        return await self._vault_change("vault.remove", ref, lambda: self.vault().remove(ref), False)

    async def credential(self, ref: str) -> str:
        """The secret behind ``vault:REF``, decrypted now, for the one call that needs it."""
        return await asyncio.to_thread(self.vault().get, ref)

    # ------------------------------------------------------------------ providers and models

    async def add_provider(self, **spec: Any) -> prov.Provider:
        provider = prov.build_provider(**spec, now_ms=self.now_ms(), actor=self.actor)

        def op(tx: LedgerTx) -> Changed[prov.Provider]:
            prov.add(tx.conn, provider)
            self._catalog_cache = None
            return provider, Journal(f"provider:{provider.name}", None, provider.as_dict())

        return await self._change("manage_providers", "provider.add", op)

    async def remove_provider(self, name: str) -> prov.Provider:
        def op(tx: LedgerTx) -> Changed[prov.Provider]:
            provider = prov.remove(tx.conn, name)
            self._catalog_cache = None
            return provider, Journal(f"provider:{provider.name}", provider.as_dict(), None)

        return await self._change("manage_providers", "provider.remove", op)

    async def providers(self) -> list[prov.Provider]:
        return await self.store.read_with(prov.listing)  # type: ignore[no-any-return]

    async def provider(self, name: str) -> prov.Provider:
        return await self._tx(lambda tx: prov.get(tx.conn, name))  # type: ignore[no-any-return]

    def _catalog_if_fresh(self, max_age_s: float = 5.0) -> list[prov.CatalogModel] | None:
        cached = self._catalog_cache
        return cached[1] if cached is not None and time.monotonic() - cached[0] < max_age_s else None

    async def catalog(self, max_age_s: float = 5.0) -> list[prov.CatalogModel]:
        """The models calls can go to (kept for a few seconds: a gateway asks on every call)."""
        if (fresh := self._catalog_if_fresh(max_age_s)) is not None:
            return fresh
        found = prov.catalog(self.prices.models(self.now_ms()), await self.providers())
        self._catalog_cache = (time.monotonic(), found)
        self._catalog_index = ([m.price for m in found], {m.model: i for i, m in reversed(list(enumerate(found)))})
        self._shortlists = {}
        return found

    def _routing_breakers(self) -> dict[str, prov.Breaker] | None:
        """The breakers as last judged (None before a process's first look: its first call waits
        for it). A call that finds them older than HEALTH_REFRESH_S starts a refresh in the
        background, unless one is already under way, and goes on with these."""
        if self._breakers is not None and self._health_refresh is None \
                and time.monotonic() - self._health_at >= HEALTH_REFRESH_S:
            self._start_health_refresh()
        return self._breakers

    def _start_health_refresh(self) -> asyncio.Task[dict[str, prov.Breaker]]:
        self._health_at = time.monotonic()
        task = self._health_refresh = asyncio.create_task(self._read_health())

        def done(t: asyncio.Task[dict[str, prov.Breaker]]) -> None:
            self._health_refresh = None
            if not t.cancelled() and (exc := t.exception()) is not None:
                log.warning("provider health not refreshed (kept as it was): %s", exc)

        task.add_done_callback(done)
        return task

    async def _refresh_health(self) -> dict[str, prov.Breaker]:
        """Bring health and breakers up to date now (joining a refresh under way)."""
        task = self._health_refresh or self._start_health_refresh()
        return await asyncio.shield(task)

    async def _read_health(self) -> dict[str, prov.Breaker]:
        now = self.now_ms()
        since = now - self._health.window_ms

        after = self._health_last_id
        read: tuple[list[prov.HealthRow], int, dict[str, prov.Breaker]] = await self.store.read_with(
            lambda conn: (*prov.health_rows(conn, after, since), prov.breakers(conn)))
        rows, last, current = read
        self._health.add(rows)
        self._health.evict(now)
        self._health_last_id = last
        changes = prov.judge_breakers(current, self._health, now)
        if changes:
            await self._tx(lambda tx: prov.save_breakers(tx.conn, changes))
            current.update((b.provider, b) for b in changes)
        self._breakers = current
        return current

    async def provider_health(self, window_ms: int = prov.HEALTH_WINDOW_MS
                              ) -> tuple[list[prov.Health], dict[str, prov.Breaker]]:
        """Health per provider and model over the window, and every breaker as it stands now;
        a model's calls are counted under its catalog name (``PriceBook.catalog_name``)."""
        breakers = await self._refresh_health()
        now = self.now_ms()
        name = self.prices.catalog_name  # a dated or prefixed id counts against its catalog entry
        if window_ms <= self._health.window_ms:
            return self._health.health(now, window_ms, name), breakers
        book = prov.HealthBook(window_ms)  # a longer span than the one kept: read once
        rows, _ = await self.store.read_with(lambda conn: prov.health_rows(conn, None, now - window_ms))
        book.add(rows)
        return book.health(now, name=name), breakers

    async def test_connection(self, name: str, timeout_s: float = 5.0) -> prov.ConnectionResult:
        """Check the provider's credential against its models endpoint. The outcome is also the
        probe of its breaker: success closes an open or half-open breaker, failure reopens it."""
        provider = await self.provider(name)
        secret = await self.credential(provider.credential) if provider.credential else None
        result = await prov.test_connection(provider, secret, timeout_s=timeout_s)
        del secret
        now = self.now_ms()

        def op(tx: LedgerTx) -> prov.Breaker | None:
            known = prov.breakers(tx.conn).get(provider.name)
            if known is not None and known.state != "closed":
                return prov.record_probe(tx.conn, provider.name, result.state == "ok", now,
                                         f"{result.state}, {result.detail}")
            return None

        probed: prov.Breaker | None = await self._tx(op)
        if probed is not None and self._breakers is not None:  # routing sees it at once, not at the next refresh
            self._breakers = {**self._breakers, probed.provider: probed}
        return result

    # ------------------------------------------------------------------ routing

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
        if (breakers := self._routing_breakers()) is None:  # a process's first call
            breakers = await self._refresh_health()
        if self._unhealthy[0] is not breakers:  # worked out once per look at the breakers
            out = {name: b.reason for name, b in breakers.items() if b.state != "closed"}
            self._unhealthy = (breakers, out, frozenset(out))
        _, unhealthy, unhealthy_names = self._unhealthy
        output = max_tokens or routing.DEFAULT_OUTPUT_TOKENS
        prices, first_at = self._catalog_index
        needed, tier = score.input_tokens + output, score.tier_needed
        requested_at = first_at.get(model)
        key = (score.needs, tier, unhealthy_names)
        if (short := self._shortlists.get(key)) is None:
            short = self._shortlists[key] = routing.shortlist(catalog, score.needs, tier, unhealthy)
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
            or await self._tx(decide, sync=False)
        if record:
            self._note_decision(now, request_id, principal, decision)
        return decision

    def _note_decision(self, now: int, request_id: str | None, principal: str, decision: routing.Decision) -> None:
        """Keep a routing decision for the ledger. It is written with the next operation this
        engine sends (a routed call's hold follows at once, so it is committed before that call
        is settled), or, if none comes within DECISION_WAIT_S, on its own."""
        self._decision_rows.append((now, request_id or "route_" + secrets.token_hex(8), principal, decision.mode,
                                    decision.requested, decision.chosen, decision.applied,
                                    round(decision.score.value, 4), decision.requested_cost or 0,
                                    decision.chosen_cost or 0, decision.reason))
        if self._decision_flush is None:
            self._decision_flush = asyncio.create_task(self._flush_decisions())

    def _carrying_decisions(self, op: Callable[[LedgerTx], Any]) -> Callable[[LedgerTx], Any]:
        rows, self._decision_rows = self._decision_rows, []
        loop = asyncio.get_running_loop()

        def carried(tx: LedgerTx) -> Any:
            try:
                tx.conn.executemany(_INSERT_DECISION, rows)
                return op(tx)
            except BaseException:  # undone with the operation: they go with a later one
                loop.call_soon_threadsafe(self._requeue_decisions, rows)
                raise

        return carried

    def _requeue_decisions(self, rows: list[tuple[Any, ...]]) -> None:
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
        rows = await self._tx(lambda tx: tx.conn.execute(
            "SELECT ts_ms, request_id, principal, mode, requested, chosen, applied, score, requested_cost, "
            "chosen_cost, reason FROM routing_decisions ORDER BY id DESC LIMIT ?", (limit,)).fetchall())
        return [routing.Recorded(*r) for r in rows]

    async def routing_summary(self, since_ms: int) -> routing.Summary:
        """How often routing changed the model since ``since_ms``, and what that saved (applied,
        under enforced) or would have saved (suggest and dry_run)."""
        await self._decisions_written()
        row = await self._tx(lambda tx: tx.conn.execute(
            "SELECT count(*), coalesce(sum(chosen != requested), 0), "
            "coalesce(sum(CASE WHEN mode = 'enforced' AND chosen != requested AND requested_cost > chosen_cost "
            "THEN requested_cost - chosen_cost ELSE 0 END), 0), "
            "coalesce(sum(CASE WHEN mode != 'enforced' AND chosen != requested AND requested_cost > chosen_cost "
            "THEN requested_cost - chosen_cost ELSE 0 END), 0) FROM routing_decisions WHERE ts_ms >= ?",
            (since_ms,)).fetchone())
        return routing.Summary(*(int(v) for v in row))

    # ------------------------------------------------------------------ gateways

    async def gateway_heartbeat(self, status: GatewayStatus) -> None:
        """A gateway says it is alive (every few seconds) with its counters; ``stopped_ms`` when it ends."""
        await self._tx(lambda tx: tx.conn.execute(
            "INSERT INTO gateways (id, address, pid, started_ms, seen_ms, stopped_ms, requests, errors, "
            "requests_last_min, errors_last_min) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
            "seen_ms = excluded.seen_ms, stopped_ms = excluded.stopped_ms, requests = excluded.requests, "
            "errors = excluded.errors, requests_last_min = excluded.requests_last_min, "
            "errors_last_min = excluded.errors_last_min",
            (status.id, status.address, status.pid, status.started_ms, status.seen_ms, status.stopped_ms,
             status.requests, status.errors, status.requests_last_min, status.errors_last_min)), sync=False)

    async def gateways(self, seen_within_ms: int = 15_000) -> list[GatewayStatus]:
        """The gateways running on this ledger: heard from recently and not stopped."""
        since = self.now_ms() - seen_within_ms
        rows = await self._tx(lambda tx: tx.conn.execute(
            "SELECT id, address, pid, started_ms, seen_ms, stopped_ms, requests, errors, requests_last_min, "
            "errors_last_min FROM gateways WHERE seen_ms >= ? AND stopped_ms IS NULL ORDER BY started_ms",
            (since,)).fetchall())
        return [GatewayStatus(*r) for r in rows]


    # ------------------------------------------------------------------ governed clients

    def httpx_client(self, *, principal: str, team: str = "", workspace: str = "default", session: str = "",
                     agent: str = "", provider: str | None = None, routing_mode: str = "off", module: Any = httpx,
                     **client_options: Any) -> Any:
        """An httpx client whose transport governs every model call (for ``openai.OpenAI(http_client=...)``
        or ``anthropic.Anthropic(http_client=...)``); it keeps its own engine on this ledger. SDKs built
        on httpx2 (anthropic 2 and later) want ``module=httpx2``."""
        from engine.integrations.transport import transports

        sync, _ = transports(module)
        transport = sync(self.path, self.clock, _caller(principal, team, workspace, session, agent),
                         provider=provider, routing_mode=routing_mode)
        return module.Client(transport=transport, **client_options)

    def httpx_async_client(self, *, principal: str, team: str = "", workspace: str = "default", session: str = "",
                           agent: str = "", provider: str | None = None, routing_mode: str = "off",
                           module: Any = httpx, **client_options: Any) -> Any:
        """The async counterpart, governed by this engine on its event loop."""
        from engine.integrations.transport import transports

        _, governed = transports(module)
        transport = governed(self, _caller(principal, team, workspace, session, agent), provider=provider,
                             routing_mode=routing_mode)
        return module.AsyncClient(transport=transport, **client_options)


@dataclass(frozen=True, slots=True)
class GatewayStatus:
    id: str
    address: str
    pid: int
    started_ms: int
    seen_ms: int
    stopped_ms: int | None
    requests: int
    errors: int
    requests_last_min: int
    errors_last_min: int


def _caller(principal: str, team: str, workspace: str, session: str, agent: str) -> Any:
    from engine.integrations.governor import Caller

    if not principal.strip():
        raise FieldError("principal", "is empty; a governed client acts for someone")
    return Caller(principal=principal, team=team, workspace=workspace, session=session, agent=agent)


class _Lazy:
    """An iterable computed on first iteration."""

    def __init__(self, make: Callable[[], Iterable[Any]]) -> None:
        self.make = make

    def __iter__(self) -> Any:
        return iter(self.make())
