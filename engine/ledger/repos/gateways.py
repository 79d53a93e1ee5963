"""Gateway heartbeats (``gateways``): which gateways run on this ledger, and their counters."""

from __future__ import annotations

from engine.ledger.dbapi import Connection
from engine.models import GatewayStatus


class Gateways:
    __slots__ = ("conn",)

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def heartbeat(self, s: GatewayStatus) -> None:
        """A gateway's latest heartbeat (its first one registers it)."""
        self.conn.execute(
            "INSERT INTO gateways (id, address, pid, started_ms, seen_ms, stopped_ms, requests, errors, "
            "requests_last_min, errors_last_min) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
            "seen_ms = excluded.seen_ms, stopped_ms = excluded.stopped_ms, requests = excluded.requests, "
            "errors = excluded.errors, requests_last_min = excluded.requests_last_min, "
            "errors_last_min = excluded.errors_last_min",
            (s.id, s.address, s.pid, s.started_ms, s.seen_ms, s.stopped_ms, s.requests, s.errors,
             s.requests_last_min, s.errors_last_min))

    def running(self, seen_since_ms: int) -> list[GatewayStatus]:
        """The gateways heard from since ``seen_since_ms`` and not stopped, oldest first."""
        return [GatewayStatus(*r) for r in self.conn.execute(
            "SELECT id, address, pid, started_ms, seen_ms, stopped_ms, requests, errors, requests_last_min, "
            "errors_last_min FROM gateways WHERE seen_ms >= ? AND stopped_ms IS NULL ORDER BY started_ms",
            (seen_since_ms,))]
