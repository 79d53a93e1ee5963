"""The audit journal: every change to a policy, token, membership or vault entry, and every
approval decision, with actor, time, and the record before and after.

Entries are chained: each carries the hash of the one before it, and its own hash covers
its id, time, actor, action, subject, before, after and that previous hash. Editing an
entry changes its hash; deleting one breaks the next entry's link; moving one breaks two.
``verify`` walks the chain and names the first entry that does not fit.

The chain is keyed: an entry's hash is an HMAC-SHA256 under a 32-byte key kept in the
credential vault (``vault:audit-key.<ledger id>``), never in the ledger, so whoever can
write the ledger file but not read the vault cannot re-chain edited entries. The vault
also holds the id of the first entry the key covers (``ChainKey.first``): entries before
it, written before this version or while no vault could take a key, are the legacy
chain (plain SHA-256), checked as such, and bound to the keyed chain by the first keyed
entry's link. Triggers make the table append-only to SQL (``BEFORE UPDATE`` and ``BEFORE
DELETE`` raise). Deleting the newest entries leaves a shorter chain that still fits: an
``Anchor`` (the head's id and hash, kept elsewhere by the operator) names them.

Callers pass records that hold no secret (a token appears by id and prefix, never by its
secret or hash); ``append`` refuses any record with a key that looks like one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from engine.clock import format_span
from engine.models import FieldError
from engine.money import format_amount

if TYPE_CHECKING:
    from engine.ledger import LedgerView
    from engine.ledger.repos.audit import AuditRow

GENESIS: Final = "0" * 64
#: Fields holding an amount of a budget's metric (nano-dollars of a dollar budget).
AMOUNT_FIELDS: Final = frozenset({"hard", "soft", "amount", "granted", "grant_used"})
#: The amounts a creation or a removal names in its one-line summary, in this order.
AMOUNT_FIELDS_SHOWN: Final = ("amount", "granted", "hard", "soft")
#: Fields of milliseconds that are a length of time, not a moment.
DURATION_FIELDS: Final = frozenset({"duration_ms"})
#: The vault reference of a ledger's chain key: this prefix and the ledger's id.
KEY_REF_PREFIX: Final = "audit-key."
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
    #: The budget metric its amounts are in (``usd``: nano-dollars, ``tokens``, ``requests``):
    #: the record's own for a policy, its policy's for an override request; not hashed.
    metric: str = field(default="usd", compare=False)

    def shown(self, key: str, value: Any) -> str:
        """A field's value as people read it (``hard`` 20000000000 of a dollar policy: ``$20.00``;
        a time: when, to the second; a duration: ``1 h``); the journal keeps the raw value."""
        if value is None:
            return "-"
        if isinstance(value, int) and not isinstance(value, bool):
            if key in AMOUNT_FIELDS:
                return format_amount(value, self.metric)
            if key in DURATION_FIELDS:
                return format_span(value)
            if key.endswith("_ms") and value > 10**11:  # a time: when, to the second
                return datetime.fromtimestamp(value / 1000, UTC).strftime("%m-%d %H:%M:%S")
            return f"{value:,}"
        return json.dumps(value) if isinstance(value, (list, dict)) else str(value)

    def changes(self) -> list[tuple[str, Any, Any]]:
        """(field, before, after) for each field the change touched, the status first, then the
        amounts; a creation or a removal lists every field, with None on the side that does not exist."""
        before, after = self.before or {}, self.after or {}
        return sorted(((key, before.get(key), after.get(key)) for key in dict.fromkeys([*before, *after])
                       if before.get(key) != after.get(key) or self.before is None or self.after is None),
                      key=lambda c: (c[0] != "status", c[0] not in AMOUNT_FIELDS))

    def summary(self, width: int = 80) -> str:
        """The change in one line: ``status pending→approved, granted -→$5.00, ...``."""
        if self.before is None or self.after is None:
            record = self.after or self.before or {}
            amounts = ", ".join(f"{k} {self.shown(k, record[k])}" for k in AMOUNT_FIELDS_SHOWN
                                if record.get(k) is not None)
            text = ("created" if self.before is None else "removed") + (f": {amounts}" if amounts else "")
        else:
            text = ", ".join(f"{k} {self._short(k, b)}→{self._short(k, a)}" for k, b, a in self.changes()) \
                or "no field changed"
        return text if len(text) <= width else text[:width - 1] + "…"

    def _short(self, key: str, value: Any) -> str:
        text = self.shown(key, value)
        return text if len(text) <= 24 else text[:23] + "…"

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "ts_ms": self.ts_ms, "actor": self.actor, "action": self.action,
                "subject": self.subject, "before": self.before, "after": self.after, "hash": self.hash}


@dataclass(frozen=True, slots=True)
class Verification:
    ok: bool
    entries: int
    problem: str = ""
    entry_id: int | None = None
    keyed_from: int | None = None  # the first entry the vault's key covers; None: the chain is not keyed


@dataclass(frozen=True, slots=True)
class ChainKey:
    """The chain's key and the id of the first entry it covers (the vault holds both)."""

    key: bytes
    first: int

    def to_secret(self) -> str:
        return json.dumps({"key": base64.b64encode(self.key).decode(), "first": self.first})

    @classmethod
    def from_secret(cls, text: str) -> ChainKey:
        try:
            data = json.loads(text)
            key, first = base64.b64decode(data["key"], validate=True), int(data["first"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError("the audit journal's key in the vault is damaged") from exc
        if len(key) != 32 or first < 1:
            raise ValueError("the audit journal's key in the vault is damaged")
        return cls(key, first)


@dataclass(frozen=True, slots=True)
class Anchor:
    """The head of a ledger's chain as ``budgeteer audit anchor`` printed it."""

    ledger: str
    entry: int
    hash: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Anchor:
        if not isinstance(data, dict):
            raise ValueError("an anchor is a JSON object with ledger, entry and hash")
        ledger, entry, digest = data.get("ledger"), data.get("entry"), data.get("hash")
        if not isinstance(ledger, str) or not ledger:
            raise ValueError("the anchor's ledger is missing")
        if not isinstance(entry, int) or isinstance(entry, bool) or entry < 1:
            raise ValueError("the anchor's entry must be a positive whole number")
        if not isinstance(digest, str) or len(digest) != 64:
            raise ValueError("the anchor's hash must be 64 hexadecimal digits")
        return cls(ledger, entry, digest.lower())


def ledger_id(ledger: LedgerView) -> str:
    """The ledger's own random id (made by its schema; names its chain key in the vault)."""
    return ledger.audit.ledger_id()


def key_ref(ledger: str) -> str:
    return KEY_REF_PREFIX + ledger


def next_id(ledger: LedgerView) -> int:
    return ledger.audit.next_id()


def head(ledger: LedgerView) -> Anchor | None:
    """The newest entry as an anchor; None while the journal is empty."""
    newest = ledger.audit.head()
    return Anchor(ledger_id(ledger), *newest) if newest else None


def keyed_elsewhere(ledger: LedgerView) -> bool:
    """Whether the newest entry was chained under a key (its hash is not its plain SHA-256):
    a process whose vault holds no key must not start a chain of its own after it (another
    machine on a shared ledger made the key; it must be carried here: ``import_key``)."""
    newest = ledger.audit.newest(1)
    if not newest:
        return False
    e = newest[0]
    return entry_hash(e.id, e.ts_ms, e.actor, e.action, e.subject, e.before, e.after, e.prev_hash) != e.hash


def claim_anchor_post(ledger: LedgerView, day: int, now_ms: int, anchor: Anchor) -> bool:
    """True for the first process to claim ``day`` (days since 1970, UTC) for posting an anchor."""
    return ledger.audit.claim_anchor_post(day, now_ms, anchor.entry, anchor.hash)


def _canonical(record: Mapping[str, Any] | None) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def entry_hash(entry_id: int, ts_ms: int, actor: str, action: str, subject: str, before: str, after: str,
               prev_hash: str, key: bytes | None = None) -> str:
    """HMAC-SHA256 under ``key``; plain SHA-256 for an entry of the legacy (unkeyed) chain."""
    body = json.dumps([entry_id, ts_ms, actor, action, subject, before, after, prev_hash],
                      separators=(",", ":")).encode()
    return hmac.new(key, body, hashlib.sha256).hexdigest() if key is not None else hashlib.sha256(body).hexdigest()


def _check_no_secrets(record: Mapping[str, Any] | None, where: str) -> None:
    if record is None:
        return
    for key, value in record.items():
        if key.lower() in SECRET_KEYS:
            raise ValueError(f"audit: {where} has a {key!r} field; secrets never enter the journal")
        if isinstance(value, Mapping):
            _check_no_secrets(value, where)


def append(ledger: LedgerView, ts_ms: int, actor: str, action: str, subject: str,
           before: Mapping[str, Any] | None, after: Mapping[str, Any] | None, *, key: ChainKey | None = None) -> int:
    """Add an entry inside the caller's transaction (the change and its entry commit together),
    keyed by ``key`` (None: an entry of the legacy chain, while the vault holds no key)."""
    _check_no_secrets(before, "before")
    _check_no_secrets(after, "after")
    newest = ledger.audit.head()
    entry_id, prev = (newest[0] + 1, newest[1]) if newest else (1, GENESIS)
    if key is not None and entry_id < key.first:
        raise FieldError("audit", f"the journal ends at entry {entry_id - 1} but its key in the vault covers "
                                  f"entries from {key.first}: entries are missing ('audit verify' names them)")
    b, a = _canonical(before), _canonical(after)
    digest = entry_hash(entry_id, ts_ms, actor, action, subject, b, a, prev, key.key if key else None)
    ledger.audit.append(entry_id, ts_ms, actor, action, subject, b, a, prev, digest)
    return entry_id


def _entry(row: AuditRow, metrics: Mapping[str, str]) -> AuditEntry:
    before, after = json.loads(row.before), json.loads(row.after)
    record = after or before or {}
    metric = record.get("metric") or metrics.get(str(record.get("id")), "usd")
    return AuditEntry(row.id, row.ts_ms, row.actor, row.action, row.subject, before, after, row.prev_hash,
                      row.hash, str(metric))


def entries(ledger: LedgerView, *, limit: int = 200, text: str = "") -> list[AuditEntry]:
    """Newest first; ``text`` keeps entries whose actor, action or subject contain it. An
    override request's amounts are in its policy's metric, as the request's snapshot has it."""
    rows = ledger.audit.newest(limit, text)
    metrics = ledger.approvals.metrics([_record_id(r) for r in rows if r.subject.startswith("usage-budget:")])
    return [_entry(r, metrics) for r in rows]


def _record_id(row: AuditRow) -> Any:
    return (json.loads(row.after) or json.loads(row.before) or {}).get("id")


def verify(ledger: LedgerView, key: ChainKey | None = None, anchor: Anchor | None = None) -> Verification:
    """Walk the chain oldest first, entries from ``key.first`` on checked under ``key``; the
    first entry that does not fit is named. With an ``anchor``, its entry must still be there
    with the same hash: the entries missing after it are named."""
    prev, expected_id, count = GENESIS, 1, 0
    first = key.first if key is not None else None

    def failed(problem: str, entry_id: int) -> Verification:
        return Verification(False, count, problem, entry_id, first)

    anchored: str | None = None  # the anchor's entry's hash as the journal has it
    for row in ledger.audit.in_order():
        entry_id, ts, actor, action, subject, before, after, prev_hash, digest = row
        count += 1
        if entry_id != expected_id:
            what = "missing" if entry_id > expected_id else "out of order"
            return failed(f"entry {expected_id} is {what} (found entry {entry_id} in its place)", expected_id)
        keyed = key is not None and entry_id >= key.first
        if entry_hash(entry_id, ts, actor, action, subject, before, after, prev_hash,
                      key.key if keyed and key else None) != digest:
            return failed(f"entry {entry_id} was edited: its contents do not match its "
                          + ("keyed hash (re-chained without the vault's key?)" if keyed else "hash"), entry_id)
        if prev_hash != prev:
            return failed(f"entry {entry_id} does not follow entry {entry_id - 1}: "
                          "an entry before it was changed, removed or moved", entry_id)
        if anchor is not None and entry_id == anchor.entry:
            anchored = digest
        prev, expected_id = digest, expected_id + 1
    last = expected_id - 1
    if key is not None and last < key.first - 1:
        return failed(f"entries {last + 1} to {key.first - 1} are missing: the vault's key was made when the "
                      f"journal ended at entry {key.first - 1}", last + 1)
    if anchor is not None:
        if anchor.ledger != ledger_id(ledger):
            return failed(f"the anchor is of another ledger ({anchor.ledger})", anchor.entry)
        if anchored is None:
            missing = f"entry {anchor.entry} is" if last + 1 == anchor.entry else \
                f"entries {last + 1} to {anchor.entry} are"
            return failed(f"{missing} missing: the anchor names entry {anchor.entry} but the journal ends at "
                          f"entry {last}", last + 1)
        if anchored != anchor.hash:
            return failed(f"entry {anchor.entry} does not match the anchor: its hash is not the one the anchor "
                          "kept (the journal was rewritten up to it)", anchor.entry)
    return Verification(True, count, keyed_from=first)
