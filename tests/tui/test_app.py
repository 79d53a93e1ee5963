"""The dashboard, driven by Pilot on a real ledger: every screen by its number key, the
bindings, help, filter, pause, the policy form, acknowledging an alert, and a write from
another process appearing after a refresh."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from textual.command import CommandPalette
from textual.widgets import Input, Static

from engine.budgets import build_policy
from engine.clock import FrozenClock
from engine.engine import Engine
from tests.conftest import NOW_MS, event
from tui.app import BudgeteerApp
from tui.screens.alerts import AlertsScreen
from tui.screens.budgets import BudgetsScreen
from tui.screens.help import HelpModal
from tui.screens.overview import OverviewScreen
from tui.screens.policy_form import PolicyForm
from tui.screens.usage import UsageScreen
from tui.widgets.kpi import KpiTile
from tui.widgets.vim_table import VimTable


def _kpi(app: BudgeteerApp, tile: str) -> str:
    return str(app.screen.query_one(f"#kpi-{tile}", KpiTile).query_one(".kpi-value", Static).content)


async def _settle(pilot: object, app: BudgeteerApp) -> None:
    await app.workers.wait_for_complete()
    await pilot.pause(0.05)  # type: ignore[attr-defined]


async def test_every_screen_is_one_key_away(db_path: Path, clock: FrozenClock, refresh: float) -> None:
    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.record_many([event(i, model=("gpt-4o", "o3")[i % 2], cost_nanos=1_250_000_000) for i in range(8)])
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(120, 36)) as pilot:
        await _settle(pilot, app)
        assert isinstance(app.screen, OverviewScreen)
        assert _kpi(app, "today") == "$10.00" and _kpi(app, "requests") == "8"
        for key, kind in (("2", UsageScreen), ("3", BudgetsScreen), ("4", AlertsScreen), ("1", OverviewScreen)):
            await pilot.press(key)
            await _settle(pilot, app)
            assert isinstance(app.screen, kind)
        await pilot.press("2")
        await _settle(pilot, app)
        assert app.screen.query_one("#breakdown", VimTable).row_count == 2  # two models
        await pilot.press("b")  # group by provider
        await _settle(pilot, app)
        assert app.screen.query_one("#breakdown", VimTable).row_count == 1
        await pilot.press("q")
    assert app.fatal_error is None


async def test_help_lists_every_binding_with_its_id(db_path: Path, clock: FrozenClock, refresh: float) -> None:
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(120, 36)) as pilot:
        await _settle(pilot, app)
        await pilot.press("3")
        await _settle(pilot, app)
        await pilot.press("question_mark")
        await pilot.pause(0.1)
        assert isinstance(app.screen, HelpModal)
        ids = {row[2] for row in app.screen.rows}
        assert {"app.overview", "app.pause", "app.quit", "budgets.add", "budgets.backtest", "screen.filter",
                "table.down"} <= ids
        await pilot.press("escape")
        assert isinstance(app.screen, BudgetsScreen)


async def test_an_empty_ledger_says_how_to_get_data_in(db_path: Path, clock: FrozenClock) -> None:
    app = BudgeteerApp(db_path=db_path, clock=clock)
    async with app.run_test(size=(100, 30)) as pilot:
        await _settle(pilot, app)
        empty = app.screen.query_one("#empty", Static)
        assert empty.display
        assert "budgeteer import FILE" in str(empty.content) and "budgeteer demo --open" in str(empty.content)


async def test_filter_and_vim_keys_in_a_table(db_path: Path, clock: FrozenClock, refresh: float) -> None:
    async with await Engine.open(db_path, clock=clock) as engine:
        for name in ("alpha team", "beta team", "gamma"):
            await engine.add_policy(build_policy(scope="global", metric="usd", window="day", hard="5", name=name))
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(140, 36)) as pilot:
        await pilot.press("3")
        await _settle(pilot, app)
        table = app.screen.query_one("#policies", VimTable)
        table.focus()
        assert table.row_count == 3
        await pilot.press("G")
        assert table.cursor_row == 2
        await pilot.press("g", "j")
        assert table.cursor_row == 1
        await pilot.press("slash")
        await pilot.press(*"team")
        assert table.row_count == 2
        await pilot.press("escape")
        assert table.row_count == 3 and not app.screen.query_one("#filter", Input).display


async def test_the_policy_form_shows_errors_inline_and_saves_a_valid_policy(db_path: Path,
                                                                          clock: FrozenClock, refresh: float) -> None:
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("3")
        await _settle(pilot, app)
        await pilot.press("a")
        await pilot.pause(0.1)
        form = app.screen
        assert isinstance(form, PolicyForm)
        form.query_one("#f-scope", Input).value = "team:ml"
        form.query_one("#f-hard", Input).value = "-5"
        await pilot.press("ctrl+s")
        await pilot.pause(0.1)
        assert isinstance(app.screen, PolicyForm)
        assert "hard: must not be negative" in str(form.query_one("#e-hard", Static).content)
        form.query_one("#f-hard", Input).value = "250"
        form.query_one("#f-soft", Input).value = "300"
        await pilot.press("ctrl+s")
        await pilot.pause(0.1)
        assert "soft: must not be above the hard limit" in str(form.query_one("#e-soft", Static).content)
        form.query_one("#f-soft", Input).value = "200"
        await pilot.press("ctrl+s")
        await _settle(pilot, app)
        assert isinstance(app.screen, BudgetsScreen)
        assert app.screen.query_one("#policies", VimTable).row_count == 1
    async with await Engine.open(db_path, clock=clock) as engine:
        (policy,) = await engine.policies()
        assert (str(policy.scope), policy.hard, policy.soft) == ("team:ml", 250_000_000_000, 200_000_000_000)


async def test_acknowledging_an_alert_by_keys(db_path: Path, clock: FrozenClock, refresh: float) -> None:
    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.add_policy(build_policy(scope="global", metric="usd", window="day", hard="1"))
        await engine.record(event(1, cost_nanos=600_000_000))
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("4")
        await _settle(pilot, app)
        table = app.screen.query_one("#alerts-table", VimTable)
        table.focus()
        assert table.row_count == 1
        await pilot.press("enter")  # the detail first, from the focused table
        assert "reached 50%" in str(app.screen.query_one(".message-body", Static).content)
        await pilot.press("escape")
        await pilot.press("a")
        await _settle(pilot, app)
        assert table.row_count == 1 and "No alerts" in str(table.get_row_at(0)[5])  # after amount and limit
    async with await Engine.open(db_path, clock=clock) as engine:
        assert (await engine.alerts()) == [] and len(await engine.alerts(include_acked=True)) == 1


async def test_a_write_from_another_process_appears_after_a_refresh(db_path: Path, clock: FrozenClock) -> None:
    async with await Engine.open(db_path, clock=clock):
        pass
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=0.2)
    async with app.run_test(size=(120, 36)) as pilot:
        await _settle(pilot, app)
        assert _kpi(app, "requests") == "0"
        script = (
            "import asyncio\n"
            "from engine.engine import Engine\n"
            "from engine.models import UsageEvent\n"
            "async def main():\n"
            f"    async with await Engine.open({str(db_path)!r}) as e:\n"
            f"        await e.record(UsageEvent(ts_ms={NOW_MS - 1000}, request_id='other-process', "
            "provider='openai', model='gpt-4o', input_tokens=100, output_tokens=10))\n"
            "asyncio.run(main())\n"
        )
        subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
        for _ in range(30):
            await pilot.pause(0.2)
            if _kpi(app, "requests") == "1":
                break
        assert _kpi(app, "requests") == "1"


async def test_pause_stops_the_live_refresh_until_resumed(db_path: Path, clock: FrozenClock) -> None:
    async with await Engine.open(db_path, clock=clock):
        pass
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=0.2)
    async with app.run_test(size=(120, 36)) as pilot:
        await _settle(pilot, app)
        await pilot.press("p")
        assert app.paused
        async with await Engine.open(db_path, clock=clock) as engine:
            await engine.record(event(1))
        await pilot.pause(0.8)
        assert _kpi(app, "requests") == "0"
        assert "paused" in str(app.screen.query_one("#status", Static).content)
        await pilot.press("p")
        await pilot.pause(0.8)
        assert _kpi(app, "requests") == "1"


async def test_a_ledger_that_cannot_be_opened_ends_with_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-ledger.db"
    bad.write_text("hello" * 1000)
    app = BudgeteerApp(db_path=bad)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause(0.2)
    assert app.fatal_error is not None and "not a Budgeteer ledger" in app.fatal_error


async def test_each_screen_binding_does_what_it_says(db_path: Path, clock: FrozenClock, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, refresh: float) -> None:
    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.record_many([event(i, model=("gpt-4o", "o3")[i % 2], team=("ml", "ops")[i % 2])
                                  for i in range(6)])
        await engine.add_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="1", name="ML"))
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(140, 40)) as pilot:
        # usage: period, group, metric, budget lines, export
        await pilot.press("2")
        await _settle(pilot, app)
        usage = app.screen
        assert isinstance(usage, UsageScreen)
        await pilot.press("t")
        assert usage.period == "7d"
        await pilot.press("b", "m", "l")
        await _settle(pilot, app)
        assert (usage.group, usage.metric, usage.policy_index) == ("provider", "tokens", 0)
        # with budget lines on, the plot is the policy's own window (team:ml's three calls) against its limits
        assert usage.last is not None and usage.last.policy is not None
        assert usage.last.consumption[-1][1] == 3 * 270_000
        from tui.widgets.timeline import Timeline

        plot = usage.query_one("#usage-timeline", Timeline)
        assert [label for label, _ in plot._series] == ["ML, day window"]
        assert plot._lines == [("hard", 1_000_000_000)]
        legend = str(usage.query_one("#usage-legend", Static).render())
        assert "ML, day window" in legend and "hard $1.00" in legend  # the legend names the lines
        monkeypatch.chdir(tmp_path)
        await pilot.press("x")
        await pilot.pause(0.1)
        exported = (tmp_path / "budgeteer-usage-7d-by-provider.csv").read_text().splitlines()
        assert exported[0] == "provider,cost_nanos,tokens,requests,errors" and exported[1].startswith('"openai",')
        # budgets: backtest, edit (form opens with the policy), delete with confirmation
        await pilot.press("3")
        await _settle(pilot, app)
        app.screen.query_one("#policies", VimTable).focus()
        await pilot.press("b")
        await pilot.pause(0.2)
        assert "Backtest of ML" in str(app.screen.query_one(".modal-title", Static).content)
        await pilot.press("escape", "e")
        await pilot.pause(0.1)
        assert isinstance(app.screen, PolicyForm) and app.screen.query_one("#f-name", Input).value == "ML"
        await pilot.press("ctrl+b")
        await pilot.pause(0.2)
        assert "calls in scope" in str(app.screen.query_one("#backtest-result", Static).content)
        await pilot.press("escape", "d")
        await pilot.pause(0.1)
        await pilot.press("y")
        await _settle(pilot, app)
        async with await Engine.open(db_path, clock=clock) as engine:
            assert await engine.policies() == []
        # alerts: history toggle and detail
        await pilot.press("4")
        await _settle(pilot, app)
        alerts = app.screen
        assert isinstance(alerts, AlertsScreen)
        await pilot.press("h")
        await _settle(pilot, app)
        assert alerts.include_acked
        # r refreshes, : opens the command palette, esc closes it
        await pilot.press("r")
        await pilot.press("colon")
        await pilot.pause(0.2)
        assert isinstance(app.screen, CommandPalette)
        await pilot.press("escape")


async def test_a_user_keymap_rebinds_by_id(db_path: Path, clock: FrozenClock, tmp_path: Path, refresh: float) -> None:
    keymap = tmp_path / "keymap.json"
    keymap.write_text('{"app.usage": "u"}')
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(120, 36)) as pilot:
        await _settle(pilot, app)
        app.load_keymap(keymap)
        await pilot.press("u")
        await _settle(pilot, app)
        assert isinstance(app.screen, UsageScreen)


async def test_read_only_mode_refuses_changes(db_path: Path, clock: FrozenClock, refresh: float) -> None:
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh, read_only=True)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("3")
        await _settle(pilot, app)
        await pilot.press("a")
        await pilot.pause(0.1)
        assert isinstance(app.screen, BudgetsScreen)  # no form opened


async def _over_budget_ledger(db_path: Path, clock: FrozenClock) -> None:
    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.record_many([event(i, cost_nanos=2_000_000_000) for i in range(3)])
        await engine.add_policy(build_policy(scope="global", metric="usd", window="day", hard="5", soft="4",
                                             name="Daily cap", now_ms=NOW_MS))


@pytest.mark.parametrize("theme", ["textual-dark", "ansi-dark", "ansi-light"])
async def test_gauges_and_plot_follow_the_theme(db_path: Path, clock: FrozenClock, theme: str, refresh: float) -> None:
    """Over budget is drawn in the theme's error colour, never its success colour; under an
    ANSI theme gauges use ANSI colours and the plot leaves its canvas to the terminal."""
    from rich.text import Text
    from textual.color import Color

    from tui.widgets.timeline import Timeline

    await _over_budget_ledger(db_path, clock)
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh, theme=theme)
    async with app.run_test(size=(160, 48)) as pilot:
        await _settle(pilot, app)
        error = Color.parse(app.theme_variables["error"]).rich_color.name
        success = Color.parse(app.theme_variables["success"]).rich_color.name
        gauge = app.screen.query_one("#budgets", VimTable).get_row_at(0)[1]
        assert isinstance(gauge, Text) and "OVER" in gauge.plain
        styles = {str(span.style) for span in gauge.spans}
        assert any(error in s for s in styles) and not any(success in s for s in styles)
        plot = app.screen.query_one("#timeline", Timeline)
        if theme.startswith("ansi"):
            assert error.startswith("color(") and plot.theme == "clear"
        else:
            assert error.startswith("#") and plot.theme == "auto"


async def test_eighty_columns_stack_panes_and_drop_columns(db_path: Path, clock: FrozenClock, refresh: float) -> None:
    await _over_budget_ledger(db_path, clock)
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(80, 24)) as pilot:
        await _settle(pilot, app)
        assert app.screen.has_class("-narrow")
        await pilot.press("3")
        await _settle(pilot, app)
        table = app.screen.query_one("#policies", VimTable)
        assert [str(c.label) for c in table.columns.values()] == ["policy", "gauge", "spent", "hard", "mode"]
        await pilot.press("enter")  # what the narrow table leaves out is one key away
        body = str(app.screen.query_one(".message-body", Static).content)
        assert "scope           global" in body and "held" in body and "forecast" in body
        await pilot.press("escape")
        assert isinstance(app.screen, BudgetsScreen)
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.press("3")
        await _settle(pilot, app)
        table = app.screen.query_one("#policies", VimTable)
        assert not app.screen.has_class("-narrow")  # beside the details pane: held, window, hits limit in it
        assert [str(c.key.value) for c in table.ordered_columns] == [
            "policy", "scope", "gauge", "spent", "soft", "hard", "forecast", "mode", "action"]


async def test_a_refused_change_is_a_notice_naming_the_permission(db_path: Path, clock: FrozenClock,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  refresh: float) -> None:
    async with await Engine.open(db_path, clock=clock, actor="olivia") as engine:
        await engine.set_member("olivia", "owner")
        await engine.set_member("vera", "viewer")
        await engine.add_policy(build_policy(scope="global", metric="usd", window="day", hard="5", name="Daily"))
    monkeypatch.setenv("BUDGETEER_USER", "vera")
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(140, 40)) as pilot:
        await pilot.press("3")
        await _settle(pilot, app)
        app.screen.query_one("#policies", VimTable).focus()
        await pilot.press("d", "y")
        await _settle(pilot, app)
        assert any("vera (viewer) lacks the edit_policies permission" in str(n.message)
                   for n in app._notifications)
        assert isinstance(app.screen, BudgetsScreen)
    async with await Engine.open(db_path, clock=clock) as engine:
        assert [p.name for p in await engine.policies()] == ["Daily"]


async def test_columns_shrink_when_the_terminal_does(db_path: Path, clock: FrozenClock, refresh: float) -> None:
    await _over_budget_ledger(db_path, clock)
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(160, 48)) as pilot:
        await _settle(pilot, app)
        table = app.screen.query_one("#budgets", VimTable)
        wide = table.virtual_size.width
        await pilot.resize_terminal(80, 24)
        await pilot.pause(0.2)
        await _settle(pilot, app)
        assert table.virtual_size.width < wide and table.virtual_size.width <= 80


@pytest.mark.parametrize("size", [(160, 48), (80, 24)])
async def test_table_cells_stay_whole_through_the_default_refresh(db_path: Path, clock: FrozenClock,
                                                                   size: tuple[int, int]) -> None:
    """At the default 2 s refresh, rows set by a refresh were painted at the columns' label widths
    and stayed so (`demo-o  soft  Organis`) until a key was pressed. Waiting through two
    refreshes with no key, every visible cell of the alerts table is on screen whole."""
    import asyncio
    import re

    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.add_policy(build_policy(scope="global", metric="usd", window="day", hard="1",
                                             name="Organisation daily"))
        await engine.record(event(1, cost_nanos=600_000_000))
    app = BudgeteerApp(db_path=db_path, clock=clock)  # the default refresh
    async with app.run_test(size=size) as pilot:
        await pilot.press("4")
        await _settle(pilot, app)
        await asyncio.sleep(2 * app.refresh_seconds + 0.5)  # refreshes, and no key or pause to repaint
        shown = re.sub(r"<[^>]+>", "", app.export_screenshot()).replace("&#160;", " ")
        table = app.screen.query_one("#alerts-table", VimTable)
        assert table.row_count == 1
        for cell in table.get_row_at(0):
            text = str(cell).strip()
            assert text[: size[0] // 3] in shown, f"{text!r} is cut on screen"


@pytest.mark.parametrize("refresh", [2.0, 3600.0])
async def test_approvals_history_and_back_at_eighty_columns(db_path: Path, clock: FrozenClock, refresh: float) -> None:
    """`5 h h` at 80x24 raised IndexError: Pending's visible column indexes were applied to the
    History rows the table still held, and the app exited."""
    async with await Engine.open(db_path, clock=clock) as engine:
        policy = await engine.add_policy(build_policy(scope="global", metric="usd", window="day", hard="1"))
        await engine.request_override(policy.id, 1_000_000_000, 3_600_000, "a long enough reason to ask")
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(80, 24)) as pilot:
        for key in "5hhh":
            await pilot.press(key)
            await _settle(pilot, app)
        await pilot.press("h")
        await _settle(pilot, app)
        table = app.screen.query_one("#requests", VimTable)
        assert table.row_count == 1 and len(table.columns) == 5  # the pending request, narrow
    assert app.fatal_error is None and app.return_code in (None, 0)


async def test_a_poll_that_reaches_a_screen_still_mounting_waits_for_its_columns(db_path: Path,
                                                                                 clock: FrozenClock) -> None:
    """A refresh that fell between a screen switch and the new screen's on_mount read its data
    before its tables had columns: `ValueError: More values provided than there are columns`
    (seen while Alerts loaded). A fast poll and every screen's first visit, with no pause."""
    async with await Engine.open(db_path, clock=clock, actor="bob") as engine:
        await engine.record_many([event(i) for i in range(20)])
        await engine.add_policy(build_policy(scope="global", metric="usd", window="day", hard="10", soft="1",
                                             name="Daily", action="approval_required", policy_id="daily"))
        await engine.request_override("daily", 5_000_000_000, 3_600_000, "evals")
        await engine.alerts()
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        for key in "234567891":
            await pilot.press(key)
        await pilot.pause(0.3)
        assert isinstance(app.screen, OverviewScreen)
    # run_test re-raises a worker's error on leaving: getting here means none failed


@pytest.mark.parametrize("refresh_seconds", [2, 3600])
async def test_a_budgets_percentage_is_the_command_lines(db_path: Path, clock: FrozenClock,
                                                         refresh_seconds: int) -> None:
    """$10.76 of $10.00 is 107.6 %: both say 107 % (engine.money.percent_of rounds down, as
    thresholds are judged), where the dashboard said 107 % and the command line 108 %."""
    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.add_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="10",
                                             mode="suggest", policy_id="ml"))
        await engine.record(event(1, cost_nanos=10_760_000_000))
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh_seconds)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.press("3")
        await _settle(pilot, app)
        table = app.screen.query_one("#policies", VimTable)
        assert " 107%" in str(table.get_cell("ml", "gauge"))
    out = subprocess.run([sys.executable, "-m", "tui.cli", "--db", str(db_path), "policy", "list"],
                         capture_output=True, text=True, check=True, env={**os.environ, "BUDGETEER_NOW": str(NOW_MS)})
    row = next(line for line in out.stdout.splitlines() if line.startswith("ml "))
    assert " 107% " in row + " "


@pytest.mark.parametrize("refresh_seconds", [2, 3600])
async def test_the_catalog_counts_dated_and_prefixed_calls(db_path: Path, clock: FrozenClock,
                                                           refresh_seconds: int) -> None:
    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.record_many([
            event(i, provider=provider, model=model, ts_ms=NOW_MS - 60_000 + i) for i, (provider, model) in enumerate(
                [("anthropic", "claude-haiku-4-5-20251001"), ("anthropic", "claude-haiku-4-5-20251001"),
                 ("gemini", "gemini-2.5-flash"), ("mistral", "mistral-small-latest")])])
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh_seconds)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.press("8")
        await _settle(pilot, app)
        catalog = app.screen.query_one("#catalog", VimTable)
        expected = {"anthropic/claude-haiku-4-5": "2", "gemini/gemini/gemini-2.5-flash": "1",
                    "mistral/mistral/mistral-small-latest": "1"}  # keys: provider / catalog name
        assert {key: str(catalog.get_cell(key, "calls")).strip() for key in expected} == expected


async def test_hidden_screens_reading_again_never_hold_off_the_shown_screens_poll(db_path: Path,
                                                                                  clock: FrozenClock) -> None:
    """Each read's end re-armed the app's one poll, hidden screens' reads included: a hidden
    screen reading again and again (a resize, a theme change; seen once at 95 % CPU) pushed the
    shown screen's next poll back for good, and writes from another process stopped appearing."""
    async with await Engine.open(db_path, clock=clock):
        pass
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=0.3)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("2")
        await _settle(pilot, app)
        usage = app.screen
        await pilot.press("1")
        await _settle(pilot, app)
        assert _kpi(app, "requests") == "0"
        async with await Engine.open(db_path, clock=clock) as other:
            await other.record(event(1))
        for _ in range(30):  # 3 s: ten polls' worth, with the hidden screen asked to read every 0.1 s
            usage.on_resize()
            await pilot.pause(0.1)
        assert _kpi(app, "requests") == "1"
