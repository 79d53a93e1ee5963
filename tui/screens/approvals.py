"""Approvals: the override requests waiting for a decision, oldest first, and the history of
decided ones. ``a`` approves (amount and duration can be changed first), ``d`` denies with a
reason, ``u`` undoes a decision made in the last few seconds, ``enter`` shows everything,
the evaluation that opened the request included."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import Static, Tab, Tabs

from engine.approvals import UNDO_WINDOW_MS, OverrideRequest
from engine.budgets import Outcome, parse_amount
from engine.clock import format_duration, format_span, iso, parse_duration_ms
from engine.money import format_usd_plain
from tui.messages import LedgerChanged
from tui.screens.base import DataScreen
from tui.screens.form import Field, FormModal
from tui.widgets.gauge import gauge
from tui.widgets.vim_table import Cell, VimTable, right, short, sortable

if TYPE_CHECKING:
    from engine.engine import Engine


@dataclass(frozen=True, slots=True)
class ApprovalsData:
    requests: list[OverrideRequest]
    status: dict[str, Outcome]  # policy id -> its state now
    now_ms: int


PENDING_COLUMNS = ("age", "requester", "policy", "gauge", "consumed", "limit", "asked", "for", "expires in", "reason")
HISTORY_COLUMNS = ("decided", "status", "requester", "policy", "asked", "granted", "used", "by", "note")


class ApprovalsScreen(DataScreen):
    TITLE_TEXT = "Approvals"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "approve", "Approve", id="approvals.approve"),
        Binding("d", "deny", "Deny", id="approvals.deny"),
        Binding("u", "undo", "Undo", id="approvals.undo"),
        Binding("h", "toggle_history", "History", id="approvals.history"),
        Binding("enter", "detail", "Details", show=False, id="approvals.detail"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.history = False
        self.requests: dict[str, OverrideRequest] = {}
        self.last_decided: str | None = None  # the request this dashboard decided last, for u

    def body(self) -> ComposeResult:
        yield Tabs(Tab("Pending", id="tab-pending"), Tab("History", id="tab-history"), id="approval-tabs")
        yield Static("", id="approvals-title", classes="section-title")
        yield VimTable(id="requests")

    def on_mount(self) -> None:
        super().on_mount()
        self._define()

    def _define(self) -> None:
        columns = HISTORY_COLUMNS if self.history else PENDING_COLUMNS
        numeric = {"consumed", "limit", "asked", "granted", "used"}
        self.query_one("#requests", VimTable).define([(c, right(c) if c in numeric else c) for c in columns])

    async def load(self, engine: Engine) -> Any:
        requests = await engine.override_requests(pending=not self.history)
        status = {o.policy.id: o for o in await engine.policy_status()}
        return ApprovalsData(requests, status, engine.now_ms())

    def show(self, data: ApprovalsData) -> None:
        self.requests = {r.id: r for r in data.requests}
        now = data.now_ms
        keys = "[b]enter[/b] details   [b]u[/b] undo   [b]h[/b] "
        if self.history:
            self.query_one("#approvals-title", Static).update(
                f"{len(data.requests)} decided, newest first   {keys}pending")
            rows = [(r.id, self._history_row(r)) for r in data.requests]
            empty = "No decided requests yet."
        else:
            self.query_one("#approvals-title", Static).update(
                f"{len(data.requests)} pending{'' if self.narrow else ', oldest first'}   [b]a[/b] approve   "
                f"[b]d[/b] deny   {keys}history")
            rows = [(r.id, self._pending_row(r, data.status.get(r.policy_id), now)) for r in data.requests]
            empty = "Nothing waits for a decision. Calls over an approval_required limit ask here."
        columns = HISTORY_COLUMNS if self.history else PENDING_COLUMNS
        if not rows:
            cells = [""] * len(columns)
            cells[columns.index("requester")] = empty
            rows = [("none", cells)]
        table = self.query_one("#requests", VimTable)
        narrow = (("age", "requester", "policy", "asked", "reason") if not self.history
                  else ("decided", "status", "requester", "granted", "by"))
        table.show_only(narrow if self.narrow else None)  # enter shows the rest
        table.set_rows(rows)

    def _pending_row(self, r: OverrideRequest, o: Outcome | None, now: int) -> list[Any]:
        fmt = r.format_amount
        if o is None:  # the policy was removed after the request was opened
            meter: Any = "(policy removed)"
            consumed = limit = right("-")
        else:
            meter = Cell(gauge(o.consumed, o.held, o.policy.hard, o.policy.soft, self.gauge_width(),
                               self.gauge_colors()), (o.consumed + o.held) * 10_000 // max(o.policy.hard, 1))
            consumed = sortable(o.policy.format_short(o.consumed), o.consumed)
            limit = sortable(o.policy.format_short(o.policy.hard), o.policy.hard)
        expires = format_span(r.expires_ms - now) if r.expires_ms else "never"
        name = short(str(r.policy.get("name", r.policy_id)), self.name_width())
        return [Cell(format_span(now - r.created_ms), now - r.created_ms), r.requester, name, meter, consumed, limit,
                sortable(fmt(r.amount), r.amount), Cell(format_span(r.duration_ms), r.duration_ms),
                Cell(expires, r.expires_ms - now if r.expires_ms else None), _cut(r.reason, self.size.width - 120)]

    def _history_row(self, r: OverrideRequest) -> list[Any]:
        fmt = r.format_amount
        decided = iso(r.decided_ms)[:16].replace("T", " ") if r.decided_ms else "-"
        granted = sortable(fmt(r.granted), r.granted) if r.granted is not None else right("-")
        used = sortable(fmt(r.grant_used), r.grant_used) if r.granted is not None else right("-")
        return [decided, r.status, r.requester, short(str(r.policy.get("name", r.policy_id)), self.name_width()),
                sortable(fmt(r.amount), r.amount), granted, used,
                r.decided_by or ("time" if r.status == "expired" else "-"),
                _cut(r.decision_reason or "", self.size.width - 110)]

    def _selected(self) -> OverrideRequest | None:
        return self.requests.get(self.query_one("#requests", VimTable).current_key or "")

    # ---- tabs

    def action_toggle_history(self) -> None:
        tabs = self.query_one("#approval-tabs", Tabs)
        tabs.active = "tab-pending" if self.history else "tab-history"

    @on(Tabs.TabActivated, "#approval-tabs")
    def _tab_changed(self, event: Tabs.TabActivated) -> None:
        history = event.tab.id == "tab-history"
        if history != self.history:
            self.history = history
            self._define()
            self.query_one("#requests", VimTable).focus()
            self.reload(restart=True)

    # ---- decisions

    def detail(self) -> tuple[str, str] | None:
        request = self._selected()
        if request is None or self.bapp.engine is None:
            return None
        return f"Override request {request.id}", "\n".join(request.describe(self.bapp.engine.now_ms()))

    async def _decidable(self) -> tuple[Engine, OverrideRequest] | None:
        """The selected pending request and the engine, when this identity may decide it."""
        request = self._selected()
        if request is None or request.status != "pending":
            if request is not None:
                self.notify(f"{request.id} is {request.status}; only pending requests are decided",
                            severity="warning")
            return None
        engine = await self.permitted("approve_overrides", "decisions")
        if engine is None:
            return None
        if request.requester == engine.actor:
            self.notify(f"{engine.actor} cannot decide their own request", title="Not allowed", severity="error")
            return None
        return engine, request

    async def action_approve(self) -> None:
        found = await self._decidable()
        if found is None:
            return
        engine, request = found
        metric = str(request.policy.get("metric", "usd"))
        initial = format_usd_plain(request.amount) if metric == "usd" else str(request.amount)

        async def submit(values: dict[str, str]) -> OverrideRequest:
            amount = parse_amount(values["amount"], metric, "amount")
            duration = parse_duration_ms(values["duration"], "duration")
            return await engine.approve(request.id, amount, duration, reason=values["note"])

        self.app.push_screen(FormModal(
            f"Approve {request.id}", [
                Field("amount", "Grant", initial, "dollars, or a count of tokens or requests"),
                Field("duration", "For", format_duration(request.duration_ms), "30m, 2h, 1d"),
                Field("note", "Note", "", "optional: why, for the journal")],
            submit, save_label="Approve",
            intro=f"{request.requester} asks {request.format_amount(request.amount)} past "
                  f"{request.policy.get('name', request.policy_id)}: {request.reason}"), self._decided)

    async def action_deny(self) -> None:
        found = await self._decidable()
        if found is None:
            return
        engine, request = found

        async def submit(values: dict[str, str]) -> OverrideRequest:
            return await engine.deny(request.id, values["reason"])

        self.app.push_screen(FormModal(
            f"Deny {request.id}", [Field("reason", "Reason", "", "the requester sees this")], submit,
            save_label="Deny", intro=f"{request.requester} asks {request.format_amount(request.amount)} past "
                                     f"{request.policy.get('name', request.policy_id)}: {request.reason}"),
            self._decided)

    def _decided(self, request: OverrideRequest | None) -> None:
        if request is None:
            return
        self.last_decided = request.id
        what = (f"granted {request.format_amount(request.granted or 0)} to {request.requester} until "
                f"{iso(request.grant_expires_ms or 0)[11:16]} UTC" if request.status == "approved"
                else f"denied for {request.requester}")
        self.notify(f"{request.id} {what}. u undoes it for {UNDO_WINDOW_MS // 1000} s.",
                    title=request.status.capitalize())
        self.post_message(LedgerChanged())

    def action_undo(self) -> None:
        """Undo this dashboard's last decision, or, in the history tab, the selected one."""
        engine = self.bapp.engine
        selected = self._selected()
        target = selected.id if self.history and selected is not None else self.last_decided
        if engine is None or target is None:
            self.notify("No decision of yours to undo here", severity="warning")
            return
        if self.bapp.read_only:
            self.notify("Read-only mode: decisions are off", severity="warning")
            return

        def undone(request: OverrideRequest) -> None:
            self.last_decided = None
            self.notify(f"{request.id} is pending again", title="Undone")

        decided = target
        self.change(lambda: engine.undo_decision(decided), undone, "Not undone")


def _cut(text: str, width: int) -> str:
    """What fits the room the other columns leave (enter shows the whole text)."""
    width = max(20, width)
    return text if len(text) <= width else text[:width - 1] + "…"
