"""A DataTable with vim keys (j/k/g/G) and a text filter, used by every screen."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from rich.cells import cell_len
from rich.text import Text
from textual.binding import Binding, BindingType
from textual.widgets import DataTable


class VimTable(DataTable[str | Text]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("j", "cursor_down", "Down", show=False, id="table.down"),
        Binding("k", "cursor_up", "Up", show=False, id="table.up"),
        Binding("g", "scroll_top", "Top", show=False, id="table.top"),
        Binding("G", "scroll_bottom", "Bottom", show=False, id="table.bottom"),
    ]

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self._rows: list[tuple[str, Sequence[str | Text]]] = []
        self._columns: list[tuple[str, str | Text]] = []  # every column a row has a cell for
        self._visible: list[int] | None = None  # indices shown; None: all
        self.filter_text = ""
        self._wanted: str | None = None  # a row to select as soon as it is shown

    def define(self, columns: Sequence[tuple[str, str | Text]]) -> None:
        """The table's columns as (key, label); rows give a cell for each, in this order."""
        self._columns = list(columns)
        self._visible = None
        self._rows = []  # rows of other columns (a tab's) must never meet these columns' indexes
        self._rebuild_columns()

    def show_only(self, keys: Sequence[str] | None) -> None:
        """Show these columns (None: all), as on a narrow terminal; rows keep every cell."""
        order = [k for k, _ in self._columns]
        visible = None if keys is None else [order.index(k) for k in keys]
        if visible != self._visible:
            self._visible = visible
            self._rebuild_columns()
            self._render_rows()

    def _rebuild_columns(self) -> None:
        self.clear(columns=True)
        for i, (key, label) in enumerate(self._columns):
            if self._visible is None or i in self._visible:
                self.add_column(label, key=key)

    def set_rows(self, rows: list[tuple[str, Sequence[str | Text]]]) -> None:
        """Replace the rows (key, cells), keeping the cursor on the same key where it can."""
        self._rows = rows
        self._render_rows()

    def set_filter(self, text: str) -> None:
        self.filter_text = text.strip().lower()
        self._render_rows()

    def select(self, key: str) -> None:
        """Put the cursor on this row now, or when a later ``set_rows`` brings it."""
        self._wanted = key
        self._render_rows()

    def _render_rows(self) -> None:
        current = self._wanted or self.current_key
        self.clear()
        needle = self.filter_text
        shown: list[Sequence[str | Text]] = []
        for key, cells in self._rows:
            if needle and not any(needle in str(cell).lower() for cell in cells):
                continue
            if self._visible is not None:
                cells = [cells[i] for i in self._visible]
            self.add_row(*cells, key=key)
            shown.append(cells)
        # Each column is sized here to what it shows now, from its label up. DataTable would
        # only ever widen it, and measures new rows when its own message queue runs empty,
        # after a first paint: rows set by a screen's refresh were painted at their labels'
        # widths and stayed so (`demo-o  soft  Organis`) until a key was pressed.
        for column, cells_of in zip(self.ordered_columns, zip(*shown, strict=True) if shown else (), strict=False):
            if column.auto_width:
                column.content_width = max(column.label.cell_len, *map(_width, cells_of))
        if not shown:
            for column in self.ordered_columns:
                if column.auto_width:
                    column.content_width = column.label.cell_len
        if current is not None:
            keys = [str(k.value) for k in self.rows]
            if current in keys:
                self.move_cursor(row=keys.index(current), animate=False)
                if current == self._wanted:
                    self._wanted = None

    def release(self) -> None:
        """Drop the rendered rows and cells this table keeps (up to 10,000 cells, each a strip
        with caches of its own) while its screen is hidden: the screen's next show refills
        the table, which clears them anyway."""
        self._clear_caches()

    @property
    def current_key(self) -> str | None:
        if not self.row_count:
            return None
        try:
            return str(self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value)
        except Exception:  # no row under the cursor
            return None


def _width(cell: str | Text) -> int:
    """The cells a value takes in the table (a string is read as markup, as DataTable does)."""
    if isinstance(cell, Text):
        return cell.cell_len
    return Text.from_markup(cell).cell_len if "[" in cell else cell_len(cell)


def right(text: str) -> Text:
    return Text(text, justify="right")
