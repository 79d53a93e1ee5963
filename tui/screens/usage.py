"""Usage: a timeline of spend, tokens or requests over 1h to 90d, grouped by model,
provider, team or principal, with a policy's soft and hard lines, a breakdown beside
it, and export of what is shown."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.widgets import Static

from engine.budgets import Policy
from engine.clock import DAY_MS, HOUR_MS, MINUTE_MS
from engine.money import format_usd
from engine.store import BreakdownRow, TimelinePoint, Totals
from tui.screens.base import DataScreen
from tui.widgets.kpi import compact
from tui.widgets.timeline import Timeline
from tui.widgets.vim_table import VimTable, right

if TYPE_CHECKING:
    from engine.engine import Engine

#: period -> (span, bucket): buckets chosen so every read stays well under 50 ms
PERIODS = {"1h": (HOUR_MS, MINUTE_MS), "24h": (DAY_MS, 15 * MINUTE_MS), "7d": (7 * DAY_MS, HOUR_MS),
           "30d": (30 * DAY_MS, DAY_MS), "90d": (90 * DAY_MS, DAY_MS)}
GROUPS = ("model", "provider", "team", "principal")
METRICS = ("usd", "tokens", "requests")


def metric_of(t: Totals, metric: str) -> int:
    return t.cost_nanos if metric == "usd" else t.tokens if metric == "tokens" else t.requests


@dataclass(frozen=True, slots=True)
class UsageData:
    points: list[TimelinePoint]
    rows: list[BreakdownRow]
    total: Totals
    policy: Policy | None
    consumption: list[tuple[int, int]]  # the selected policy's window, bucket by bucket


class UsageScreen(DataScreen):
    TITLE_TEXT = "Usage"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("t", "cycle_period", "Period", id="usage.period"),
        Binding("b", "cycle_group", "Group by", id="usage.group"),
        Binding("m", "cycle_metric", "Metric", id="usage.metric"),
        Binding("l", "cycle_policy", "Budget lines", id="usage.policy"),
        Binding("x", "export", "Export", id="usage.export"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.period = "24h"
        self.group = "model"
        self.metric = "usd"
        self.policy_index = -1  # -1: no budget lines
        self.policies: list[Policy] = []
        self.last: UsageData | None = None

    def body(self) -> ComposeResult:
        yield Static("", id="usage-controls")
        with Horizontal(id="usage-main"):
            yield Timeline(id="usage-timeline")
            yield VimTable(id="breakdown")

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#breakdown", VimTable).define(
            [("name", "name")] + [(name, right(name)) for name in ("spend", "tokens", "calls", "share")])
        self._controls()

    def _controls(self) -> None:
        policy = self.policies[self.policy_index].name if 0 <= self.policy_index < len(self.policies) else "none"
        if 0 <= self.policy_index < len(self.policies):
            policy = f"{policy}: its window against its limits"
        if self.size.width and self.size.width < 110:  # 80 columns: the footer names the keys
            text = (f"[b]t[/b] [reverse] {self.period} [/]  [b]b[/b] [reverse] {self.group} [/]  "
                    f"[b]m[/b] [reverse] {self.metric} [/]  [b]l[/b] [reverse] {policy[:24]} [/]  [b]x[/b] export")
        else:
            text = (f"[b]t[/b] period [reverse] {self.period} [/]   [b]b[/b] by [reverse] {self.group} [/]   "
                    f"[b]m[/b] metric [reverse] {self.metric} [/]   [b]l[/b] budget lines [reverse] {policy} [/]   "
                    "[b]x[/b] export")
        self.query_one("#usage-controls", Static).update(text)

    def on_resize(self) -> None:
        super().on_resize()
        self._controls()

    def _cycle(self, values: tuple[str, ...], current: str) -> str:
        return values[(values.index(current) + 1) % len(values)]

    def action_cycle_period(self) -> None:
        self.period = self._cycle(tuple(PERIODS), self.period)
        self._changed()

    def action_cycle_group(self) -> None:
        self.group = self._cycle(GROUPS, self.group)
        self._changed()

    def action_cycle_metric(self) -> None:
        self.metric = self._cycle(METRICS, self.metric)
        self._changed()

    def action_cycle_policy(self) -> None:
        self.policy_index = self.policy_index + 1 if self.policy_index + 1 < len(self.policies) else -1
        self._changed()

    def _changed(self) -> None:
        self._controls()
        self.reload()

    async def load(self, engine: Engine) -> Any:
        self.policies = await engine.policies()
        span, bucket = PERIODS[self.period]
        now = engine.now_ms()
        start, end = now - span, now + 1
        policy = self.policies[self.policy_index] if 0 <= self.policy_index < len(self.policies) else None
        order = {"usd": "cost", "tokens": "tokens", "requests": "requests"}[self.metric]
        return UsageData(
            points=await engine.timeline(start, end, bucket, group_by=self.group),
            rows=await engine.breakdown(start, end, self.group, limit=25, order=order),  # type: ignore[arg-type]
            total=await engine.totals(start, end),
            policy=policy,
            consumption=await engine.policy_timeline(policy, start, end, bucket) if policy else [],
        )

    def show(self, data: UsageData) -> None:
        self.last = data
        self._controls()
        top = [r.key for r in data.rows[:6]]
        series = []
        for key in top:
            series.append((key or "(none)", [(p.bucket_ms, metric_of(p.totals, self.metric))
                                             for p in data.points if p.group == key]))
        timeline = self.query_one("#usage-timeline", Timeline)
        p = data.policy
        if p is None:
            timeline.show_series(series, metric=self.metric)
        else:  # what the policy's window held over time, against its limits
            lines = [("hard", p.hard)] + ([("soft", p.soft)] if p.soft is not None else [])
            marks = f"soft {p.format_short(p.soft)} (lower line), hard" if p.soft is not None else "hard"
            timeline.show_series([(f"{p.name}, {p.window} window; {marks} {p.format_short(p.hard)}",
                                   data.consumption)], metric=p.metric, lines=lines, force_legend=True)
        table = self.query_one("#breakdown", VimTable)
        total = metric_of(data.total, self.metric)
        table.set_rows([(r.key, [r.key or "(none)", right(format_usd(r.totals.cost_nanos)),
                                 right(compact(r.totals.tokens)), right(f"{r.totals.requests:,}"),
                                 right(f"{100 * metric_of(r.totals, self.metric) / total:.1f}%" if total else "-")])
                        for r in data.rows])

    def action_export(self) -> None:
        """Write the breakdown on screen to a CSV file in the current folder."""
        from engine.integrations.files import neutralise

        if self.last is None:
            return
        path = Path.cwd() / f"budgeteer-usage-{self.period}-by-{self.group}.csv"
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
