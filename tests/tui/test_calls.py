"""The live Calls screen (key 0), driven by Pilot on a real ledger at the default refresh and a
frozen one (where ``r`` stands in for the refresh): calls recorded elsewhere appear at the
top with the cursor kept on its call, the screen's hold and catching up, the filters, a
blocked call naming its policy (refused for real by the governed transport), the ring's
bound, and the details of one call."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest
from textual.widgets import Static

from engine.budgets import build_policy
from engine.clock import FrozenClock
from engine.engine import Engine
from tests.asgi_servers import FakeOpenAI, serve
from tests.conftest import NOW_MS, event
from tui.app import BudgeteerApp
from tui.screens.calls import CallsScreen
from tui.screens.message import MessageModal
from tui.widgets.vim_table import VimTable

REFRESHES = pytest.mark.parametrize("refresh", [2.0, 3600.0], ids=["default-refresh", "frozen"])


async def _settle(pilot: Any, app: BudgeteerApp) -> None:
    await app.workers.wait_for_complete()
    await pilot.pause(0.05)


async def _calls(pilot: Any, app: BudgeteerApp) -> CallsScreen:
    await _settle(pilot, app)
    await pilot.press("0")
    await _settle(pilot, app)
    assert isinstance(app.screen, CallsScreen)
    return app.screen


def _table(app: BudgeteerApp) -> VimTable:
    return app.screen.query_one("#calls-table", VimTable)


def _request_ids(app: BudgeteerApp) -> list[str]:
    """The request id of each row shown, top first (the row key is the call's id)."""
    screen = app.screen
    assert isinstance(screen, CallsScreen)
    by_id = {str(c.id): c.event.request_id for ring in screen.rings.values() for c in ring}
    return [by_id.get(str(row.value), str(row.value)) for row in _table(app).rows]


async def _until(pilot: Any, app: BudgeteerApp, refresh: float, done: Any) -> None:
    """Through the refresh (frozen: ``r``, the refresh by hand) until ``done()``, for at most 15 s."""
    for _ in range(75):
        if done():
            return
        if refresh > 60:
            await pilot.press("r")
            await _settle(pilot, app)
        else:
            await pilot.pause(0.2)
    assert done()


@REFRESHES
async def test_calls_from_another_process_appear_at_the_top_and_the_cursor_stays(
        db_path: Path, clock: FrozenClock, refresh: float) -> None:
    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.record_many([event(i) for i in range(4)])
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(160, 48)) as pilot:
        screen = await _calls(pilot, app)
        assert _request_ids(app) == ["req-3", "req-2", "req-1", "req-0"]  # newest first
        reads: list[int] = []
        assert app.engine is not None
        real = app.engine.recent_calls

        async def observed(after: int = 0, limit: int = 200, status: str | None = None) -> Any:
            reads.append(after)
            return await real(after, limit, status)

        app.engine.recent_calls = observed  # type: ignore[method-assign]
        newest_held = screen.last_id
        await pilot.press("j", "j")
        assert _table(app).current_key is not None
        on = _request_ids(app)[_table(app).cursor_row]
        assert on == "req-1"
        script = (
            "import asyncio\n"
            "from engine.engine import Engine\n"
            "from engine.models import UsageEvent\n"
            "async def main():\n"
            f"    async with await Engine.open({str(db_path)!r}) as e:\n"
            "        for n in range(2):\n"
            f"            await e.record(UsageEvent(ts_ms={NOW_MS - 1000} + n, request_id=f'other-{{n}}', "
            "provider='openai', model='gpt-4o', principal='carol', input_tokens=100, output_tokens=10))\n"
            "asyncio.run(main())\n"
        )
        subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
        await _until(pilot, app, refresh, lambda: len(_table(app).rows) == 6)
        assert _request_ids(app) == ["other-1", "other-0", "req-3", "req-2", "req-1", "req-0"]
        assert _request_ids(app)[_table(app).cursor_row] == "req-1"  # the cursor stayed on its call
        assert "carol" in str(_table(app).get_row_at(0))
        # Every poll asked only for what came after the newest call it held, never the whole window.
        assert reads and reads[0] == newest_held and all(after >= newest_held > 0 for after in reads)
    assert app.fatal_error is None


@REFRESHES
async def test_hold_keeps_the_list_still_and_resuming_catches_up(db_path: Path, clock: FrozenClock,
                                                                 refresh: float) -> None:
    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.record_many([event(i) for i in range(3)])
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(160, 48)) as pilot:
        screen = await _calls(pilot, app)
        await pilot.press("space")
        assert screen.held
        async with await Engine.open(db_path, clock=clock) as engine:  # another Engine, as a gateway's
            await engine.record_many([event(i) for i in range(10, 13)])
        await _until(pilot, app, refresh, lambda: len(screen.waiting) == 3)
        assert _request_ids(app) == ["req-2", "req-1", "req-0"]  # held still
        title = str(app.screen.query_one("#calls-title", Static).content)
        assert "held" in title and "3 new waiting" in title
        await pilot.press("space")
        await _settle(pilot, app)
        assert not screen.held
        assert _request_ids(app) == ["req-12", "req-11", "req-10", "req-2", "req-1", "req-0"]
        assert "live" in str(app.screen.query_one("#calls-title", Static).content)
    assert app.fatal_error is None


@REFRESHES
async def test_the_text_and_status_filters_narrow_the_list(db_path: Path, clock: FrozenClock,
                                                           refresh: float) -> None:
    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.record_many([
            event(0), event(1, principal="bob"), event(2, status="error"),
            event(3, principal="bob", status="blocked", cost_nanos=0, input_tokens=0, output_tokens=0),
            event(4)])
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(160, 48)) as pilot:
        await _calls(pilot, app)
        assert len(_table(app).rows) == 5
        await pilot.press("slash", "b", "o", "b")
        await _settle(pilot, app)
        assert _request_ids(app) == ["req-3", "req-1"]
        await pilot.press("escape")
        await _settle(pilot, app)
        assert len(_table(app).rows) == 5
        shown = []
        for _ in range(4):  # ok, error, blocked, and all again
            await pilot.press("f")
            await _settle(pilot, app)
            shown.append(_request_ids(app))
        assert shown == [["req-4", "req-1", "req-0"], ["req-2"], ["req-3"], ["req-4", "req-3", "req-2", "req-1",
                                                                               "req-0"]]
    assert app.fatal_error is None


@REFRESHES
async def test_a_call_refused_by_a_budget_shows_the_policy_that_blocked_it(db_path: Path, clock: FrozenClock,
                                                                           refresh: float) -> None:
    """Refused for real: the governed transport in front of a fake provider, the openai SDK as client."""
    async with await Engine.open(db_path) as engine:
        await engine.add_policy(build_policy(scope="principal:bob", metric="usd", window="day", hard="0.000001",
                                             name="Bob's cap", policy_id="bob-cap"))
        with serve(FakeOpenAI().app()) as url:
            http = engine.httpx_async_client(principal="bob")
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-provider", http_client=http, max_retries=0)
            with pytest.raises(openai.APIStatusError) as refused:
                await client.chat.completions.create(model="gpt-4o-mini",
                                                     messages=[{"role": "user", "content": "hi"}])
            await http.aclose()
    assert refused.value.status_code == 402
    app = BudgeteerApp(db_path=db_path, refresh_seconds=refresh)
    async with app.run_test(size=(160, 48)) as pilot:
        await _calls(pilot, app)
        table = _table(app)
        assert len(table.rows) == 1
        cells = [str(c) for c in table.get_row_at(0)]
        assert "blocked" in cells and "Bob's cap" in cells and "bob" in cells and "$0.00" in cells
        await pilot.press("enter")
        await pilot.pause(0.1)
        assert isinstance(app.screen, MessageModal)
        assert "blocked by       Bob's cap (bob-cap)" in app.screen.body_text
    assert app.fatal_error is None


@REFRESHES
async def test_the_ring_holds_at_most_its_bound(db_path: Path, clock: FrozenClock, refresh: float,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CallsScreen, "RING", 5)
    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.record_many([event(i) for i in range(8)])
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(160, 48)) as pilot:
        screen = await _calls(pilot, app)
        assert _request_ids(app) == [f"req-{i}" for i in (7, 6, 5, 4, 3)]
        await pilot.press("space")  # held: what waits is bounded too
        async with await Engine.open(db_path, clock=clock) as engine:
            await engine.record_many([event(i) for i in range(20, 27)])
        await _until(pilot, app, refresh, lambda: len(screen.waiting) == 5 and screen.last_id >= 15)
        await pilot.press("space")
        await _settle(pilot, app)
        assert _request_ids(app) == [f"req-{i}" for i in (26, 25, 24, 23, 22)]
        assert all(len(ring) <= 5 for ring in screen.rings.values()) and len(screen.waiting) == 0
    assert app.fatal_error is None


@pytest.mark.parametrize("size", [(160, 48), (80, 24)])
async def test_enter_shows_the_call_in_full(db_path: Path, clock: FrozenClock, size: tuple[int, int]) -> None:
    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.record(event(1, model="claude-haiku-4-5-20251001", provider="anthropic", input_tokens=5000,
                                  cached_input_tokens=3000, cache_write_tokens=1000, output_tokens=700,
                                  reasoning_tokens=200, cost_nanos=12_345_678, tags={"ticket": "OPS-7"}))
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=3600)
    async with app.run_test(size=size) as pilot:
        await _calls(pilot, app)
        row = " ".join(str(c) for c in _table(app).get_row_at(0))
        assert "$0.01" in row and "ok" in row
        await pilot.press("enter")
        await pilot.pause(0.1)
        assert isinstance(app.screen, MessageModal)
        body = app.screen.body_text
        for text in ("req-1", "claude-haiku-4-5-20251001", "input tokens     5,000", "cached reads   3,000",
                     "cache writes   1,000", "output tokens    700", "reasoning      200",
                     "$0.012345678 (provider)", '"ticket": "OPS-7"', "alice", "ml"):
            assert text in body, text
        await pilot.press("escape")
        assert isinstance(app.screen, CallsScreen)


@pytest.mark.parametrize("size", [(160, 48), (80, 24), (120, 30), (180, 40)])
async def test_every_cell_is_on_screen_whole_or_elided(db_path: Path, clock: FrozenClock,
                                                       size: tuple[int, int]) -> None:
    """At 160 columns the policy column ran past the edge (`Organisation mon`): each width shows
    the columns that fit, long names elided with …, through the default refresh."""
    import asyncio
    import re

    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.record_many([
            event(1, model="claude-sonnet-4-5-20250929", principal="svc-support-triage", team="customer-support",
                  token_id="tok_d41a2eecf282", input_tokens=123_456, output_tokens=12_345, latency_ms=20_189),
            event(2, status="blocked", cost_nanos=0, input_tokens=0, output_tokens=0, principal="svc-search-embedder",
                  tags={"policy": "demo-org-month", "policy_name": "Organisation monthly, all teams"})])
    app = BudgeteerApp(db_path=db_path, clock=clock)  # the default refresh
    async with app.run_test(size=size) as pilot:
        await _calls(pilot, app)
        await asyncio.sleep(2 * app.refresh_seconds + 0.5)
        shown = re.sub(r"<[^>]+>", "", app.export_screenshot()).replace("&#160;", " ").replace("&#x27;", "'")
        table = _table(app)
        assert len(table.rows) == 2
        for row in range(2):
            cells = [str(c).strip() for c in table.get_row_at(row)]
            line = next((ln for ln in shown.splitlines() if cells[0] in ln and cells[1] in ln), "")
            for text in cells:
                assert text in line, f"{text!r} is cut on screen at {size}: {line!r}"
        if size[0] >= 110:
            assert "Organisation monthl…" in shown
    assert app.fatal_error is None
