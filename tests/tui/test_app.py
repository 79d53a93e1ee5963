"""The dashboard, driven by Pilot on a real ledger: totals, the empty state, live refresh,
and a write from another process appearing after a refresh."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from textual.widgets import DataTable, Static

from engine.clock import FrozenClock
from engine.engine import Engine
from tests.conftest import NOW_MS, event
from tui.app import BudgeteerApp
from tui.widgets.kpi import KpiTile


def _kpi(app: BudgeteerApp, tile: str) -> str:
    return str(app.query_one(f"#kpi-{tile}", KpiTile).query_one(".kpi-value", Static).content)


async def test_the_dashboard_shows_the_ledger_totals(db_path: Path, clock: FrozenClock) -> None:
    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.record_many([event(i, model=("gpt-4o", "o3")[i % 2], cost_nanos=1_250_000_000) for i in range(8)])
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=0.2)
    async with app.run_test(size=(120, 30)) as pilot:
        await pilot.pause(0.5)
        assert _kpi(app, "today") == "$10.00"
        assert _kpi(app, "requests") == "8"
        table = app.query_one("#models", DataTable)
        assert table.row_count == 2
        assert not app.query_one("#empty", Static).display
        await pilot.press("q")
    assert app.fatal_error is None


async def test_an_empty_ledger_says_how_to_get_data_in(db_path: Path, clock: FrozenClock) -> None:
    app = BudgeteerApp(db_path=db_path, clock=clock)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause(0.5)
        empty = app.query_one("#empty", Static)
        assert empty.display
        assert "budgeteer import FILE" in str(empty.content)
        assert "budgeteer demo --open" in str(empty.content)


async def test_a_write_from_another_process_appears_after_a_refresh(db_path: Path, clock: FrozenClock) -> None:
    async with await Engine.open(db_path, clock=clock):
        pass
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=0.2)
    async with app.run_test(size=(120, 30)) as pilot:
        await pilot.pause(0.5)
        assert _kpi(app, "requests") == "0"
        script = (
            "import asyncio, sys\n"
            "from engine.engine import Engine\n"
            "from engine.models import UsageEvent\n"
            "async def main():\n"
            f"    async with await Engine.open({str(db_path)!r}) as e:\n"
            f"        await e.record(UsageEvent(ts_ms={NOW_MS - 1000}, request_id='other-process', "
            "provider='openai', model='gpt-4o', input_tokens=100, output_tokens=10))\n"
            "asyncio.run(main())\n"
        )
        subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
        for _ in range(20):
            await pilot.pause(0.2)
            if _kpi(app, "requests") == "1":
                break
        assert _kpi(app, "requests") == "1"


async def test_pause_stops_the_live_refresh_until_resumed(db_path: Path, clock: FrozenClock) -> None:
    async with await Engine.open(db_path, clock=clock):
        pass
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=0.2)
    async with app.run_test(size=(120, 30)) as pilot:
        await pilot.pause(0.5)
        await pilot.press("p")
        assert app.paused
        async with await Engine.open(db_path, clock=clock) as engine:
            await engine.record(event(1))
        await pilot.pause(0.8)
        assert _kpi(app, "requests") == "0"
        assert "paused" in str(app.query_one("#status", Static).content)
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
