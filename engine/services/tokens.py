"""API tokens: issuing, revoking and rotating them (changes), and checking a secret.

A service of ``Engine`` (``engine.services.core``): the engine's methods of the same names
delegate here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from engine import tokens
from engine.clock import period_range
from engine.ledger import LedgerTx
from engine.services.core import Changed, Core, Journal, Service
from engine.services.usage import UsageService
from engine.tokens import Token


class TokenService(Service):
    def __init__(self, core: Core, usage: UsageService) -> None:
        super().__init__(core)
        self.usage = usage

    async def create_token(self, *, name: str, principal: str, team: str = "", scopes: Sequence[str] | None = None,
                           rpm: int | None = None, tpm: int | None = None,
                           expires_ms: int | None = None) -> tuple[Token, str]:
        """A new token and its secret, which exists nowhere else afterwards: show it once."""
        parsed = tokens.parse_scopes(list(scopes) if scopes else None)
        now = self.now_ms()

        def op(tx: LedgerTx) -> Changed[tuple[Token, str]]:
            token, secret = tokens.create(tx, name=name, principal=principal, team=team, scopes=parsed,
                                          rpm=rpm, tpm=tpm, expires_ms=expires_ms, now_ms=now, actor=self.actor)
            return (token, secret), Journal(f"token:{token.id}", None, token.as_dict())

        return await self._change("manage_tokens", "token.create", op)

    async def tokens(self) -> list[Token]:
        """Every token with its spend this month (never a secret or a digest)."""
        found: list[Token] = await self._tx(lambda tx: tokens.all_tokens(tx))
        start, end = period_range("month", self.now_ms())
        spend = {r.key: r.totals.cost_nanos for r in await self.usage.breakdown(start, end, "token_id", limit=10_000)}
        return [replace(t, used_this_month=spend.get(t.id, 0)) for t in found]

    async def revoke_token(self, token_id: str) -> Token:
        now = self.now_ms()

        def op(tx: LedgerTx) -> Changed[Token]:
            before, after = tokens.revoke(tx, token_id, now, self.actor)
            return after, Journal(f"token:{after.id}", before.as_dict(), after.as_dict())

        return await self._change("manage_tokens", "token.revoke", op)

    async def rotate_token(self, token_id: str) -> tuple[Token, Token, str]:
        """Revoke a token and issue its successor; (old, new, new secret)."""
        now = self.now_ms()

        def op(tx: LedgerTx) -> Changed[tuple[Token, Token, str]]:
            before = tokens.get(tx, token_id)
            old, new, secret = tokens.rotate(tx, token_id, now, self.actor)
            return (old, new, secret), [Journal(f"token:{old.id}", before.as_dict(), old.as_dict()),
                                        Journal(f"token:{new.id}", None, new.as_dict(), "token.create")]

        return await self._change("manage_tokens", "token.rotate", op)

    async def authenticate(self, secret: str, scope: str | None = None, *, touch: bool = True) -> Token:
        """The token a secret belongs to, if active and scoped for ``scope``; else TokenRefused.
        ``touch=False`` reads only (no write transaction): the caller records the use later
        with ``touch_tokens``, as the gateway does in batches."""
        now = self.now_ms()
        if not touch:
            found: Token = await self.store.read_with(
                lambda ledger: tokens.authenticate(ledger, secret, now, scope, touch=False))
            return found
        return await self._tx(lambda tx: tokens.authenticate(tx, secret, now, scope))

    async def touch_tokens(self, last_used: dict[str, int]) -> None:
        if last_used:
            await self._tx(lambda tx: tokens.touch(tx, last_used), sync=False)
