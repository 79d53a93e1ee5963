"""The Budgeteer dashboard: a Textual app over one ledger.

Screens (number keys, or the command palette): 1 overview, 2 usage, 3 budgets,
4 alerts, 5 approvals, 6 tokens, 7 audit journal, 8 models, 9 vault, 0 calls (live).
Data is read through ``Engine`` in workers; the current screen reads again a refresh
interval after its last read ended, never piling polls up, and not while paused or while
a modal is open. On a ledger that pushes its changes (PostgreSQL) it also reads as soon as
another process commits a change of policies, tokens, approvals, prices, providers or members,
at most every ``WAKE_S``. New override requests are announced on any screen.

Screens tell the app what happened by messages (``tui.messages``): a read done or ended, a
change made, a piece of work failed; the app keeps the status line and the poll, and its one
handler, ``_work_failed``, turns any failed work into a notice (never a crash, never a traceback).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

from textual import on, work
from textual.app import App, ScreenStackError, SystemCommand
from textual.binding import Binding, BindingType
from textual.command import CommandInput, CommandPalette
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Input, TextArea

from engine.clock import Clock
from engine.engine import Engine, default_db_path
from engine.ledger import StoreError, redacted
from tui.messages import (
    READS,
    LedgerChanged,
    LedgerRead,
    ReadEnded,
    ReportsFailures,
    StatusOutdated,
    WorkFailed,
    in_words,
)
from tui.palette import Palette, binding_rank, key_label
from tui.screens.alerts import AlertsScreen
from tui.screens.approvals import ApprovalsScreen
from tui.screens.audit import AuditScreen
from tui.screens.base import DataScreen
from tui.screens.budgets import BudgetsScreen
from tui.screens.calls import CallsScreen
from tui.screens.help import HelpModal
from tui.screens.models import ModelsScreen
from tui.screens.overview import OverviewScreen
from tui.screens.tokens import TokensScreen
from tui.screens.usage import UsageScreen
from tui.screens.vault import VaultScreen

SCREENS: dict[str, tuple[str, str]] = {  # mode -> (key, description)
    "overview": ("1", "Overview: spend, budgets near their limits, last 24 hours"),
    "usage": ("2", "Usage: timeline and breakdown by model, provider, team, principal"),
    "budgets": ("3", "Budgets: policies as gauges; add, edit, backtest"),
    "alerts": ("4", "Alerts: list, detail, acknowledge"),
    "approvals": ("5", "Approvals: override requests to approve, deny or undo; their history"),
    "tokens": ("6", "API tokens: state, last use, spend; create, revoke, rotate"),
    "audit": ("7", "Audit journal: every change and decision; filter, verify the chain"),
    "models": ("8", "Models: catalog, tiers, provider health, routing decisions; explain a prompt"),
    "vault": ("9", "Vault: credentials by reference and fingerprint; add, remove, test"),
    "calls": ("0", "Calls, live: each call as it is recorded, who, model, tokens, cost, status, the policy "
                   "that blocked it"),
}
log = logging.getLogger("budgeteer")
#: A change pushed by the ledger is read this long after it arrives, with every other change
#: that arrives meanwhile: a burst of changes costs one read, and at most four a second.
WAKE_S = 0.25


class BudgeteerApp(ReportsFailures, App[None]):
    CSS_PATH = "budgeteer.tcss"
    # Screens get -narrow below 110 columns (an 80x24 terminal: panes stack in a column),
    # -medium below 150 (gauges and names shorten), -wide from 150.
    HORIZONTAL_BREAKPOINTS: ClassVar[list[tuple[int, str]] | None] = [
        (0, "-narrow"), (110, "-medium"), (150, "-wide")]
    TITLE = "Budgeteer"
    MODES: ClassVar[dict[str, type[Screen[None]]]] = {  # type: ignore[assignment]
        "overview": OverviewScreen, "usage": UsageScreen, "budgets": BudgetsScreen, "alerts": AlertsScreen,
        "approvals": ApprovalsScreen, "tokens": TokensScreen, "audit": AuditScreen, "models": ModelsScreen,
        "vault": VaultScreen, "calls": CallsScreen}
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("1", "switch_mode('overview')", "Overview", id="app.overview"),
        Binding("2", "switch_mode('usage')", "Usage", id="app.usage"),
        Binding("3", "switch_mode('budgets')", "Budgets", id="app.budgets"),
        Binding("4", "switch_mode('alerts')", "Alerts", id="app.alerts"),
        Binding("5", "switch_mode('approvals')", "Approvals", id="app.approvals"),
        Binding("6", "switch_mode('tokens')", "Tokens", id="app.tokens"),
        Binding("7", "switch_mode('audit')", "Audit", id="app.audit"),
        Binding("8", "switch_mode('models')", "Models", id="app.models"),
        Binding("9", "switch_mode('vault')", "Vault", id="app.vault"),
        Binding("0", "switch_mode('calls')", "Calls", id="app.calls"),
        Binding("question_mark", "help", "Help", id="app.help"),
        Binding("q", "quit", "Quit", id="app.quit"),
        Binding("p", "toggle_pause", "Pause", id="app.pause"),
        Binding("r", "refresh_now", "Refresh", show=False, id="app.refresh"),
        # Textual's own palette key, kept, and `:` (k9s, vim) beside it.
        Binding("ctrl+p", "command_palette", "Commands", show=False, priority=True, id="app.palette"),
        # The keys below act before the focused widget sees the next key. A binding that is not
        # a priority runs only once its key has bubbled back up from the focused widget, and
        # by then the keys typed after it were already given to that widget: `:usage` went to
        # the table under the palette, text typed right after tab went into the field left.
        Binding("colon", "commands", "Commands", show=False, priority=True, id="app.commands"),
        Binding("tab", "focus_next", "Next field", show=False, priority=True, id="app.next"),
        Binding("shift+tab", "focus_previous", "Previous field", show=False, priority=True, id="app.previous"),
        Binding("escape", "leave_input", "Leave the box", priority=True, id="app.leave"),
    ]

    def __init__(self, db_path: Path | str, clock: Clock | None = None, refresh_seconds: float = 2.0,
                 label: str | None = None, read_only: bool = False, theme: str | None = None) -> None:
        super().__init__()
        if theme:
            self.theme = theme  # ansi-dark / ansi-light leave the colours to the terminal
        self.db_path = db_path
        self.clock = clock
        self.refresh_seconds = refresh_seconds
        self.label = label or redacted(db_path)
        self.read_only = read_only
        # Who the dashboard acts as: the engine's operator identity, set when it opens (on
        # PostgreSQL the database role connected as, whatever BUDGETEER_USER says).
        self.actor = ""
        self.engine: Engine | None = None
        self.fatal_error: str | None = None
        self.paused = False
        self.updated_ms: int | None = None
        self.error: str | None = None
        self.known_requests: set[str] | None = None  # pending override requests already announced
        self.watching = False
        self._poll_timer: Timer | None = None
        self._wake_timer: Timer | None = None  # a read of pushed changes, soon
        self._wake_after_read = False  # a change came while a read was under way: read again after it

    def load_keymap(self, path: Path) -> None:
        """A user keymap: a JSON object of binding id -> keys (``{"app.quit": "ctrl+q"}``)."""
        try:
            mapping = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            self.notify(f"Keymap {path} ignored: {exc}", severity="warning")
            return
        if isinstance(mapping, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
            self.set_keymap(mapping)
        else:
            self.notify(f"Keymap {path} ignored: it must map binding ids to keys", severity="warning")

    async def on_mount(self) -> None:
        self.sub_title = self.label + ("  (read-only)" if self.read_only else "")
        self.load_keymap(default_db_path().parent / "keymap.json")
        try:
            self.engine = await Engine.open(self.db_path, clock=self.clock)
        except StoreError as exc:
            self.fatal_error = str(exc)
            self.exit()
            return
        self.engine.on_change(self._ledger_notified)
        self.actor = self.engine.actor
        if self.engine.identity_notice:
            self.notify(self.engine.identity_notice, title="Who is acting", severity="warning", timeout=15)
        await self.switch_mode("overview")
        self._watch_requests()
        self.arm_poll()
        self.set_interval(1.0, self.update_status)

    async def on_unmount(self) -> None:
        if self.engine is not None:
            await self.engine.close()

    # ---- live refresh

    def data_screen(self) -> DataScreen | None:
        """The data screen showing now: None while a modal is open, and in the instant of a
        mode switch when the new mode's stack is still empty (where ``self.screen`` raises)."""
        try:
            screen = self.screen
        except ScreenStackError:
            return None
        return screen if isinstance(screen, DataScreen) else None

    def arm_poll(self) -> None:
        """Schedule the next poll ``refresh_seconds`` from now, replacing any scheduled one.
        Every screen's load calls this when it finishes, so the next read starts a full
        interval after the last one ended (a one-shot timer re-armed, never a fixed
        interval): slow reads never pile up and never leave the app no idle time."""
        if self._poll_timer is not None:
            self._poll_timer.stop()
        if not self.is_running:
            return
        self._poll_timer = self.set_timer(self.refresh_seconds, self._poll, name="poll")

    def _poll(self) -> None:
        self._poll_timer = None
        if self.paused:
            self.arm_poll()
            return
        self._watch_requests()  # on any screen, a modal included
        screen = self.data_screen()
        if screen is None:  # a modal is open, or a mode switch is under way
            self.arm_poll()
            return
        if not screen.reload(poll=True):  # a read still under way arms the next poll when it ends
            self.arm_poll()

    def _ledger_notified(self, _kind: str) -> None:
        """A process committed a change (the ledger pushed it, ``Engine.on_change``): read within
        ``WAKE_S``, with whatever else arrives meanwhile."""
        if self._wake_timer is None and self.is_running:
            self._wake_timer = self.set_timer(WAKE_S, self._wake, name="wake")

    def _wake(self) -> None:
        """Read what is shown again, and look for override requests, as a poll does (a poll that
        finds the same data leaves the screen alone); the timer's poll goes on as it was."""
        self._wake_timer = None
        if self.paused:
            return
        self._watch_requests()
        screen = self.data_screen()
        if screen is not None and not screen.reload(poll=True):
            # A read under way may have begun before the change: one more when it ends.
            self._wake_after_read = True

    def _watch_requests(self) -> None:
        """Announce override requests opened since the last look, by this process or another,
        whatever screen is showing (a modal included). One look at a time: a look still
        running is left to finish, never cancelled by the next poll."""
        if self.engine is not None and not self.watching:
            self.watching = True
            self._look_for_requests()

    @work(group="watch-requests")
    async def _look_for_requests(self) -> None:
        try:
            assert self.engine is not None
            pending = await self.engine.override_requests(pending=True)
        except Exception:  # the screen's own load reports an unreadable ledger
            return
        finally:
            self.watching = False
        ids = {r.id for r in pending}
        if self.known_requests is None:
            if pending:
                self.notify(f"{len(pending)} override request{'s' if len(pending) > 1 else ''} wait for a "
                            "decision: 5 shows them", title="Approvals")
        else:
            for r in pending:
                if r.id not in self.known_requests:
                    self.notify(f"{r.requester} asks {r.format_amount(r.amount)} past "
                                f"{r.policy.get('name', r.policy_id)}: {r.reason[:80]}  (5 shows it)",
                                title="Override request", severity="warning", timeout=10)
        # Kept as a union: a request undone back to pending was announced already.
        self.known_requests = (self.known_requests or set()) | ids

    # ---- what screens tell the app

    @on(LedgerRead)
    def mark_updated(self) -> None:
        self.error = None
        self.updated_ms = self.engine.now_ms() if self.engine else None
        self.update_status()

    @on(ReadEnded)
    def _read_ended(self) -> None:
        self.arm_poll()  # the next poll: a full interval after this read ended
        if self._wake_after_read:
            self._wake_after_read = False
            self._ledger_notified("*")

    @on(LedgerChanged)
    def _ledger_changed(self) -> None:
        """What is on screen reads again (other screens read when shown)."""
        screen = self.data_screen()
        if screen is not None:
            screen.reload()

    @on(StatusOutdated)
    def _status_outdated(self) -> None:
        self.update_status()

    @on(WorkFailed)
    def _work_failed(self, failure: WorkFailed) -> None:
        """The one place a failure of the dashboard's work becomes words. An error Budgeteer raises
        on purpose is its own sentence; anything else is an unexpected error, with a log line (its
        type and message, no traceback). A read that fails also shows in the status line until a
        read succeeds, and its notice is not repeated at every poll."""
        exc = failure.error
        words = in_words(exc)
        if words is None:
            words = f"unexpected error: {type(exc).__name__}: {exc}"
            log.error("dashboard: %s failed with an unexpected error: %s: %s", failure.group, type(exc).__name__, exc)
        if failure.group == READS:
            seen = self.error
            self.ledger_error(exc)
            if self.error == seen:
                return
        self.notify(words, title=failure.title, severity="error", timeout=10)

    def ledger_error(self, exc: BaseException) -> None:
        self.error = f"The ledger cannot be read: {exc}"
        self.update_status()

    def update_status(self) -> None:
        screen = self.data_screen()
        if screen is None or self.engine is None:
            return
        if self.error:
            text = f"[b red]{self.error}[/]  (retrying every {self.refresh_seconds:g} s)"
        elif self.updated_ms is None:
            text = "loading…"
        else:
            age = max(0, (self.engine.now_ms() - self.updated_ms) // 1000)
            pushed = "on change and " if self.engine.notifies else ""
            state = "[b]paused[/b] (p resumes)" if self.paused else f"live, {pushed}every {self.refresh_seconds:g} s"
            text = f"updated {age} s ago · {state}"
        screen.show_status(text)

    def action_toggle_pause(self) -> None:
        self.paused = not self.paused
        self.update_status()

    def action_refresh_now(self) -> None:
        self._watch_requests()
        screen = self.data_screen()
        if screen is not None:
            screen.reload()

    # ---- keys, help and commands

    def typing(self) -> bool:
        """A text box has the focus: printable keys (`:` too) are text, esc leaves it."""
        return isinstance(self.focused, (Input, TextArea))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "commands":
            return not self.typing()  # `:` in a text box is a colon
        if action == "leave_input":
            return self.typing()  # otherwise esc is the screen's (back, cancel, close)
        return True

    async def action_commands(self) -> None:
        await self.action_command_palette()

    async def action_command_palette(self) -> None:
        """Open the palette and give its box the focus before the next key is read: the app
        reads keys one after the other, so `:usage` typed at once all lands in the box."""
        if self.use_command_palette and not CommandPalette.is_open(self):
            palette = Palette(id="--command-palette")
            mounted = asyncio.ensure_future(self.push_screen(palette))
            # Bounded: while this waits the app reads no key, and an app that is exiting
            # (a crash elsewhere) never mounts the palette; it then opens as Textual's would.
            done, _ = await asyncio.wait({mounted}, timeout=2.0)
            boxes = palette.query(CommandInput) if done else None
            if boxes:
                palette.set_focus(boxes.first())

    async def action_leave_input(self) -> None:
        """esc in any text box: a dashboard screen takes the focus back to its table (the
        filter box is cleared too); a form or the palette does what its own esc does (cancel,
        close); anything else just loses the focus."""
        screen = self.screen
        if isinstance(screen, DataScreen):
            screen.leave_input()
            return
        for binding in screen._bindings.key_to_bindings.get("escape", []):
            if await self.run_action(binding.action, screen):
                return
        screen.set_focus(None)

    def action_help(self) -> None:
        """Every binding active on this screen: the screen's own first, then those every screen
        shares and its tables', then the app's, then Textual's own (arrows, page keys)."""
        rows: list[tuple[int, str, str, str]] = []
        screen = self.screen
        for key, active in screen.active_bindings.items():
            binding = active.binding
            rows.append((binding_rank(screen, active.node, binding), key_label(self.get_key_display(binding), key),
                         binding.description or binding.action, binding.id or "(Textual's own)"))
        rows.sort(key=lambda r: r[0])  # stable: each group keeps its bindings' order
        self.push_screen(HelpModal([row[1:] for row in rows]))

    def get_system_commands(self, screen: Screen[object]) -> Iterable[SystemCommand]:
        """The app's commands; the screen's own come from its ScreenActions provider."""
        for mode, (key, description) in SCREENS.items():
            yield SystemCommand(f"Go to {mode} ({key})", description,
                                lambda m=mode: self.run_worker(self.switch_mode(m)))  # type: ignore[misc]
        yield SystemCommand("Pause or resume live refresh (p)", "Stop polling the ledger", self.action_toggle_pause)
        yield SystemCommand("Refresh now (r)", "Read the ledger again", self.action_refresh_now)
        yield SystemCommand("Keys of this screen (?)", "Every binding and its id", self.action_help)
        for command in super().get_system_commands(screen):
            if command.title != "Keys":  # Textual's key panel: the line above is this app's
                yield command
