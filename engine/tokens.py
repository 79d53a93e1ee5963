"""API tokens: ``bgt_`` plus 32 random bytes (URL-safe base64), shown once.

The ledger keeps the SHA-256 of the secret and a short public prefix (the 8 characters
after ``bgt_``) to find the row: a lookup is one indexed read by prefix, never a scan of
every token, and the digest comparison takes the same time however much of a wrong
secret matches. The lookup reads the first token whose prefix is at or after the one
presented (the first of all past the last), so a known and an unknown prefix both read one
real row, build it, hash the secret and compare digests: the same work. What timing can
still tell is only whether the presented prefix lies past every token's (one more index
seek), never whether a token with that prefix exists nor anything of its secret.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

from engine.errors import Refused
from engine.models import FieldError

if TYPE_CHECKING:
    from engine.ledger import LedgerView

PREFIX: Final = "bgt_"
LOOKUP_CHARS: Final = 8
SECRET_BYTES: Final = 32
SCOPES: Final = ("chat", "embeddings", "responses", "models", "traces", "usage:read")
_DUMMY: Final = hashlib.sha256(b"budgeteer-no-such-token").digest()

TokenState = Literal["active", "expired", "revoked"]
Refusal = Literal["malformed", "unknown", "wrong", "expired", "revoked", "scope"]


class TokenRefused(Refused):
    """A token that does not admit the call: 403 when it lacks the scope, else 401."""

    http_status = 401
    code = "invalid_api_key"

    def __init__(self, reason: Refusal, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        if reason == "scope":
            self.http_status, self.code = 403, "missing_scope"


def limits_text(rpm: int | None, tpm: int | None) -> str:
    """Rate limits in words: ``60 requests and 100,000 tokens a minute``, ``60 requests a
    minute, no token limit``, ``no rate limit``; the dashboard and the command line both say it so."""
    if rpm and tpm:
        return f"{rpm:,} requests and {tpm:,} tokens a minute"
    if rpm:
        return f"{rpm:,} requests a minute, no token limit"
    if tpm:
        return f"{tpm:,} tokens a minute, no request limit"
    return "no rate limit"


@dataclass(frozen=True, slots=True)
class Token:
    id: str
    prefix: str
    name: str
    workspace: str
    principal: str
    team: str
    scopes: tuple[str, ...]
    rpm: int | None
    tpm: int | None
    created_ms: int
    created_by: str
    expires_ms: int | None
    last_used_ms: int | None
    revoked_ms: int | None
    rotated_from: str | None = None
    replaced_by: str | None = None
    used_this_month: int = field(default=0, compare=False)  # nano-dollars, filled in by the engine

    @property
    def limits(self) -> str:
        """The token's rate limits as an operator reads them (``limits_text``)."""
        return limits_text(self.rpm, self.tpm)

    def state(self, now_ms: int) -> TokenState:
        if self.revoked_ms is not None:
            return "revoked"
        if self.expires_ms is not None and now_ms >= self.expires_ms:
            return "expired"
        return "active"

    def as_dict(self, now_ms: int | None = None) -> dict[str, Any]:
        """Everything public about the token: never its secret, never its digest."""
        out = {"id": self.id, "prefix": PREFIX + self.prefix, "name": self.name, "workspace": self.workspace,
               "principal": self.principal, "team": self.team, "scopes": list(self.scopes), "rpm": self.rpm,
               "tpm": self.tpm, "created_ms": self.created_ms, "created_by": self.created_by,
               "expires_ms": self.expires_ms, "last_used_ms": self.last_used_ms, "revoked_ms": self.revoked_ms,
               "rotated_from": self.rotated_from, "replaced_by": self.replaced_by}
        if now_ms is not None:
            out["state"] = self.state(now_ms)
        return out


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse_scopes(values: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    scopes = tuple(dict.fromkeys(s.strip() for v in (values or ["chat", "embeddings", "responses", "models"])
                                 for s in v.split(",") if s.strip()))
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise FieldError("scopes", f"unknown scope {unknown[0]!r}; use {', '.join(SCOPES)}" if unknown else "is empty")
    return scopes


def parse_limit(text: str, field_name: str) -> int | None:
    """A rate limit typed by a person: empty for none, else a positive whole number."""
    text = text.strip().replace(",", "").replace("_", "")
    if not text:
        return None
    if not text.isdigit() or int(text) <= 0:
        raise FieldError(field_name, f"must be a positive whole number or empty for no limit, not {text!r}")
    return int(text)


def create(ledger: LedgerView, *, name: str, principal: str, team: str = "", workspace: str = "default",
           scopes: tuple[str, ...], rpm: int | None, tpm: int | None, expires_ms: int | None, now_ms: int,
           actor: str, rotated_from: str | None = None) -> tuple[Token, str]:
    """A new token and its secret (the only time the secret exists outside the caller)."""
    if not name.strip():
        raise FieldError("name", "is empty")
    if not principal.strip():
        raise FieldError("principal", "is empty; a token acts for someone")
    for label, value in (("rpm", rpm), ("tpm", tpm)):
        if value is not None and value <= 0:
            raise FieldError(label, f"must be a positive whole number (got {value})")
    if expires_ms is not None and expires_ms <= now_ms:
        raise FieldError("expires", "is in the past")
    while True:
        secret = PREFIX + secrets.token_urlsafe(SECRET_BYTES)
        prefix = secret[len(PREFIX):len(PREFIX) + LOOKUP_CHARS]
        if not ledger.tokens.prefix_taken(prefix):
            break
    token = Token("tok_" + secrets.token_hex(6), prefix, name.strip(), workspace, principal.strip(), team.strip(),
                  tuple(scopes), rpm, tpm, now_ms, actor, expires_ms, None, None, rotated_from, None)
    ledger.tokens.insert(token, digest(secret))
    return token, secret


def get(ledger: LedgerView, token_id: str) -> Token:
    """By id (``tok_…``) or by the public ``bgt_`` prefix, never one mistaken for the other."""
    if token_id.startswith(PREFIX):
        token = ledger.tokens.by_prefix(token_id[len(PREFIX):len(PREFIX) + LOOKUP_CHARS])
    else:
        token = ledger.tokens.by_id(token_id)
    if token is None:
        raise FieldError("token", f"no token {token_id}")
    return token


def all_tokens(ledger: LedgerView) -> list[Token]:
    return ledger.tokens.listing()


def revoke(ledger: LedgerView, token_id: str, now_ms: int, actor: str) -> tuple[Token, Token]:
    before = get(ledger, token_id)
    if before.revoked_ms is not None:
        raise FieldError("token", f"{before.id} is already revoked")
    ledger.tokens.revoke(before.id, now_ms, actor)
    return before, get(ledger, before.id)


def rotate(ledger: LedgerView, token_id: str, now_ms: int, actor: str) -> tuple[Token, Token, str]:
    """Revoke the token and issue a new one with the same grants, linked both ways."""
    old = get(ledger, token_id)
    if old.revoked_ms is not None:
        raise FieldError("token", f"{old.id} is revoked; create a new token instead")
    expires = old.expires_ms if old.expires_ms is None or old.expires_ms > now_ms else None
    new, secret = create(ledger, name=old.name, principal=old.principal, team=old.team, workspace=old.workspace,
                         scopes=old.scopes, rpm=old.rpm, tpm=old.tpm, expires_ms=expires, now_ms=now_ms, actor=actor,
                         rotated_from=old.id)
    ledger.tokens.revoke(old.id, now_ms, actor, replaced_by=new.id)
    return get(ledger, old.id), new, secret


def authenticate(ledger: LedgerView, secret: str, now_ms: int, scope: str | None = None, *,
                 touch: bool = True) -> Token:
    """The token a presented secret belongs to, or TokenRefused saying why (never echoing the secret)."""
    if not secret.startswith(PREFIX) or len(secret) < len(PREFIX) + LOOKUP_CHARS + 8:
        raise TokenRefused("malformed", "not a Budgeteer token (they start with bgt_)")
    presented = digest(secret)
    prefix = secret[len(PREFIX):len(PREFIX) + LOOKUP_CHARS]
    # One real row whatever the prefix (see the module docstring): the same work for an unknown
    # prefix as for a known one.
    stored = ledger.tokens.lookup(prefix)
    match = hmac.compare_digest(presented, stored.digest if stored is not None else _DUMMY)
    if stored is None or not match or stored.token.prefix != prefix:
        raise TokenRefused("wrong", "invalid token")
    token = admit(stored.token, now_ms, scope)
    if touch:
        ledger.tokens.used(token.id, now_ms)
    return token


def admit(token: Token, now_ms: int, scope: str | None = None) -> Token:
    """The token if it may be used now for ``scope``, else TokenRefused saying why (a gateway
    checks a token it read a moment ago with this alone)."""
    state = token.state(now_ms)
    if state == "revoked":
        raise TokenRefused("revoked", f"token {PREFIX}{token.prefix}… was revoked")
    if state == "expired":
        raise TokenRefused("expired", f"token {PREFIX}{token.prefix}… has expired")
    if scope is not None and scope not in token.scopes:
        raise TokenRefused("scope", f"token {PREFIX}{token.prefix}… lacks the {scope} scope")
    return token


def touch(ledger: LedgerView, last_used: dict[str, int]) -> None:
    """Record tokens' last use in one statement (a gateway batches them)."""
    ledger.tokens.used_last(last_used)
