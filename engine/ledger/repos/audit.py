"""The audit journal (``audit_journal``, ``audit_anchor_posts``, the ledger's identity): the rows
behind ``engine.audit``, which keeps the chain's rules (hashes, keys, anchors, verification).
The journal is append-only: there is no statement here that changes or removes an entry."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final, NamedTuple

from engine.ledger.dbapi import Connection

_ENTRY: Final = "SELECT id, ts_ms, actor, action, subject, before, after, prev_hash, hash FROM audit_journal"


class AuditRow(NamedTuple):
    """An entry as the journal keeps it: ``before`` and ``after`` as their canonical JSON text."""

    id: int
    ts_ms: int
    actor: str
    action: str
    subject: str
    before: str
    after: str
    prev_hash: str
    hash: str


class AuditJournal:
    __slots__ = ("conn",)

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def ledger_id(self) -> str:
        """The ledger's own random id (made by its schema)."""
        return str(self.conn.execute("SELECT ledger_id FROM ledger_identity").fetchone()[0])

    def next_id(self) -> int:
        return int(self.conn.execute("SELECT coalesce(max(id), 0) + 1 FROM audit_journal").fetchone()[0])

    def head(self) -> tuple[int, str] | None:
        """The newest entry's id and hash; None while the journal is empty."""
        row = self.conn.execute("SELECT id, hash FROM audit_journal ORDER BY id DESC LIMIT 1").fetchone()
        return (int(row[0]), str(row[1])) if row else None

    def append(self, entry_id: int, ts_ms: int, actor: str, action: str, subject: str, before: str, after: str,
               prev_hash: str, digest: str) -> None:
        self.conn.execute("INSERT INTO audit_journal (id, ts_ms, actor, action, subject, before, after, prev_hash, "
                           "hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (entry_id, ts_ms, actor, action, subject, before, after, prev_hash, digest))

    def newest(self, limit: int, text: str = "") -> list[AuditRow]:
        """Newest first; ``text`` keeps entries whose actor, action or subject contain it (in any case)."""
        sql, params = _ENTRY, []
        if text:
            sql += " WHERE instr(lower(actor || ' ' || action || ' ' || subject), ?) > 0"
            params.append(text.lower())
        sql += " ORDER BY id DESC LIMIT ?"
        return [AuditRow(*r) for r in self.conn.execute(sql, [*params, limit]).fetchall()]

    def in_order(self) -> Iterator[AuditRow]:
        """Every entry in the order it was written (read as the caller goes)."""
        for row in self.conn.execute(_ENTRY + " ORDER BY id"):
            yield AuditRow(*row)

    def claim_anchor_post(self, day: int, now_ms: int, entry: int, digest: str) -> bool:
        """True for the first to claim ``day`` (days since 1970, UTC) for posting an anchor."""
        cursor = self.conn.execute("INSERT INTO audit_anchor_posts (day, ts_ms, entry, hash) VALUES (?, ?, ?, ?) "
                                    "ON CONFLICT (day) DO NOTHING", (day, now_ms, entry, digest))
        return cursor.rowcount == 1

