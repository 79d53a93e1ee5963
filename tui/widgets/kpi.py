"""A KPI tile: a label, a big value and a small note under it."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static


def compact(count: int) -> str:
    """1234 -> 1,234; 407779 -> 407k; 1234567 -> 1.2M: counts that fit a narrow tile."""
    for floor, size, suffix in ((10**9, 10**9, "B"), (10**6, 10**6, "M"), (10**5, 10**3, "k")):
        if count >= floor:
            return f"{count / size:,.1f}{suffix}" if suffix != "k" else f"{count // size:,}k"
    return f"{count:,}"


class KpiTile(Vertical):
    def __init__(self, label: str, *, id: str | None = None) -> None:
        super().__init__(id=id, classes="kpi")
        self.label = label

    def compose(self) -> ComposeResult:
        yield Static(self.label, classes="kpi-label")
        yield Static("…", classes="kpi-value")
        yield Static("", classes="kpi-note")

    def show(self, value: str, note: str = "") -> None:
        self.query_one(".kpi-value", Static).update(value)
        self.query_one(".kpi-note", Static).update(note)
