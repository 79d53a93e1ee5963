"""Forecasts on a steady burn, and backtests on a small hand-checked ledger."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from engine.budgets import backtest, build_policy, forecast
from engine.clock import DAY_MS, HOUR_MS, MINUTE_MS
from engine.engine import Engine
from engine.models import UsageEvent
from tests.conftest import NOW_MS

DOLLAR = 1_000_000_000


def test_a_steady_burn_projects_to_the_end_of_the_window_and_names_the_hour_of_the_limit() -> None:
    policy = build_policy(scope="global", metric="usd", window="day", hard="100")
    now = NOW_MS  # 12:00 UTC: half the day is left
    f = forecast(policy, consumed=48 * DOLLAR, recent=4 * DOLLAR, recent_ms=HOUR_MS, now_ms=now)
    assert f.burn_per_hour == 4 * DOLLAR
    assert f.projected == 48 * DOLLAR + 12 * 4 * DOLLAR  # $96 by midnight: under the limit
    assert f.limit_at_ms is None and not f.overrun
    f = forecast(policy, consumed=60 * DOLLAR, recent=5 * DOLLAR, recent_ms=HOUR_MS, now_ms=now)
    assert f.projected == 120 * DOLLAR and f.overrun
    assert f.limit_at_ms == now + 8 * HOUR_MS  # $40 of headroom at $5 an hour
    assert forecast(policy, 100 * DOLLAR, 0, HOUR_MS, now).limit_at_ms == now  # already there
    idle = forecast(policy, 10 * DOLLAR, 0, HOUR_MS, now)
    assert (idle.projected, idle.limit_at_ms, idle.burn_per_hour) == (10 * DOLLAR, None, 0)


def test_a_rolling_window_projects_its_steady_state() -> None:
    policy = build_policy(scope="global", metric="tokens", window="rolling:6h", hard="1000")
    f = forecast(policy, consumed=300, recent=100, recent_ms=HOUR_MS, now_ms=NOW_MS)
    assert f.projected == 600 and not f.overrun and f.window_end_ms is None


def _ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=ZoneInfo("UTC")).timestamp() * 1000)


def test_backtest_on_a_small_hand_checked_ledger() -> None:
    # A $10 daily budget. Day 1: $4, $5, $3 (blocked: 12 > 10), $1 (10, allowed: a limit may be met).
    # Day 2: $11 (blocked, more than the whole budget), $2. A blocked-status row is ignored.
    rows = [
        (_ms("2026-11-01T09:00"), 4 * DOLLAR, 10, "ok"),
        (_ms("2026-11-01T10:00"), 5 * DOLLAR, 10, "ok"),
        (_ms("2026-11-01T11:00"), 3 * DOLLAR, 10, "ok"),
        (_ms("2026-11-01T12:00"), 1 * DOLLAR, 10, "error"),
        (_ms("2026-11-01T13:00"), 0, 0, "blocked"),
        (_ms("2026-11-02T08:00"), 11 * DOLLAR, 10, "ok"),
        (_ms("2026-11-02T09:00"), 2 * DOLLAR, 10, "ok"),
    ]
    policy = build_policy(scope="global", metric="usd", window="day", hard="10", soft="8")
    result = backtest(policy, rows, _ms("2026-11-01T00:00"), _ms("2026-11-03T00:00"))
    assert result.calls == 6
    assert result.blocked == 2
    assert result.first_block_ms == _ms("2026-11-01T11:00")
    assert result.prevented == 14 * DOLLAR
    assert result.allowed_total == 12 * DOLLAR
    assert result.windows_hit == 2
    assert result.soft_crossings == 1  # day 1 passed $8 at $9; day 2 never did
    by_requests = backtest(build_policy(scope="global", metric="requests", window="rolling:90m", hard="1"),
                           rows, 0, _ms("2026-11-03T00:00"))
    # one request per 90 minutes: 09:00 yes, 10:00 no, 11:00 yes (09:00 has left), 12:00 no;
    # day 2: 08:00 yes, 09:00 no (08:00 is an hour before)
    assert (by_requests.blocked, by_requests.allowed_total) == (3, 3)


async def test_engine_backtest_reads_only_the_scope_and_period_asked(engine: Engine) -> None:
    events = [UsageEvent(ts_ms=NOW_MS - DAY_MS + i * 10 * MINUTE_MS, request_id=f"r{i}", provider="openai",
                         model="gpt-4o", team=("ml", "search")[i % 2], principal="p", cost_nanos=DOLLAR,
                         cost_source="provider") for i in range(100)]
    await engine.record_many(events)
    draft = build_policy(scope="team:ml", metric="usd", window="day", hard="20")
    result = await engine.backtest(draft, NOW_MS - DAY_MS, NOW_MS + DAY_MS)
    assert result.calls == 50
    # windows are UTC days: events span yesterday 12:00 to today 04:30
    in_yesterday = sum(1 for e in events[::2] if e.ts_ms < NOW_MS - NOW_MS % DAY_MS)
    in_today = 50 - in_yesterday
    assert result.blocked == max(0, in_yesterday - 20) + max(0, in_today - 20)
    assert result.prevented == result.blocked * DOLLAR
    assert (await engine.event_count()) == 100  # a backtest writes nothing


async def test_engine_forecast_uses_the_last_hour_of_the_ledger(engine: Engine) -> None:
    policy = await engine.add_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="100"))
    await engine.record_many([UsageEvent(ts_ms=NOW_MS - 30 * MINUTE_MS + i, request_id=f"f{i}", provider="openai",
                                         model="gpt-4o", team="ml", cost_nanos=DOLLAR, cost_source="provider")
                              for i in range(10)])
    (f,) = await engine.forecasts()
    assert f.policy.id == policy.id
    assert (f.consumed, f.burn_per_hour) == (10 * DOLLAR, 10 * DOLLAR)
    assert f.projected == 10 * DOLLAR + 12 * 10 * DOLLAR and f.overrun
    assert f.limit_at_ms == NOW_MS + 9 * HOUR_MS


async def test_the_month_end_spend_is_forecast_as_a_monthly_budget_on_everything(engine: Engine) -> None:
    # $5 earlier this month (and $9 last month, not counted), $2 in the last hour: NOW_MS is
    # 2026-11-18 12:00 UTC, 300 hours before December, so the month ends at $7 + 300 x $2.
    await engine.record_many([UsageEvent(ts_ms=ts, request_id=f"s{i}", provider="openai", model="gpt-4o",
                                         cost_nanos=cost * DOLLAR, cost_source="provider")
                              for i, (ts, cost) in enumerate([(_ms("2026-10-30T10:00"), 9),
                                                              (_ms("2026-11-02T10:00"), 5),
                                                              (NOW_MS - 20 * MINUTE_MS, 2)])])
    spend = await engine.spend_forecast()
    assert (spend.consumed, spend.burn_per_hour, spend.projected) == (7 * DOLLAR, 2 * DOLLAR, 607 * DOLLAR)
    assert spend.window_end_ms == _ms("2026-12-01T00:00") and spend.limit_at_ms is None and not spend.overrun
    # The same figures as a budget on everything gets from the engine's own forecast.
    await engine.add_policy(build_policy(scope="global", metric="usd", window="month", hard="1000000"))
    (budget,) = await engine.forecasts()
    assert (budget.consumed, budget.burn_per_hour, budget.projected) == (7 * DOLLAR, 2 * DOLLAR, 607 * DOLLAR)


async def test_a_policy_timeline_restarts_with_each_calendar_window(engine: Engine) -> None:
    """Drawn against its limits, a daily policy climbs through the day and starts again at
    midnight; its last point is what the evaluator holds it at now."""
    events = [UsageEvent(ts_ms=NOW_MS - DAY_MS + i * 10 * MINUTE_MS, request_id=f"r{i}", provider="openai",
                         model="gpt-4o", team=("ml", "search")[i % 2], principal="p", cost_nanos=DOLLAR,
                         cost_source="provider") for i in range(100)]
    await engine.record_many(events)
    midnight = NOW_MS - NOW_MS % DAY_MS
    for metric, hard, unit in (("usd", "100", DOLLAR), ("requests", "100", 1)):  # rollups, then raw events
        policy = build_policy(scope="team:ml", metric=metric, window="day", hard=hard)
        points = await engine.policy_timeline(policy, NOW_MS - DAY_MS, NOW_MS + 1, HOUR_MS)
        values = dict(points)
        before = [v for b, v in points if b < midnight]
        assert before == sorted(before) and before[-1] == unit * sum(
            1 for e in events[::2] if e.ts_ms < midnight)
        assert values[midnight] == unit * sum(1 for e in events[::2] if midnight <= e.ts_ms < midnight + HOUR_MS)
        await engine.add_policy(policy)
        status = {o.policy.id: o for o in await engine.policy_status()}
        assert points[-1][1] == status[policy.id].consumed


def test_a_rolling_policy_timeline_sums_its_trailing_span() -> None:
    from engine.budgets import consumption_series

    policy = build_policy(scope="global", metric="usd", window="rolling:3h", hard="10")
    amounts = {h * HOUR_MS: DOLLAR for h in range(10)}  # a dollar an hour from hour 0
    series = dict(consumption_series(policy, amounts, 0, 10 * HOUR_MS, HOUR_MS))
    assert [series[h * HOUR_MS] // DOLLAR for h in range(10)] == [1, 2, 3, 3, 3, 3, 3, 3, 3, 3]
