"""Workspace members (``members``): the rows behind ``engine.access``, which keeps the
permission matrix and the rules of who may make whom what."""

from __future__ import annotations

from engine.access import Member, Role
from engine.ledger.changes import MEMBER, announce
from engine.ledger.dbapi import Connection


class Members:
    __slots__ = ("conn",)

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def listing(self, workspace: str) -> list[Member]:
        return [Member(str(w), str(u), r, int(a), str(b)) for w, u, r, a, b in self.conn.execute(
            "SELECT workspace, \"user\", role, added_ms, added_by FROM members WHERE workspace = ? ORDER BY \"user\"",
            (workspace,))]

    def role_of(self, user: str, workspace: str) -> Role | None:
        row = self.conn.execute("SELECT role FROM members WHERE workspace = ? AND \"user\" = ?",
                                 (workspace, user)).fetchone()
        return row[0] if row else None

    def none(self) -> bool:
        """True while the ledger has no member at all, in any workspace."""
        return self.conn.execute("SELECT 1 FROM members LIMIT 1").fetchone() is None

    def put(self, workspace: str, user: str, role: Role, now_ms: int, actor: str) -> None:
        """Add the member, or change the role of one already there (keeping when and by whom it was added)."""
        self.conn.execute("INSERT INTO members (workspace, \"user\", role, added_ms, added_by) VALUES (?, ?, ?, ?, ?) "
                           "ON CONFLICT (workspace, \"user\") DO UPDATE SET role = excluded.role",
                           (workspace, user, role, now_ms, actor))
        announce(self.conn, MEMBER)

    def remove(self, workspace: str, user: str) -> None:
        self.conn.execute("DELETE FROM members WHERE workspace = ? AND \"user\" = ?", (workspace, user))
        announce(self.conn, MEMBER)

    def other_owners(self, workspace: str, user: str) -> int:
        return int(self.conn.execute("SELECT count(*) FROM members WHERE workspace = ? AND role = 'owner' "
                                      "AND \"user\" != ?", (workspace, user)).fetchone()[0])
