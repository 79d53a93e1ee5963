"""Alerts (stored once per policy, window, kind and threshold), overshoots (calls settled above
their hold), the webhooks alerts are delivered to, and the log of those deliveries."""

from __future__ import annotations

from collections.abc import Sequence

from engine.ledger.dbapi import Connection
from engine.ledger.results import AlertRow, Delivery, OvershootRow, Webhook


class Alerts:
    __slots__ = ("conn",)

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def raise_once(self, policy_id: str, window_start_ms: int, kind: str, threshold: int, now_ms: int,
                   value: int, message: str) -> int | None:
        """Store an alert once per policy, window, kind and threshold; its id, or None if already
        there. A threshold alert is not stored either when a higher threshold of the policy has
        fired in the window (a lower one never fires after it)."""
        cur = self.conn.execute(
            "INSERT INTO alerts (policy_id, window_start_ms, kind, threshold, ts_ms, value, message) "
            "SELECT ?, ?, ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM alerts WHERE policy_id = ? "
            "AND window_start_ms = ? AND kind = 'threshold' AND ? = 'threshold' AND threshold > ?) "
            "ON CONFLICT (policy_id, window_start_ms, kind, threshold) DO NOTHING",
            (policy_id, window_start_ms, kind, threshold, now_ms, value, message, policy_id, window_start_ms, kind,
             threshold))
        return cur.lastrowid if cur.rowcount else None

    def listing(self, *, include_acked: bool, limit: int) -> list[AlertRow]:
        """The newest ``limit`` alerts (not yet acknowledged, unless ``include_acked``), newest first."""
        where = "" if include_acked else "WHERE acked_ms IS NULL"
        return list(map(AlertRow._make, self.conn.execute(
            "SELECT id, policy_id, window_start_ms, kind, threshold, ts_ms, value, message, acked_by, acked_ms "
            f"FROM alerts {where} ORDER BY ts_ms DESC, id DESC LIMIT ?", (limit,))))

    def ack(self, alert_id: int, actor: str, now_ms: int) -> bool | None:
        """Acknowledge an alert (once): True if acknowledged now, False if it already was, None
        if there is no such alert."""
        row = self.conn.execute("SELECT acked_ms FROM alerts WHERE id = ?", (alert_id,)).fetchone()
        if row is None:
            return None
        if row[0] is None:
            self.conn.execute("UPDATE alerts SET acked_by = ?, acked_ms = ? WHERE id = ?", (actor, now_ms, alert_id))
        return row[0] is None

    def add_overshoot(self, now_ms: int, request_id: str, hold_id: str, policy_id: str, held: int,
                      settled: int) -> int:
        """Record a call settled above its hold on a policy; the overshoot's id."""
        cur = self.conn.execute("INSERT INTO overshoots (ts_ms, request_id, hold_id, policy_id, held, settled) "
                                "VALUES (?, ?, ?, ?, ?, ?)", (now_ms, request_id, hold_id, policy_id, held, settled))
        return int(cur.lastrowid or 0)

    def overshoots(self, since_ms: int = 0) -> list[OvershootRow]:
        """Each overshoot since ``since_ms``, oldest first."""
        return list(map(OvershootRow._make, self.conn.execute(
            "SELECT id, ts_ms, request_id, policy_id, held, settled FROM overshoots WHERE ts_ms >= ? ORDER BY id",
            (since_ms,))))

    def add_webhook(self, webhook_id: str, url: str, kind: str, now_ms: int) -> None:
        self.conn.execute("INSERT INTO webhooks (id, url, kind, enabled, created_ms) VALUES (?, ?, ?, 1, ?)",
                          (webhook_id, url, kind, now_ms))

    def remove_webhook(self, webhook_id: str) -> tuple[str, str] | None:
        """Disable an enabled webhook and forget its URL (a secret); its (url, kind), or None if
        there is no such webhook. The row stays for its deliveries."""
        row = self.conn.execute("SELECT url, kind FROM webhooks WHERE id = ? AND enabled = 1",
                                (webhook_id,)).fetchone()
        if row is not None:
            self.conn.execute("UPDATE webhooks SET enabled = 0, url = '' WHERE id = ?", (webhook_id,))
        return (str(row[0]), str(row[1])) if row else None

    def webhooks(self) -> list[Webhook]:
        """The enabled webhooks, oldest first. The URL is a secret: callers redact it."""
        return [Webhook(str(i), str(u), str(k)) for i, u, k in self.conn.execute(
            "SELECT id, url, kind FROM webhooks WHERE enabled = 1 ORDER BY created_ms")]

    def log_deliveries(self, rows: Sequence[tuple[int, str, int, int, int, str]]) -> None:
        """Log delivery attempts (alert, webhook, attempt, ts, ok, detail)."""
        self.conn.executemany("INSERT INTO webhook_deliveries (alert_id, webhook_id, attempt, ts_ms, ok, detail) "
                              "VALUES (?, ?, ?, ?, ?, ?)", rows)

    def deliveries(self, alert_id: int) -> list[Delivery]:
        return [Delivery(str(w), int(a), bool(ok), str(d)) for w, a, ok, d in self.conn.execute(
            "SELECT webhook_id, attempt, ok, detail FROM webhook_deliveries WHERE alert_id = ? ORDER BY id",
            (alert_id,))]
