"""Override requests: asking for headroom on a policy, and approving, denying, undoing or
cancelling it.

A service of ``Engine`` (``engine.services.core``): the engine's methods of the same names
delegate here."""

from __future__ import annotations

from collections.abc import Callable

from engine import access, approvals
from engine.approvals import OverrideRequest
from engine.ledger import LedgerTx
from engine.models import FieldError
from engine.services.core import Changed, Core, Journal, Service
from engine.services.policies import PolicyService


class ApprovalService(Service):
    def __init__(self, core: Core, policies: PolicyService) -> None:
        super().__init__(core)
        self.policies = policies

    async def open_override_requests(self) -> int:
        now = self.now_ms()
        return await self._tx(lambda tx: approvals.pending_count(tx, now))

    async def request_override(self, policy_id: str, amount: int, duration_ms: int, reason: str,
                               requester: str | None = None) -> tuple[OverrideRequest, bool]:
        """Ask by hand for headroom on a policy (the requester is the actor unless given);
        returns (request, created): a pending one of the same requester is returned instead."""
        policy = await self.policies.policy(policy_id)
        if not reason.strip():
            raise FieldError("reason", "is empty; say what the headroom is for")
        who = requester or self.actor
        now = self.now_ms()

        def op(tx: LedgerTx) -> Changed[tuple[OverrideRequest, bool]]:
            request, created = approvals.open_request(
                tx, policy_id=policy.id, policy_snapshot=policy.to_json(), requester=who, amount=amount,
                duration_ms=duration_ms, reason=reason.strip(), evaluation={"decision": "requested by hand"},
                now_ms=now, pending_ttl_ms=self.budgets.pending_ttl_ms)
            return (request, created), [Journal(request.subject, None, request.audit_view())] if created else []

        return await self._change("request_overrides", "override.request", op)

    async def override_requests(self, pending: bool | None = True, limit: int = 200) -> list[OverrideRequest]:
        now = self.now_ms()

        def op(tx: LedgerTx) -> list[OverrideRequest]:
            approvals.expire(tx, now)
            return approvals.listing(tx, pending=pending, limit=limit)

        return await self._tx(op)

    async def override_request(self, request_id: str) -> OverrideRequest:
        return await self._tx(lambda tx: approvals.get(tx, request_id))

    async def _decide(self, action: str, decide: Callable[[LedgerTx, int], tuple[OverrideRequest, OverrideRequest]],
                      permission: access.Permission = "approve_overrides") -> OverrideRequest:
        now = self.now_ms()

        def op(tx: LedgerTx) -> Changed[OverrideRequest]:
            before, after = decide(tx, now)
            return after, Journal(after.subject + f" ({after.id})", before.audit_view(), after.audit_view())

        return await self._change(permission, action, op)

    async def approve(self, request_id: str, amount: int | None = None, duration_ms: int | None = None,
                      reason: str = "") -> OverrideRequest:
        return await self._decide("override.approve", lambda tx, now: approvals.approve(
            tx, request_id, self.actor, now, amount=amount, duration_ms=duration_ms, reason=reason))

    async def deny(self, request_id: str, reason: str) -> OverrideRequest:
        return await self._decide("override.deny", lambda tx, now: approvals.deny(
            tx, request_id, self.actor, now, reason))

    async def undo_decision(self, request_id: str) -> OverrideRequest:
        return await self._decide("override.undo", lambda tx, now: approvals.undo(
            tx, request_id, self.actor, now))

    async def cancel_request(self, request_id: str) -> OverrideRequest:
        return await self._decide("override.cancel", lambda tx, now: approvals.cancel(
            tx, request_id, self.actor, now), permission="request_overrides")
