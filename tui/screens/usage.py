"""Usage: a timeline of spend, tokens or requests over a rolling or calendar period, grouped by
model, provider, team, principal, token, workspace, agent or session, with a policy's soft and
hard lines, a breakdown beside it, a drill-down into any of its rows, and export of what is shown."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from rich.markup import escape
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Input, OptionList, Static

from engine.budgets import Policy
from engine.clock import DAY_MS, HOUR_MS, MINUTE_MS, period_range
from engine.ledger import BreakdownRow, TimelinePoint, Totals
from engine.models import FieldError
from engine.money import format_usd
from tui.screens.base import DataScreen
from tui.widgets.kpi import compact
from tui.widgets.timeline import MAX_SERIES, Timeline
from tui.widgets.vim_table import VimTable, right

if TYPE_CHECKING:
    from engine.engine import Engine

#: rolling periods, cycled by t: period -> (span, bucket); buckets keep every read well under 50 ms
PERIODS = {"1h": (HOUR_MS, MINUTE_MS), "24h": (DAY_MS, 15 * MINUTE_MS), "7d": (7 * DAY_MS, HOUR_MS),
           "30d": (30 * DAY_MS, DAY_MS), "90d": (90 * DAY_MS, DAY_MS)}
#: calendar periods, picked with T (UTC), beside a typed range of days
CALENDAR = ("today", "this week", "this month", "last month")
GROUPS = ("model", "provider", "team", "principal", "token_id", "workspace", "agent", "session")
METRICS = ("usd", "tokens", "requests")
#: enter on a row narrows to it and breaks it down by the first of these not narrowed yet
DRILL = {"workspace": ("team", "principal", "model"), "team": ("principal", "model"),
         "principal": ("model", "session"), "model": ("principal", "team", "session"),
         "provider": ("model", "principal"), "token_id": ("model", "session"), "agent": ("session", "model"),
         "session": ("model",)}


def metric_of(t: Totals, metric: str) -> int:
    return t.cost_nanos if metric == "usd" else t.tokens if metric == "tokens" else t.requests


def bucket_for(span_ms: int) -> int:
    """The chart's bucket for a calendar period, as the rolling periods of that length have."""
    return next((bucket for span, bucket in PERIODS.values() if span_ms <= span), DAY_MS)


def period_bounds(period: str, now_ms: int) -> tuple[int, int, int]:
    """(start, end, bucket) of a rolling or calendar period, or a range of days."""
    if period in PERIODS:
        span, bucket = PERIODS[period]
        return now_ms - span, now_ms + 1, bucket
    start, end = period_range(period, now_ms)
    end = min(end, now_ms + 1)  # a period under way ends now
    return start, end, bucket_for(end - start)


@dataclass(frozen=True, slots=True)
class UsageData:
    points: list[TimelinePoint]
    rows: list[BreakdownRow]
    total: Totals
    policy: Policy | None
    consumption: list[tuple[int, int]]  # the selected policy's window, bucket by bucket
    span: tuple[int, int]
    bucket_ms: int
    view: tuple[str, tuple[tuple[str, str], ...]]  # the group and drill-down path it was read for


class PeriodModal(ModalScreen[str | None]):
    """Pick a calendar period, or type a range of days; a bad range is an error under it."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel", id="period.cancel")]

    def __init__(self, now_ms: int) -> None:
        super().__init__()
        self.now_ms = now_ms

    def compose(self) -> ComposeResult:
        with Vertical(classes="modal period", id="period-modal"):
            yield Static("[b]Period[/b]  enter picks, tab to type a range, esc cancels", classes="modal-title")
            yield OptionList(*CALENDAR, id="period-options")
            yield Input(placeholder="a range of days: 2026-11-01..2026-11-15", id="period-range")
            yield Static("", id="period-error", classes="field-error")

    def on_mount(self) -> None:
        self.query_one("#period-error", Static).display = False
        self.query_one("#period-options", OptionList).focus()

    @on(OptionList.OptionSelected)
    def _picked(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(CALENDAR[event.option_index])

    @on(Input.Submitted, "#period-range")
    def _typed(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        error = self.query_one("#period-error", Static)
        try:
            if ".." not in text:
                raise FieldError("period", f"type two days as YYYY-MM-DD..YYYY-MM-DD, not {text!r}")
            period_range(text, self.now_ms)
        except FieldError as exc:
            error.update(escape(str(exc)))
            error.display = True
            return
        self.dismiss(text)

    def action_cancel(self) -> None:
        self.dismiss(None)


class UsageScreen(DataScreen):
    TITLE_TEXT = "Usage"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("t", "cycle_period", "Period", id="usage.period"),
        Binding("T", "pick_period", "Calendar period", show=False, id="usage.calendar"),
        Binding("b", "cycle_group", "Group by", id="usage.group"),
        Binding("m", "cycle_metric", "Metric", id="usage.metric"),
        Binding("l", "cycle_policy", "Budget lines", id="usage.policy"),
        Binding("x", "export", "Export", id="usage.export"),
        Binding("enter", "drill", "Drill down", show=False, id="usage.drill"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.period = "24h"
        self.group = "model"
        self.metric = "usd"
        self.policy_index = -1  # -1: no budget lines
        self.policies: list[Policy] = []
        self.last: UsageData | None = None
        #: the drill-down, outermost first: (dimension, value); climbing back groups by dimension again
        self.path: list[tuple[str, str]] = []
        self._drill_pending = False  # enter came before the rows of the group asked for

    def body(self) -> ComposeResult:
        yield Static("", id="usage-controls")
        yield Static("", id="usage-path")
        with Horizontal(id="usage-main"):
            with Horizontal(id="usage-chart"):
                yield Timeline(id="usage-timeline", legend="usage-legend")
                yield Static("", id="usage-legend")
            yield VimTable(id="breakdown")

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#breakdown", VimTable).define(
            [("name", "name")] + [(name, right(name)) for name in ("spend", "tokens", "calls", "share")])
        self._controls()

    def _view(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        return self.group, tuple(self.path)

    @property
    def filters(self) -> dict[str, str]:
        return dict(self.path)

    def breadcrumb(self) -> str:
        """``all › team=search › principal=alice``, then what the rows are."""
        steps = " › ".join(["all", *(f"{dim}={value or '(none)'}" for dim, value in self.path)])
        return f"{steps}   by {self.group}"

    def _controls(self) -> None:
        policy = self.policies[self.policy_index].name if 0 <= self.policy_index < len(self.policies) else "none"
        if 0 <= self.policy_index < len(self.policies):
            policy = f"{policy}: its window against its limits"
        if self.size.width and self.size.width < 110:  # 80 columns: the footer names the keys
            text = (f"[b]t[/b]/[b]T[/b] [reverse] {self.period} [/]  [b]b[/b] [reverse] {self.group} [/]  "
                    f"[b]m[/b] [reverse] {self.metric} [/]  [b]l[/b] [reverse] {policy[:16]} [/]")
        else:
            text = (f"[b]t[/b] period [reverse] {self.period} [/]  [b]T[/b] calendar   [b]b[/b] by "
                    f"[reverse] {self.group} [/]   [b]m[/b] metric [reverse] {self.metric} [/]   "
                    f"[b]l[/b] budget lines [reverse] {policy} [/]   [b]x[/b] export")
        self.query_one("#usage-controls", Static).update(text)
        back = "   [dim]enter narrows to a row" + (", esc climbs back" if self.path else "") + "[/dim]"
        if self.size.width and self.size.width < 110:  # 80 columns: the path alone
            back = ""
        self.query_one("#usage-path", Static).update(escape(self.breadcrumb()) + back)

    def on_resize(self) -> None:
        super().on_resize()
        self._controls()

    def _cycle(self, values: tuple[str, ...], current: str) -> str:
        return values[(values.index(current) + 1) % len(values)] if current in values else values[0]

    def action_cycle_period(self) -> None:
        self.period = self._cycle(tuple(PERIODS), self.period)
        self._changed()

    def action_pick_period(self) -> None:
        engine = self.bapp.engine
        now = engine.now_ms() if engine is not None else 0

        def chosen(period: str | None) -> None:
            if period:
                self.period = period
                self._changed()

        self.app.push_screen(PeriodModal(now), chosen)

    def action_cycle_group(self) -> None:
        narrowed = set(self.filters)
        choices = tuple(g for g in GROUPS if g not in narrowed)
        self.group = self._cycle(choices, self.group)
        self._changed()

    def action_cycle_metric(self) -> None:
        self.metric = self._cycle(METRICS, self.metric)
        self._changed()

    def action_cycle_policy(self) -> None:
        self.policy_index = self.policy_index + 1 if self.policy_index + 1 < len(self.policies) else -1
        self._changed()

    def action_drill(self) -> None:
        """Narrow chart and table to the row under the cursor; break it down by the next dimension."""
        if self.last is None or self.last.view != self._view():
            self._drill_pending = True  # `b b enter` typed quickly: drill into the new rows when they come
            return
        table = self.query_one("#breakdown", VimTable)
        key = table.current_key
        if key is None or key not in {r.key for r in self.last.rows}:
            return
        narrowed = {*self.filters, self.group}
        following = next((d for d in DRILL[self.group] if d not in narrowed), None)
        if following is None:
            self.notify(f"{self.group}={key or '(none)'} is as narrow as it goes", severity="warning")
            return
        self.path.append((self.group, key))
        self.group = following
        self._changed()

    def action_clear_filter(self) -> None:
        """esc: leave the filter box first; then climb one level of the drill-down."""
        box = self.query_one("#filter", Input)
        if box.display or box.value or not self.path:
            super().action_clear_filter()
            self._draw_chart()
            return
        self.group, value = self.path.pop()
        self.query_one("#breakdown", VimTable).select(value)
        self._changed()

    @on(DataTable.RowSelected, "#breakdown")
    def _row_drilled(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_drill()

    @on(Input.Changed, "#filter")
    def _chart_filter(self) -> None:
        self._draw_chart()

    def _changed(self) -> None:
        self._controls()
        self.reload(restart=True)

    async def load(self, engine: Engine) -> Any:
        self.policies = await engine.policies()
        start, end, bucket = period_bounds(self.period, engine.now_ms())
        policy = self.policies[self.policy_index] if 0 <= self.policy_index < len(self.policies) else None
        order = {"usd": "cost", "tokens": "tokens", "requests": "requests"}[self.metric]
        filters = self.filters or None
        return UsageData(
            points=await engine.timeline(start, end, bucket, group_by=self.group, filters=filters),
            rows=await engine.breakdown(start, end, self.group, limit=25, order=order,  # type: ignore[arg-type]
                                        filters=filters),
            total=await engine.totals(start, end, filters),
            policy=policy,
            consumption=await engine.policy_timeline(policy, start, end, bucket) if policy else [],
            span=(start, end),
            bucket_ms=bucket,
            view=self._view(),
        )

    def show(self, data: UsageData) -> None:
        self.last = data
        self._controls()
        self._draw_chart()
        table = self.query_one("#breakdown", VimTable)
        total = metric_of(data.total, self.metric)
        table.set_rows([(r.key, [r.key or "(none)", right(format_usd(r.totals.cost_nanos)),
                                 right(compact(r.totals.tokens)), right(f"{r.totals.requests:,}"),
                                 right(f"{100 * metric_of(r.totals, self.metric) / total:.1f}%" if total else "-")])
                        for r in data.rows])
        if self._drill_pending and data.view == self._view():
            self._drill_pending = False
            self.action_drill()

    def _draw_chart(self) -> None:
        """The largest groups as series, those whose name matches the filter when one is typed."""
        data = self.last
        if data is None:
            return
        needle = self.query_one("#filter", Input).value.strip().lower()
        ranked = [(n, r.key) for n, r in enumerate(data.rows)]  # a series keeps its colour by its rank
        shown = [(n, key) for n, key in ranked if not needle or needle in (key or "(none)").lower()][:MAX_SERIES]
        names = [key for _, key in shown]
        by_group: dict[str, list[tuple[int, int]]] = {key: [] for key in names}
        for p in data.points:
            if p.group in by_group:
                by_group[p.group].append((p.bucket_ms, metric_of(p.totals, self.metric)))
        timeline = self.query_one("#usage-timeline", Timeline)
        p = data.policy
        if p is None:
            timeline.show_series([(key or "(none)", by_group[key]) for key in names], metric=self.metric,
                                 bucket_ms=data.bucket_ms, span=data.span, styles=[n for n, _ in shown])
        else:  # what the policy's window held over time, against its limits
            lines = [("hard", p.hard)] + ([("soft", p.soft)] if p.soft is not None else [])
            timeline.show_series([(f"{p.name}, {p.window} window", data.consumption)], metric=p.metric,
                                 bucket_ms=data.bucket_ms, span=data.span, lines=lines, running=True)

    def action_export(self) -> None:
        """Write the breakdown on screen to a CSV file in the current folder."""
        from engine.integrations.files import neutralise

        if self.last is None:
            return
        where = "".join(f"-{dim}-{value or 'none'}" for dim, value in self.path)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{self.period}{where}-by-{self.group}".replace("..", "-to-"))
        path = Path.cwd() / f"budgeteer-usage-{name}.csv"
        lines = [f"{self.group},cost_nanos,tokens,requests,errors"]
        for r in self.last.rows:
            lines.append(f"\"{neutralise(r.key)}\",{r.totals.cost_nanos},{r.totals.tokens},{r.totals.requests},"
                         f"{r.totals.errors}")
        try:
            path.write_text("\n".join(lines) + "\n")
        except OSError as exc:
            self.notify(f"Could not write {path}: {exc.strerror}", severity="error")
            return
        self.notify(f"Exported {len(self.last.rows)} rows to {path}")
