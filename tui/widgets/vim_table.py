"""A DataTable with vim keys (j/k/g/G), a text filter and sorting by any column (s/S), used by
every screen. Cells that must shrink to fit the table are elided with ``…``, never cut."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from rich.cells import cell_len
from rich.text import Text
from textual.binding import Binding, BindingType
from textual.widgets import DataTable
from textual.widgets.data_table import Column

SortValue = int | float | str


@dataclass(frozen=True, slots=True)
class Cell:
    """What a cell shows and the value it sorts by: money in nano-dollars, a count, a time in ms.
    ``None`` sorts last whichever the direction (``-``, ``never``)."""

    shown: str | Text
    value: SortValue | None

    def __str__(self) -> str:
        return str(self.shown)


CellLike = str | Text | Cell
Rows = list[tuple[str, Sequence[CellLike]]]
MIN_ELIDED = 8  # a column shrinks to fit the table no narrower than this (or its label)


class VimTable(DataTable[str | Text]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("j", "cursor_down", "Down", show=False, id="table.down"),
        Binding("k", "cursor_up", "Up", show=False, id="table.up"),
        Binding("g", "scroll_top", "Top", show=False, id="table.top"),
        Binding("G", "scroll_bottom", "Bottom", show=False, id="table.bottom"),
        Binding("s", "cycle_sort", "Sort by next column", show=False, id="table.sort"),
        Binding("S", "reverse_sort", "Reverse the sort", show=False, id="table.reverse"),
    ]

    def __init__(self, *, id: str | None = None) -> None:
        # The cells' own colours win on the cursor row: a gauge keeps its red there.
        super().__init__(id=id, cursor_type="row", zebra_stripes=True, cursor_foreground_priority="renderable")
        self._rows: Rows = []
        self._columns: list[tuple[str, str | Text]] = []  # every column a row has a cell for
        self._visible: list[int] | None = None  # indices shown; None: all
        self._pending_visible: Sequence[str] | None = None  # show_only before the columns were defined
        self.filter_text = ""
        self._wanted: str | None = None  # a row to select as soon as it is shown
        self._fitted_width = -1  # the content width the columns were last fitted to
        self.sort_key: str | None = None  # the column sorted by; None: the screen's own order
        self.sort_descending = False

    def define(self, columns: Sequence[tuple[str, str | Text]]) -> None:
        """The table's columns as (key, label); rows give a cell for each, in this order."""
        first = not self._columns
        self._columns = list(columns)
        self._visible = None
        if first and self._pending_visible is not None:
            order = [k for k, _ in self._columns]
            self._visible = [order.index(k) for k in self._pending_visible]
        self._pending_visible = None
        if not first:  # rows of other columns (a tab's) must never meet these columns' indexes
            self._rows = []
        if self.sort_key not in {k for k, _ in self._columns}:
            self.sort_key = None
        self._rebuild_columns()
        if not first:
            self._wanted = None  # a row of the other columns is no row of these
        if first and self._rows:  # a screen's first read came back before it defined the columns
            self._render_rows()

    def show_only(self, keys: Sequence[str] | None) -> None:
        """Show these columns (None: all), as on a narrow terminal; rows keep every cell."""
        if not self._columns:  # a first read that came back before the screen defined them
            self._pending_visible = keys
            return
        order = [k for k, _ in self._columns]
        visible = None if keys is None else [order.index(k) for k in keys]
        if visible != self._visible:
            self._visible = visible
            self._rebuild_columns()
            self._render_rows()

    def _shown_columns(self) -> list[int]:
        return list(range(len(self._columns))) if self._visible is None else self._visible

    def _rebuild_columns(self) -> None:
        self._wanted = self._wanted or self.current_key  # clearing the columns loses the cursor
        self.clear(columns=True)
        for i in self._shown_columns():
            key, label = self._columns[i]
            if key == self.sort_key:
                arrow = " ▼" if self.sort_descending else " ▲"
                label = Text(str(label) + arrow, justify=label.justify if isinstance(label, Text) else None)
            self.add_column(label, key=key)

    def set_rows(self, rows: Sequence[tuple[str, Sequence[CellLike]]]) -> None:
        """Replace the rows (key, cells), keeping the cursor on the same key where it can. A cell
        is text, or a ``Cell`` with the value it sorts by; text sorts by the number it shows
        (``$1.25``, ``780k``, ``12.5%``, ``1,234``), else alphabetically."""
        self._rows = list(rows)
        self._render_rows()

    def set_filter(self, text: str) -> None:
        self.filter_text = text.strip().lower()
        self._render_rows()

    def select(self, key: str) -> None:
        """Put the cursor on this row now, or when a later ``set_rows`` brings it."""
        self._wanted = key
        self._render_rows()

    # ---- sorting

    def action_cycle_sort(self) -> None:
        """The next shown column (numbers largest first, text A to Z), then the screen's own order."""
        keys = [self._columns[i][0] for i in self._shown_columns()]
        if not keys:
            return
        at = keys.index(self.sort_key) + 1 if self.sort_key in keys else 0
        self.sort_key = keys[at] if at < len(keys) else None
        if self.sort_key is not None:
            index = [k for k, _ in self._columns].index(self.sort_key)
            values = [sort_value(cells[index]) for _, cells in self._rows if index < len(cells)]
            # Amounts, counts and times start largest (newest) first; names start at a.
            self.sort_descending = sum(isinstance(v, (int, float)) or (isinstance(v, str) and bool(_TIME.fullmatch(v)))
                                       for v in values) * 2 > len(values)
        self._rebuild_columns()
        self._render_rows()

    def action_reverse_sort(self) -> None:
        if self.sort_key is None:
            self.action_cycle_sort()
            if self.sort_key is None:
                return
        self.sort_descending = not self.sort_descending
        self._rebuild_columns()
        self._render_rows()

    def _sorted(self, rows: Rows) -> Rows:
        if self.sort_key is None:
            return rows
        index = [k for k, _ in self._columns].index(self.sort_key)
        numbers: list[tuple[float, str, Sequence[CellLike]]] = []
        words: list[tuple[str, str, Sequence[CellLike]]] = []
        blank: Rows = []
        for key, cells in rows:
            value = sort_value(cells[index]) if index < len(cells) else None
            if isinstance(value, str):
                words.append((value, key, cells))
            elif value is not None:
                numbers.append((value, key, cells))
            else:
                blank.append((key, cells))
        # Numbers before words, each in the chosen direction; cells without a value last, always.
        numbers.sort(key=lambda v: v[0], reverse=self.sort_descending)
        words.sort(key=lambda v: v[0], reverse=self.sort_descending)
        return [(key, cells) for _, key, cells in numbers] + [(key, cells) for _, key, cells in words] + blank

    # ---- drawing

    def _render_rows(self) -> None:
        if not self._columns:  # drawn when ``define`` gives the columns
            return
        current = self._wanted or self.current_key
        self.clear()
        needle = self.filter_text
        shown: list[tuple[str, list[str | Text]]] = []
        for key, cells in self._sorted(self._rows):
            if needle and not any(needle in str(cell).lower() for cell in cells):
                continue
            picked = cells if self._visible is None else [cells[i] for i in self._visible]
            shown.append((key, [c.shown if isinstance(c, Cell) else c for c in picked]))
        # Each column is sized here to what it shows now, from its label up. DataTable would
        # only ever widen it, and measures new rows when its own message queue runs empty,
        # after a first paint: rows set by a screen's refresh were painted at their labels'
        # widths and stayed so (`demo-o  soft  Organis`) until a key was pressed.
        columns = list(self.ordered_columns)
        widths = [max([column.label.cell_len, *(_width(cells[i]) for _, cells in shown)])
                  for i, column in enumerate(columns)]
        limits = self._fit(columns, widths)
        for key, cells in shown:
            self.add_row(*[elide(c, limits[i]) if _width(c) > limits[i] else c for i, c in enumerate(cells)],
                         key=key)
        for column, width in zip(columns, limits, strict=True):
            if column.auto_width:
                column.content_width = width
        if current is not None:
            keys = [str(k.value) for k in self.rows]
            if current in keys:
                self.move_cursor(row=keys.index(current), animate=False)
                if current == self._wanted:
                    self._wanted = None

    def on_resize(self) -> None:
        """The room the columns were fitted to changed (the first layout, a details pane shown
        or hidden, the terminal resized): fit them again. A screen's poll that brings the same
        data leaves the rows alone, so this is the only fit such a table would get."""
        if self.scrollable_content_region.width != self._fitted_width:
            self._render_rows()

    def _fit(self, columns: list[Column], widths: list[int]) -> list[int]:
        """The widths to draw at: when the columns need more room than the table has, the widest
        text columns (numbers are never shortened) give way first, down to ``MIN_ELIDED``."""
        self._fitted_width = self.scrollable_content_region.width
        room = self.scrollable_content_region.width if self.styles.width is not None and \
            not self.styles.width.is_auto else 0
        if room <= 0:
            return widths
        limits = list(widths)
        padding = 2 * self.cell_padding
        shown = self._shown_columns()
        numeric = {j for _, cells in self._rows for j, c in enumerate(cells)
                   if isinstance(c, Cell) and isinstance(c.value, (int, float))}  # a gauge, an amount
        text_columns = [i for i, j in enumerate(shown[:len(columns)]) if j not in numeric and not (
            isinstance(label := self._columns[j][1], Text) and label.justify == "right")]
        floor = {i: max(MIN_ELIDED, columns[i].label.cell_len) for i in text_columns}
        excess = sum(limits) + padding * len(limits) - room
        while excess > 0:
            shrinkable = [i for i in text_columns if limits[i] > floor[i]]
            if not shrinkable:
                break
            widest = max(shrinkable, key=lambda i: limits[i])
            limits[widest] -= 1
            excess -= 1
        return limits

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


def elide(cell: str | Text, width: int) -> Text:
    """The cell in ``width`` cells, its end replaced by ``…`` when it is longer: never silently cut."""
    text = cell.copy() if isinstance(cell, Text) else (Text.from_markup(cell) if "[" in cell else Text(cell))
    text.truncate(max(1, width), overflow="ellipsis")
    return text


def short(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, ending in ``…`` when shortened."""
    return text if len(text) <= width else text[:max(0, width - 1)] + "…"


_NUMBER = re.compile(r"([<>~≈]?)(-?)\$?(-?[\d,]*\.?\d+)\s*([kKMBG]?)\s*(%?)")
#: A time as tables show it (2026-11-18 12:00:05, 11-18 12:00, 12:00:05): its text sorts as its time.
_TIME = re.compile(r"(\d{4}-)?\d{2}-\d{2}( \d{2}:\d{2}(:\d{2})?)?|\d{2}:\d{2}(:\d{2})?")
_SCALE = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}


def sort_value(cell: CellLike) -> SortValue | None:
    """What a cell sorts by: its ``Cell`` value, else the number its text shows, else its text."""
    if isinstance(cell, Cell):
        return cell.value
    text = (cell.plain if isinstance(cell, Text) else Text.from_markup(cell).plain if "[" in cell else cell).strip()
    if text in ("", "-", "—", "never", "n/a"):
        return None
    number = _NUMBER.fullmatch(text)
    if number:
        _, sign, digits, scale, _ = number.groups()
        value = float(digits.replace(",", "")) * _SCALE[scale]
        return -value if sign else value
    return text.lower()


def right(text: str) -> Text:
    return Text(text, justify="right")


def sortable(text: str, value: SortValue | None, *, justify_right: bool = True) -> Cell:
    """A right-aligned cell that sorts by ``value``."""
    return Cell(right(text) if justify_right else text, value)
