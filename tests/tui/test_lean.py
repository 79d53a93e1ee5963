"""The dashboard stays lean: touring the screens again and again keeps no more of them alive."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
from textual.widget import Widget
from textual.widgets._footer import FooterKey

from engine.budgets import build_policy
from engine.clock import FrozenClock
from engine.engine import Engine
from tests.conftest import event
from tui.app import BudgeteerApp
from tui.widgets.footer import KeysFooter


def _live_widgets() -> int:
    gc.collect()
    return sum(isinstance(o, Widget) for o in gc.get_objects())


@pytest.mark.parametrize("refresh", [2.0, 3600.0])
async def test_touring_the_screens_keeps_no_widgets_alive(db_path: Path, clock: FrozenClock, refresh: float) -> None:
    """Each screen switch rebuilt the footer, and Textual kept every key it had ever built bound
    to the footer (Textualize/textual#6666): about 280 dead widgets and 6 MB a tour of the nine
    screens. The widgets alive after 4 tours are those alive after 1."""
    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.add_policy(build_policy(scope="global", metric="usd", window="day", hard="1", name="Daily"))
        await engine.record_many([event(i, cost_nanos=10_000_000) for i in range(20)])
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(160, 48)) as pilot:

        async def tours(n: int) -> None:
            for _ in range(n):
                for key in "1234567890":
                    await pilot.press(key)
                    await app.workers.wait_for_complete()
                    await pilot.pause()
            await pilot.pause(0.1)

        await tours(1)
        after_one = _live_widgets()
        await tours(3)
        after_four = _live_widgets()
        assert after_four - after_one < 9, f"{after_four - after_one} more widgets alive after 3 more tours"
        for footer in app.screen.query(KeysFooter):  # one entry per key it shows
            assert footer.watcher_count() == len(footer.query(FooterKey))


async def test_a_poll_that_reads_nothing_new_leaves_the_screen_as_it_is(db_path: Path, clock: FrozenClock) -> None:
    """Every poll refilled every table and redrew the plot even when nothing had changed: most of
    the app's CPU between keys. Polls reading what is shown leave the table's rows untouched;
    a new event still shows at the next poll."""
    import asyncio

    from textual.widgets import Static

    from tui.widgets.kpi import KpiTile
    from tui.widgets.vim_table import VimTable

    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.add_policy(build_policy(scope="global", metric="usd", window="day", hard="1", name="Daily"))
        await engine.record(event(1, cost_nanos=10_000_000))
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=0.2)
    async with app.run_test(size=(160, 48)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause(0.1)
        table = app.screen.query_one("#budgets", VimTable)
        row = next(iter(table.rows.values()))
        polls = 0
        while polls < 3:  # three polls, each read to its end
            before = app.screen._loader  # type: ignore[attr-defined]
            await asyncio.sleep(0.1)
            if app.screen._loader is not before:  # type: ignore[attr-defined]
                await app.workers.wait_for_complete()
                polls += 1
        assert next(iter(table.rows.values())) is row
        async with await Engine.open(db_path, clock=clock) as engine:
            await engine.record(event(2, cost_nanos=10_000_000))
        for _ in range(50):
            await pilot.pause(0.1)
            value = app.screen.query_one("#kpi-requests", KpiTile).query_one(".kpi-value", Static).content
            if str(value) == "2":
                break
        assert str(value) == "2"
