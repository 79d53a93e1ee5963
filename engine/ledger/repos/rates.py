"""Rate-limit windows (``rate_log``, ``rate_totals``): the rows behind ``engine.ratelimits``,
which keeps the sliding-window rules and never sees a statement.

``rate_log`` holds what each key took, one row per take (or correction), at the store's time;
``rate_totals`` the sum of a key's rows still in the log, kept by triggers on the log, so that
what a window holds is read at a constant cost however busy the key: its total less the rows
that have left the window and are not yet pruned (a short range of the index). Rows that have
left the window are deleted now and then (``prune``). Every method runs inside the ledger's
write transaction: the read, the decision and the take are one, under the ledger's write lock,
whichever process makes them. A take is two statements (two round trips on PostgreSQL), one to
read every window it needs and one to log every row it takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, NamedTuple

from engine.ledger.dbapi import Connection

#: What the window of one (key, kind) holds: its total, what left it (sum, rows), its oldest row.
_WINDOW: Final = (
    "SELECT {n} AS n, (SELECT total FROM rate_totals WHERE key = ? AND kind = ?), "
    "(SELECT coalesce(sum(amount), 0) FROM rate_log WHERE key = ? AND kind = ? AND ts_ms <= ?), "
    "(SELECT count(*) FROM rate_log WHERE key = ? AND kind = ? AND ts_ms <= ?), "
    "(SELECT min(ts_ms) FROM rate_log WHERE key = ? AND kind = ? AND ts_ms > ?)")
_LOG_ROW: Final = "INSERT INTO rate_log (key, kind, ts_ms, amount) VALUES (?, ?, ?, ?)"


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

    def windows(self, keys: Sequence[tuple[str, str]], cutoff_ms: int) -> list[RateWindow]:
        """The windows of each (key, kind) of ``keys``, in their order, that start after
        ``cutoff_ms`` (rows at or before it have left): one statement for all of them."""
        if not keys:
            return []
        sql = " UNION ALL ".join(_WINDOW.format(n=n) for n in range(len(keys))) + " ORDER BY n"
        params: list[object] = []
        for key, kind in keys:
            params += (key, kind, key, kind, cutoff_ms, key, kind, cutoff_ms, key, kind, cutoff_ms)
        return [RateWindow(int(total or 0) - int(gone or 0), None if oldest is None else int(oldest), int(expired or 0))
                for _, total, gone, expired, oldest in self.conn.execute(sql, params)]

    def window(self, key: str, kind: str, cutoff_ms: int) -> RateWindow:
        """The window of (key, kind) that starts after ``cutoff_ms``."""
        return self.windows([(key, kind)], cutoff_ms)[0]

    def entries(self, key: str, kind: str, after_ms: int, offset: int, limit: int) -> list[tuple[int, int]]:
        """(ts_ms, amount) of ``limit`` rows of (key, kind) after ``after_ms``, oldest first,
        from the ``offset``-th on (a page of the window)."""
        return [(int(ts), int(amount)) for ts, amount in self.conn.execute(
            "SELECT ts_ms, amount FROM rate_log WHERE key = ? AND kind = ? AND ts_ms > ? ORDER BY ts_ms, amount "
            "LIMIT ? OFFSET ?", (key, kind, after_ms, limit, offset))]

    def keys(self) -> list[tuple[str, str]]:
        """Every (key, kind) the log has known."""
        return [(str(k), str(t)) for k, t in self.conn.execute("SELECT key, kind FROM rate_totals ORDER BY key, kind")]

    def add(self, rows: Sequence[tuple[str, str, int, int]]) -> None:
        """Log (key, kind, ts_ms, amount) rows, in one statement (the log's trigger adds them to
        their keys' totals)."""
        if rows:
            self.conn.execute(_LOG_ROW + ", (?, ?, ?, ?)" * (len(rows) - 1), [value for row in rows for value in row])

    def prune(self, key: str, kind: str, cutoff_ms: int) -> None:
        """Delete the rows of (key, kind) at or before ``cutoff_ms`` (the log's trigger takes
        them off the total)."""
        self.conn.execute("DELETE FROM rate_log WHERE key = ? AND kind = ? AND ts_ms <= ?", (key, kind, cutoff_ms))
