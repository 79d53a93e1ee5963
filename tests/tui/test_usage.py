"""The Usage screen by keys on a real ledger, at the default refresh and a frozen one: the
drill-down and its breadcrumb, the calendar period picker, and charts that run to now with a
legend beside them, distinct series and compact axis labels."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from textual.widgets import Input, Static

from engine.clock import DAY_MS, HOUR_MS, MINUTE_MS, FrozenClock
from engine.engine import Engine
from tests.conftest import NOW_MS, event
from tui.app import BudgeteerApp
from tui.screens.usage import UsageScreen
from tui.widgets.timeline import Timeline
from tui.widgets.vim_table import VimTable

REFRESH = pytest.mark.parametrize("refresh", [2.0, 3600.0])  # the default, and frozen


def _ms(*parts: int) -> int:
    return int(datetime(*parts, tzinfo=UTC).timestamp()) * 1000  # type: ignore[misc]


async def _settle(pilot: object, app: BudgeteerApp) -> None:
    await app.workers.wait_for_complete()
    await pilot.pause(0.05)  # type: ignore[attr-defined]


async def _usage(pilot: object, app: BudgeteerApp) -> UsageScreen:
    await pilot.press("2")  # type: ignore[attr-defined]
    await _settle(pilot, app)
    assert isinstance(app.screen, UsageScreen)
    return app.screen


def _table_names(screen: UsageScreen) -> list[str]:
    table = screen.query_one("#breakdown", VimTable)
    return [str(table.get_row_at(i)[0]) for i in range(table.row_count)]


def _series(screen: UsageScreen) -> list[str]:
    return [label for label, _, _ in screen.query_one("#usage-timeline", Timeline).legend_entries]


def _path(screen: UsageScreen) -> str:
    return str(screen.query_one("#usage-path", Static).render())


@REFRESH
async def test_enter_drills_down_chart_and_table_and_esc_climbs_back(db_path: Path, clock: FrozenClock,
                                                                     refresh: float) -> None:
    people = [("ml", "alice", "o3", 5), ("ml", "alice", "gpt-4o", 3), ("ml", "bob", "gpt-4o", 2),
              ("web", "carol", "o3", 1), ("web", "dan", "gpt-4.1", 1)]
    events, n = [], 0
    for team, principal, model, count in people:
        for _ in range(count):
            events.append(event(n, team=team, principal=principal, model=model))
            n += 1
    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.record_many(events)
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(160, 48)) as pilot:
        usage = await _usage(pilot, app)
        await pilot.press("b", "b")  # model -> provider -> team
        await _settle(pilot, app)
        assert usage.group == "team" and _table_names(usage) == ["ml", "web"]
        assert _path(usage).startswith("all   by team")
        await pilot.press("enter")  # the cursor is on ml, the largest
        await _settle(pilot, app)
        assert usage.group == "principal" and usage.filters == {"team": "ml"}
        assert _table_names(usage) == ["alice", "bob"]  # the table narrowed...
        assert _series(usage) == ["alice", "bob"]  # ...and the chart
        assert usage.last is not None and usage.last.total.requests == 10
        assert _path(usage).startswith("all › team=ml   by principal")
        await pilot.press("enter")
        await _settle(pilot, app)
        assert usage.group == "model" and _table_names(usage) == ["o3", "gpt-4o"] == _series(usage)
        assert _path(usage).startswith("all › team=ml › principal=alice   by model")
        # esc leaves the filter box first, and the drill-down stays where it is
        await pilot.press("slash", "o")
        await pilot.pause(0.05)
        assert _series(usage) == ["o3", "gpt-4o"]  # both match "o"
        await pilot.press("3")
        await pilot.pause(0.05)
        assert _series(usage) == ["o3"] and _table_names(usage) == ["o3"]  # "/" filters the chart too
        await pilot.press("escape")
        await _settle(pilot, app)
        assert not usage.query_one("#filter", Input).display and usage.filters == {"team": "ml", "principal": "alice"}
        assert _series(usage) == ["o3", "gpt-4o"]
        await pilot.press("escape")  # climbs one level
        await _settle(pilot, app)
        assert usage.group == "principal" and usage.filters == {"team": "ml"}
        assert _table_names(usage) == ["alice", "bob"]
        assert _path(usage).startswith("all › team=ml   by principal")
        await pilot.press("escape")
        await _settle(pilot, app)
        assert usage.group == "team" and usage.filters == {} and _table_names(usage) == ["ml", "web"]
        assert _series(usage) == ["ml", "web"]
    assert app.fatal_error is None


@REFRESH
async def test_enter_typed_before_the_new_rows_arrive_drills_into_them(db_path: Path, clock: FrozenClock,
                                                                       refresh: float) -> None:
    """`b b enter` typed at once: the enter waited for the team rows, never narrowing the team
    to a model name (`team=o3`) from the rows still on screen."""
    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.record_many([event(i, team=("ml", "web", "ml")[i % 3], model=("o3", "gpt-4o")[i % 2],
                                        principal=("alice", "bob")[i % 2]) for i in range(6)])
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(80, 24)) as pilot:
        usage = await _usage(pilot, app)
        # b, b and enter handled before the read they start can finish, as when typed quickly
        usage.action_cycle_group()
        usage.action_cycle_group()
        usage.action_drill()
        for _ in range(100):  # the cancelled reads end, the last one shows its rows
            await pilot.pause(0.05)
            if not usage.loading_data and _table_names(usage) != ["o3", "gpt-4o"]:
                break
        assert usage.filters == {"team": "ml"} and usage.group == "principal"
        assert _path(usage) == "all › team=ml   by principal"  # at 80 columns, the path alone
    assert app.fatal_error is None


@REFRESH
async def test_group_by_agent_and_session(db_path: Path, clock: FrozenClock, refresh: float) -> None:
    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.record_many([event(i, agent=("research", "planner", "research")[i % 3],
                                        session=f"s-{i % 2}") for i in range(6)])
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(160, 48)) as pilot:
        usage = await _usage(pilot, app)
        for _ in range(6):  # model, provider, team, principal, token_id, workspace, agent
            await pilot.press("b")
        await _settle(pilot, app)
        assert usage.group == "agent" and _table_names(usage) == ["research", "planner"]
        await pilot.press("enter")  # agent -> session
        await _settle(pilot, app)
        assert usage.group == "session" and usage.filters == {"agent": "research"}
        assert sorted(_table_names(usage)) == ["s-0", "s-1"] and usage.last is not None
        assert usage.last.total.requests == 4


def _press_period(usage: UsageScreen) -> tuple[int, int]:
    assert usage.last is not None
    return usage.last.span


@REFRESH
async def test_the_period_picker_sets_calendar_ranges(db_path: Path, clock: FrozenClock, refresh: float) -> None:
    """Frozen at Wednesday 2026-11-18 12:00 UTC: this week is from Monday the 16th to now, last
    month is October, a typed range includes its last day, a bad range is an error in the modal."""
    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.record_many([event(i) for i in range(3)] +  # today
                                 [event(10 + i, ts_ms=_ms(2026, 11, 10, 9) + i) for i in range(2)])
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(160, 48)) as pilot:
        usage = await _usage(pilot, app)
        await pilot.press("T")
        await pilot.pause(0.1)
        assert type(app.screen).__name__ == "PeriodModal"
        await pilot.press("down", "enter")  # this week
        await _settle(pilot, app)
        assert usage.period == "this week" and _press_period(usage) == (_ms(2026, 11, 16), NOW_MS + 1)
        await pilot.press("T")
        await pilot.pause(0.1)
        await pilot.press("down", "down", "down", "enter")  # last month
        await _settle(pilot, app)
        assert usage.period == "last month" and _press_period(usage) == (_ms(2026, 10, 1), _ms(2026, 11, 1))
        assert usage.last is not None and usage.last.bucket_ms == DAY_MS
        timeline = usage.query_one("#usage-timeline", Timeline)
        assert (timeline.buckets[0], timeline.buckets[-1]) == (_ms(2026, 10, 1), _ms(2026, 10, 31))
        # a bad range stays in the modal with an error naming what is wrong
        await pilot.press("T")
        await pilot.pause(0.1)
        await pilot.press("tab", *"2026-11-15..2026-11-01", "enter")
        await pilot.pause(0.1)
        assert type(app.screen).__name__ == "PeriodModal"
        error = str(app.screen.query_one("#period-error", Static).render())
        assert "2026-11-15 is after 2026-11-01" in error
        await pilot.press(*["backspace"] * 22, *"2026-11-01..2026-11-15", "enter")
        await _settle(pilot, app)
        assert usage.period == "2026-11-01..2026-11-15"
        assert _press_period(usage) == (_ms(2026, 11, 1), _ms(2026, 11, 16))
        assert usage.last is not None and usage.last.total.requests == 2  # the 10th's; today's are outside
        await pilot.press("t")  # t goes back to the rolling periods
        await _settle(pilot, app)
        assert usage.period == "1h"
    assert app.fatal_error is None


@REFRESH
async def test_the_x_axis_runs_to_now(db_path: Path, clock: FrozenClock, refresh: float) -> None:
    """Events only in the first minutes of the hour: the 1h view still ends at now (12:00), not
    at the last event, with the empty buckets as zero."""
    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.record_many([event(i, ts_ms=NOW_MS - HOUR_MS + i * MINUTE_MS) for i in range(5)])
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(160, 48)) as pilot:
        usage = await _usage(pilot, app)
        await pilot.press("t", "t", "t", "t")  # 24h -> 7d -> 30d -> 90d -> 1h
        await _settle(pilot, app)
        assert usage.period == "1h"
        timeline = usage.query_one("#usage-timeline", Timeline)
        assert timeline.buckets[0] == NOW_MS - HOUR_MS and timeline.buckets[-1] == NOW_MS
        assert timeline.x_labels[-1] == "12:00" and timeline.unit == "$ per min"
        (_, points), = timeline._series
        assert len(points) == 5  # the rest of the hour is drawn as zero
        await pilot.press("t")  # 24h, in 15-minute buckets
        await _settle(pilot, app)
        assert timeline.buckets[-1] == NOW_MS and timeline.x_labels[-1] == "12:00"
        assert timeline.unit == "$ per 15 min"
        await pilot.press("t")  # 7d: one label a day, never the same day twice
        await _settle(pilot, app)
        assert timeline.unit == "$ per hour" and len(set(timeline.x_labels)) == len(timeline.x_labels)
        assert timeline.x_labels[-1] == "11-18" and timeline.buckets[-1] == NOW_MS


@pytest.mark.parametrize("theme", ["textual-dark", "ansi-dark"])
@REFRESH
async def test_the_legend_lists_every_series_each_distinct(db_path: Path, clock: FrozenClock, refresh: float,
                                                           theme: str) -> None:
    models = [f"model-{chr(97 + i)}" for i in range(12)]
    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.record_many([event(i, model=models[i % 12], cost_nanos=(12 - i % 12) * 1_000_000)
                                  for i in range(48)])
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh, theme=theme)
    async with app.run_test(size=(160, 48)) as pilot:
        usage = await _usage(pilot, app)
        timeline = usage.query_one("#usage-timeline", Timeline)
        drawn = [label for label, _ in timeline._series]
        assert drawn == models[:10]  # the ten largest
        legend = str(usage.query_one("#usage-legend", Static).render())
        for label in drawn:
            assert label in legend
        styles = [(str(color), marker) for _, color, marker in timeline.legend_entries]
        assert len(styles) == 10 and len(set(styles)) == 10  # no two share colour and marker
        assert len({color for color, _ in styles}) >= (6 if theme.startswith("ansi") else 10)
        # the legend is beside the plot, not on it
        plot, box = timeline.region, usage.query_one("#usage-legend", Static).region
        assert box.x >= plot.right


@REFRESH
async def test_axis_counts_read_compactly_and_eighty_columns_keep_a_readable_plot(
        db_path: Path, clock: FrozenClock, refresh: float) -> None:
    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.record(event(1, input_tokens=779_431, output_tokens=200))
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(80, 24)) as pilot:
        usage = await _usage(pilot, app)
        await pilot.press("m")  # tokens
        await _settle(pilot, app)
        timeline = usage.query_one("#usage-timeline", Timeline)
        assert timeline.unit == "tokens per 15 min"
        assert all(re.fullmatch(r"\d+(\.\d)?[kMB]?", label) for label in timeline.y_labels), timeline.y_labels
        assert "500k" in timeline.y_labels, timeline.y_labels  # never 779631.0
        assert timeline.size.height >= 14  # a plot of 10 rows, with its axis and unit under it
        await pilot.press("m")  # requests
        await _settle(pilot, app)
        assert timeline.unit == "requests per 15 min" and "1" in timeline.y_labels
        await pilot.press("m")  # money
        await _settle(pilot, app)
        assert all(label.startswith("$") for label in timeline.y_labels)


def test_money_and_counts_on_an_axis() -> None:
    from tui.widgets.timeline import short_count

    assert [short_count(v) for v in (0, 950, 1500, 779_631, 2_400_000)] == ["0", "950", "1.5k", "780k", "2.4M"]
    assert DAY_MS // HOUR_MS == 24
