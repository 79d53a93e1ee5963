"""Override requests and their grants (``override_requests``, and the grant a hold took):
the rows behind ``engine.approvals``, which keeps the state machine and its rules."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final

from engine.approvals import OverrideRequest
from engine.ledger.changes import APPROVAL, announce
from engine.ledger.dbapi import Connection

_COLUMNS: Final = ("id, subject, policy_id, policy_snapshot, requester, amount, duration_ms, reason, evaluation, "
                   "status, created_ms, expires_ms, decided_by, decided_ms, decision_reason, granted, "
                   "grant_expires_ms, grant_used")


def _request(row: Sequence[Any]) -> OverrideRequest:
    (rid, subject, policy_id, snapshot, requester, amount, duration, reason, evaluation, status, created, expires,
     decided_by, decided_ms, decision_reason, granted, grant_expires, used) = row
    return OverrideRequest(rid, subject or f"usage-budget:{policy_id}", policy_id, json.loads(snapshot), requester,
                           amount, duration, reason, json.loads(evaluation), status, created, expires, decided_by,
                           decided_ms, decision_reason, granted, grant_expires, used)


class Approvals:
    __slots__ = ("conn",)

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def get(self, request_id: str) -> OverrideRequest | None:
        row = self.conn.execute(f"SELECT {_COLUMNS} FROM override_requests WHERE id = ?", (request_id,)).fetchone()
        return None if row is None else _request(row)

    def pending_of(self, policy_id: str, requester: str) -> OverrideRequest | None:
        row = self.conn.execute(f"SELECT {_COLUMNS} FROM override_requests WHERE policy_id = ? AND requester = ? "
                                 "AND status = 'pending'", (policy_id, requester)).fetchone()
        return None if row is None else _request(row)

    def listing(self, pending: bool | None, limit: int) -> list[OverrideRequest]:
        """Pending requests oldest first; decided ones (``pending=False``) newest first; None: all, newest first."""
        if pending:
            sql = f"SELECT {_COLUMNS} FROM override_requests WHERE status = 'pending' ORDER BY created_ms, id LIMIT ?"
        elif pending is False:
            sql = (f"SELECT {_COLUMNS} FROM override_requests WHERE status != 'pending' "
                   "ORDER BY coalesce(decided_ms, created_ms) DESC, id LIMIT ?")
        else:
            sql = f"SELECT {_COLUMNS} FROM override_requests ORDER BY created_ms DESC, id LIMIT ?"
        return [_request(r) for r in self.conn.execute(sql, (limit,))]

    def pending_count(self, now_ms: int) -> int:
        return int(self.conn.execute("SELECT count(*) FROM override_requests WHERE status = 'pending' AND "
                                      "(expires_ms IS NULL OR expires_ms > ?)", (now_ms,)).fetchone()[0])

    def insert(self, request_id: str, *, subject: str, policy_id: str, policy_snapshot: dict[str, Any],
               requester: str, amount: int, duration_ms: int, reason: str, evaluation: dict[str, Any],
               now_ms: int, expires_ms: int) -> None:
        """A new pending request."""
        self.conn.execute("INSERT INTO override_requests (id, subject, policy_id, policy_snapshot, requester, "
                           "amount, duration_ms, reason, evaluation, status, created_ms, expires_ms) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
                           (request_id, subject, policy_id, json.dumps(policy_snapshot), requester, amount,
                            duration_ms, reason, json.dumps(evaluation), now_ms, expires_ms))
        announce(self.conn, APPROVAL)

    def expire(self, now_ms: int) -> list[str]:
        """Pending requests past their time become expired (decided when they expired); their ids."""
        ids = [str(r[0]) for r in self.conn.execute(
            "SELECT id FROM override_requests WHERE status = 'pending' AND expires_ms IS NOT NULL AND expires_ms <= ?",
            (now_ms,))]
        if ids:
            self.conn.executemany("UPDATE override_requests SET status = 'expired', decided_ms = expires_ms "
                                   "WHERE id = ?", [(i,) for i in ids])
            announce(self.conn, APPROVAL)
        return ids

    def approve(self, request_id: str, actor: str, now_ms: int, reason: str, granted: int,
                grant_expires_ms: int) -> bool:
        """Approve a request still pending; False if it was not."""
        approved = self.conn.execute(
            "UPDATE override_requests SET status = 'approved', decided_by = ?, decided_ms = ?, "
            "decision_reason = ?, granted = ?, grant_expires_ms = ? WHERE id = ? AND status = 'pending'",
            (actor, now_ms, reason, granted, grant_expires_ms, request_id)).rowcount > 0
        if approved:
            announce(self.conn, APPROVAL)
        return approved

    def deny(self, request_id: str, actor: str, now_ms: int, reason: str) -> None:
        self.conn.execute("UPDATE override_requests SET status = 'denied', decided_by = ?, decided_ms = ?, "
                           "decision_reason = ? WHERE id = ? AND status = 'pending'",
                           (actor, now_ms, reason, request_id))
        announce(self.conn, APPROVAL)

    def cancel(self, request_id: str, actor: str, now_ms: int) -> None:
        self.conn.execute("UPDATE override_requests SET status = 'cancelled', decided_by = ?, decided_ms = ? "
                           "WHERE id = ?", (actor, now_ms, request_id))
        announce(self.conn, APPROVAL)

    def reopen(self, request_id: str) -> None:
        """Back to pending, with no decision and no grant."""
        self.conn.execute("UPDATE override_requests SET status = 'pending', decided_by = NULL, decided_ms = NULL, "
                           "decision_reason = NULL, granted = NULL, grant_expires_ms = NULL WHERE id = ?",
                           (request_id,))
        announce(self.conn, APPROVAL)

    def set_times(self, request_id: str, created_ms: int, expires_ms: int | None) -> None:
        self.conn.execute("UPDATE override_requests SET created_ms = ?, expires_ms = ? WHERE id = ?",
                           (created_ms, expires_ms, request_id))
        announce(self.conn, APPROVAL)

    # ---- grants

    def active_grant(self, policy_id: str, requester: str, now_ms: int, need: int) -> OverrideRequest | None:
        """The approved, unexpired grant of this requester on this policy with at least ``need``
        left that ends first."""
        rows = self.conn.execute(
            f"SELECT {_COLUMNS} FROM override_requests WHERE policy_id = ? AND requester = ? "
            "AND status = 'approved' AND grant_expires_ms > ? AND granted - grant_used >= ? "
            "ORDER BY grant_expires_ms LIMIT 1", (policy_id, requester, now_ms, need)).fetchall()
        return _request(rows[0]) if rows else None

    def use_grant(self, request_id: str, amount: int) -> None:
        """Take ``amount`` from the grant (a negative amount gives it back)."""
        self.conn.execute("UPDATE override_requests SET grant_used = grant_used + ? WHERE id = ?",
                           (amount, request_id))

    def policy_snapshot(self, request_id: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT policy_snapshot FROM override_requests WHERE id = ?",
                                 (request_id,)).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def metrics(self, request_ids: Sequence[Any]) -> dict[str, str]:
        """The metric of each request's policy (``usd`` when its snapshot names none), by id."""
        ids = [str(i) for i in request_ids]
        metrics: dict[str, str] = {}
        for start in range(0, len(ids), 500):  # within either database's limit on parameters
            chunk = ids[start:start + 500]
            for request_id, snapshot in self.conn.execute(
                    f"SELECT id, policy_snapshot FROM override_requests WHERE id IN ({', '.join('?' * len(chunk))})",
                    chunk):
                metrics[str(request_id)] = str(json.loads(snapshot).get("metric") or "usd")
        return metrics

    def hold_takes(self, hold_id: str, request_id: str | None, amount: int) -> None:
        """What a call's hold took from a grant (``request_id``), remembered on the hold."""
        if request_id is None:
            self.conn.execute("UPDATE holds SET grant_amount = ? WHERE id = ?", (amount, hold_id))
        else:
            self.conn.execute("UPDATE holds SET grant_id = ?, grant_amount = ? WHERE id = ?",
                               (request_id, amount, hold_id))
