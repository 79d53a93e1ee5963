"""Changes that other processes keep in memory, and how a PostgreSQL ledger announces them.

A gateway keeps what it reads on every call in memory: the budget book's policies, the tokens
it checked, the catalog of models and providers, the price book. A change of one of these
*kinds* made by another process (another gateway, the dashboard, a command line, on any host)
has to reach it at once. On PostgreSQL the transaction that writes the kind sends
``NOTIFY budgeteer, '<kind>'`` (``announce``, called by the repository that writes it): the
notification is part of the transaction, delivered to every listening process when it commits
and never if it rolls back (a savepoint rolled back takes its notifications with it). Each
process listens on a connection of its own (``engine.ledger.pg.listen``) and hands the kind to
the store's subscribers (``Store.on_change``).

On SQLite nothing is sent: a running gateway reads policies again at the first batch after they
moved (every batch checks the ledger's version) and tokens after ``TOKEN_CACHE_S``; the
dashboard reads on its timer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final, Literal

from engine.ledger.dbapi import Connection

#: The notification channel.
CHANNEL: Final = "budgeteer"

Kind = Literal["policy", "token", "approval", "price", "provider", "member"]
POLICY: Final = "policy"  # a policy added, edited or removed
TOKEN: Final = "token"  # a token issued, revoked or rotated
APPROVAL: Final = "approval"  # an override request opened or decided (a grant made, undone, expired)
PRICE: Final = "price"  # price versions imported
PROVIDER: Final = "provider"  # a provider added or removed
MEMBER: Final = "member"  # a member's role set or removed
KINDS: Final = (POLICY, TOKEN, APPROVAL, PRICE, PROVIDER, MEMBER)
#: Anything may have changed: the listener was disconnected, and what was sent meanwhile is lost.
ANY: Final = "*"

_NOTIFY: Final = f"SELECT pg_notify('{CHANNEL}', ?)"
log = logging.getLogger("budgeteer")


class Subscribers:
    """Who is told of a change of a kind: the store's listeners, the engine's. Each is told in
    turn; one that fails is logged and the others still hear of it."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[[str], None]] = []

    def add(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Subscribe ``callback``; returns what unsubscribes it."""
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return unsubscribe

    def tell(self, kind: str) -> None:
        for callback in list(self._callbacks):
            try:
                callback(kind)
            except Exception as exc:  # one subscriber's failure stops no other
                log.warning("a subscriber to the ledger's changes failed on %r: %s: %s", kind,
                            type(exc).__name__, exc)


def announce(conn: Connection, kind: Kind) -> None:
    """Tell every process listening on the ledger that ``kind`` changed, when (and if) the
    transaction this runs in commits. Nothing on SQLite (no process listens there)."""
    if getattr(conn, "dialect", "sqlite") == "postgresql":
        conn.execute(_NOTIFY, (kind,))
