"""Overview: today's and this month's spend, the budgets nearest their limits, the models
that spent most in the last 24 hours, the last 24 hours of spend, open override requests and
active alerts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Static

from engine.budgets import Outcome
from engine.clock import DAY_MS, HOUR_MS, iso, period_range
from engine.ledger import BreakdownRow, TimelinePoint, Totals
from engine.money import format_usd, format_usd_compact
from tui.screens.base import DataScreen
from tui.widgets.gauge import gauge
from tui.widgets.kpi import KpiTile, compact
from tui.widgets.timeline import Timeline
from tui.widgets.vim_table import Cell, VimTable, right, short, sortable

if TYPE_CHECKING:
    from engine.alerts import Alert
    from engine.budgets import Forecast
    from engine.engine import Engine, GatewayStatus


@dataclass(frozen=True, slots=True)
class OverviewData:
    today: Totals
    month: Totals
    last_30d: Totals
    last_24h: Totals
    burn_per_hour: int
    month_forecast: int
    budgets: list[Outcome]
    forecasts: dict[str, Forecast]
    timeline: list[TimelinePoint]
    timeline_span: tuple[int, int]  # the last 24 hours, to now
    top_models: list[BreakdownRow]
    alerts: list[Alert]
    open_requests: int
    gateways: list[GatewayStatus]


TOP_MODELS = 8


class OverviewScreen(DataScreen):
    TITLE_TEXT = "Overview"

    def body(self) -> ComposeResult:
        with Horizontal(id="kpis"):
            yield KpiTile("Today", id="kpi-today")
            yield KpiTile("This month", id="kpi-month")
            yield KpiTile("Tokens 30d", id="kpi-tokens")
            yield KpiTile("Calls 30d", id="kpi-requests")
            yield KpiTile("Errors 24h", id="kpi-errors")
            yield KpiTile("Burn rate", id="kpi-burn")
        yield Static("", id="empty")
        with Horizontal(id="overview-main"):
            with Vertical(id="overview-left"):
                yield Static("Budgets nearest their limits", classes="section-title")
                yield VimTable(id="budgets")
                yield Static("Top models, last 24 hours  (2 breaks it down)", classes="section-title",
                             id="overview-models-title")
                yield VimTable(id="overview-models")
                yield Static("Active alerts  (4 lists them all)", classes="section-title", id="overview-alerts-title")
                yield VimTable(id="overview-alerts")
            with Vertical(id="overview-right"):
                yield Static("Spend, last 24 hours", classes="section-title")
                yield Timeline(id="timeline")
        yield Static("", id="attention")

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#budgets", VimTable).define(
            [("policy", "policy"), ("gauge", "gauge"), ("spent", right("spent")), ("limit", right("limit")),
             ("forecast", right("forecast"))])
        self.query_one("#overview-alerts", VimTable).define([("time", "time (UTC)"), ("message", "message")])
        self.query_one("#overview-models", VimTable).define(
            [("model", "model")] + [(c, right(c)) for c in ("spend", "calls", "errors", "share")])

    async def load(self, engine: Engine) -> Any:
        now = engine.now_ms()
        status = await engine.policy_status()
        forecasts = {f.policy.id: f for f in await engine.forecasts()}
        month = await engine.totals(*period_range("month", now))
        spend = await engine.spend_forecast()  # this month at the last hour's pace
        return OverviewData(
            today=await engine.totals(*period_range("today", now)),
            month=month,
            last_30d=await engine.totals(now - 30 * DAY_MS, now + 1),
            last_24h=await engine.totals(now - DAY_MS, now + 1),
            burn_per_hour=spend.burn_per_hour,
            month_forecast=spend.projected,
            budgets=sorted(status, key=lambda o: -(o.consumed + o.held) / max(o.policy.hard, 1))[:8],
            forecasts=forecasts,
            timeline=await engine.timeline(now - DAY_MS, now + 1, HOUR_MS),
            timeline_span=(now - DAY_MS, now + 1),
            top_models=await engine.breakdown(now - DAY_MS, now + 1, "model", limit=TOP_MODELS, order="cost"),
            alerts=await engine.alerts(limit=50),
            open_requests=await engine.open_override_requests(),
            gateways=await engine.gateways(),
        )

    def show(self, data: OverviewData) -> None:
        self.query_one("#kpi-today", KpiTile).show(format_usd(data.today.cost_nanos),
                                                   f"{data.today.requests:,} calls")
        self.query_one("#kpi-month", KpiTile).show(format_usd(data.month.cost_nanos),
                                                   f"{compact(data.month.requests)} calls")
        output = compact(data.last_30d.output_tokens)
        self.query_one("#kpi-tokens", KpiTile).show(compact(data.last_30d.tokens),
                                                    f"{output} out" if self.narrow else f"{output} output")
        unpriced = data.last_30d.unpriced
        self.query_one("#kpi-requests", KpiTile).show(f"{data.last_30d.requests:,}",
                                                      f"{unpriced:,} unpriced" if unpriced else "all priced")
        self.query_one("#kpi-errors", KpiTile).show(f"{100 * data.last_24h.error_rate:.1f}%",
                                                    f"{data.last_24h.errors:,} failed")
        burn = self.query_one("#kpi-burn", KpiTile)
        burn.query_one(".kpi-label", Static).update("Burn rate" if self.narrow else "Burn, month-end")
        burn.show(f"{format_usd_compact(data.burn_per_hour)}/h", f"→ {format_usd_compact(data.month_forecast)}")
        burn.tooltip = "Spend per hour over the last hour, and the month's total if that pace holds"
        empty = self.query_one("#empty", Static)
        empty.display = data.last_30d.requests == 0
        empty.update("[b]No usage in the last 30 days.[/b]  Get data in with [b]budgeteer import FILE[/b] "
                     "(JSONL or CSV events), or try [b]budgeteer demo --open[/b] for a month of example traffic.")
        table = self.query_one("#budgets", VimTable)
        rows = []
        colors, width = self.gauge_colors(), self.gauge_width()
        for o in data.budgets:
            p = o.policy
            f = data.forecasts.get(p.id)
            rows.append((p.id, [short(p.name, self.name_width()),
                                Cell(gauge(o.consumed, o.held, p.hard, p.soft, width, colors),
                                     (o.consumed + o.held) * 10_000 // max(p.hard, 1)),
                                sortable(p.format_short(o.consumed), o.consumed),
                                sortable(p.format_short(p.hard), p.hard),
                                sortable(p.format_short(f.projected), f.projected) if f else right("-")]))
        if not rows:
            rows.append(("none", ["no budgets yet: press 3, then a to add one", "", "", "", ""]))
        table.set_rows(rows)
        self.query_one("#timeline", Timeline).show_points(
            [(p.bucket_ms, p.totals.cost_nanos) for p in data.timeline], metric="usd", bucket_ms=HOUR_MS,
            span=data.timeline_span)
        spent = data.last_24h.cost_nanos
        self.query_one("#overview-models", VimTable).set_rows(
            [(r.key, [r.key or "(none)", sortable(format_usd(r.totals.cost_nanos), r.totals.cost_nanos),
                      right(f"{r.totals.requests:,}"), right(f"{r.totals.errors:,}"),
                      right(f"{100 * r.totals.cost_nanos / spent:.1f}%" if spent else "-")])
             for r in data.top_models] or [("none", ["no calls in the last 24 hours", "", "", "", ""])])
        self.query_one("#overview-alerts", VimTable).set_rows(
            [(str(a.id), [iso(a.ts_ms)[5:16].replace("T", " "), a.message]) for a in data.alerts]
            or [("none", ["", "No active alerts."])])
        # 80 columns have no room for the alerts table: the line under the panes carries them.
        alerts = "; ".join(a.message for a in data.alerts[:2]) if self.narrow else ""
        self.query_one("#attention", Static).update(
            f"{gateway_line(data.gateways)}    [b]Open override requests:[/b] {data.open_requests}    "
            f"[b]Active alerts:[/b] {len(data.alerts)}{': ' + alerts if alerts else ''}")


def gateway_line(gateways: list[GatewayStatus]) -> str:
    """Whether a gateway serves this ledger, its request rate and error rate over the last minute."""
    if not gateways:
        return "[b]Gateway:[/b] none running on this ledger"
    requests = sum(g.requests_last_min for g in gateways)
    errors = sum(g.errors_last_min for g in gateways)
    where = ", ".join(g.address or f"pid {g.pid}" for g in gateways)
    rate = f"{100 * errors / requests:.1f}% errors" if requests else "no errors"
    return f"[b]Gateway:[/b] {where} · {requests:,} req/min · {rate}"
