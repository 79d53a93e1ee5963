"""Textual's Footer without its leak.

The footer is rebuilt whenever the active bindings change (every screen switch, every
move of the focus), and each key it builds binds itself to the footer's ``compact``
reactive. Textual keeps those entries on the footer and drops one only when ``compact``
changes, which never happens here, so every key ever built stayed alive with its styles
and caches: about 280 keys and 6 MB per tour of the nine screens (Textualize/textual#6666,
open). Here the entries of keys no longer in the footer are dropped after each rebuild.
"""

from __future__ import annotations

from textual.widgets import Footer


class LeanFooter(Footer):
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
