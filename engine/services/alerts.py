"""Alerts and webhooks: listing and acknowledging alerts, projected overruns, the webhooks that
receive them and their deliveries.

A service of ``Engine`` (``engine.services.core``): the engine's methods of the same names
delegate here."""

from __future__ import annotations

import secrets
from functools import partial
from urllib.parse import urlsplit

import httpx

from engine.alerts import WEBHOOK_KINDS, Alert, deliver, forecast_message, redact_url
from engine.budgets import window_bounds
from engine.ledger import LedgerTx
from engine.ledger.results import Delivery
from engine.models import FieldError
from engine.services.core import Changed, Core, Journal, Service
from engine.services.policies import PolicyService


class AlertService(Service):
    def __init__(self, core: Core, policies: PolicyService) -> None:
        super().__init__(core)
        self.policies = policies

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
        forecasts = [f for f in await self.policies.forecasts() if f.overrun]
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
            self.core.spawn_delivery(ids)
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

    async def deliveries(self, alert_id: int) -> list[Delivery]:
        return await self._tx(lambda tx: tx.deliveries(alert_id))

    async def _deliver(self, alert_ids: list[int]) -> None:
        hooks: list[tuple[str, str, str]] = await self.store.transact(lambda tx: tx.webhooks())
        if not hooks:
            return
        alerts = {a.id: a for a in await self.alerts(include_acked=True, limit=10_000) if a.id in alert_ids}
        async with httpx.AsyncClient(timeout=10.0) as client:
            for alert in alerts.values():
                for webhook_id, url, kind in hooks:
                    attempts = await deliver(client, url, kind, alert, self.core.webhook_retry_delays)
                    rows = [(alert.id, webhook_id, n, self.now_ms(), int(ok), detail) for n, ok, detail in attempts]
                    await self.store.transact(partial(LedgerTx.log_deliveries, rows=rows))
