"""Alerts: each threshold once per window and again in the next, projected overruns, and
delivery to real webhooks on 127.0.0.1 with retries and a delivery log."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from engine.alerts import redact_url
from engine.budgets import build_policy
from engine.clock import DAY_MS, MINUTE_MS, FrozenClock
from engine.demo import populate
from engine.engine import CallRequest, Engine
from engine.models import UsageEvent
from tests.conftest import NOW_MS

DOLLAR = 1_000_000_000


def _spend(n: int, dollars: float, ts: int = NOW_MS) -> UsageEvent:
    return UsageEvent(ts_ms=ts, request_id=f"s{n}", provider="openai", model="gpt-4o", team="ml",
                      principal="alice", cost_nanos=int(dollars * DOLLAR), cost_source="provider")


async def test_each_threshold_fires_once_per_window_and_again_in_the_next(engine: Engine,
                                                                          clock: FrozenClock) -> None:
    await engine.add_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="10", soft="9"))
    await engine.record(_spend(1, 5.5))
    assert [(a.kind, a.threshold) for a in await engine.alerts()] == [("threshold", 50)]
    await engine.record(_spend(2, 0.5))
    await engine.record(_spend(3, 0.1))
    assert len(await engine.alerts()) == 1  # still in the same band: nothing new
    await engine.record(_spend(4, 3.5))  # $9.60: past 80% and the $9 soft limit
    kinds = sorted((a.kind, a.threshold) for a in await engine.alerts())
    assert kinds == [("soft", 0), ("threshold", 50), ("threshold", 80)]
    assert "passed its soft limit: $9.60 of $9.00" in next(a.message for a in await engine.alerts()
                                                             if a.kind == "soft")
    clock.advance(DAY_MS)
    await engine.record(_spend(5, 6, ts=clock.now_ms()))
    fresh = [a for a in await engine.alerts() if a.window_start_ms == NOW_MS - NOW_MS % DAY_MS + DAY_MS]
    assert [(a.kind, a.threshold) for a in fresh] == [("threshold", 50)]


@pytest.mark.sqlite_only  # counts the statements SQLite's writer runs
async def test_a_policy_past_its_thresholds_does_not_write_its_alerts_again_on_every_call(engine: Engine) -> None:
    await engine.add_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="10"))
    await engine.record(_spend(1, 8.5))  # past 50 % and 80 %: one alert, for 80 %
    writes: list[str] = []
    engine.store._writer.conn.set_trace_callback(  # every statement the ledger's writer runs
        lambda sql: writes.append(sql) if sql.startswith("INSERT INTO alerts") else None)
    for n in range(5):
        # A hold of up to $0.012, above the $0.01 each call settles at (else it is an overshoot, alerted)
        call = CallRequest(principal="alice", team="ml", model="gpt-4o-mini", input_tokens=100, max_tokens=20_000)
        auth = await engine.authorize(call)
        assert auth.hold_id
        await engine.settle(auth.hold_id, _spend(10 + n, 0.01))
    engine.store._writer.conn.set_trace_callback(None)
    assert [(a.kind, a.threshold) for a in await engine.alerts()] == [("threshold", 80)]
    assert len(writes) <= 1  # the one already stored is looked for once, not on each of ten batches


async def test_a_policy_first_seen_past_several_thresholds_fires_one_alert_for_the_highest(
        db_path, clock: FrozenClock) -> None:
    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.record(_spend(1, 10.5))  # spent before any budget: 105 % of the one added now
        policy = await engine.add_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="10"))
        await engine.record(_spend(2, 0.01))
        alerts = await engine.alerts()
        assert [(a.kind, a.threshold) for a in alerts] == [("threshold", 100)]
        assert "reached 100% of its hard limit: $10.51 of $10.00" in alerts[0].message
        # The limit raised: $10.52 is now 70 %, past 50 %, which counts as fired with the 100 %.
        await engine.update_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="15",
                                                policy_id=policy.id))
        await engine.record(_spend(3, 0.01))
        assert [a.threshold for a in await engine.alerts()] == [100]
    async with await Engine.open(db_path, clock=clock) as engine:  # a new process: the ledger remembers
        await engine.record(_spend(4, 0.01))
        assert [a.threshold for a in await engine.alerts()] == [100]
        await engine.record(_spend(5, 1.5))  # $12.03 of $15: past 80 %, below the 100 % that fired
        assert [a.threshold for a in await engine.alerts()] == [100]
        clock.advance(DAY_MS)  # the next window starts afresh
        await engine.record(_spend(6, 8, ts=clock.now_ms()))  # 53 % of $15
        assert [a.threshold for a in await engine.alerts() if a.window_start_ms > NOW_MS] == [50]


async def test_a_fresh_demo_ledger_raises_one_threshold_alert_per_policy(db_path) -> None:
    """The demo's budgets are added after its history, each first evaluated past its thresholds:
    ML monthly is past 100 % on 2026-11-29, and says so once (not at 50, 80 and 100 % at once)."""
    end = NOW_MS + 11 * DAY_MS
    async with await Engine.open(db_path, clock=FrozenClock(end), durable=False) as engine:
        await populate(engine, days=30, end_ms=end)
        alerts = await engine.alerts()
    thresholds = sorted((a.policy_id, a.threshold) for a in alerts if a.kind == "threshold")
    assert thresholds == [("demo-ml-month", 100), ("demo-opus", 50), ("demo-org-month", 80)]
    assert len(alerts) == 6  # and the three soft limits passed


async def test_an_alert_is_acknowledged_once(engine: Engine) -> None:
    await engine.add_policy(build_policy(scope="global", metric="usd", window="day", hard="1"))
    await engine.record(_spend(1, 0.6))
    assert [a.threshold for a in await engine.alerts()] == [50]
    await engine.record(_spend(2, 0.4))
    alerts = await engine.alerts()
    assert [a.threshold for a in sorted(alerts, key=lambda a: a.threshold)] == [50, 100]
    engine.actor = "operator"
    acked = await engine.ack_alert(alerts[0].id)
    assert acked.acked_by == "operator" and acked.acked_ms == NOW_MS
    assert len(await engine.alerts()) == 1 and len(await engine.alerts(include_acked=True)) == 2


async def test_a_projected_overrun_raises_one_forecast_alert(engine: Engine) -> None:
    await engine.add_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="100"))
    await engine.record_many([_spend(i, 1, ts=NOW_MS - 30 * MINUTE_MS + i) for i in range(10)])
    assert len(await engine.check_forecasts()) == 1
    assert await engine.check_forecasts() == []
    (alert,) = [a for a in await engine.alerts() if a.kind == "forecast"]
    assert "on course for $130.00 against a hard limit of $100.00" in alert.message


@dataclass
class FakeWebhook:
    """A real HTTP server on 127.0.0.1 that fails the first ``failures`` posts."""

    failures: int
    bodies: list[dict[str, object]] = field(default_factory=list)
    calls: int = 0
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        body = await reader.readexactly(length)
        self.calls += 1
        status = b"500 Oops" if self.calls <= self.failures else b"200 OK"
        if status.startswith(b"200"):
            self.bodies.append(json.loads(body))
        writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await writer.drain()
        writer.close()


@pytest.fixture
async def webhook() -> AsyncIterator[FakeWebhook]:
    hook = FakeWebhook(failures=1)
    server = await asyncio.start_server(hook.handle, "127.0.0.1", 0)
    hook.port = server.sockets[0].getsockname()[1]
    async with server:
        yield hook


async def test_alerts_are_delivered_with_retries_and_logged(engine: Engine, webhook: FakeWebhook) -> None:
    engine.webhook_retry_delays = (0.01, 0.01)
    await engine.add_webhook(f"http://127.0.0.1:{webhook.port}/hooks/T000/SECRET", "slack")
    await engine.add_policy(build_policy(scope="global", metric="usd", window="day", hard="10"))
    await engine.record(_spend(1, 6))
    (alert,) = await engine.alerts()
    for _ in range(100):
        await asyncio.sleep(0.02)
        if webhook.bodies:
            break
    await asyncio.sleep(0.05)
    assert webhook.calls == 2
    assert webhook.bodies == [{"text": f":rotating_light: Budgeteer: {alert.message}"}]
    deliveries = await engine.deliveries(alert.id)
    assert [(attempt, ok, detail) for _, attempt, ok, detail in deliveries] == [(1, False, "HTTP 500"),
                                                                                (2, True, "HTTP 200")]
    listed = await engine.webhooks()
    assert listed[0][1] == "http://127.0.0.1/…" and "SECRET" not in repr(listed)


def test_webhook_urls_are_redacted_to_their_host() -> None:
    assert redact_url("https://hooks.slack.com/services/T0/B0/XYZ") == "https://hooks.slack.com/…"


async def test_a_bad_webhook_is_refused_naming_the_field(engine: Engine) -> None:
    from engine.models import FieldError

    with pytest.raises(FieldError, match="url: must be an http"):
        await engine.add_webhook("ftp://example.org/x")
    with pytest.raises(FieldError, match="kind: must be one of generic, slack"):
        await engine.add_webhook("https://example.org/x", "pager")


async def test_holds_do_not_raise_alerts_only_spend_does(engine: Engine) -> None:
    await engine.add_policy(build_policy(scope="global", metric="usd", window="day", hard="0.01"))
    auth = await engine.authorize(CallRequest(principal="a", model="gpt-4o-mini", max_tokens=1000))
    assert auth.allowed and await engine.alerts() == []
