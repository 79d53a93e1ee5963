"""The keys of the screen underneath, each with the id a user keymap overrides it by."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static


class HelpModal(ModalScreen[None]):
    """Every binding of the screen underneath, by id, key and description."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,question_mark,q", "close", "Close", id="help.close")]

    def __init__(self, rows: list[tuple[str, str, str]]) -> None:
        super().__init__()
        self.rows = rows

    def compose(self) -> ComposeResult:
        lines = [f"{key:<12} {desc:<28} {bid}" for key, desc, bid in self.rows]
        with VerticalScroll(classes="modal"):
            yield Static("[b]Keys on this screen[/b]  (key, action, id for a keymap)", classes="modal-title")
            yield Static("\n".join(lines), markup=False, id="help-body")

    def action_close(self) -> None:
        self.dismiss(None)
