"""The Budgeteer dashboard: a Textual app over one ledger.

For now one screen of the ledger's totals (spend today and this month, tokens,
requests, errors) and the top models, refreshed live; the full set of screens comes
with the dashboard issue. Data is loaded by a worker that goes through ``Engine``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Header, Static

from engine.clock import DAY_MS, Clock, period_range
from engine.engine import Engine
from engine.money import format_usd
from engine.store import BreakdownRow, StoreError, Totals
from tui.widgets.kpi import KpiTile


def compact(count: int) -> str:
    """1234 -> 1,234; 1234567 -> 1.2M: counts that fit a narrow tile."""
    for size, suffix in ((10**9, "B"), (10**6, "M")):
        if count >= size:
            return f"{count / size:,.1f}{suffix}"
    return f"{count:,}"


@dataclass(frozen=True, slots=True)
class Snapshot:
    today: Totals
    month: Totals
    last_30d: Totals
    last_24h: Totals
    models: list[BreakdownRow]


class BudgeteerApp(App[None]):
    CSS_PATH = "budgeteer.tcss"
    TITLE = "Budgeteer"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit", id="app.quit"),
        Binding("r", "refresh", "Refresh", id="app.refresh"),
        Binding("p", "toggle_pause", "Pause", id="app.pause"),
    ]

    def __init__(self, db_path: Path, clock: Clock | None = None, refresh_seconds: float = 2.0,
                 label: str | None = None) -> None:
        super().__init__()
        self.db_path = db_path
        self.label = label or str(db_path)
        self.clock = clock
        self.refresh_seconds = refresh_seconds
        self.engine: Engine | None = None
        self.fatal_error: str | None = None
        self.paused = False
        self.updated_at: float | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="main"):
            with Horizontal(id="kpis"):
                yield KpiTile("Today", id="kpi-today")
                yield KpiTile("This month", id="kpi-month")
                yield KpiTile("Tokens 30d", id="kpi-tokens")
                yield KpiTile("Calls 30d", id="kpi-requests")
                yield KpiTile("Errors 24h", id="kpi-errors")
            yield Static("", id="empty")
            yield DataTable(id="models", cursor_type="row", zebra_stripes=True)
            yield Static("Loading the ledger…", id="status")
        yield Footer()

    async def on_mount(self) -> None:
        self.sub_title = self.label
        table = self.query_one("#models", DataTable)
        table.add_column("model (30 days)")
        for name in ("requests", "tokens", "cost", "share"):
            table.add_column(Text(name, justify="right"), key=name)
        try:
            self.engine = await Engine.open(self.db_path, clock=self.clock)
        except StoreError as exc:
            self.fatal_error = str(exc)
            self.exit()
            return
        self.load()
        self.set_interval(1.0, self._tick_status)

    async def on_unmount(self) -> None:
        if self.engine is not None:
            await self.engine.close()

    def action_refresh(self) -> None:
        self.load()

    def action_toggle_pause(self) -> None:
        self.paused = not self.paused
        self._tick_status()

    @work(exclusive=True, group="load")
    async def load(self) -> None:
        """Read a snapshot; the next poll is scheduled only when this one is done."""
        engine = self.engine
        if engine is None:
            return
        try:
            now = engine.now_ms()
            snap = Snapshot(
                today=await engine.totals(*period_range("today", now)),
                month=await engine.totals(*period_range("month", now)),
                last_30d=await engine.totals(now - 30 * DAY_MS, now + 60_000),
                last_24h=await engine.totals(now - DAY_MS, now + 60_000),
                models=await engine.breakdown(now - 30 * DAY_MS, now + 60_000, "model", limit=12),
            )
        except Exception as exc:  # a ledger that cannot be read is a state, not a crash
            self.query_one("#status", Static).update(f"[b]The ledger cannot be read:[/b] {exc}")
        else:
            self.show(snap)
            self.updated_at = time.monotonic()
            self._tick_status()
        self.set_timer(self.refresh_seconds, self._poll)

    def _poll(self) -> None:
        if not self.paused:
            self.load()
        else:
            self.set_timer(self.refresh_seconds, self._poll)

    def show(self, snap: Snapshot) -> None:
        self.query_one("#kpi-today", KpiTile).show(format_usd(snap.today.cost_nanos),
                                                   f"{snap.today.requests:,} requests")
        self.query_one("#kpi-month", KpiTile).show(format_usd(snap.month.cost_nanos),
                                                   f"{snap.month.requests:,} requests")
        self.query_one("#kpi-tokens", KpiTile).show(compact(snap.last_30d.tokens),
                                                    f"{compact(snap.last_30d.output_tokens)} output")
        unpriced = snap.last_30d.unpriced
        self.query_one("#kpi-requests", KpiTile).show(f"{snap.last_30d.requests:,}",
                                                      f"{unpriced:,} unpriced" if unpriced else "all priced")
        self.query_one("#kpi-errors", KpiTile).show(f"{100 * snap.last_24h.error_rate:.1f}%",
                                                    f"{snap.last_24h.errors:,} failed")
        empty = self.query_one("#empty", Static)
        empty.display = snap.last_30d.requests == 0
        empty.update("[b]No usage in the last 30 days.[/b]\n\n"
                     "Get data in with [b]budgeteer import FILE[/b] (JSONL or CSV events), "
                     "or try [b]budgeteer demo --open[/b] for a month of example traffic.")
        table = self.query_one("#models", DataTable)
        table.display = bool(snap.models)
        table.clear()
        total = snap.last_30d.cost_nanos
        for row in snap.models:
            t = row.totals
            share = f"{100 * t.cost_nanos / total:.1f}%" if total else "-"
            cells = (f"{t.requests:,}", compact(t.tokens), format_usd(t.cost_nanos), share)
            table.add_row(row.key, *(Text(c, justify="right") for c in cells), key=row.key)

    def _tick_status(self) -> None:
        status = self.query_one("#status", Static)
        if self.updated_at is None:
            return
        age = int(time.monotonic() - self.updated_at)
        state = "[b]paused[/b] (p resumes)" if self.paused else f"refreshing every {self.refresh_seconds:g} s"
        status.update(f"updated {age} s ago · {state}")
