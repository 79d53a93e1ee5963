"""Members and roles: who may do what on this ledger.

A service of ``Engine`` (``engine.services.core``): the engine's methods of the same names
delegate here."""

from __future__ import annotations

from engine import access
from engine.ledger import LedgerTx
from engine.services.core import Changed, Journal, Service


class MemberService(Service):
    async def members(self) -> list[access.Member]:
        return await self._tx(lambda tx: access.members(tx))

    async def role(self, user: str | None = None) -> access.Role | None:
        """The user's role; None when not a member. On a ledger without members everyone is an owner."""
        def op(tx: LedgerTx) -> access.Role | None:
            return "owner" if access.single_user(tx) else access.role_of(tx, user or self.actor)

        return await self._tx(op)

    async def may(self, permission: access.Permission) -> bool:
        return access.allowed(await self.role(), permission)

    @property
    def verified(self) -> bool:
        """The actor is the database role this process connects as (PostgreSQL), which the
        server checked; not so on SQLite, nor for an actor code named otherwise."""
        return self.store.session_user is not None and self.actor == self.store.session_user

    async def member_notice(self, user: str) -> str | None:
        """What to tell whoever made ``user`` a member when nobody can act as them: on
        PostgreSQL a member is a login role, and ``user`` is none (yet, or misspelt)."""
        if await self.store.login_role_exists(user) is not False:
            return None
        return (f"user: {user} is no login role of this database, so nobody acts as {user} until the role "
                f"exists (CREATE ROLE \"{user}\" LOGIN)")

    async def set_member(self, user: str, role: str) -> access.Member:
        parsed = access.parse_role(role)
        now = self.now_ms()

        def op(tx: LedgerTx) -> Changed[access.Member]:
            before, after = access.set_member(tx, self.actor, user, parsed, now, verified=self.verified)
            return after, Journal(f"member:{after.user}", before.as_dict() if before else None, after.as_dict())

        return await self._change("manage_members", "member.set", op)

    async def remove_member(self, user: str) -> access.Member:
        def op(tx: LedgerTx) -> Changed[access.Member]:
            before = access.remove_member(tx, self.actor, user)
            return before, Journal(f"member:{user}", before.as_dict(), None)

        return await self._change("manage_members", "member.remove", op)
