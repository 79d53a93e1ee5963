"""The palette and the keys (issue 18, finding 5), driven by Pilot on a real ledger, at the
default refresh (2 s) and a frozen one. Keys "typed at once" are handed to the driver one after
the other with no pause, as a fast typist or a paste does; Pilot's press() waits for the app to
go idle after each key and so never shows the races these tests are about."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from pathlib import Path

import pytest
from textual import events
from textual.command import CommandList, CommandPalette
from textual.keys import _character_to_key, _get_unicode_name_from_key
from textual.widgets import Input, TextArea

from engine.budgets import build_policy
from engine.clock import FrozenClock
from engine.engine import Engine
from tests.conftest import event
from tui.app import BudgeteerApp
from tui.screens.approvals import ApprovalsScreen
from tui.screens.audit import AuditScreen
from tui.screens.budgets import BudgetsScreen
from tui.screens.form import FormModal
from tui.screens.help import HelpModal
from tui.screens.overview import OverviewScreen
from tui.screens.policy_form import PolicyForm
from tui.screens.tokens import TokensScreen
from tui.screens.usage import UsageScreen

REFRESHES = [2.0, 3600.0]  # the default refresh, and a frozen one


def type_at_once(app: BudgeteerApp, *keys: str) -> None:
    """Queue these keys on the driver with no pause between them (Pilot's press, without its waits)."""
    assert app._driver is not None
    for key in keys:
        char: str | None = key if len(key) == 1 else None
        if len(key) == 1 and not key.isalnum():
            key = _character_to_key(key)
        if char is None:
            try:
                char = unicodedata.lookup(_get_unicode_name_from_key(key))
            except KeyError:
                pass
        key_event = events.Key(key, char)
        key_event.set_sender(app)
        app._driver.send_message(key_event)


async def _settle(pilot: object, app: BudgeteerApp) -> None:
    await pilot.pause(0.1)  # type: ignore[attr-defined]
    await app.workers.wait_for_complete()
    await pilot.pause(0.1)  # type: ignore[attr-defined]


async def _until(pilot: object, app: BudgeteerApp, done: Callable[[], bool], seconds: float = 10) -> bool:
    """Wait for the keys already sent to be acted on (two cores shared by many: no fixed pause
    is long enough): True as soon as ``done()``, False after ``seconds``. Not a timing assertion."""
    for _ in range(int(seconds / 0.05)):
        if done():
            await _settle(pilot, app)
            return True
        await pilot.pause(0.05)  # type: ignore[attr-defined]
    return False


def _typing(app: BudgeteerApp) -> bool:
    return isinstance(app.focused, (Input, TextArea))


async def _ledger(db_path: Path, clock: FrozenClock) -> None:
    """Calls, a policy and a pending override request: every screen has rows and every form opens."""
    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.record_many([event(i, model=("gpt-4o", "o3")[i % 2]) for i in range(4)])
        policy = await engine.add_policy(build_policy(scope="global", metric="usd", window="day", hard="1",
                                                      name="Organisation daily"))
        await engine.request_override(policy.id, 1_000_000_000, 3_600_000, "a long enough reason to ask",
                                      requester="ci-bot")


@pytest.mark.parametrize("refresh", REFRESHES)
async def test_ctrl_p_and_colon_both_open_the_palette(db_path: Path, clock: FrozenClock, refresh: float) -> None:
    """`:` had displaced Textual's own ctrl+p: ctrl+p did nothing."""
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(120, 36)) as pilot:
        await _settle(pilot, app)
        for key in ("ctrl+p", "colon"):
            await pilot.press(key)
            await pilot.pause(0.1)
            assert isinstance(app.screen, CommandPalette), key
            await pilot.press("escape")
            await pilot.pause(0.1)
            assert isinstance(app.screen, OverviewScreen)
        # `:` in a text box is a colon, not the palette
        await pilot.press("slash", "a", "colon", "b")
        assert app.screen.query_one("#filter", Input).value == "a:b"
        assert isinstance(app.screen, OverviewScreen)


@pytest.mark.parametrize("refresh", REFRESHES)
async def test_a_command_typed_at_once_lands_where_it_says(db_path: Path, clock: FrozenClock,
                                                            refresh: float) -> None:
    """`:usage⏎` typed quickly landed on Alerts: the letters reached the screen under the palette
    before the palette had its box, and enter ran the first command of the unfiltered list."""
    await _ledger(db_path, clock)
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(120, 36)) as pilot:
        await _settle(pilot, app)
        for text, screen in (("usage", UsageScreen), ("tokens", TokensScreen), ("overview", OverviewScreen)):
            type_at_once(app, ":", *text, "enter")
            assert await _until(pilot, app, lambda s=screen: isinstance(app.screen, s)), (  # type: ignore[misc]
                f":{text}⏎ landed on {type(app.screen).__name__}")


@pytest.mark.parametrize("refresh", REFRESHES)
async def test_the_palette_offers_the_screens_actions_and_runs_them(db_path: Path, clock: FrozenClock,
                                                                     refresh: float) -> None:
    """The palette offered only go-to, pause, quit and theme; now every binding of the screen
    is a command named by its description, and choosing one does what its key does."""
    await _ledger(db_path, clock)
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(120, 36)) as pilot:
        for key, kind in (("3", BudgetsScreen), ("5", ApprovalsScreen), ("7", AuditScreen)):
            await pilot.press(key)
            await _settle(pilot, app)
            screen = app.screen
            assert isinstance(screen, kind)
            expected = {binding.description for _, binding in screen._bindings if binding.id}
            await pilot.press("ctrl+p")
            await _settle(pilot, app)
            commands = app.screen.query_one(CommandList)
            listed = {str(commands.get_option_at_index(i).prompt).split("\n")[0]
                      for i in range(commands.option_count)}
            names = {re.sub(r" \([^)]*\)$", "", name) for name in listed}
            assert expected <= names, expected - names
            assert {"Go to usage (2)", "Pause or resume live refresh (p)", "Refresh now (r)",
                    "Keys of this screen (?)", "Quit", "Theme"} <= listed
            await pilot.press("escape")
        # running one: on Budgets, "add" opens the new-policy form, as `a` does
        await pilot.press("3")
        await _settle(pilot, app)
        await pilot.press("ctrl+p", *"add", "enter")
        await _settle(pilot, app)
        assert isinstance(app.screen, PolicyForm) and app.screen.policy is None


def _screen_keys(app: BudgeteerApp) -> list[str]:
    """The keys of the app's go-to-screen bindings (1-9, and any screen added since)."""
    return [binding.key for _, binding in app._bindings if binding.action.startswith("switch_mode(")]


CASES = [  # (screen key, keys that focus a text box, what it is); every screen's filter box too
    ("8", ("e",), "Models' explain box"),
    ("3", ("a",), "the new-policy form"),
    ("3", ("e",), "the edit-policy form"),
    ("5", ("a",), "the approve form"),
    ("5", ("d",), "the deny form"),
    ("6", ("n",), "the new-token form"),
    ("9", ("n",), "the vault's add (or passphrase) form"),
    ("1", ("ctrl+p",), "the command palette"),
]


@pytest.mark.parametrize("refresh", REFRESHES)
async def test_esc_leaves_every_text_box(db_path: Path, clock: FrozenClock, refresh: float) -> None:
    """On Models, esc left the focus in the explain box, so `9` typed "9". Every text box of
    every screen and modal: after esc the next key typed at once is a command (here the number of
    another screen), never text in the box."""
    await _ledger(db_path, clock)
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(120, 40)) as pilot:
        filters = [(key, ("slash",), f"the filter box of screen {key}") for key in _screen_keys(app)]
        for screen_key, openers, what in filters + CASES:
            await pilot.press(screen_key)
            await _settle(pilot, app)
            start = app.screen
            table = start.query("VimTable")
            if table:
                table.first().focus()
            await pilot.press(*openers)
            await _settle(pilot, app)
            assert _typing(app), f"{what}: no text box has the focus"
            box = app.focused
            assert isinstance(box, Input)
            type_at_once(app, "x", "escape", "4" if screen_key != "4" else "2")
            await _settle(pilot, app)
            assert not box.value.endswith("4") and not box.value.endswith("2"), f"{what}: {box.value!r}"
            assert type(app.screen).__name__ == ("AlertsScreen" if screen_key != "4" else "UsageScreen"), \
                f"{what}: the key after esc went to {type(app.screen).__name__}"
            assert not _typing(app)


@pytest.mark.parametrize("refresh", REFRESHES)
async def test_text_typed_right_after_tab_lands_in_the_new_field(db_path: Path, clock: FrozenClock,
                                                                 refresh: float) -> None:
    """Text typed right after tab went into the field being left: tab was acted on only once it
    had bubbled back up to the app, after the letters behind it had been given to the old field."""
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("3")
        await _settle(pilot, app)
        await pilot.press("a")
        await _settle(pilot, app)
        form = app.screen
        assert isinstance(form, PolicyForm) and app.focused is form.query_one("#f-name", Input)
        # (a field reached by tab has its text selected: what is typed replaces it)
        type_at_once(app, "n", "tab", *"team:ml", "tab", "tab", "tab", "tab", *"40", "shift+tab", *"Asia/Tokyo")
        values = {}

        def filled() -> bool:
            values.update({name: form.query_one(f"#f-{name}", Input).value for name, _, _ in PolicyForm.FIELDS})
            return values["tz"].endswith("Tokyo") or values["soft"].endswith("Tokyo")

        await _until(pilot, app, filled)
        assert values == {"name": "n", "scope": "team:ml", "metric": "usd", "window": "month", "tz": "Asia/Tokyo",
                          "soft": "40", "hard": ""}
        # the same in a one-line form of another kind (tokens)
        await pilot.press("escape", "6", "n")
        await _settle(pilot, app)
        assert isinstance(app.screen, FormModal)
        first, second = list(app.screen.query(Input))[:2]
        assert app.focused is first
        type_at_once(app, "a", "tab", "b", "c")
        await _until(pilot, app, lambda: (first.value + second.value).endswith("c"))
        assert (first.value, second.value[-2:]) == ("a", "bc")


def _footer_text(app: BudgeteerApp) -> str:
    """The footer row as drawn (the screenshot's last line of text)."""
    svg = app.export_screenshot()
    rows = re.findall(r'<text class="[^"]*" x="[^"]*" y="([^"]*)"[^>]*>([^<]*)</text>', svg)
    by_y: dict[float, list[str]] = {}
    for y, text in rows:
        by_y.setdefault(float(y), []).append(text.replace("&#160;", " ").replace("&#x27;", "'"))
    return "".join(by_y[max(by_y)])


@pytest.mark.parametrize("refresh", REFRESHES)
@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
async def test_the_footer_shows_the_screens_keys_first_and_never_cuts_help_and_quit(
        db_path: Path, clock: FrozenClock, size: tuple[int, int], refresh: float) -> None:
    """`q Quit` was cut on Usage and Budgets at 160 columns and `? Help` at 80: the nine
    screen keys crowded the footer. On every screen, at both sizes, both are drawn, and the
    screen's own first key comes before the app's."""
    await _ledger(db_path, clock)
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=size) as pilot:
        for key in _screen_keys(app):
            await pilot.press(key)
            await _settle(pilot, app)
            own = sorted((b for _, b in app.screen._bindings if b.show and b.id),
                         key=lambda b: b.id.startswith("screen."))  # type: ignore[union-attr]
            first = f"{app.get_key_display(own[0])} {own[0].description}"
            # the footer is redrawn when the bindings change (a focus, a refresh): wait for it
            await _until(pilot, app, lambda f=first: _footer_text(app).strip().startswith(f))  # type: ignore[misc]
            footer = _footer_text(app)
            assert footer.strip().startswith(first), f"screen {key} at {size}: {footer!r}"
            assert "? Help" in footer and "q Quit" in footer, f"screen {key} at {size}: {footer!r}"


@pytest.mark.parametrize("refresh", REFRESHES)
async def test_help_lists_this_screens_keys_first(db_path: Path, clock: FrozenClock, refresh: float) -> None:
    """`?` listed the app's keys before the screen's: now the screen's (its tables' too), then
    the app's, then Textual's own."""
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("3")
        await _settle(pilot, app)
        app.screen.query_one("#policies").focus()
        await pilot.press("question_mark")
        await pilot.pause(0.1)
        help_modal = app.screen
        assert isinstance(help_modal, HelpModal)
        ids = [row[2] for row in help_modal.rows]
        assert ids[:4] == ["budgets.add", "budgets.edit", "budgets.delete", "budgets.backtest"]
        groups = [0 if not i.startswith(("app.", "(")) else 1 if i.startswith("app.") else 2 for i in ids]
        assert groups == sorted(groups) and set(groups) == {0, 1, 2}


async def test_the_palette_lists_the_screens_actions_before_anything_is_typed(db_path: Path, clock: FrozenClock,
                                                                             refresh: float) -> None:
    """With nothing typed the palette listed the app's go-to commands first, in whatever order
    its providers answered; the screen's own actions come first, in the screen's order."""
    await _ledger(db_path, clock)
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("3")
        await _settle(pilot, app)
        await pilot.press("ctrl+p")
        await _settle(pilot, app)
        commands = app.screen.query_one(CommandList)
        listed = [str(commands.get_option_at_index(i).prompt).split("\n")[0] for i in range(commands.option_count)]
        assert listed[:4] == ["Add (a)", "Edit (e)", "Delete (d)", "Backtest 30d (b)"], listed[:6]
