"""Budgets: every policy as a gauge with its soft and hard marks, consumed, soft and hard
limits, forecast, mode and action; under the table, the selected policy's window so far
against its limits; add, edit, remove, and backtest a policy from here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Static

from engine.budgets import Forecast, Outcome, Policy
from engine.clock import DAY_MS, MINUTE_MS, iso
from tui.messages import BACKTESTS
from tui.screens.base import DataScreen
from tui.screens.confirm import ConfirmModal
from tui.screens.message import MessageModal
from tui.screens.policy_form import PolicyForm
from tui.widgets.gauge import gauge
from tui.widgets.timeline import Timeline
from tui.widgets.vim_table import Cell, VimTable, right, short, sortable

if TYPE_CHECKING:
    from engine.engine import Engine


@dataclass(frozen=True, slots=True)
class BudgetsData:
    status: list[Outcome]
    forecasts: dict[str, Forecast]
    charted: str | None = None  # the policy whose window ``consumption`` draws
    consumption: tuple[tuple[int, int], ...] = ()
    bucket_ms: int = 0
    span: tuple[int, int] | None = None  # the charted window so far: its start to now


COLUMNS = ("policy", "scope", "window", "gauge", "spent", "held", "soft", "hard", "forecast", "hits limit", "mode",
           "action")
NARROW_COLUMNS = ("policy", "gauge", "spent", "hard", "mode")
# Beside the details pane (140-189 columns): held shows in the gauge (▒), the window in the
# chart's title, all three in the pane.
WIDE_COLUMNS = tuple(c for c in COLUMNS if c not in ("held", "hits limit", "window"))
CHART_POINTS = 60
#: Bucket sizes for a budget's chart: each divides a day (minutes, then hours).
CHART_BUCKETS = tuple(m * MINUTE_MS for m in (1, 2, 5, 10, 15, 30)) + tuple(
    h * 3_600_000 for h in (1, 2, 3, 4, 6, 8, 12, 24))


class BudgetsScreen(DataScreen):
    TITLE_TEXT = "Budgets"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "add", "Add", id="budgets.add"),
        Binding("e", "edit", "Edit", id="budgets.edit"),
        Binding("d", "delete", "Delete", id="budgets.delete"),
        Binding("b", "backtest", "Backtest 30d", id="budgets.backtest"),
        Binding("enter", "detail", "Details", show=False, id="budgets.detail"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.policies: dict[str, Policy] = {}
        self.data: BudgetsData | None = None

    def body(self) -> ComposeResult:
        yield Static("", id="budgets-title", classes="section-title")
        yield VimTable(id="policies")
        yield Static("", id="budget-chart-title", classes="section-title")
        yield Timeline(id="budget-chart")

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#policies", VimTable).define(
            [(c, right(c) if c in ("spent", "held", "soft", "hard", "forecast", "hits limit") else c)
             for c in COLUMNS])

    async def load(self, engine: Engine) -> Any:
        status = await engine.policy_status()
        forecasts = {f.policy.id: f for f in await engine.forecasts()}
        selected = self.query_one("#policies", VimTable).current_key
        o = next((o for o in status if o.policy.id == selected), status[0] if status else None)
        if o is None:
            return BudgetsData(status, forecasts)
        now = engine.now_ms()
        # A bucket that divides a day, so a window starting on the hour starts a bucket: the
        # chart begins at the window's start, never with the end of the window before it.
        wanted = (now - o.window_start_ms) // CHART_POINTS
        bucket = next((b for b in CHART_BUCKETS if b >= wanted), CHART_BUCKETS[-1])
        points = [(b, v) for b, v in await engine.policy_timeline(o.policy, o.window_start_ms, now + 1, bucket)
                  if b >= o.window_start_ms - o.window_start_ms % bucket]
        start = o.window_start_ms - o.window_start_ms % bucket
        return BudgetsData(status, forecasts, o.policy.id, tuple(points), bucket, (start, now + 1))

    @on(DataTable.RowHighlighted, "#policies")
    def _follow(self, event: DataTable.RowHighlighted) -> None:
        """The chart under the table follows the cursor. A highlight of a row the cursor has left
        already is stale: setting the rows again passes the cursor over the first row on its way
        back to its own, and following that one read again, set the rows again, and so on: a
        read loop at 100 % CPU whenever the cursor was not on the first row."""
        if event.row_key.value != self.query_one("#policies", VimTable).current_key:
            return
        if self.data is not None and event.row_key.value != self.data.charted and event.row_key.value in self.policies:
            self.reload(restart=True)

    def show(self, data: BudgetsData) -> None:
        self.policies = {o.policy.id: o.policy for o in data.status}
        self.data = data
        self.query_one("#budgets-title", Static).update(
            f"{len(data.status)} policies   [b]a[/b] add   [b]e[/b] edit   [b]d[/b] delete   "
            "[b]b[/b] backtest the last 30 days")
        rows = []
        colors, width = self.gauge_colors(), self.gauge_width()
        for o in data.status:
            p = o.policy
            f = data.forecasts.get(p.id)
            fmt = p.format_short
            hits = "-"
            if f is not None and f.limit_at_ms is not None:
                hits = "now" if f.limit_at_ms <= o.window_start_ms or f.consumed >= p.hard else (
                    iso(f.limit_at_ms)[5:16].replace("T", " "))
            rows.append((p.id, [short(p.name, self.name_width()), str(p.scope), str(p.window),
                                Cell(gauge(o.consumed, o.held, p.hard, p.soft, width, colors),
                                     (o.consumed + o.held) * 10_000 // max(p.hard, 1)),
                                sortable(fmt(o.consumed), o.consumed), sortable(fmt(o.held), o.held),
                                sortable(fmt(p.soft), p.soft) if p.soft is not None else right("-"),
                                sortable(fmt(p.hard), p.hard),
                                sortable(fmt(f.projected), f.projected) if f else right("-"),
                                Cell(right(hits), None if hits == "-" else f.limit_at_ms if f else None),
                                p.mode if p.enabled else "off", p.action]))
        if not rows:
            rows = [("none", ["No budgets yet: press a to add one.", *[""] * (len(COLUMNS) - 1)])]
        table = self.query_one("#policies", VimTable)
        table.show_only(NARROW_COLUMNS if self.narrow else None if self.size.width >= 190 else WIDE_COLUMNS)
        table.set_rows(rows)
        self._chart(data)

    def _chart(self, data: BudgetsData) -> None:
        """The charted policy's window so far, against its soft and hard limits."""
        title = self.query_one("#budget-chart-title", Static)
        chart = self.query_one("#budget-chart", Timeline)
        o = next((o for o in data.status if o.policy.id == data.charted), None)
        chart.display = title.display = o is not None
        if o is None:
            return
        p = o.policy
        marks = f"soft {p.format_short(p.soft)}, " if p.soft is not None else ""
        since = iso(o.window_start_ms)[5:16].replace("T", " ")
        title.update(f"{p.name}, {p.window} window since {since}: {marks}hard {p.format_short(p.hard)}")
        lines = [("hard", p.hard)] + ([("soft", p.soft)] if p.soft is not None else [])
        chart.show_series([(p.name, list(data.consumption))], metric=p.metric, lines=lines,
                          bucket_ms=data.bucket_ms, span=data.span, running=True)

    def _selected(self) -> Policy | None:
        return self.policies.get(self.query_one("#policies", VimTable).current_key or "")

    def detail(self) -> tuple[str, str] | None:
        """Everything about the selected policy, the columns an 80-column table leaves out included."""
        policy = self._selected()
        if policy is None or self.data is None:
            return None
        o = next(o for o in self.data.status if o.policy.id == policy.id)
        f = self.data.forecasts.get(policy.id)
        fmt = policy.format_amount
        lines = [
            f"id              {policy.id}",
            f"scope           {policy.scope}",
            f"metric, window  {policy.metric}, {policy.window} ({policy.window.tz})",
            f"window          {iso(o.window_start_ms)} to {iso(o.window_end_ms)}",
            f"consumed        {fmt(o.consumed)}",
            f"held            {fmt(o.held)} (calls in flight)",
            f"soft limit      {fmt(policy.soft) if policy.soft is not None else '-'}",
            f"hard limit      {fmt(policy.hard)}  on reaching it: {policy.action}",
            f"mode            {policy.mode}{'' if policy.enabled else ' (disabled)'}",
            f"alerts at       {', '.join(f'{t}%' for t in policy.thresholds)} of the hard limit",
        ]
        if f is not None:
            lines.append(f"forecast        {fmt(f.projected)} by the window's end")
            if f.limit_at_ms is not None:
                lines.append(f"limit reached   {iso(f.limit_at_ms)} at the current pace")
        lines.append(f"created         {iso(policy.created_ms)} by {policy.created_by or '-'}")
        return (policy.name, "\n".join(lines))

    def _writable(self) -> bool:
        if self.bapp.read_only:
            self.notify("Read-only mode: policies cannot be changed here", severity="warning")
            return False
        return True

    def action_add(self) -> None:
        if self._writable() and self.bapp.engine is not None:
            self.app.push_screen(PolicyForm(actor=self.bapp.actor, now_ms=self.bapp.engine.now_ms()),
                                 self._saved_new)

    def action_edit(self) -> None:
        policy = self._selected()
        if policy is not None and self._writable() and self.bapp.engine is not None:
            self.app.push_screen(PolicyForm(policy, actor=self.bapp.actor, now_ms=self.bapp.engine.now_ms()),
                                 self._saved_edit)

    def _saved_new(self, policy: Policy | None) -> None:
        if policy is not None and (engine := self.bapp.engine) is not None:
            self.change(lambda: engine.add_policy(policy), f"Added {policy.name}")

    def _saved_edit(self, policy: Policy | None) -> None:
        if policy is not None and (engine := self.bapp.engine) is not None:
            self.change(lambda: engine.update_policy(policy), f"Saved {policy.name}")

    def action_delete(self) -> None:
        policy = self._selected()
        if policy is None or not self._writable():
            return

        def answer(yes: bool | None) -> None:
            if yes and (engine := self.bapp.engine) is not None:
                self.change(lambda: engine.remove_policy(policy.id), f"Removed {policy.name}")

        self.app.push_screen(ConfirmModal(f"Remove the policy {policy.name!r}?"), answer)

    def action_backtest(self) -> None:
        policy = self._selected()
        if policy is not None:
            self._backtest(policy)

    @work(exclusive=True, group=BACKTESTS, description="Not backtested", exit_on_error=False)
    async def _backtest(self, policy: Policy) -> None:
        """The last 30 days replayed against the policy, in a worker: keys work while it runs (up
        to a second on a large ledger) and a newer backtest replaces it."""
        engine = self.bapp.engine
        if engine is None:
            return
        now = engine.now_ms()
        result = await engine.backtest(policy, now - 30 * DAY_MS, now + 1)
        fmt = policy.format_amount
        first = iso(result.first_block_ms) if result.first_block_ms is not None else "never"
        self.app.push_screen(MessageModal(f"Backtest of {policy.name}, last 30 days", "\n".join([
            f"calls in scope        {result.calls:,}",
            f"would have blocked    {result.blocked:,} (first: {first})",
            f"would have saved      {fmt(result.prevented)} of {fmt(result.prevented + result.allowed_total)}",
            f"windows it blocked in {result.windows_hit:,}",
            f"soft-limit crossings  {result.soft_crossings:,}",
        ])))
