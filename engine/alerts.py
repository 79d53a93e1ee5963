"""Alerts: threshold crossings and projected overruns, stored once per window, and calls
settled above their hold (an overshoot, once each), delivered to webhooks (generic JSON or
Slack-compatible) with retries and a delivery log.

Crossings are found inside the ledger's write transaction (``crossed`` is pure); the
alert row's uniqueness (policy, window, kind, threshold) makes each one fire once per
window and again in the next. Delivery happens after the commit, off the hot path.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import httpx

from engine.forecasts import Forecast
from engine.models import UsageEvent
from engine.rules import Policy

RETRY_DELAYS_S: Final = (0.5, 2.0, 8.0)
WEBHOOK_KINDS: Final = ("generic", "slack")


@dataclass(frozen=True, slots=True)
class Alert:
    id: int
    policy_id: str
    window_start_ms: int
    kind: str  # threshold, soft, forecast or overshoot (threshold: the overshoot's id)
    threshold: int
    ts_ms: int
    value: int
    message: str
    acked_by: str | None
    acked_ms: int | None

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "policy_id": self.policy_id, "window_start_ms": self.window_start_ms,
                "kind": self.kind, "threshold": self.threshold, "ts_ms": self.ts_ms, "value": self.value,
                "message": self.message, "acked_by": self.acked_by, "acked_ms": self.acked_ms}


def crossed(policy: Policy, consumed: int) -> list[tuple[str, int]]:
    """(kind, threshold) of the highest threshold ``consumed`` has reached and of the soft
    limit once passed. A policy first seen past several thresholds (50, 80 and 100 %) fires
    one alert, for the highest; the lower ones are then taken as fired in that window."""
    reached = [pct for pct in policy.thresholds if consumed * 100 >= policy.hard * pct]
    out = [("threshold", max(reached))] if reached else []
    if policy.soft is not None and consumed > policy.soft:
        out.append(("soft", 0))
    return out


def crossing_message(policy: Policy, kind: str, threshold: int, consumed: int) -> str:
    fmt = policy.format_amount
    if kind == "soft":
        return f"{policy.name} passed its soft limit: {fmt(consumed)} of {fmt(policy.soft or 0)}"
    return (f"{policy.name} reached {threshold}% of its hard limit: {fmt(consumed)} of {fmt(policy.hard)} "
            f"this {policy.window}")


def overshoot_message(policy: Policy, event: UsageEvent, held: int, settled: int) -> str:
    fmt = policy.format_amount
    return (f"{policy.name} ({policy.id}): call {event.request_id} ({event.model} via {event.provider or '?'}, "
            f"{event.principal or '?'}) settled at {fmt(settled)} against a hold of {fmt(held)}: the provider "
            f"counted more than the bound held, and the hard limit can be passed by {fmt(settled - held)}")


def forecast_message(f: Forecast) -> str:
    fmt = f.policy.format_amount
    return (f"{f.policy.name} is on course for {fmt(f.projected)} against a hard limit of {fmt(f.policy.hard)} "
            f"(burning {fmt(f.burn_per_hour)} an hour)")


def redact_url(url: str) -> str:
    """A webhook URL is a secret (Slack's carry their key in the path): show only the host."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}/…" if parts.scheme else "…"


def payload(alert: Alert, kind: str) -> dict[str, Any]:
    if kind == "slack":
        return {"text": f":rotating_light: Budgeteer: {alert.message}"}
    return {"source": "budgeteer", "alert": alert.as_dict()}


async def deliver(client: httpx.AsyncClient, url: str, kind: str, alert: Alert,
                  delays: Sequence[float] = RETRY_DELAYS_S) -> list[tuple[int, bool, str]]:
    """POST one alert, retrying on failure; (attempt, ok, detail) per attempt. Details never hold the URL."""
    return await post_json(client, url, payload(alert, kind), delays)


async def post_json(client: httpx.AsyncClient, url: str, body: Any,
                    delays: Sequence[float] = RETRY_DELAYS_S) -> list[tuple[int, bool, str]]:
    """POST a JSON body to a webhook as ``deliver`` does."""
    attempts: list[tuple[int, bool, str]] = []
    for attempt in range(1, len(delays) + 2):
        try:
            response = await client.post(url, content=json.dumps(body),
                                         headers={"content-type": "application/json"})
            ok = 200 <= response.status_code < 300
            attempts.append((attempt, ok, f"HTTP {response.status_code}"))
            if ok or (400 <= response.status_code < 500 and response.status_code != 429):
                return attempts  # success, or a refusal that retrying will not change
        except httpx.HTTPError as exc:
            attempts.append((attempt, False, type(exc).__name__))
        if attempt <= len(delays):
            await asyncio.sleep(delays[attempt - 1])
    return attempts
