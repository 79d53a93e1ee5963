"""Engine: opens a ledger, wires the domain services, and is the one public entry point.

The command line, the dashboard and the integrations all go through an ``Engine``;
none of them touches SQL or builds a store of its own. Each public method is a one-line
delegation to a service of ``engine.services`` (usage, calls, policies, approvals, tokens,
members, audit, alerts, catalog, credentials, gateways, ledgers, changes), all built on one ``Core``: the
store, the clock, who acts, and the one path of every change (``Core.change``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import platformdirs

from engine import access, approvals, audit, routing
from engine import providers as prov
from engine import vault as vault_mod
from engine.alerts import Alert
from engine.approvals import OverrideRequest
from engine.budgets import (
    Authorization,
    Backtest,
    BudgetBook,
    CallCost,
    Evaluation,
    Forecast,
    Outcome,
    Overshoot,
    Policy,
)
from engine.clock import HOUR_MS, Clock, parse_duration_ms
from engine.ledger import (
    TIMELINE_FIELDS,
    BreakdownRow,
    CopyReport,
    LedgerRefusing,
    Metric,
    RecordResult,
    Store,
    TimelinePoint,
    Totals,
    is_dsn,
    open_ledger,
)
from engine.ledger.results import BudgetDecision, Delivery
from engine.models import FieldError, GatewayStatus, SettledCall, UsageEvent
from engine.pricing import ModelPrice, PriceBook, bundled_prices
from engine.ratelimits import Limit, RateDecision
from engine.services.alerts import AlertService
from engine.services.approvals import ApprovalService
from engine.services.audit import AuditService
from engine.services.calls import CallRequest, CallService
from engine.services.catalog import CatalogService
from engine.services.changes import ChangeService
from engine.services.core import Core
from engine.services.credentials import CredentialService
from engine.services.gateways import GatewayService
from engine.services.ledgers import LedgerService
from engine.services.members import MemberService
from engine.services.policies import PolicyService
from engine.services.tokens import TokenService
from engine.services.usage import UsageService
from engine.spill import SpillJournal
from engine.tokens import Token
from engine.vault import Vault

LEDGER_FILENAME = "ledger.db"
log = logging.getLogger("budgeteer")

__all__ = ["LEDGER_FILENAME", "CallRequest", "Engine", "GatewayStatus", "Services", "claimed_identity",
           "default_db_path", "ledger_location", "local_identity", "operator_identity"]


def home_dir() -> Path:
    """Where this machine keeps Budgeteer's files: ``$BUDGETEER_HOME``, else the user data directory."""
    if os.environ.get("BUDGETEER_HOME"):
        return Path(os.environ["BUDGETEER_HOME"]).expanduser()
    return Path(platformdirs.user_data_dir("budgeteer", appauthor=False))


def default_db_path() -> Path:
    """``BUDGETEER_DB`` when it names a file, else ``$BUDGETEER_HOME/ledger.db``, else the user data directory's."""
    if os.environ.get("BUDGETEER_DB") and not is_dsn(os.environ["BUDGETEER_DB"]):
        return Path(os.environ["BUDGETEER_DB"]).expanduser()
    return home_dir() / LEDGER_FILENAME


def ledger_location(db: str | Path | None = None) -> str | Path:
    """The ledger ``db`` names (``--db``), else ``BUDGETEER_DB``'s, else the default file: a
    PostgreSQL database's address (``postgresql://user@host:port/db``) or an SQLite file."""
    if db is not None and str(db):
        return str(db) if is_dsn(str(db)) else Path(db).expanduser()
    if is_dsn(os.environ.get("BUDGETEER_DB", "")):
        return os.environ["BUDGETEER_DB"]
    return default_db_path()


def local_identity() -> str:
    """Who this process acts as on an SQLite ledger: ``BUDGETEER_USER``, else the login name."""
    return claimed_identity() or os.environ.get("USER") or os.environ.get("USERNAME") or "local"


def claimed_identity() -> str | None:
    """The identity the environment claims (``BUDGETEER_USER``, else ``BUDGETEER_ACTOR``), if any."""
    return os.environ.get("BUDGETEER_USER") or os.environ.get("BUDGETEER_ACTOR") or None


def operator_identity(store: Store) -> tuple[str, str | None]:
    """Who an operator's process (the command line, the dashboard) acts as on ``store``, and what
    to tell them when the environment asked for someone else.

    On PostgreSQL it is the database role the process connects as (``session_user``): the
    server checked that login, so ``BUDGETEER_USER`` is not honoured there (a claim it ignores
    is named in the notice, once). On SQLite it is ``local_identity()``: nothing can check who
    opens a file, so the identity is whatever the environment says."""
    if store.session_user is None:
        return local_identity(), None
    claimed = claimed_identity()
    if claimed is None or claimed == store.session_user:
        return store.session_user, None
    name = "BUDGETEER_USER" if os.environ.get("BUDGETEER_USER") else "BUDGETEER_ACTOR"
    return store.session_user, (f"{name}={claimed} is ignored on a PostgreSQL ledger: you act as "
                                f"{store.session_user}, the database role you connect as")


@dataclass(frozen=True, slots=True)
class Services:
    """The engine's domain services, each given the core (and the services it asks) at construction."""

    usage: UsageService
    calls: CallService
    policies: PolicyService
    approvals: ApprovalService
    tokens: TokenService
    members: MemberService
    audit: AuditService
    alerts: AlertService
    credentials: CredentialService
    gateways: GatewayService
    catalog: CatalogService
    ledgers: LedgerService
    changes: ChangeService

    @classmethod
    def build(cls, core: Core) -> Services:
        usage = UsageService(core)
        policies = PolicyService(core, usage)
        credentials = CredentialService(core)
        gateways = GatewayService(core, credentials)
        catalog = CatalogService(core, gateways)
        alerts = AlertService(core, policies)
        core.carry, core.deliver, core.vault = catalog.carry, alerts._deliver, credentials.vault
        gateways.providers_changed = catalog.forget
        return cls(usage, CallService(core, usage), policies, ApprovalService(core, policies),
                   TokenService(core, usage), MemberService(core), AuditService(core), alerts, credentials, gateways,
                   catalog, LedgerService(core, credentials), ChangeService(core, catalog))


class Engine:
    """A ledger with its prices. Open with ``async with await Engine.open(path) as engine``.

    Changes are made as ``actor``, checked against the permission matrix of ``engine.access``
    and written to the audit journal in the same transaction as the change itself
    (``Core.change``). Unless code names one (the gateway acts as ``gateway``), the actor is the
    operator's identity (``operator_identity``): the database role on PostgreSQL, the local
    identity on SQLite; ``identity_notice`` says when the environment asked for someone else.
    """

    def __init__(self, store: Store, prices: PriceBook, clock: Clock, actor: str | None = None) -> None:
        #: Set when BUDGETEER_USER named someone the ledger does not let this process be (on
        #: PostgreSQL): the command line prints it on stderr, the dashboard shows it once.
        self.identity_notice: str | None = None
        if actor is None:
            actor, self.identity_notice = operator_identity(store)
        self.store = store
        self.prices = prices
        self.clock = clock
        pending = os.environ.get("BUDGETEER_APPROVAL_TTL")
        self.budgets = BudgetBook(clock.now_ms, pending_ttl_ms=parse_duration_ms(pending, "BUDGETEER_APPROVAL_TTL")
                                  if pending else approvals.DEFAULT_PENDING_TTL_MS)
        store.add_transaction_hooks(self.budgets.begin, self.budgets.abort, self.budgets.end)
        self.core = Core(store, prices, clock, self.budgets, actor)
        self.services = Services.build(self.core)
        # Governed async transports made from this engine: their streams still open are settled
        # before it closes (a caller may leave one unfinished and never close its client).
        self.transports: weakref.WeakSet[Any] = weakref.WeakSet()

    @property
    def actor(self) -> str:
        """Who changes are made as (checked and journaled)."""
        return self.core.actor

    @actor.setter
    def actor(self, actor: str) -> None:
        self.core.actor = actor

    @property
    def spill(self) -> SpillJournal:
        """Settlements of answered calls the ledger refused, until it takes them (engine.spill)."""
        return self.services.calls.spill

    @property
    def refusing(self) -> str | None:
        """Why the ledger refuses writes, while it does."""
        return self.services.calls.refusing

    def allow_while_down(self, nanos: int | None) -> None:
        """Admit calls up to ``nanos`` of spend from this process while the ledger cannot be
        written (None, the default: refuse them); see ``CallService.allow_while_down``."""
        self.services.calls.allow_while_down(nanos)

    @property
    def admits_while_down(self) -> bool:
        """Whether calls are admitted (against the allowance) while the ledger refuses writes."""
        return self.services.calls.down_allowance is not None

    @property
    def vault_passphrase(self) -> Callable[[], str] | None:
        """Asked when the file vault needs its passphrase and BUDGETEER_VAULT_PASSPHRASE is unset."""
        return self.services.credentials.vault_passphrase

    @vault_passphrase.setter
    def vault_passphrase(self, ask: Callable[[], str] | None) -> None:
        self.services.credentials.vault_passphrase = ask

    @property
    def webhook_retry_delays(self) -> tuple[float, ...]:
        return self.core.webhook_retry_delays

    @webhook_retry_delays.setter
    def webhook_retry_delays(self, delays: tuple[float, ...]) -> None:
        self.core.webhook_retry_delays = delays

    @classmethod
    async def open(cls, db: str | Path | None = None, *, clock: Clock | None = None,
                   durable: bool = True, sync_interval_s: float = 0.0, actor: str | None = None) -> Engine:
        """Open the ledger at ``db``: an SQLite file (the user data directory's by default) or a
        PostgreSQL database (``postgresql://user@host:port/db``); ``durable`` and
        ``sync_interval_s`` as in ``SQLiteStore.open``. The clock is ``clock`` if given, else the
        store's: the system's for SQLite, the database's for PostgreSQL. ``actor``: who the code
        opening it acts as (the gateway: ``gateway``); the command line and the dashboard name
        none, and act as the operator (``operator_identity``: on PostgreSQL the database role
        connected as, whatever ``BUDGETEER_USER`` says)."""
        store = await open_ledger(ledger_location(db), home=home_dir(), durable=durable,
                                  sync_interval_s=sync_interval_s)
        try:
            prices = PriceBook()
            prices.extend(bundled_prices().all_versions())
            prices.extend(ModelPrice.from_json(json.loads(spec)) for spec in await store.load_prices())
        except BaseException:
            await store.close()
            raise
        engine = cls(store, prices, clock or store.clock, actor)
        if engine.spill.pending():  # settlements a process before this one could not write
            try:
                replayed = await engine.replay_spill()
            except LedgerRefusing as exc:
                engine.services.calls._refused(str(exc))
            else:
                if replayed:
                    log.warning("replayed %d settlements from the spill journal %s", replayed, engine.spill.path)
        return engine

    @property
    def path(self) -> Path:
        """Where this machine keeps the ledger's files: the SQLite file; for PostgreSQL, the local
        name its spill journal and vault sit beside."""
        return self.store.path

    @property
    def location(self) -> str:
        """What opens this ledger again: its file, or its database's address."""
        return self.store.location

    async def close(self) -> None:
        for transport in list(self.transports):
            await transport.settle_open()
        await self.services.calls.close()
        await self.services.gateways.close()
        await self.services.catalog.close()
        await self.services.changes.close()
        if self.core.deliveries:
            await asyncio.wait(self.core.deliveries, timeout=30)
        await self.store.close()

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def now_ms(self) -> int:
        return self.clock.now_ms()

    # ------------------------------------------------------------------ changes other processes made (ChangeService)

    def on_change(self, callback: Callable[[str], None]) -> Callable[[], None]:
        return self.services.changes.on_change(callback)

    @property
    def notifies(self) -> bool:
        """Changes of other processes are pushed to this engine as they commit (PostgreSQL)."""
        return self.services.changes.notifies

    # ------------------------------------------------------------------ usage: recording and reading (UsageService)

    def priced(self, event: UsageEvent) -> UsageEvent:
        return self.services.usage.priced(event)

    async def record(self, event: UsageEvent) -> RecordResult:
        return await self.services.usage.record(event)

    async def record_many(self, events: Iterable[UsageEvent]) -> list[RecordResult]:
        return await self.services.usage.record_many(events)

    async def bulk_record(self, events: Iterable[UsageEvent], *, atomic: bool = False) -> tuple[int, int]:
        return await self.services.usage.bulk_record(events, atomic=atomic)

    async def import_usage(self, events: Iterable[UsageEvent], *, atomic: bool = False,
                           source: str = "") -> tuple[int, int]:
        return await self.services.usage.import_usage(events, atomic=atomic, source=source)

    async def ingest_otlp(self, payload: Any) -> Any:
        return await self.services.usage.ingest_otlp(payload)

    async def import_otlp(self, payload: Any, source: str = "") -> Any:
        return await self.services.usage.import_otlp(payload, source)

    def period(self, period: str | None) -> tuple[int, int]:
        return self.services.usage.period(period)

    async def totals(self, start_ms: int, end_ms: int, filters: Mapping[str, str] | None = None) -> Totals:
        return await self.services.usage.totals(start_ms, end_ms, filters)

    async def timeline(self, start_ms: int, end_ms: int, bucket_ms: int, *,
                       filters: Mapping[str, str] | None = None,
                       group_by: str | None = None,
                       fields: Sequence[str] = TIMELINE_FIELDS) -> list[TimelinePoint]:
        return await self.services.usage.timeline(start_ms, end_ms, bucket_ms, filters=filters, group_by=group_by,
                                                  fields=fields)

    async def breakdown(self, start_ms: int, end_ms: int, by: str, *, limit: int = 10,
                        order: Metric = "cost",
                        filters: Mapping[str, str] | None = None) -> list[BreakdownRow]:
        return await self.services.usage.breakdown(start_ms, end_ms, by, limit=limit, order=order, filters=filters)

    async def usage_report(self, period: str | None, by: str, limit: int = 50) -> dict[str, Any]:
        return await self.services.usage.usage_report(period, by, limit)

    async def event_count(self) -> int:
        return await self.services.usage.event_count()

    async def recent_calls(self, after: int = 0, limit: int = 200, status: str | None = None) -> list[SettledCall]:
        return await self.services.usage.recent_calls(after, limit, status)

    def iter_events(self, start_ms: int, end_ms: int) -> AsyncIterator[UsageEvent]:
        return self.services.usage.iter_events(start_ms, end_ms)

    async def data_version(self) -> int:
        return await self.services.usage.data_version()

    # ------------------------------------------------------------------ budgets (PolicyService)

    async def add_policy(self, policy: Policy) -> Policy:
        return await self.services.policies.add_policy(policy)

    async def update_policy(self, policy: Policy) -> Policy:
        return await self.services.policies.update_policy(policy)

    async def remove_policy(self, policy_id: str) -> Policy:
        return await self.services.policies.remove_policy(policy_id)

    async def policies(self) -> list[Policy]:
        return await self.services.policies.policies()

    async def policy(self, policy_id: str) -> Policy:
        return await self.services.policies.policy(policy_id)

    async def policy_status(self) -> list[Outcome]:
        return await self.services.policies.policy_status()

    async def overshoots(self, since_ms: int = 0) -> list[Overshoot]:
        return await self.services.policies.overshoots(since_ms)

    async def spend_forecast(self, lookback_ms: int = HOUR_MS) -> Forecast:
        return await self.services.policies.spend_forecast(lookback_ms)

    async def forecasts(self, lookback_ms: int = HOUR_MS) -> list[Forecast]:
        return await self.services.policies.forecasts(lookback_ms)

    async def backtest(self, policy: Policy, start_ms: int, end_ms: int) -> Backtest:
        return await self.services.policies.backtest(policy, start_ms, end_ms)

    async def policy_timeline(self, policy: Policy, start_ms: int, end_ms: int,
                              bucket_ms: int) -> list[tuple[int, int]]:
        return await self.services.policies.policy_timeline(policy, start_ms, end_ms, bucket_ms)

    async def would_blocks(self, limit: int = 100) -> list[BudgetDecision]:
        return await self.services.policies.would_blocks(limit)

    # ------------------------------------------ governed calls: holds, settlement, the spill journal (CallService)

    def worst_case(self, call: CallRequest) -> CallCost:
        return self.services.calls.worst_case(call)

    async def authorize(self, call: CallRequest) -> Authorization:
        return await self.services.calls.authorize(call)

    async def check(self, call: CallRequest) -> Evaluation:
        return await self.services.calls.check(call)

    async def authorize_limited(self, call: CallRequest,
                                limits: list[Limit]) -> tuple[RateDecision, Authorization | None]:
        return await self.services.calls.authorize_limited(call, limits)

    def rate_refusal(self, limits: list[Limit]) -> RateDecision | None:
        return self.services.calls.rate_refusals.refusal(limits, self.now_ms())

    async def adjust_rate(self, key: str, kind: str, delta: int) -> None:
        return await self.services.calls.adjust_rate(key, kind, delta)

    async def settle(self, hold_id: str, event: UsageEvent) -> RecordResult:
        return await self.services.calls.settle(hold_id, event)

    async def settle_call(self, hold_id: str | None, event: UsageEvent | None,
                          rate: tuple[str, str, int] | None = None) -> bool:
        return await self.services.calls.settle_call(hold_id, event, rate)

    async def replay_spill(self, *, probe: bool = False) -> int:
        return await self.services.calls.replay_spill(probe=probe)

    async def release(self, hold_id: str) -> None:
        return await self.services.calls.release(hold_id)

    async def expire_holds(self) -> None:
        return await self.services.calls.expire_holds()

    async def open_holds(self) -> int:
        return await self.services.calls.open_holds()

    # ------------------------------------------------------------------ override requests (ApprovalService)

    async def open_override_requests(self) -> int:
        return await self.services.approvals.open_override_requests()

    async def request_override(self, policy_id: str, amount: int, duration_ms: int, reason: str,
                               requester: str | None = None) -> tuple[OverrideRequest, bool]:
        return await self.services.approvals.request_override(policy_id, amount, duration_ms, reason, requester)

    async def override_requests(self, pending: bool | None = True, limit: int = 200) -> list[OverrideRequest]:
        return await self.services.approvals.override_requests(pending, limit)

    async def override_request(self, request_id: str) -> OverrideRequest:
        return await self.services.approvals.override_request(request_id)

    async def approve(self, request_id: str, amount: int | None = None, duration_ms: int | None = None,
                      reason: str = "") -> OverrideRequest:
        return await self.services.approvals.approve(request_id, amount, duration_ms, reason)

    async def deny(self, request_id: str, reason: str) -> OverrideRequest:
        return await self.services.approvals.deny(request_id, reason)

    async def undo_decision(self, request_id: str) -> OverrideRequest:
        return await self.services.approvals.undo_decision(request_id)

    async def cancel_request(self, request_id: str) -> OverrideRequest:
        return await self.services.approvals.cancel_request(request_id)

    # ------------------------------------------------------------------ API tokens (TokenService)

    async def create_token(self, *, name: str, principal: str, team: str = "", scopes: Sequence[str] | None = None,
                           rpm: int | None = None, tpm: int | None = None,
                           expires_ms: int | None = None) -> tuple[Token, str]:
        return await self.services.tokens.create_token(name=name, principal=principal, team=team, scopes=scopes,
                                                       rpm=rpm, tpm=tpm, expires_ms=expires_ms)

    async def tokens(self) -> list[Token]:
        return await self.services.tokens.tokens()

    async def revoke_token(self, token_id: str) -> Token:
        return await self.services.tokens.revoke_token(token_id)

    async def rotate_token(self, token_id: str) -> tuple[Token, Token, str]:
        return await self.services.tokens.rotate_token(token_id)

    async def authenticate(self, secret: str, scope: str | None = None, *, touch: bool = True) -> Token:
        return await self.services.tokens.authenticate(secret, scope, touch=touch)

    async def touch_tokens(self, last_used: dict[str, int]) -> None:
        return await self.services.tokens.touch_tokens(last_used)

    # ------------------------------------------------------------------ members and roles (MemberService)

    async def members(self) -> list[access.Member]:
        return await self.services.members.members()

    async def role(self, user: str | None = None) -> access.Role | None:
        return await self.services.members.role(user)

    async def may(self, permission: access.Permission) -> bool:
        return await self.services.members.may(permission)

    async def set_member(self, user: str, role: str) -> access.Member:
        return await self.services.members.set_member(user, role)

    async def member_notice(self, user: str) -> str | None:
        return await self.services.members.member_notice(user)

    async def remove_member(self, user: str) -> access.Member:
        return await self.services.members.remove_member(user)

    # ------------------------------------------------------------------ moving the ledger (LedgerService)

    async def copy_ledger(self, to: str | Path, *,
                          progress: Callable[[int, int, str], None] | None = None) -> CopyReport:
        return await self.services.ledgers.copy_ledger(to, home_dir(), progress)

    # ------------------------------------------------------------------ audit journal (AuditService)

    async def audit_entries(self, limit: int = 200, text: str = "") -> list[audit.AuditEntry]:
        return await self.services.audit.audit_entries(limit, text)

    async def export_audit_key(self) -> str:
        return await self.services.audit.export_audit_key()

    async def import_audit_key(self, text: str) -> int:
        return await self.services.audit.import_audit_key(text)

    async def verify_audit(self, anchor: audit.Anchor | None = None) -> audit.Verification:
        return await self.services.audit.verify_audit(anchor)

    async def audit_anchor(self) -> audit.Anchor | None:
        return await self.services.audit.audit_anchor()

    async def post_audit_anchor(self) -> bool:
        return await self.services.audit.post_audit_anchor()

    # ------------------------------------------------------------------ alerts (AlertService)

    async def alerts(self, *, include_acked: bool = False, limit: int = 200) -> list[Alert]:
        return await self.services.alerts.alerts(include_acked=include_acked, limit=limit)

    async def ack_alert(self, alert_id: int) -> Alert:
        return await self.services.alerts.ack_alert(alert_id)

    async def check_forecasts(self) -> list[int]:
        return await self.services.alerts.check_forecasts()

    async def add_webhook(self, url: str, kind: str = "generic") -> str:
        return await self.services.alerts.add_webhook(url, kind)

    async def remove_webhook(self, webhook_id: str) -> str:
        return await self.services.alerts.remove_webhook(webhook_id)

    async def webhooks(self) -> list[tuple[str, str, str]]:
        return await self.services.alerts.webhooks()

    async def deliveries(self, alert_id: int) -> list[Delivery]:
        return await self.services.alerts.deliveries(alert_id)

    # ------------------------------------------------------------------ prices, models and routing (CatalogService)

    def price_for(self, model: str, *, workspace: str = "", provider: str | None = None,
                  at_ms: int | None = None) -> ModelPrice | None:
        return self.services.catalog.price_for(model, workspace=workspace, provider=provider, at_ms=at_ms)

    async def import_prices(self, data: Any, *, effective_from_ms: int | None = None,
                            workspace: str = "", source: str = "") -> tuple[int, list[str]]:
        return await self.services.catalog.import_prices(data, effective_from_ms=effective_from_ms, workspace=workspace,
                                                         source=source)

    async def catalog(self, max_age_s: float = 5.0) -> list[prov.CatalogModel]:
        return await self.services.catalog.catalog(max_age_s)

    async def route(self, request: Mapping[str, Any], *, principal: str, model: str, mode: str = "suggest",
                    team: str = "", workspace: str = "default", token_id: str = "", session: str = "",
                    agent: str = "", max_tokens: int | None = None, request_id: str | None = None,
                    record: bool = True, input_tokens: int | None = None) -> routing.Decision:
        return await self.services.catalog.route(request, principal=principal, model=model, mode=mode, team=team,
                                                 workspace=workspace, token_id=token_id, session=session, agent=agent,
                                                 max_tokens=max_tokens, request_id=request_id, record=record,
                                                 input_tokens=input_tokens)

    async def routing_decisions(self, limit: int = 100) -> list[routing.Recorded]:
        return await self.services.catalog.routing_decisions(limit)

    async def routing_summary(self, since_ms: int) -> routing.Summary:
        return await self.services.catalog.routing_summary(since_ms)

    # ------------------------------------------------------------------ vault (CredentialService)

    def vault(self) -> Vault:
        return self.services.credentials.vault()

    async def vault_unlock(self, passphrase: str) -> None:
        return await self.services.credentials.vault_unlock(passphrase)

    async def vault_status(self) -> vault_mod.Status:
        return await self.services.credentials.vault_status()

    async def vault_entries(self) -> list[vault_mod.Entry]:
        return await self.services.credentials.vault_entries()

    async def vault_set(self, ref: str, secret: str) -> vault_mod.Entry:
        return await self.services.credentials.vault_set(ref, secret)

    async def vault_remove(self, ref: str) -> vault_mod.Entry:
        return await self.services.credentials.vault_remove(ref)

    async def credential(self, ref: str) -> str:
        return await self.services.credentials.credential(ref)

    # ------------------------------------------------------------------ providers and gateways (GatewayService)

    async def add_provider(self, **spec: Any) -> prov.Provider:
        return await self.services.gateways.add_provider(**spec)

    async def remove_provider(self, name: str) -> prov.Provider:
        return await self.services.gateways.remove_provider(name)

    async def providers(self) -> list[prov.Provider]:
        return await self.services.gateways.providers()

    async def provider(self, name: str) -> prov.Provider:
        return await self.services.gateways.provider(name)

    async def provider_health(self, window_ms: int = prov.HEALTH_WINDOW_MS
                              ) -> tuple[list[prov.Health], dict[str, prov.Breaker]]:
        return await self.services.gateways.provider_health(window_ms)

    async def test_connection(self, name: str, timeout_s: float = 5.0) -> prov.ConnectionResult:
        return await self.services.gateways.test_connection(name, timeout_s)

    async def gateway_heartbeat(self, status: GatewayStatus) -> None:
        return await self.services.gateways.gateway_heartbeat(status)

    async def gateways(self, seen_within_ms: int = 15_000) -> list[GatewayStatus]:
        return await self.services.gateways.gateways(seen_within_ms)

    # ------------------------------------------------------------------ governed clients

    def httpx_client(self, *, principal: str, team: str = "", workspace: str = "default", session: str = "",
                     agent: str = "", provider: str | None = None, routing_mode: str = "off", module: Any = httpx,
                     **client_options: Any) -> Any:
        """An httpx client whose transport governs every model call (for ``openai.OpenAI(http_client=...)``
        or ``anthropic.Anthropic(http_client=...)``); it keeps its own engine on this ledger. SDKs built
        on httpx2 (anthropic 2 and later) want ``module=httpx2``."""
        from engine.integrations.transport import transports  # see _caller

        sync, _ = transports(module)
        transport = sync(self.location, self.clock, _caller(principal, team, workspace, session, agent),
                         provider=provider, routing_mode=routing_mode, open_engine=type(self).open)
        return module.Client(transport=transport, **client_options)

    def httpx_async_client(self, *, principal: str, team: str = "", workspace: str = "default", session: str = "",
                           agent: str = "", provider: str | None = None, routing_mode: str = "off",
                           module: Any = httpx, **client_options: Any) -> Any:
        """The async counterpart, governed by this engine on its event loop."""
        from engine.integrations.transport import transports  # see _caller

        _, governed = transports(module)
        transport = governed(self, _caller(principal, team, workspace, session, agent), provider=provider,
                             routing_mode=routing_mode)
        return module.AsyncClient(transport=transport, **client_options)


def _caller(principal: str, team: str, workspace: str, session: str, agent: str) -> Any:
    # The governor and the transports are imported only when a governed client is made: with them
    # comes the request contract (pydantic), which the dashboard and the command line never need
    # (9 MB and 80 ms at their start). No cycle: neither imports this module (the acyclic contract).
    from engine.integrations.governor import Caller

    if not principal.strip():
        raise FieldError("principal", "is empty; a governed client acts for someone")
    return Caller(principal=principal, team=team, workspace=workspace, session=session, agent=agent)


def _document_delegations() -> None:
    """Each delegation reads as its service's method does (``help(Engine.record)``)."""
    for service in (UsageService, CallService, PolicyService, ApprovalService, TokenService, MemberService,
                    AuditService, AlertService, CredentialService, GatewayService, CatalogService, ChangeService):
        for name, method in vars(service).items():
            if not name.startswith("_") and callable(delegation := vars(Engine).get(name)) and method.__doc__:
                delegation.__doc__ = method.__doc__


_document_delegations()
