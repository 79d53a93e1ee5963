"""What every dashboard screen shares: data read through the Engine in a worker, a status
line, a filter for its table, and the details of its table's row: in a pane beside the table
that follows the cursor on a terminal 140 columns or wider, in a modal on ``enter`` below."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, cast

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.command import Provider
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import DataTable, Header, Input, Static
from textual.worker import Worker

from engine.access import AccessDenied
from tui.messages import (
    CHANGES,
    READS,
    LedgerChanged,
    LedgerRead,
    ReadEnded,
    ReportsFailures,
    StatusOutdated,
    WorkFailed,
)
from tui.palette import ScreenActions
from tui.screens.message import MessageModal
from tui.widgets.footer import KeysFooter
from tui.widgets.gauge import theme_colors
from tui.widgets.vim_table import VimTable

if TYPE_CHECKING:
    from engine.access import Permission
    from engine.engine import Engine

T = TypeVar("T")
#: From this many columns a screen with details shows them in a pane beside its table.
DETAILS_PANE_MIN_WIDTH = 140


class Host(Protocol):
    """What a screen reads from the app it runs in (the app's own state goes by messages)."""

    engine: Engine | None
    read_only: bool
    actor: str


class DataScreen(ReportsFailures, Screen[None]):
    """A screen that reads a snapshot from the Engine, off the main thread of input; it changes
    the ledger in workers too (``change``), and says what happened by messages to the app."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("slash", "filter", "Filter", id="screen.filter"),
        Binding("escape", "clear_filter", "Back", show=False, id="screen.escape"),
    ]
    # The palette lists this screen's bindings as commands.
    COMMANDS: ClassVar[set[type[Provider] | Callable[[], type[Provider]]]] = {ScreenActions}
    TITLE_TEXT = ""

    def __init__(self) -> None:
        super().__init__()
        self._loader: Worker[None] | None = None
        self._shown: Any = None  # the data on screen, as the last read returned it
        self._status_text = ""

    @property
    def bapp(self) -> Host:
        return cast("Host", self.app)

    def compose(self) -> ComposeResult:
        yield Header(icon="$")  # Textual's ⭘ is missing from the screenshots' SVG font
        with Horizontal(id="screen-body"):
            with Vertical(id="screen-main"):
                yield from self.body()
            if self.has_details:
                with VerticalScroll(id="details-pane"):
                    yield Static("", id="details-title", classes="section-title")
                    yield Static("", id="details-body", markup=False)
        yield Input(placeholder="filter rows (esc clears)", id="filter")
        yield Static("", id="status")
        yield KeysFooter()

    def show_status(self, text: str) -> None:
        """The app's state (updated when, paused, the ledger unreadable) on this screen's status line.
        The same text again is left alone: an update lays the screen out again, and the app says
        "updated 0 s ago" after every read, a frame after the read's own paint."""
        for status in self.query("#status").results(Static):  # none yet in the instant of a mode switch
            if text != self._status_text:
                status.update(text)
                self._status_text = text

    def body(self) -> ComposeResult:
        raise NotImplementedError

    def on_mount(self) -> None:
        self.query_one("#filter", Input).display = False
        self.sub_title = self.TITLE_TEXT
        self.app.theme_changed_signal.subscribe(self, lambda _theme: self.reload())

    def on_resize(self) -> None:
        self.reload()  # narrow and wide layouts draw gauges and notes differently
        self.show_details()

    @property
    def narrow(self) -> bool:
        """An 80-column terminal: shorter notes, narrower gauges (the -narrow breakpoint)."""
        return self.has_class("-narrow")

    @property
    def roomy(self) -> bool:
        """150 columns or more for the screen's own content (the details pane's left aside):
        full-length gauges and names."""
        return self.has_class("-wide") and (not self.details_beside or self.size.width >= 190)

    def gauge_width(self) -> int:
        return 20 if self.roomy else 10

    def name_width(self) -> int:
        return 28 if self.roomy else 20

    def gauge_colors(self) -> dict[str, str]:
        """ok / warn / over in the current theme's success / warning / error."""
        return theme_colors(self.app.theme_variables)

    async def permitted(self, permission: Permission, what: str) -> Engine | None:
        """The engine, when this identity may change ``what`` from here: not in read-only mode
        and holding ``permission``; otherwise a notice saying why (the matrix's own words).
        A quick look at the ledger before a form or a question opens (keys typed right after
        this one go to it); a ledger that cannot answer is reported like a failed worker."""
        engine = self.bapp.engine
        if engine is None:
            return None
        if self.bapp.read_only:
            self.notify(f"Read-only mode: {what} cannot be changed here", severity="warning")
            return None
        try:
            if not await engine.may(permission):
                self.notify(str(AccessDenied(engine.actor, await engine.role(), permission)), title="Not allowed",
                            severity="error")
                return None
        except Exception as exc:  # the app's one handler says it in words
            self.post_message(WorkFailed(exc, "Not allowed", CHANGES))
            return None
        return engine

    def change(self, work: Callable[[], Awaitable[T]], done: Callable[[T], object] | str,
               refused: str = "Not changed") -> Worker[None]:
        """Change the ledger in a worker: ``work`` makes the change, then ``done`` (a notice, or a
        callback given the result) and the screen reads again. A refusal or any failure is the
        app's notice titled ``refused``; keys keep working meanwhile. Changes are never cancelled
        by a later one (a cancelled change could be made and not said): each runs to its end."""
        async def run() -> None:
            result = await work()
            if isinstance(done, str):
                self.notify(done)
            else:
                done(result)
            self.post_message(LedgerChanged())

        return self.run_worker(run(), group=CHANGES, description=refused, exit_on_error=False)

    def on_screen_suspend(self) -> None:
        """Hidden, a screen keeps its data, not its rendered lines: its tables' rendered rows
        and every widget's last painted lines (strips, each with caches of its own; together
        about 1 MB a screen, 9-11 MB over the nine). Its resume reads and shows again, and
        paints afresh."""
        for table in self.query(VimTable):
            table.release()
        for widget in self.walk_children():
            widget._styles_cache.clear()

    def on_screen_resume(self) -> None:
        self.reload()
        self.post_message(StatusOutdated())

    @property
    def loading_data(self) -> bool:
        """A read of this screen is under way (or about to start)."""
        return self._loader is not None and not self._loader.is_finished

    def reload(self, restart: bool = False, poll: bool = False) -> bool:
        """Read the screen's data again, unless a read is under way; ``restart`` when what the
        screen shows has changed (a tab, a search): the new read replaces the one under way
        (the worker is exclusive, so starting it cancels the other). A ``poll`` that reads what
        is on screen already leaves the screen as it is. True when a read started (or will, once
        the screen is mounted)."""
        if not self.is_mounted:
            # The poll or a resume can reach a screen still mounting: its tables have no columns
            # yet, and rows shown now would not fit them (`More values provided than there are
            # columns`). The screen's queue runs this once its on_mount handlers are done.
            self.call_later(self.reload, restart, poll)
            return True
        if not self.is_current:
            # A hidden screen reads when it is shown again (its resume). Reads of hidden screens
            # (a resize, a theme change) cost CPU for nothing, and each one's end re-armed the
            # app's poll, so hidden screens reading again and again held the shown one's poll
            # off for good: writes from another process stopped appearing, at 95 % CPU.
            return False
        if (restart or not self.loading_data) and self.bapp.engine is not None:
            self._loader = self._load(poll)
            return True
        return False

    @work(exclusive=True, group=READS, description="Not read", exit_on_error=False)
    async def _load(self, poll: bool = False) -> None:
        """Read and show; a read that fails (a ledger that cannot be read is a state, not a crash)
        is the app's to report, in the status line, by the worker's failure."""
        engine = self.bapp.engine
        try:
            if engine is None:
                return
            data = await self.load(engine)
            # Tables refilled and the plot redrawn every 2 s for nothing cost the app most of its
            # CPU between keys; what a key changed (a tab, a period, the size) is always shown.
            try:
                if not (poll and data == self._shown):
                    self.show(data)
                    self._shown = data
                    self.show_details()
            except NoMatches:  # the screen's widgets were removed while it read: the app is quitting
                return
            self.post_message(LedgerRead())
        finally:
            if self.is_current:  # the next poll: a full interval after this read ended
                self.post_message(ReadEnded())

    async def load(self, engine: Engine) -> Any:
        raise NotImplementedError

    def show(self, data: Any) -> None:
        raise NotImplementedError

    # ---- filtering

    def table(self) -> VimTable | None:
        tables = self.query(VimTable)
        return tables.first() if tables else None

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.display = True
        box.focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        if box.display or box.value:
            box.value = ""
            box.display = False
            table = self.table()
            if table is not None:
                table.set_filter("")
                self.set_focus(table)

    def leave_input(self) -> None:
        """esc in a text box of this screen: the filter box is cleared, any other (Models'
        explain box) keeps its text; the table gets the focus back at once, so the key typed
        next is a command again (set_focus, not focus(), which waits for the app's queue)."""
        box = self.query_one("#filter", Input)
        typed_in = self.focused
        table = self.table()
        self.set_focus(table if table is not None and table.display else None)
        if typed_in is box:
            # Cleared once the box has read the keys typed before esc, still in its queue;
            # cleared now, a letter typed just before esc would come back after it.
            box.call_later(self.action_clear_filter)

    # ---- details of the table's row

    def detail(self) -> tuple[str, str] | None:
        """The title and text of the details of the row under the table's cursor, for screens that
        have them (None: no row)."""
        return None

    @property
    def has_details(self) -> bool:
        return type(self).detail is not DataScreen.detail

    @property
    def details_beside(self) -> bool:
        """A terminal wide enough for the details pane beside the table."""
        return self.has_details and self.app.size.width >= DETAILS_PANE_MIN_WIDTH

    def show_details(self) -> None:
        """Fill the pane beside the table with the row under the cursor (wide terminals only)."""
        if not self.has_details or not self.is_mounted:
            return
        pane = self.query_one("#details-pane", VerticalScroll)
        pane.display = self.details_beside
        if not pane.display:
            return
        found = self.detail()
        title, text = found if found is not None else ("Details", "No row selected.")
        self.query_one("#details-title", Static).update(f"{title}")
        self.query_one("#details-body", Static).update(text)

    def action_detail(self) -> None:
        """``enter``: the row's details in a modal, unless the pane beside the table shows them."""
        if self.details_beside:
            self.show_details()
            return
        found = self.detail()
        if found is not None:
            self.app.push_screen(MessageModal(*found))

    @on(DataTable.RowHighlighted)
    def _row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table is self.table():
            self.show_details()

    @on(DataTable.RowSelected)
    def _row_chosen(self, event: DataTable.RowSelected) -> None:
        """enter on a focused table row (the table takes enter before the screen's binding)."""
        if self.has_details or type(self).action_detail is not DataScreen.action_detail:
            event.stop()
            self.action_detail()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        table = self.table()
        if table is not None:
            table.set_filter(event.value)

    @on(Input.Submitted, "#filter")
    def _filter_done(self) -> None:
        table = self.table()
        if table is not None:
            table.focus()
