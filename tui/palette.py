"""The command palette (ctrl+p or `:`): the current screen's actions by name, then the app's.

``ScreenActions`` is a provider every dashboard screen lists in its ``COMMANDS`` (Posting's
pattern): each binding of the screen and of its focused widget becomes a command named by its
description, so a binding added to a screen is in the palette without more code.

``Palette`` fixes a race of Textual's palette: its list is filled by a search that runs after
each key, so an enter typed right after the text (`:usage⏎` at typing speed) chose whatever
the stale list had highlighted (the first command in alphabetical order, "Go to alerts").
Enter now runs the best match of the text in the box whenever the list is not yet its answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from textual import on
from textual.command import CommandPalette, DiscoveryHit, Hit, Hits, Provider
from textual.widgets import Input

if TYPE_CHECKING:
    from textual.binding import Binding
    from textual.dom import DOMNode
    from textual.screen import Screen


def key_label(app_key_display: str, key: str) -> str:
    """How a key reads in help and in the palette: `?` rather than question_mark."""
    return {"question_mark": "?", "colon": ":", "slash": "/", "escape": "esc"}.get(key, app_key_display)


def binding_rank(screen: Screen[object], node: DOMNode, binding: Binding) -> int:
    """Where a binding is listed (help, footer, palette): 0 the screen's own, 1 the keys every
    screen shares (filter: screen.*) and its widgets' (a table's), 2 the app's, 3 Textual's own
    (bindings without an id)."""
    if not binding.id:
        return 3
    if node is screen.app:
        return 2
    return 0 if node is screen and not binding.id.startswith("screen.") else 1


@dataclass
class _ScreenHit(DiscoveryHit):
    """A screen action listed before anything is typed. Textual orders these hits by score
    (all 0) in the order its providers happen to answer, so the app's go-to commands often came
    first; a rank just above 0, falling with the action's place, puts the screen's first."""

    rank: float = 0.0

    @property
    def score(self) -> float:
        return self.rank


class ScreenActions(Provider):
    """Every action of the screen the palette was opened on, by its binding's description."""

    def _actions(self) -> list[tuple[str, str, partial[object]]]:
        """Every binding of the screen and its focused widget, each action once, the screen's
        own first. Read from the binding chain rather than active_bindings, where a key bound
        twice (enter: the table's select, the screen's details) shows only one of them."""
        screen = self.screen
        found = []
        seen: set[tuple[int, str]] = set()
        for node, bindings in screen._modal_binding_chain:
            for key, binding in bindings:
                rank = binding_rank(screen, node, binding)
                if rank > 1 or not binding.description or (id(node), binding.action) in seen:
                    continue  # the app's commands come from get_system_commands; one command an action
                if self.app._check_action_state(binding.action, node) is False:
                    continue
                seen.add((id(node), binding.action))
                found.append((rank, key, node, binding))
        found.sort(key=lambda f: f[0])
        screen_name = screen.sub_title or type(screen).__name__
        return [(f"{b.description} ({key_label(self.app.get_key_display(b), key)})", f"{screen_name} · {b.id}",
                 partial(self._run, b, node)) for _, key, node, b in found]

    async def _run(self, binding: Binding, node: DOMNode) -> None:
        await self.app.run_action(binding.action, node)

    async def discover(self) -> Hits:
        for n, (title, help_text, run) in enumerate(self._actions()):
            yield _ScreenHit(title, run, help=help_text, rank=0.5 - n / 10_000)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, help_text, run in self._actions():
            if (score := matcher.match(title)) > 0:
                yield Hit(score, matcher.highlight(title), run, help=help_text)


class Palette(CommandPalette):
    """Textual's palette, with enter running the best match of what is typed (see the module)."""

    def _gathering(self) -> bool:
        return any(w.group == self._GATHER_COMMANDS_GROUP and not w.is_finished for w in self.workers)

    async def _best_match(self, text: str) -> Hit | None:
        best: Hit | None = None
        async for hit in self._search_for(text):
            if isinstance(hit, Hit) and (best is None or hit.score > best.score):
                best = hit
        return best

    @on(Input.Submitted)
    def _enter(self, event: Input.Submitted) -> None:
        """Enter while the list is still being searched for the text: run the text's best match
        (prevent_default keeps Textual's handler, which picks the highlighted option, out)."""
        text = event.value.strip()
        if text and self._gathering():
            event.prevent_default()
            event.stop()
            self._cancel_gather_commands()
            self.run_worker(self._run_best(text), group="palette-enter", exclusive=True)

    async def _run_best(self, text: str) -> None:
        hit = await self._best_match(text)
        if hit is None:
            self._gather_commands(text)  # show "no matches" as the palette does
            return
        self.app.post_message(CommandPalette.Closed(option_selected=True))
        self.dismiss()
        self.app.call_later(hit.command)
