"""Budget policies, stored as their JSON spec (``engine.budgets.Policy`` reads and writes it)."""

from __future__ import annotations

from engine.ledger.changes import POLICY, announce
from engine.ledger.dbapi import Connection
from engine.ledger.results import PoliciesVersion


class Policies:
    __slots__ = ("conn",)

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def specs(self) -> list[str]:
        """The spec of every policy not deleted, by id."""
        return [str(r[0]) for r in self.conn.execute("SELECT spec FROM policies WHERE deleted = 0 ORDER BY id")]

    def version(self) -> PoliciesVersion:
        row = self.conn.execute("SELECT count(*), coalesce(max(updated_ms), 0) FROM policies").fetchone()
        return PoliciesVersion(int(row[0]), int(row[1]))

    def save(self, policy_id: str, spec: str, now_ms: int, *, deleted: bool = False) -> None:
        self.conn.execute(
            "INSERT INTO policies (id, spec, deleted, updated_ms) VALUES (?, ?, ?, ?) ON CONFLICT (id) DO UPDATE "
            "SET spec = excluded.spec, deleted = excluded.deleted, updated_ms = excluded.updated_ms",
            (policy_id, spec, int(deleted), now_ms))
        announce(self.conn, POLICY)
