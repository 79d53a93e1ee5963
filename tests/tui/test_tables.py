"""Tables people expect, and every cell right: sorting by value (s, S), the details pane beside
the table from 140 columns, the layout of Budgets, Alerts and Overview, and every visible cell
of every table compared with the engine's value for its row, with the default refresh running."""

from __future__ import annotations

import asyncio
import io
import re
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from rich.text import Text
from textual.color import Color
from textual.widgets import Static

from engine.budgets import build_policy
from engine.clock import FrozenClock, format_span, iso
from engine.demo import populate
from engine.engine import Engine
from engine.money import format_usd
from engine.tokens import PREFIX
from tests.conftest import event, isolated_home
from tui.app import BudgeteerApp
from tui.cli.dashboard import svg_keep_spaces
from tui.screens.budgets import BudgetsScreen
from tui.screens.message import MessageModal
from tui.screens.usage import period_bounds
from tui.widgets.kpi import compact
from tui.widgets.vim_table import VimTable

NOW = 1_795_003_200_000
REFRESH = pytest.mark.parametrize("refresh", [2.0, 3600.0], ids=["default-refresh", "frozen"])


async def _settle(pilot: object, app: BudgeteerApp) -> None:
    await app.workers.wait_for_complete()
    await pilot.pause(0.05)  # type: ignore[attr-defined]


async def _a_poll_lands(app: BudgeteerApp) -> None:
    """Wait, with no key and no pause, for the default refresh's next read of the screen shown to
    end (about refresh_seconds from now), then for its paint: the condition a fixed sleep of the
    interval and a margin waited for, without the margin."""
    screen = app.screen
    before = screen._loader  # type: ignore[attr-defined]
    for _ in range(int((app.refresh_seconds + 30) / 0.05)):
        await asyncio.sleep(0.05)
        loader = screen._loader  # type: ignore[attr-defined]
        if loader is not before and loader is not None and loader.is_finished:
            break
    else:
        raise AssertionError(f"no refresh of {type(screen).__name__} in {app.refresh_seconds + 30} s")
    await asyncio.sleep(0.2)  # what it read painted (a frame is 1/60 s)


async def _three_budgets(db_path: Path, clock: FrozenClock) -> None:
    """Spent $9, $10 and $100: as text, '$10.00' < '$100.00' < '$9.00'; by value the other way."""
    async with await Engine.open(db_path, clock=clock) as engine:
        for name, team, spent in (("Alpha", "a", 9), ("Bravo", "b", 100), ("Charlie", "c", 10)):
            await engine.add_policy(build_policy(scope=f"team:{team}", metric="usd", window="day", hard="1000",
                                                 name=name))
            await engine.record(event(spent, team=team, cost_nanos=spent * 1_000_000_000))


def _column(table: VimTable, key: str) -> list[str]:
    index = [str(c.key.value) for c in table.ordered_columns].index(key)
    return [str(table.get_row_at(i)[index]) for i in range(table.row_count)]


@REFRESH
async def test_s_sorts_by_value_S_reverses_and_the_cursor_and_sort_survive_a_refresh(
        db_path: Path, clock: FrozenClock, refresh: float) -> None:
    await _three_budgets(db_path, clock)
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.press("3")
        await _settle(pilot, app)
        table = app.screen.query_one("#policies", VimTable)
        table.focus()
        await pilot.press("j")  # the cursor on the second row, Bravo's or another's
        picked = table.current_key
        spent_of = {p.id: f"${n:.2f}" for p in app.screen.policies.values()
                    for name, n in (("Alpha", 9), ("Bravo", 100), ("Charlie", 10)) if p.name == name}
        at = ["$100.00", "$10.00", "$9.00"].index(spent_of[str(picked)])
        keys = [str(c.key.value) for c in table.ordered_columns]
        for _ in range(keys.index("spent") + 1):  # s cycles policy, scope, window, gauge, spent
            await pilot.press("s")
        assert _column(table, "spent") == ["$100.00", "$10.00", "$9.00"]  # by value, largest first
        assert "spent ▼" in str(table.ordered_columns[keys.index("spent")].label)
        assert table.current_key == picked and table.cursor_row == at  # the cursor stayed on its row
        await pilot.press("S")
        assert _column(table, "spent") == ["$9.00", "$10.00", "$100.00"]
        assert table.current_key == picked and table.cursor_row == 2 - at
        await pilot.press("r")  # a refresh sets the rows again
        await _settle(pilot, app)
        if refresh < 60:
            await _a_poll_lands(app)
            await _settle(pilot, app)
        assert _column(table, "spent") == ["$9.00", "$10.00", "$100.00"] and table.current_key == picked
        await pilot.press("slash", "a")  # a filter keeps the sort: Alpha, Bravo and Charlie all hold an a
        await _settle(pilot, app)
        assert _column(table, "spent") == ["$9.00", "$10.00", "$100.00"]
        await pilot.press("escape")
        table.focus()
        await pilot.press("s")  # the next column: soft
        assert "spent ▼" not in str(table.ordered_columns[keys.index("spent")].label)


@REFRESH
async def test_the_cursor_off_the_first_row_leaves_budgets_at_rest(db_path: Path, clock: FrozenClock,
                                                                   refresh: float) -> None:
    """Setting the rows again passes the cursor over the first row on its way back to its own;
    the chart followed that stale highlight, read again, set the rows again, and so on: Budgets
    read and redrew without end (a core at 100 %) once the cursor left the first row."""
    await _three_budgets(db_path, clock)
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.press("3")
        await _settle(pilot, app)
        screen = app.screen
        table = screen.query_one("#policies", VimTable)
        table.focus()
        await pilot.press("j")
        await _settle(pilot, app)
        charted = screen.data.charted  # type: ignore[attr-defined]
        assert charted == table.current_key and table.cursor_row == 1  # the chart follows the cursor
        shown = []
        show = screen.show  # type: ignore[attr-defined]
        screen.show = lambda data: (shown.append(data), show(data))  # type: ignore[attr-defined]
        for _ in range(10):  # a second at rest: no read shows anything new
            await asyncio.sleep(0.1)
        assert shown == [] and table.current_key == charted


@REFRESH
async def test_the_details_pane_follows_the_cursor_at_160_and_enter_opens_a_modal_at_80(
        db_path: Path, clock: FrozenClock, refresh: float) -> None:
    await _three_budgets(db_path, clock)
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.press("3")
        await _settle(pilot, app)
        pane = app.screen.query_one("#details-pane")
        title = app.screen.query_one("#details-title", Static)
        table = app.screen.query_one("#policies", VimTable)
        names = {p.id: p.name for p in app.screen.policies.values()}
        assert pane.display and str(title.content) == names[str(table.current_key)]
        assert "soft limit" in str(app.screen.query_one("#details-body", Static).content)
        table.focus()
        await pilot.press("j")
        await _settle(pilot, app)
        second = names[str(table.current_key)]
        assert str(title.content) == second and table.cursor_row == 1
        await pilot.press("enter")  # the pane shows it: no modal over it
        await _settle(pilot, app)
        assert isinstance(app.screen, BudgetsScreen)
        await pilot.resize_terminal(80, 24)
        await pilot.pause(0.2)
        await _settle(pilot, app)
        assert not pane.display
        app.screen.query_one("#policies", VimTable).focus()
        await pilot.press("enter")
        await _settle(pilot, app)
        assert isinstance(app.screen, MessageModal) and app.screen.title_text == second


async def _over_budget(db_path: Path, clock: FrozenClock) -> None:
    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.add_policy(build_policy(scope="global", metric="usd", window="day", hard="1", soft="0.5",
                                             name="Organisation daily", mode="dry_run"))
        await engine.record(event(1, cost_nanos=1_500_000_000))
        await engine.alerts()


async def test_budgets_at_160_show_soft_limit_mode_and_action_whole(db_path: Path, clock: FrozenClock) -> None:
    await _over_budget(db_path, clock)
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=3600)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.press("3")
        await _settle(pilot, app)
        table = app.screen.query_one("#policies", VimTable)
        cells = _visible_cells(table)
        assert cells[0]["soft"] == "$0.50" and cells[0]["mode"] == "dry_run" and cells[0]["action"] == "block"


async def test_alerts_at_80x24_keep_the_amounts(db_path: Path, clock: FrozenClock) -> None:
    await _over_budget(db_path, clock)
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=3600)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("4")
        await _settle(pilot, app)
        rows = _visible_cells(app.screen.query_one("#alerts-table", VimTable))
        assert rows and all(r["amount"] == "$1.50" and r["limit"] == "$1.00" for r in rows)


async def test_the_cursor_row_keeps_the_gauge_colour(db_path: Path, clock: FrozenClock) -> None:
    """The cursor's highlight whitened the gauge of the most critical budget, the row it starts on."""
    await _over_budget(db_path, clock)
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=3600)
    async with app.run_test(size=(160, 48)) as pilot:
        await _settle(pilot, app)
        table = app.screen.query_one("#budgets", VimTable)
        table.focus()
        await pilot.pause(0.1)
        assert table.cursor_row == 0
        over = Color.parse(app.theme_variables["error"]).rich_color
        line = table.render_line(1)  # the header, then the cursor's row
        bars = [s for s in line if "█" in s.text]
        assert bars and all(s.style is not None and s.style.color is not None
                            and s.style.color.get_truecolor() == over.get_truecolor() for s in bars)


async def test_overview_uses_its_room_for_the_top_models(db_path: Path, clock: FrozenClock) -> None:
    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.record_many([event(i, model=("gpt-4o", "o3")[i % 2], cost_nanos=(i + 1) * 10**9)
                                  for i in range(4)])
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=3600)
    async with app.run_test(size=(160, 48)) as pilot:
        await _settle(pilot, app)
        rows = _visible_cells(app.screen.query_one("#overview-models", VimTable))
        assert [(r["model"], r["spend"], r["share"]) for r in rows] == [("o3", "$6.00", "60.0%"),
                                                                        ("gpt-4o", "$4.00", "40.0%")]


def test_svg_screenshots_place_text_at_its_first_letter() -> None:
    """A run starting with spaces (' add' after a bold 'a') was drawn from the spaces' column by
    viewers that strip them: 'aadd'. Each run now starts at its first letter's column."""
    from rich.console import Console

    console = Console(record=True, width=40, file=io.StringIO())
    console.print(Text.from_markup("[b]a[/b] add   [b]t[/b] period"))
    svg = svg_keep_spaces(console.export_svg())
    runs = re.findall(r'<text [^>]*x="([\d.]+)"[^>]*textLength="([\d.]+)"[^>]*>([^<]*)</text>', svg)
    assert not [t for _, _, t in runs if t.startswith("&#160;") or t.endswith("&#160;")]
    x = {t: float(pos) for pos, _, t in runs}
    width = float(next(length for _, length, t in runs if t == "a"))
    assert x["add"] == pytest.approx(x["a"] + 2 * width) and x["period"] == pytest.approx(x["t"] + 2 * width)


# ---- every visible cell against the engine


def _visible_cells(table: VimTable) -> list[dict[str, str]]:
    """What the screen shows of the table, cell by cell (column key -> text), for each row in
    view: read from the terminal's lines as painted, so a cell cut by its column, the table's
    edge or a stale paint reads cut."""
    from rich.console import Console

    app = table.app
    console = Console(width=app.size.width, height=app.size.height, file=io.StringIO(), record=True,
                      force_terminal=True, color_system="truecolor", legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    screen = console.export_text().splitlines()
    area = table.scrollable_content_region
    clip = app.screen._compositor.find_widget(table).clip  # what its containers leave in view
    columns = list(table.ordered_columns)
    rows = []
    for y in range(1, area.height):
        if int(table.scroll_y) + y - 1 >= table.row_count or area.y + y >= clip.bottom:
            break
        line = screen[area.y + y][area.x:min(area.right, clip.right)]
        cells, x = {}, -int(table.scroll_x)
        for column in columns:
            width = column.get_render_width(table)
            if x + width > 0 and x < len(line):
                cells[str(column.key.value)] = line[max(0, x):x + width].strip()
            x += width
        rows.append(cells)
    return rows


def _keys_in_view(table: VimTable) -> list[str]:
    top = int(table.scroll_y)
    return [str(r.key.value) for r in table.ordered_rows][top:top + table.size.height - 1]


Expected = dict[str, dict[str, str]]  # row key -> column key -> the engine's text


async def _overview_budgets(engine: Engine) -> Expected:
    forecasts = {f.policy.id: f for f in await engine.forecasts()}
    out = {}
    for o in await engine.policy_status():
        p, f = o.policy, forecasts.get(o.policy.id)
        out[p.id] = {"policy": p.name, "gauge": f"{100 * (o.consumed + o.held) // max(p.hard, 1)}%",
                     "spent": p.format_short(o.consumed), "limit": p.format_short(p.hard),
                     "hard": p.format_short(p.hard), "held": p.format_short(o.held),
                     "soft": p.format_short(p.soft) if p.soft is not None else "-",
                     "forecast": p.format_short(f.projected) if f else "-", "scope": str(p.scope),
                     "window": str(p.window), "mode": p.mode if p.enabled else "off", "action": p.action}
    return out


async def _top_models(engine: Engine) -> Expected:
    now = engine.now_ms()
    spent = (await engine.totals(now - 86_400_000, now + 1)).cost_nanos
    return {r.key: {"model": r.key, "spend": format_usd(r.totals.cost_nanos), "calls": f"{r.totals.requests:,}",
                    "errors": f"{r.totals.errors:,}", "share": f"{100 * r.totals.cost_nanos / spent:.1f}%"}
            for r in await engine.breakdown(now - 86_400_000, now + 1, "model", limit=8, order="cost")}


async def _alerts(engine: Engine) -> Expected:
    policies = {p.id: p for p in await engine.policies()}
    out = {}
    for a in await engine.alerts(limit=500):
        p = policies[a.policy_id]
        out[str(a.id)] = {"time (UTC)": iso(a.ts_ms)[:16].replace("T", " "), "time": iso(a.ts_ms)[5:16].replace(
            "T", " "), "policy": a.policy_id, "kind": f"{a.threshold}%" if a.kind == "threshold" else a.kind,
            "amount": p.format_short(a.value), "limit": p.format_short(p.hard), "message": a.message,
            "acknowledged": a.acked_by or ""}
    return out


async def _tokens(engine: Engine) -> Expected:
    now = engine.now_ms()
    out = {}
    for t in await engine.tokens():
        out[t.id] = {"name": t.name, "prefix": f"{PREFIX}{t.prefix}…", "principal": t.principal,
                     "team": t.team or "-", "state": t.state(now), "rpm": str(t.rpm or "-"),
                     "tpm": str(t.tpm or "-"), "month": format_usd(t.used_this_month),
                     "last used": "never" if t.last_used_ms is None else f"{format_span(now - t.last_used_ms)} ago"}
    return out


async def _audit(engine: Engine) -> Expected:
    return {str(e.id): {"#": str(e.id), "time (UTC)": iso(e.ts_ms)[:19].replace("T", " "), "actor": e.actor,
                        "action": e.action, "subject": e.subject} for e in await engine.audit_entries(limit=500)}


async def _vault(engine: Engine) -> Expected:
    return {e.ref: {"reference": f"vault:{e.ref}", "fingerprint": e.fingerprint}
            for e in await engine.vault_entries() or []}


async def _pending(engine: Engine) -> Expected:
    now = engine.now_ms()
    status = {o.policy.id: o for o in await engine.policy_status()}
    out = {}
    for r in await engine.override_requests(pending=True):
        o = status.get(r.policy_id)
        out[r.id] = {"age": format_span(now - r.created_ms), "requester": r.requester,
                     "policy": str(r.policy.get("name", r.policy_id)), "asked": r.format_amount(r.amount),
                     "for": format_span(r.duration_ms)}
        if o is not None:
            out[r.id] |= {"consumed": o.policy.format_short(o.consumed), "limit": o.policy.format_short(o.policy.hard),
                          "gauge": f"{100 * (o.consumed + o.held) // max(o.policy.hard, 1)}%"}
    return out


async def _catalog(engine: Engine) -> Expected:
    return {f"{m.provider}/{m.model}": {"model": m.model, "tier": str(m.cost_tier), "in": format_usd(m.price.input),
                                         "out": format_usd(m.price.output)} for m in await engine.catalog()}


async def _health(engine: Engine) -> Expected:
    health, breakers = await engine.provider_health()
    out = {}
    for h in (h for h in health if not h.model):
        b = breakers.get(h.provider)
        out[h.provider] = {"provider": h.provider, "calls": f"{h.calls:,}", "err": f"{100 * h.error_rate:.1f}%",
                           "mean": f"{h.mean_latency_ms:,}", "p95": f"{h.p95_latency_ms:,}",
                           "state": b.state.replace("_", "-") if b is not None and b.state != "closed" else "ok"}
    return out


async def _decisions(engine: Engine) -> Expected:
    def bare(model: str) -> str:
        return model.rsplit("/", 1)[-1]

    return {f"{r.request_id}-{i}": {
        "time": iso(r.ts_ms)[5:16].replace("T", " "), "who": r.principal, "mode": r.mode,
        "route": f"{bare(r.requested)} → {bare(r.chosen)}" if r.chosen != r.requested
        else f"{bare(r.requested)} (kept)",
        "saving": format_usd(r.saving)} for i, r in enumerate(await engine.routing_decisions(50))}


async def _usage_breakdown(engine: Engine) -> Expected:
    """Usage as it opens: the last 24 hours by model, spend first."""
    start, end, _ = period_bounds("24h", engine.now_ms())
    total = (await engine.totals(start, end)).cost_nanos
    return {r.key: {"name": r.key or "(none)", "spend": format_usd(r.totals.cost_nanos),
                    "tokens": compact(r.totals.tokens), "calls": f"{r.totals.requests:,}",
                    "share": f"{100 * r.totals.cost_nanos / total:.1f}%" if total else "-"}
            for r in await engine.breakdown(start, end, "model", limit=25, order="cost")}


async def _calls(engine: Engine) -> Expected:
    out = {}
    for c in await engine.recent_calls(limit=500):
        e = c.event
        out[str(c.id)] = {
            "time (UTC)": iso(e.ts_ms)[5:19].replace("T", " "), "principal": e.principal, "team": e.team,
            "token": e.token_id, "model": e.model, "in / out": f"{e.input_tokens:,} / {e.output_tokens:,}",
            "cost": format_usd(e.cost_nanos or 0), "latency": f"{e.latency_ms:,} ms", "status": e.status,
            "blocked by": e.tags.get("policy_name") or e.tags.get("policy")
            or ("not recorded" if e.status == "blocked" else "")}
    return out


#: The engine's view of each table, by (screen key, table id); a table missing here fails the test.
TABLES: dict[tuple[str, str], Callable[[Engine], Awaitable[Expected]]] = {
    ("1", "budgets"): _overview_budgets, ("1", "overview-models"): _top_models,
    ("1", "overview-alerts"): _alerts, ("3", "policies"): _overview_budgets, ("4", "alerts-table"): _alerts,
    ("5", "requests"): _pending, ("6", "tokens-table"): _tokens, ("7", "audit-table"): _audit,
    ("8", "catalog"): _catalog, ("8", "health"): _health, ("8", "decisions"): _decisions,
    ("9", "vault-table"): _vault, ("2", "breakdown"): _usage_breakdown, ("0", "calls-table"): _calls,
}
UNCHECKED: set[tuple[str, str]] = set()


def _matches(shown: str, full: str, column: str) -> bool:
    """Whole, or elided with …; a gauge shows its percentage."""
    if column == "gauge":
        return full in shown
    if column == "time (UTC)" and len(shown) == 8:  # the time of day alone, on a narrower terminal
        return full.endswith(shown)
    return shown == full or (shown.endswith("…") and full.startswith(shown[:-1]))


@pytest.fixture(scope="module")
def demo_ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cells") / "demo.db"

    async def build() -> None:
        async with await Engine.open(path, clock=FrozenClock(NOW), durable=False) as engine:
            await populate(engine, days=2, end_ms=NOW)
            await engine.alerts()

    with isolated_home(path.parent / "home"):
        asyncio.run(build())
    return path


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
async def test_every_visible_cell_is_the_engines_value(demo_ledger: Path, tmp_path: Path,
                                                       size: tuple[int, int]) -> None:
    """On every screen, with the default 2 s refresh running, each cell in view is the engine's
    value for its row, whole or ending in …, never silently cut."""
    db = tmp_path / "demo.db"
    shutil.copy(demo_ledger, db)
    clock = FrozenClock(NOW)
    app = BudgeteerApp(db_path=db, clock=clock, label="demo ledger")  # the default refresh
    async with await Engine.open(db, clock=clock) as engine, app.run_test(size=size) as pilot:
        checked = 0
        for key in "1234567890":
            await pilot.press(key)
            await _settle(pilot, app)
            await _a_poll_lands(app)  # a refresh lands, and no key or pause repaints
            for table in app.screen.query(VimTable):
                if not table.display or not table.region.width or (key, table.id) in UNCHECKED:
                    continue
                assert (key, table.id) in TABLES, f"no engine view of the table {table.id!r} on screen {key}"
                expected = await TABLES[key, str(table.id)](engine)
                for row_key, cells in zip(_keys_in_view(table), _visible_cells(table), strict=False):  # rows in view
                    if row_key == "none":
                        continue
                    want = expected[row_key]
                    for column, shown in cells.items():
                        if column in want:
                            assert _matches(shown, want[column], column), (
                                f"screen {key} {table.id} row {row_key} {column}: {shown!r} is not "
                                f"{want[column]!r}")
                            checked += 1
        assert checked > 100


async def test_rows_and_columns_shown_before_the_table_is_defined_are_drawn_when_it_is() -> None:
    """A screen's first read can come back before its on_mount defines the table: add_row raised
    'More values provided than there are columns' and show_only raised ValueError in the worker."""
    from textual.app import App, ComposeResult

    class One(App[None]):
        def compose(self) -> ComposeResult:
            yield VimTable(id="t")

    app = One()
    async with app.run_test() as pilot:
        table = app.query_one(VimTable)
        table.show_only(["b"])
        table.set_rows([("r1", ["x", "y"])])
        table.define([("a", "a"), ("b", "b")])
        await pilot.pause()
        assert [str(c.label) for c in table.ordered_columns] == ["b"] and table.get_row_at(0) == ["y"]


async def test_a_time_column_sorts_newest_first(db_path: Path, clock: FrozenClock) -> None:
    """Times sort as their time, newest first as amounts are largest first (they sorted oldest
    first, as words: `time (UTC) ▲`)."""
    async with await Engine.open(db_path, clock=clock) as engine:
        for n, hard in enumerate(("10", "20", "30")):
            clock.advance(60_000)
            await engine.add_policy(build_policy(scope="global", metric="usd", window="day", hard=hard,
                                                 name=f"P{n}", policy_id=f"p{n}"))
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=3600)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.press("7")
        await _settle(pilot, app)
        table = app.screen.query_one("#audit-table", VimTable)
        table.focus()
        await pilot.press("s", "s")  # #, then time (UTC)
        keys = [str(c.key.value) for c in table.ordered_columns]
        assert "time (UTC) ▼" in str(table.ordered_columns[keys.index("time (UTC)")].label)
        times = _column(table, "time (UTC)")
        assert times == sorted(times, reverse=True) and times[0] > times[-1]


async def test_a_budgets_chart_says_it_shows_the_window_so_far(db_path: Path, clock: FrozenClock) -> None:
    """The chart under Budgets draws the window's running total, and said `$ per 8 hours` as if
    each point were that bucket's own spend."""
    from tui.widgets.timeline import Timeline

    await _three_budgets(db_path, clock)
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=3600)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.press("3")
        await _settle(pilot, app)
        unit = app.screen.query_one("#budget-chart", Timeline).unit
        assert unit.startswith("$ in the window so far, every ") and " per " not in unit
