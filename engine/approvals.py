"""Override requests: asking for, granting and refusing headroom past a hard limit.

A call that meets an enforced ``approval_required`` limit opens a request (one per policy
and requester while one is pending: a retry finds the open one). An operator approves
it, possibly with a different amount or duration, or denies it with a reason.

An approval is a *grant*: ``granted`` of headroom on that one policy, for that one
requester, until ``grant_expires_ms`` or until it is used up. A call by the requester
that the policy would refuse goes through when its worst case fits what is left of the
grant; the worst case is taken from the grant when the call is authorized and the part
it did not use is given back when it settles (all of it if the call fails). So the
calls let through by a grant never cost more, together, than the granted amount.
Denied, cancelled and expired requests grant nothing.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from engine.clock import format_span, iso
from engine.errors import Refused
from engine.models import FieldError
from engine.money import format_usd
from engine.rules import Policy

if TYPE_CHECKING:
    from engine.ledger import LedgerView

Status = Literal["pending", "approved", "denied", "expired", "cancelled"]
STATUSES: Final = ("pending", "approved", "denied", "expired", "cancelled")
DEFAULT_PENDING_TTL_MS: Final = 4 * 3_600_000
DEFAULT_GRANT_MS: Final = 3_600_000
UNDO_WINDOW_MS: Final = 10_000


class ApprovalError(Refused):
    """A decision that cannot be made (already decided, own request, ...); says why."""

    http_status = 409
    code = "approval_conflict"


@dataclass(frozen=True, slots=True)
class OverrideRequest:
    id: str
    subject: str
    policy_id: str
    policy: dict[str, Any]
    requester: str
    amount: int
    duration_ms: int
    reason: str
    evaluation: dict[str, Any]
    status: Status
    created_ms: int
    expires_ms: int | None
    decided_by: str | None
    decided_ms: int | None
    decision_reason: str | None
    granted: int | None
    grant_expires_ms: int | None
    grant_used: int

    @property
    def remaining(self) -> int:
        return max(0, (self.granted or 0) - self.grant_used) if self.status == "approved" else 0

    def grant_active(self, now_ms: int) -> bool:
        return self.status == "approved" and self.grant_expires_ms is not None and now_ms < self.grant_expires_ms \
            and self.remaining > 0

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "subject": self.subject, "policy_id": self.policy_id, "policy": self.policy,
                "requester": self.requester, "amount": self.amount, "duration_ms": self.duration_ms,
                "reason": self.reason, "evaluation": self.evaluation, "status": self.status,
                "created_ms": self.created_ms, "expires_ms": self.expires_ms, "decided_by": self.decided_by,
                "decided_ms": self.decided_ms, "decision_reason": self.decision_reason, "granted": self.granted,
                "grant_expires_ms": self.grant_expires_ms, "grant_used": self.grant_used}

    def format_amount(self, amount: int) -> str:
        """An amount in the request's policy unit, as the policy itself writes it."""
        return Policy.from_json(self.policy).format_amount(amount)

    def describe(self, now_ms: int) -> list[str]:
        """The request in full, for people: who asked for what, the decision, the grant, and
        the evaluation that opened it."""
        fmt, p = self.format_amount, self.policy
        lines = [f"{self.id}  {self.subject}  {self.status}",
                 f"requester      {self.requester}",
                 f"policy         {p.get('name', self.policy_id)} ({p.get('scope')}, hard "
                 f"{fmt(int(p.get('hard', 0)))} per {p.get('window')}, {p.get('mode')})",
                 f"asked          {fmt(self.amount)} for {format_span(self.duration_ms)}",
                 f"reason         {self.reason}",
                 f"created        {iso(self.created_ms)} ({format_span(now_ms - self.created_ms)} ago)"]
        if self.status == "pending" and self.expires_ms:
            lines.append(f"expires        {iso(self.expires_ms)} (in {format_span(self.expires_ms - now_ms)})")
        if self.decided_by or self.decided_ms:
            lines.append(f"decided        {self.status} by {self.decided_by or 'time'} at {iso(self.decided_ms or 0)}"
                         + (f": {self.decision_reason}" if self.decision_reason else ""))
        if self.granted is not None:
            lines.append(f"granted        {fmt(self.granted)} until {iso(self.grant_expires_ms or 0)}; "
                         f"used {fmt(self.grant_used)}, left {fmt(self.remaining)}")
        lines += self._evaluation_lines()
        return lines

    def _evaluation_lines(self) -> list[str]:
        """The evaluation that opened the request: its decision and each policy's verdict on the call."""
        ev = self.evaluation
        outcomes = ev.get("outcomes")
        if not isinstance(outcomes, list) or not outcomes:
            return ["evaluation     " + json.dumps(ev)]
        lines = [f"evaluation     {ev.get('decision')}, decided by {ev.get('deciding_policy') or '-'}"]
        for o in outcomes:
            usd = o.get("metric") == "usd"

            def fmt(n: Any, usd: bool = usd) -> str:
                return format_usd(int(n)) if usd else f"{int(n):,}"

            lines.append(f"  {o.get('policy')}: {o.get('status')}  consumed {fmt(o.get('consumed', 0))} + held "
                         f"{fmt(o.get('held', 0))} + this call {fmt(o.get('cost', 0))} = "
                         f"{fmt(o.get('projected', 0))} against {fmt(o.get('limit', 0))}")
            if o.get("message"):
                lines.append(f"    {o['message']}")
        return lines

    def audit_view(self) -> dict[str, Any]:
        """What the journal keeps of a request: its decision, not the whole evaluation."""
        return {k: v for k, v in self.as_dict().items() if k not in ("policy", "evaluation")}


def open_request(ledger: LedgerView, *, policy_id: str, policy_snapshot: dict[str, Any], requester: str,
                 amount: int, duration_ms: int, reason: str, evaluation: dict[str, Any], now_ms: int,
                 pending_ttl_ms: int) -> tuple[OverrideRequest, bool]:
    """The pending request of this requester on this policy, opening one if there is none;
    returns (request, created)."""
    expire(ledger, now_ms)
    found = ledger.approvals.pending_of(policy_id, requester)
    if found is not None:
        return found, False
    if amount <= 0:
        raise FieldError("amount", "must be more than zero")
    if duration_ms <= 0:
        raise FieldError("ttl", "must be a positive duration")
    request_id = "ovr_" + secrets.token_hex(6)
    ledger.approvals.insert(request_id, subject=f"usage-budget:{policy_id}", policy_id=policy_id,
                            policy_snapshot=policy_snapshot, requester=requester, amount=amount,
                            duration_ms=duration_ms, reason=reason, evaluation=evaluation, now_ms=now_ms,
                            expires_ms=now_ms + pending_ttl_ms)
    return get(ledger, request_id), True


def get(ledger: LedgerView, request_id: str) -> OverrideRequest:
    request = ledger.approvals.get(request_id)
    if request is None:
        raise FieldError("id", f"no override request {request_id}")
    return request


def listing(ledger: LedgerView, *, pending: bool | None = None, limit: int = 200) -> list[OverrideRequest]:
    """Pending requests oldest first; decided ones (``pending=False``) newest first; None: all, newest first."""
    return ledger.approvals.listing(pending, limit)


def expire(ledger: LedgerView, now_ms: int) -> list[str]:
    """Pending requests past their time become expired; their ids."""
    return ledger.approvals.expire(now_ms)


def _pending(ledger: LedgerView, request_id: str, now_ms: int) -> OverrideRequest:
    expire(ledger, now_ms)
    request = get(ledger, request_id)
    if request.status != "pending":
        by = f" by {request.decided_by}" if request.decided_by else ""
        raise ApprovalError(f"{request.id} is already {request.status}{by}")
    return request


def approve(ledger: LedgerView, request_id: str, actor: str, now_ms: int, *, amount: int | None = None,
            duration_ms: int | None = None, reason: str = "") -> tuple[OverrideRequest, OverrideRequest]:
    """Grant the request (or a different amount or duration); returns (before, after). Of two
    operators deciding at once, the first wins and the second is told who decided."""
    before = _pending(ledger, request_id, now_ms)
    if actor == before.requester:
        raise ApprovalError(f"{actor} cannot approve their own request {before.id}")
    granted = before.amount if amount is None else amount
    if granted <= 0:
        raise FieldError("amount", "must be more than zero")
    duration = before.duration_ms if duration_ms is None else duration_ms
    if duration <= 0:
        raise FieldError("ttl", "must be a positive duration")
    if not ledger.approvals.approve(request_id, actor, now_ms, reason, granted, now_ms + duration):
        # cannot happen inside one write transaction; kept as the guard it is
        raise ApprovalError(f"{request_id} was decided by someone else first")
    return before, get(ledger, request_id)


def deny(ledger: LedgerView, request_id: str, actor: str, now_ms: int,
         reason: str) -> tuple[OverrideRequest, OverrideRequest]:
    if not reason.strip():
        raise FieldError("reason", "is empty; say why the request is denied")
    before = _pending(ledger, request_id, now_ms)
    if actor == before.requester:
        raise ApprovalError(f"{actor} cannot decide their own request {before.id}; cancel it instead")
    ledger.approvals.deny(request_id, actor, now_ms, reason.strip())
    return before, get(ledger, request_id)


def cancel(ledger: LedgerView, request_id: str, actor: str,
           now_ms: int) -> tuple[OverrideRequest, OverrideRequest]:
    before = _pending(ledger, request_id, now_ms)
    if actor != before.requester:
        raise ApprovalError(f"only {before.requester} can cancel {before.id}; deny it instead")
    ledger.approvals.cancel(request_id, actor, now_ms)
    return before, get(ledger, request_id)


def undo(ledger: LedgerView, request_id: str, actor: str, now_ms: int,
         window_ms: int = UNDO_WINDOW_MS) -> tuple[OverrideRequest, OverrideRequest]:
    """Put a just-made decision back to pending, if it is recent and its grant is untouched."""
    before = get(ledger, request_id)
    if before.status not in ("approved", "denied") or before.decided_ms is None:
        raise ApprovalError(f"{request_id} has no decision to undo (it is {before.status})")
    if now_ms - before.decided_ms > window_ms:
        raise ApprovalError(f"the decision on {request_id} is older than {window_ms // 1000} s and stands")
    if before.grant_used:
        raise ApprovalError(f"the grant of {request_id} is already in use; it cannot be undone")
    ledger.approvals.reopen(request_id)
    return before, get(ledger, request_id)


def active_grant(ledger: LedgerView, policy_id: str, requester: str, now_ms: int,
                 need: int) -> OverrideRequest | None:
    """An approved, unexpired grant of this requester on this policy with at least ``need`` left."""
    return ledger.approvals.active_grant(policy_id, requester, now_ms, need)


def use_grant(ledger: LedgerView, request_id: str, amount: int) -> None:
    ledger.approvals.use_grant(request_id, amount)


def pending_count(ledger: LedgerView, now_ms: int) -> int:
    return ledger.approvals.pending_count(now_ms)


def attach_grant(ledger: LedgerView, hold_id: str, request_id: str, amount: int) -> None:
    """Take a call's worst case from the grant, remembering it on the call's hold."""
    ledger.approvals.hold_takes(hold_id, request_id, amount)
    use_grant(ledger, request_id, amount)


def settle_grant(ledger: LedgerView, hold_id: str, request_id: str, taken: int,
                 actual: dict[str, int] | None) -> None:
    """Give back to the grant ``request_id`` what the call of ``hold_id``, which took ``taken``
    from it, did not use: the worst case less its actual amount in the policy's metric, or
    all of it when the call did not run (``actual`` None)."""
    snapshot = ledger.approvals.policy_snapshot(request_id)
    if snapshot is None:
        return
    used = 0 if actual is None else min(taken, actual.get(snapshot["metric"], taken))
    if taken - used:
        use_grant(ledger, request_id, used - taken)
    ledger.approvals.hold_takes(hold_id, None, used)
