"""A message to read and close: details, errors, results."""

from __future__ import annotations

from typing import Any, ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static


class MessageModal(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,enter,q", "dismiss", "Close", id="modal.close")]

    def __init__(self, title: str, body: str) -> None:
        super().__init__()
        self.title_text, self.body_text = title, body

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="modal"):
            yield Static(f"[b]{self.title_text}[/b]", classes="modal-title")
            yield Static(self.body_text, markup=False, classes="message-body")
            yield Static("[dim]esc closes[/dim]")

    async def action_dismiss(self, result: Any = None) -> None:
        self.dismiss(None)
