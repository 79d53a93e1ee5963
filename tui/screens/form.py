"""A modal of one-line fields whose answer is checked by the engine before it closes.

``submit`` receives the fields' values and does the work (an approval, a new token...).
A refusal stays in the form: bad input (``BadInput``) shows under the field it names and takes
the cursor there, any other Budgeteer error (a missing permission, a request already decided)
shows at the bottom; the form closes with the submit's result only when it succeeded.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static
from textual.worker import Worker

from engine.errors import BadInput, BudgeteerError
from tui.messages import CHANGES, ReportsFailures


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    label: str
    value: str = ""
    hint: str = ""
    password: bool = False  # typed characters are not shown (a secret, a passphrase)


class FormModal(ReportsFailures, ModalScreen[Any]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel", id="form.cancel"),
        Binding("ctrl+s", "save", "Save", id="form.save"),
    ]

    def __init__(self, title: str, fields: list[Field], submit: Callable[[dict[str, str]], Awaitable[Any]], *,
                 intro: str = "", save_label: str = "Save") -> None:
        super().__init__()
        self.title_text, self.fields, self.submit, self.intro = title, fields, submit, intro
        self.save_label = save_label
        self._saving: Worker[None] | None = None

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="modal form"):
            yield Static(f"[b]{self.title_text}[/b]  enter or ctrl+s: {self.save_label.lower()}, esc cancels",
                         classes="modal-title")
            if self.intro:
                yield Static(self.intro, markup=False, classes="form-intro")
            for f in self.fields:
                with Horizontal(classes="field-row"):
                    yield Label(f.label, classes="field-label")
                    yield Input(f.value, placeholder=f.hint, id=f"f-{f.name}", password=f.password)
                yield Static("", id=f"e-{f.name}", classes="field-error")
            yield Static("", id="e-other", classes="field-error")
            with Horizontal(classes="buttons"):
                yield Button(self.save_label, id="save", variant="primary")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        for error in self.query(".field-error"):
            error.display = False
        if self.fields:
            self.query_one(f"#f-{self.fields[0].name}", Input).focus()

    def values(self) -> dict[str, str]:
        return {f.name: self.query_one(f"#f-{f.name}", Input).value.strip() for f in self.fields}

    def show_refusal(self, exc: BudgeteerError) -> None:
        """Bad input under its field (and the cursor there); anything else at the bottom."""
        field = exc.field if isinstance(exc, BadInput) else ""
        known = field in {f.name for f in self.fields}
        message = self.query_one(f"#e-{field}" if known else "#e-other", Static)
        message.update(str(exc))
        message.display = True
        if known:
            box = self.query_one(f"#f-{field}", Input)
            box.focus()
            box.scroll_visible()
        message.scroll_visible()

    @on(Input.Submitted)
    @on(Button.Pressed, "#save")
    def action_save(self) -> None:
        if self._saving is not None and not self._saving.is_finished:
            return  # enter pressed twice: the first submit is under way, and is never cancelled
        for error in self.query(".field-error"):
            error.display = False
        self._saving = self.run_worker(self._save(self.values()), group=CHANGES,
                                       description=f"Not done: {self.title_text}", exit_on_error=False)

    async def _save(self, values: dict[str, str]) -> None:
        """The submit in a worker: keys work while the engine answers; anything but a refusal is
        the app's notice, and the form stays open with what was typed."""
        try:
            result = await self.submit(values)
        except BudgeteerError as exc:
            self.show_refusal(exc)
            return
        self.dismiss(result)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
