"""Add or edit a budget policy; validation messages show under the field they name."""

from __future__ import annotations

from typing import ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Static

from engine.budgets import ACTIONS, MODES, Policy, build_policy, edited_policy
from engine.models import FieldError
from engine.money import format_usd_plain
from tui.messages import BACKTESTS, ReportsFailures


class PolicyForm(ReportsFailures, ModalScreen[Policy | None]):
    """Add or edit a policy; a refusal shows under the field it names."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel", id="form.cancel"),
        Binding("ctrl+s", "save", "Save", id="form.save"),
        Binding("ctrl+b", "backtest", "Backtest draft", id="form.backtest"),
    ]
    FIELDS: ClassVar[list[tuple[str, str, str]]] = [  # (field, label, hint shown in the empty box)
        ("name", "Name", "a name people will recognise"),
        ("scope", "Scope", "global, team:ml, team:ml+model:gpt-4o"),
        ("metric", "Metric", "usd, tokens or requests"),
        ("window", "Window", "hour, day, week, month, quarter, rolling:6h"),
        ("tz", "Time zone", "UTC, Europe/Paris ..."),
        ("soft", "Soft limit", "alerts only: $400, or a count"),
        ("hard", "Hard limit", "$500, or a count of tokens or requests"),
    ]

    def __init__(self, policy: Policy | None = None, *, actor: str = "", now_ms: int = 0) -> None:
        super().__init__()
        self.policy = policy
        self.actor, self.now_ms = actor, now_ms

    def _initial(self, name: str) -> str:
        p = self.policy
        if p is None:
            return {"metric": "usd", "window": "month", "tz": "UTC"}.get(name, "")
        amount = (lambda n: format_usd_plain(n)) if p.metric == "usd" else str
        return {"name": p.name, "scope": str(p.scope), "metric": p.metric, "window": str(p.window),
                "tz": p.window.tz, "soft": amount(p.soft) if p.soft is not None else "",
                "hard": amount(p.hard)}[name]

    def compose(self) -> ComposeResult:
        # One line per field, so the whole form fits an 80x24 terminal; a refusal appears
        # right under the field it names.
        with VerticalScroll(classes="modal form"):
            yield Static(f"[b]{'Edit ' + self.policy.id if self.policy else 'New policy'}[/b]  "
                         "tab moves, ctrl+s saves, ctrl+b backtests, esc cancels", classes="modal-title")
            for name, label, hint in self.FIELDS:
                with Horizontal(classes="field-row"):
                    yield Label(label, classes="field-label")
                    yield Input(self._initial(name), placeholder=hint, id=f"f-{name}")
                yield Static("", id=f"e-{name}", classes="field-error")
            with Horizontal(classes="field-row select-row"):
                yield Label("Mode", classes="field-label")
                yield Select([(m, m) for m in MODES], value=self.policy.mode if self.policy else "enforced",
                             id="f-mode", allow_blank=False)
            with Horizontal(classes="field-row select-row"):
                yield Label("At the hard limit", classes="field-label")
                yield Select([(a, a) for a in ACTIONS], value=self.policy.action if self.policy else "block",
                             id="f-action", allow_blank=False)
            yield Static("", id="e-other", classes="field-error")
            yield Static("", id="backtest-result")
            with Horizontal(classes="buttons"):
                yield Button("Save", id="save", variant="primary")
                yield Button("Backtest 30 days", id="backtest")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        for error in self.query(".field-error"):
            error.display = False
        self.query_one("#f-name", Input).focus()

    def _value(self, name: str) -> str:
        return self.query_one(f"#f-{name}", Input).value.strip()

    def _draft(self) -> Policy | None:
        """The policy the form describes, or None with the refusal shown under its field."""
        for error in self.query(".field-error"):
            error.display = False
        values = {name: self._value(name) for name, _, _ in self.FIELDS}
        values.update(tz=values["tz"] or "UTC", mode=str(self.query_one("#f-mode", Select).value),
                      action=str(self.query_one("#f-action", Select).value))
        try:
            if self.policy is None:
                policy = build_policy(**values, actor=self.actor, now_ms=self.now_ms)
            else:  # every field the form shows, as typed; the rest (thresholds, on or off) kept
                policy = edited_policy(self.policy, values, actor=self.actor, now_ms=self.now_ms)
        except FieldError as exc:
            known = exc.field in {n for n, _, _ in self.FIELDS}
            message = self.query_one(f"#e-{exc.field}" if known else "#e-other", Static)
            message.update(f"{exc.field}: {exc.reason}")
            message.display = True
            if known:  # take the operator to the field at fault
                box = self.query_one(f"#f-{exc.field}", Input)
                box.focus()
                box.scroll_visible()
            message.scroll_visible()
            return None
        return policy

    @on(Button.Pressed, "#save")
    def action_save(self) -> None:
        policy = self._draft()
        if policy is None:
            return
        self.dismiss(policy)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#backtest")
    def action_backtest(self) -> None:
        """Replay the last 30 days against the policy as drafted, before saving it."""
        policy = self._draft()
        if policy is not None:
            self._backtest(policy)

    @work(exclusive=True, group=BACKTESTS, description="Not backtested", exit_on_error=False)
    async def _backtest(self, policy: Policy) -> None:
        engine = getattr(self.app, "engine", None)
        if engine is None:
            return
        now = engine.now_ms()
        result = await engine.backtest(policy, now - 30 * 86_400_000, now + 1)
        fmt = policy.format_amount
        self.query_one("#backtest-result", Static).update(
            f"Last 30 days: {result.calls:,} calls in scope; would have blocked {result.blocked:,} "
            f"({fmt(result.prevented)} of {fmt(result.prevented + result.allowed_total)}) in "
            f"{result.windows_hit:,} window{'' if result.windows_hit == 1 else 's'}.")
