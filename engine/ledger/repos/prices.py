"""Price versions imported into the ledger (``engine.pricing.ModelPrice`` specs, as JSON)."""

from __future__ import annotations

from collections.abc import Sequence

from engine.ledger.changes import PRICE, announce
from engine.ledger.dbapi import Connection


class Prices:
    __slots__ = ("conn",)

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def save(self, rows: Sequence[tuple[str, str, int, str, str, str, int]]) -> None:
        """Store price versions (model, workspace, effective_from_ms, provider, spec, source, imported_at)."""
        self.conn.executemany(
            "INSERT INTO prices (model, workspace, effective_from_ms, provider, spec, source, imported_at_ms)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (model, workspace, effective_from_ms) DO UPDATE SET"
            " provider = excluded.provider, spec = excluded.spec, source = excluded.source,"
            " imported_at_ms = excluded.imported_at_ms", rows)
        if rows:
            announce(self.conn, PRICE)

    def specs(self) -> list[str]:
        """Every stored version's spec, by model, workspace and date."""
        return [str(r[0]) for r in self.conn.execute(
            "SELECT spec FROM prices ORDER BY model, workspace, effective_from_ms")]
