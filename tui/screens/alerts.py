"""Alerts: the list, each one's detail, and acknowledging them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import Static

from engine.alerts import Alert
from engine.budgets import Policy
from engine.clock import iso
from tui.screens.base import DataScreen
from tui.widgets.vim_table import VimTable, right, sortable

if TYPE_CHECKING:
    from engine.engine import Engine


class AlertsScreen(DataScreen):
    TITLE_TEXT = "Alerts"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "ack", "Acknowledge", id="alerts.ack"),
        Binding("enter", "detail", "Detail", id="alerts.detail"),
        Binding("h", "toggle_history", "Show acknowledged", id="alerts.history"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.include_acked = False
        self.alerts: dict[str, Alert] = {}
        self.policies: dict[str, Policy] = {}

    def body(self) -> ComposeResult:
        yield Static("", id="alerts-title", classes="section-title")
        yield VimTable(id="alerts-table")

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#alerts-table", VimTable).define(
            [(name, right(name) if name in ("amount", "limit") else name)
             for name in ("time (UTC)", "policy", "kind", "amount", "limit", "message", "acknowledged")])

    async def load(self, engine: Engine) -> Any:
        alerts = await engine.alerts(include_acked=self.include_acked)
        self.policies = {p.id: p for p in await engine.policies()}
        return alerts

    def _amounts(self, a: Alert) -> list[Any]:
        """What the alert is about (consumed, projected, or by how much a call overshot) and the
        hard limit, in the policy's unit: a message cut at 80 columns still leaves them."""
        p = self.policies.get(a.policy_id)
        if p is None:  # the policy was removed since
            return [right("-"), right("-")]
        return [sortable(p.format_short(a.value), a.value), sortable(p.format_short(p.hard), p.hard)]

    def show(self, data: list[Alert]) -> None:
        self.alerts = {str(a.id): a for a in data}
        which = "all alerts" if self.include_acked else "open alerts"
        self.query_one("#alerts-title", Static).update(
            f"{len(data)} {which}   [b]a[/b] acknowledge   [b]enter[/b] detail   [b]h[/b] "
            f"{'hide' if self.include_acked else 'show'} acknowledged")
        rows = [(str(a.id), [iso(a.ts_ms)[:16].replace("T", " "), a.policy_id,
                             f"{a.threshold}%" if a.kind == "threshold" else a.kind, *self._amounts(a),
                             a.message, a.acked_by or ""]) for a in data]
        if not rows:
            rows = [("none", ["", "", "", "", "", "No alerts. Budgets raise them at 50/80/100 % of a hard limit.",
                              ""])]
        table = self.query_one("#alerts-table", VimTable)
        # 80 columns: the message names the policy; enter shows everything.
        table.show_only(("time (UTC)", "kind", "amount", "limit", "message") if self.narrow else None)
        table.set_rows(rows)

    def _selected(self) -> Alert | None:
        key = self.query_one("#alerts-table", VimTable).current_key
        return self.alerts.get(key or "")

    def action_toggle_history(self) -> None:
        self.include_acked = not self.include_acked
        self.reload()

    def detail(self) -> tuple[str, str] | None:
        alert = self._selected()
        if alert is None:
            return None
        acked = f"{alert.acked_by} at {iso(alert.acked_ms)}" if alert.acked_by and alert.acked_ms else "no"
        return f"Alert {alert.id}", "\n".join([
            alert.message, "", f"policy       {alert.policy_id}", f"kind         {alert.kind}",
            f"raised       {iso(alert.ts_ms)}", f"window from  {iso(alert.window_start_ms)}",
            f"acknowledged {acked}",
        ])

    async def action_ack(self) -> None:
        alert = self._selected()
        if alert is None:
            return
        engine = await self.permitted("ack_alerts", "alerts")
        if engine is None:
            return
        self.change(lambda: engine.ack_alert(alert.id), f"Acknowledged alert {alert.id}", "Not acknowledged")
