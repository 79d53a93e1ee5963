"""API tokens (``api_tokens``): the rows behind ``engine.tokens``, which keeps the rules
(secrets, digests, scopes, states) and never sees a statement."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final, NamedTuple

from engine.ledger.changes import TOKEN, announce
from engine.ledger.dbapi import Connection
from engine.tokens import Token

_COLUMNS: Final = ("id, prefix, name, workspace, principal, team, scopes, rpm, tpm, created_ms, created_by, "
                   "expires_ms, last_used_ms, revoked_ms, rotated_from, replaced_by")
_LOOKUP: Final = f"SELECT {_COLUMNS}, hash FROM api_tokens WHERE prefix >= ? ORDER BY prefix LIMIT 1"


class StoredToken(NamedTuple):
    """A token and the SHA-256 of its secret, as the ledger keeps them."""

    token: Token
    digest: bytes


def _token(row: Sequence[Any]) -> Token:
    (tid, prefix, name, workspace, principal, team, scopes, rpm, tpm, created, by, expires, used, revoked,
     rotated_from, replaced_by) = row
    return Token(tid, prefix, name, workspace, principal, team, tuple(json.loads(scopes)), rpm, tpm, created, by,
                 expires, used, revoked, rotated_from, replaced_by)


class Tokens:
    __slots__ = ("conn",)

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def prefix_taken(self, prefix: str) -> bool:
        return self.conn.execute("SELECT 1 FROM api_tokens WHERE prefix = ?", (prefix,)).fetchone() is not None

    def insert(self, token: Token, digest: bytes) -> None:
        t = token
        self.conn.execute(f"INSERT INTO api_tokens ({_COLUMNS}, hash) VALUES ({', '.join('?' * 17)})",
                           (t.id, t.prefix, t.name, t.workspace, t.principal, t.team, json.dumps(list(t.scopes)),
                            t.rpm, t.tpm, t.created_ms, t.created_by, t.expires_ms, t.last_used_ms, t.revoked_ms,
                            t.rotated_from, t.replaced_by, digest))
        announce(self.conn, TOKEN)

    def by_id(self, token_id: str) -> Token | None:
        row = self.conn.execute(f"SELECT {_COLUMNS} FROM api_tokens WHERE id = ?", (token_id,)).fetchone()
        return None if row is None else _token(row)

    def by_prefix(self, prefix: str) -> Token | None:
        row = self.conn.execute(f"SELECT {_COLUMNS} FROM api_tokens WHERE prefix = ?", (prefix,)).fetchone()
        return None if row is None else _token(row)

    def listing(self) -> list[Token]:
        return [_token(r) for r in self.conn.execute(f"SELECT {_COLUMNS} FROM api_tokens ORDER BY created_ms, id")]

    def lookup(self, prefix: str) -> StoredToken | None:
        """The first token whose prefix is at or after ``prefix``, else the first of all (None
        only when there is no token): one real row whatever the prefix (``engine.tokens``)."""
        row = self.conn.execute(_LOOKUP, (prefix,)).fetchone() or self.conn.execute(_LOOKUP, ("",)).fetchone()
        return None if row is None else StoredToken(_token(row[:-1]), bytes(row[-1]))

    def revoke(self, token_id: str, now_ms: int, actor: str, replaced_by: str | None = None) -> None:
        if replaced_by is None:
            self.conn.execute("UPDATE api_tokens SET revoked_ms = ?, revoked_by = ? WHERE id = ?",
                               (now_ms, actor, token_id))
        else:
            self.conn.execute("UPDATE api_tokens SET revoked_ms = ?, revoked_by = ?, replaced_by = ? WHERE id = ?",
                               (now_ms, actor, replaced_by, token_id))
        announce(self.conn, TOKEN)

    def used(self, token_id: str, now_ms: int) -> None:
        self.conn.execute("UPDATE api_tokens SET last_used_ms = ? WHERE id = ?", (now_ms, token_id))

    def used_last(self, last_used: Mapping[str, int], *, keep_later: bool = True) -> None:
        """Each token's last use in one statement; ``keep_later``: a later use already written stays."""
        if keep_later:
            self.conn.executemany("UPDATE api_tokens SET last_used_ms = ? WHERE id = ? "
                                  "AND coalesce(last_used_ms, 0) < ?",
                                  [(ts, token_id, ts) for token_id, ts in last_used.items()])
        else:
            self.conn.executemany("UPDATE api_tokens SET last_used_ms = ? WHERE id = ?",
                                  [(ts, token_id) for token_id, ts in last_used.items()])
