"""The footer: the screen's own keys first, then the app's, with `? Help` and `q Quit` pinned
to the right edge so a long row of screen keys never pushes them off an 80-column terminal.

The app's screen-switch keys (actions ``switch_mode(...)``) show as one hint, `0-9 Screens`,
instead of nine items. Which key does what is read from the bindings, so keys added to a screen
or to the app show up here by themselves and a user keymap's keys are the ones shown.

Without its leak: the footer is rebuilt whenever the active bindings change (every screen
switch, every move of the focus), and each key it builds binds itself to the footer's
``compact`` reactive. Textual keeps those entries on the footer and drops one only when
``compact`` changes, which never happens here, so every key ever built stayed alive with its
styles and caches: about 280 keys and 6 MB per tour of the nine screens (Textualize/textual#6666,
open). Here the entries of keys no longer in the footer are dropped after each rebuild.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import HorizontalGroup
from textual.widgets import Footer
from textual.widgets._footer import FooterKey

from tui.palette import binding_rank

PINNED = ("help", "quit")  # the app's actions that always show, at the right edge


class KeysFooter(Footer):
    DEFAULT_CSS = """
    KeysFooter .footer-pinned {
        dock: right;
        width: auto;
        height: 1;
        padding-left: 1;
        background: $footer-background;
    }
    """

    async def recompose(self) -> None:
        await super().recompose()
        self.drop_stale_watchers()

    def drop_stale_watchers(self) -> None:
        watchers = getattr(self, "__watchers", {})
        for name, entries in watchers.items():
            watchers[name] = [(node, callback) for node, callback in entries
                              if node.is_attached and not node._closing]

    def watcher_count(self) -> int:
        """Entries bound to this footer's reactives (one per key shown, once rebuilt)."""
        return sum(len(entries) for entries in getattr(self, "__watchers", {}).values())

    def _key(self, binding: Binding, enabled: bool, tooltip: str, display: str | None = None,
             description: str | None = None) -> FooterKey:
        return FooterKey(binding.key, display or self.app.get_key_display(binding),
                         binding.description if description is None else description, binding.action,
                         disabled=not enabled, tooltip=tooltip or binding.description).data_bind(
                             compact=Footer.compact)

    def compose(self) -> ComposeResult:
        if not self._bindings_ready:
            return
        screen_keys: list[tuple[int, FooterKey]] = []
        app_keys: list[FooterKey] = []
        pinned: dict[str, FooterKey] = {}
        switches: list[tuple[Binding, bool, str]] = []
        actions: set[tuple[int, str]] = set()
        switch_at = 0
        for active in self.screen.active_bindings.values():
            node, binding, enabled, tooltip = active
            if not binding.show or (id(node), binding.action) in actions:
                continue  # one item per action, as Textual's footer does
            focused = self.app.focused
            if binding.action == "leave_input" and (focused is None or focused.screen is not self.screen):
                continue  # the text box with the focus is in the palette or a form above this screen
            actions.add((id(node), binding.action))
            if node is not self.app:
                # This screen's own keys before those every screen shares (`/` filter).
                rank = binding_rank(self.screen, node, binding)
                screen_keys.append((rank, self._key(binding, enabled, tooltip)))
            elif binding.action in PINNED:
                pinned[binding.action] = self._key(binding, enabled, tooltip)
            elif binding.action.startswith("switch_mode("):
                switch_at = switch_at if switches else len(app_keys)  # the hint goes where the first was
                switches.append((binding, enabled, tooltip))
            else:
                app_keys.append(self._key(binding, enabled, tooltip))
        if switches:
            keys = [self.app.get_key_display(b) for b, _, _ in switches]
            if all(k.isdigit() for k in keys):  # 1-9, or 0-9 with a tenth screen on 0
                keys_shown = sorted(keys)
                display = f"{keys_shown[0]}-{keys_shown[-1]}" if len(keys) > 1 else keys[0]
            else:  # a keymap gave them other keys: name them all
                display = "".join(keys) if all(len(k) == 1 for k in keys) else ",".join(keys)
            hint = self._key(switches[0][0], True, "Switch screen: " + ", ".join(
                f"{k} {b.description}" for k, (b, _, _) in zip(keys, switches, strict=True)),
                display=display, description="Screens")
            app_keys.insert(switch_at, hint)
        yield from (key for _, key in sorted(screen_keys, key=lambda k: k[0]))
        yield from app_keys
        if pinned:
            with HorizontalGroup(classes="footer-pinned"):
                yield from (pinned[action] for action in PINNED if action in pinned)
