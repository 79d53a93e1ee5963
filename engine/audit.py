"""The audit journal: every change to a policy, token, membership or vault entry, and every
approval decision, with actor, time, and the record before and after.

Entries are chained: each carries the hash of the one before it, and its own hash covers
its id, time, actor, action, subject, before, after and that previous hash. Editing an
entry changes its hash; deleting one breaks the next entry's link; moving one breaks two.
``verify`` walks the chain and names the first entry that does not fit.

Callers pass records that hold no secret (a token appears by id and prefix, never by its
secret or hash); ``append`` refuses any record with a key that looks like one.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

GENESIS: Final = "0" * 64
#: Keys that must never reach the journal, however a caller builds its record.
SECRET_KEYS: Final = frozenset({"secret", "hash", "token", "password", "passphrase", "api_key", "key_material"})


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    ts_ms: int
    actor: str
    action: str
    subject: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    prev_hash: str
    hash: str

    def changes(self) -> list[tuple[str, Any, Any]]:
        """(field, before, after) for each field the change touched; a creation or a removal
        lists every field, with None on the side that does not exist."""
        before, after = self.before or {}, self.after or {}
        return [(key, before.get(key), after.get(key)) for key in dict.fromkeys([*before, *after])
                if before.get(key) != after.get(key) or self.before is None or self.after is None]

    def summary(self, width: int = 80) -> str:
        """The change in one line: ``status pending→approved, granted None→5000000000``."""
        if self.before is None:
            text = "created"
        elif self.after is None:
            text = "removed"
        else:
            changes = sorted(self.changes(), key=lambda c: c[0] != "status")  # the status first
            text = ", ".join(f"{k} {_short(k, b)}→{_short(k, a)}" for k, b, a in changes) or "no field changed"
        return text if len(text) <= width else text[:width - 1] + "…"

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "ts_ms": self.ts_ms, "actor": self.actor, "action": self.action,
                "subject": self.subject, "before": self.before, "after": self.after, "hash": self.hash}


@dataclass(frozen=True, slots=True)
class Verification:
    ok: bool
    entries: int
    problem: str = ""
    entry_id: int | None = None


def _short(key: str, value: Any) -> str:
    if key.endswith("_ms") and isinstance(value, int) and value > 10**11:  # a time: when, to the second
        return datetime.fromtimestamp(value / 1000, UTC).strftime("%m-%d %H:%M:%S")
    text = "-" if value is None else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= 24 else text[:23] + "…"


def _canonical(record: Mapping[str, Any] | None) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def entry_hash(entry_id: int, ts_ms: int, actor: str, action: str, subject: str, before: str, after: str,
               prev_hash: str) -> str:
    body = json.dumps([entry_id, ts_ms, actor, action, subject, before, after, prev_hash], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def _check_no_secrets(record: Mapping[str, Any] | None, where: str) -> None:
    if record is None:
        return
    for key, value in record.items():
        if key.lower() in SECRET_KEYS:
            raise ValueError(f"audit: {where} has a {key!r} field; secrets never enter the journal")
        if isinstance(value, Mapping):
            _check_no_secrets(value, where)


def append(conn: sqlite3.Connection, ts_ms: int, actor: str, action: str, subject: str,
           before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> int:
    """Add an entry inside the caller's transaction (the change and its entry commit together)."""
    _check_no_secrets(before, "before")
    _check_no_secrets(after, "after")
    row = conn.execute("SELECT id, hash FROM audit_journal ORDER BY id DESC LIMIT 1").fetchone()
    entry_id, prev = (int(row[0]) + 1, str(row[1])) if row else (1, GENESIS)
    b, a = _canonical(before), _canonical(after)
    digest = entry_hash(entry_id, ts_ms, actor, action, subject, b, a, prev)
    conn.execute("INSERT INTO audit_journal (id, ts_ms, actor, action, subject, before, after, prev_hash, hash) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (entry_id, ts_ms, actor, action, subject, b, a, prev, digest))
    return entry_id


def _entry(row: tuple[Any, ...]) -> AuditEntry:
    return AuditEntry(int(row[0]), int(row[1]), str(row[2]), str(row[3]), str(row[4]), json.loads(row[5]),
                      json.loads(row[6]), str(row[7]), str(row[8]))


def entries(conn: sqlite3.Connection, *, limit: int = 200, text: str = "") -> list[AuditEntry]:
    """Newest first; ``text`` keeps entries whose actor, action or subject contain it."""
    sql = "SELECT id, ts_ms, actor, action, subject, before, after, prev_hash, hash FROM audit_journal"
    params: list[Any] = []
    if text:
        sql += " WHERE instr(lower(actor || ' ' || action || ' ' || subject), ?) > 0"
        params.append(text.lower())
    sql += " ORDER BY id DESC LIMIT ?"
    params.append(limit)
    return [_entry(r) for r in conn.execute(sql, params)]


def verify(conn: sqlite3.Connection) -> Verification:
    """Walk the chain oldest first; the first entry that does not fit is named."""
    prev, expected_id, count = GENESIS, 1, 0
    for row in conn.execute("SELECT id, ts_ms, actor, action, subject, before, after, prev_hash, hash "
                            "FROM audit_journal ORDER BY rowid"):
        entry_id, ts, actor, action, subject, before, after, prev_hash, digest = row
        count += 1
        if entry_id != expected_id:
            what = "missing" if entry_id > expected_id else "out of order"
            return Verification(False, count, f"entry {expected_id} is {what} (found entry {entry_id} in its place)",
                                expected_id)
        if entry_hash(entry_id, ts, actor, action, subject, before, after, prev_hash) != digest:
            return Verification(False, count, f"entry {entry_id} was edited: its contents do not match its hash",
                                entry_id)
        if prev_hash != prev:
            return Verification(False, count, f"entry {entry_id} does not follow entry {entry_id - 1}: "
                                              "an entry before it was changed, removed or moved", entry_id)
        prev, expected_id = digest, expected_id + 1
    return Verification(True, count)
