"""Rate-limit windows (``rate_log``, ``rate_totals``): the rows behind ``engine.ratelimits``,
which keeps the sliding-window rules and never sees a statement.

``rate_log`` holds what each key took, one row per take (or correction), at the store's time;
``rate_totals`` the sum of a key's rows still in the log, so that what a window holds is read
in one statement of constant cost, however busy the key: its total less the rows that have
left the window and are not yet pruned (a short range of the index). Rows that have left the
window are deleted now and then (``prune``), their sum taken off the total in the same
transaction. Every method runs inside the ledger's write transaction: the read, the decision
and the take are one, under the ledger's write lock, whichever process makes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, NamedTuple

from engine.ledger.dbapi import Connection

#: What a window holds, for one (key, kind): its total, its oldest row and the rows that left it.
_WINDOW: Final = (
    "SELECT (SELECT total FROM rate_totals WHERE key = ? AND kind = ?), "
    "(SELECT coalesce(sum(amount), 0) FROM rate_log WHERE key = ? AND kind = ? AND ts_ms <= ?), "
    "(SELECT count(*) FROM rate_log WHERE key = ? AND kind = ? AND ts_ms <= ?), "
    "(SELECT min(ts_ms) FROM rate_log WHERE key = ? AND kind = ? AND ts_ms > ?)")
_LOG_ROW: Final = "INSERT INTO rate_log (key, kind, ts_ms, amount) VALUES (?, ?, ?, ?)"
_TOTAL_ROW: Final = ("INSERT INTO rate_totals (key, kind, total) VALUES (?, ?, ?) ON CONFLICT (key, kind) "
                     "DO UPDATE SET total = rate_totals.total + excluded.total")


class RateWindow(NamedTuple):
    """What the window of one (key, kind) holds: the sum of its rows (``total``), the time of
    its oldest row (None when it has none), and how many rows that have left it are still in
    the log (``expired``, the prune's backlog)."""

    total: int
    oldest_ms: int | None
    expired: int


class RateLog:
    __slots__ = ("conn",)

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def window(self, key: str, kind: str, cutoff_ms: int) -> RateWindow:
        """The window of (key, kind) that starts after ``cutoff_ms`` (rows at or before it have left)."""
        total, gone, expired, oldest = self.conn.execute(
            _WINDOW, (key, kind, key, kind, cutoff_ms, key, kind, cutoff_ms, key, kind, cutoff_ms)).fetchone()
        return RateWindow(int(total or 0) - int(gone or 0), None if oldest is None else int(oldest), int(expired or 0))

    def entries(self, key: str, kind: str, after_ms: int, offset: int, limit: int) -> list[tuple[int, int]]:
        """(ts_ms, amount) of ``limit`` rows of (key, kind) after ``after_ms``, oldest first,
        from the ``offset``-th on (a page of the window)."""
        return [(int(ts), int(amount)) for ts, amount in self.conn.execute(
            "SELECT ts_ms, amount FROM rate_log WHERE key = ? AND kind = ? AND ts_ms > ? ORDER BY ts_ms, amount "
            "LIMIT ? OFFSET ?", (key, kind, after_ms, limit, offset))]

    def add(self, rows: Sequence[tuple[str, str, int, int]]) -> None:
        """Log (key, kind, ts_ms, amount) rows and add them to their keys' totals (two statements)."""
        if not rows:
            return
        more = ", (?, ?, ?, ?)" * (len(rows) - 1)
        self.conn.execute(_LOG_ROW + more, [value for row in rows for value in row])
        totals: dict[tuple[str, str], int] = {}
        for key, kind, _, amount in rows:
            totals[(key, kind)] = totals.get((key, kind), 0) + amount
        self.conn.execute(_TOTAL_ROW.replace("(?, ?, ?)", ", ".join(["(?, ?, ?)"] * len(totals)), 1),
                          [value for (key, kind), total in totals.items() for value in (key, kind, total)])

    def prune(self, key: str, kind: str, cutoff_ms: int) -> None:
        """Delete the rows of (key, kind) at or before ``cutoff_ms``, their sum taken off the total."""
        gone = self.conn.execute("DELETE FROM rate_log WHERE key = ? AND kind = ? AND ts_ms <= ? RETURNING amount",
                                 (key, kind, cutoff_ms)).fetchall()
        if gone:
            self.conn.execute("UPDATE rate_totals SET total = total - ? WHERE key = ? AND kind = ?",
                              (sum(int(amount) for (amount,) in gone), key, kind))
