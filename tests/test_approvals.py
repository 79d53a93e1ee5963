"""Override requests and their grants, on a real ledger: one request per blocked requester,
exact grants that stop at their amount and their expiry, self-approval refused, and two
operators deciding the same request at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from engine.access import AccessDenied
from engine.approvals import ApprovalError
from engine.budgets import build_policy
from engine.clock import FrozenClock
from engine.engine import CallRequest, Engine
from engine.models import UsageEvent
from tests.conftest import NOW_MS

DOLLAR = 1_000_000_000


async def _strict(engine: Engine, hard: str = "1") -> str:
    policy = build_policy(scope="team:ml", metric="usd", window="day", hard=hard, action="approval_required",
                          name="ML strict", now_ms=NOW_MS)
    await engine.add_policy(policy)
    await engine.record(UsageEvent(ts_ms=NOW_MS - 1000, request_id="spent", provider="openai", model="gpt-4o",
                                   team="ml", principal="alice", cost_nanos=int(hard) * DOLLAR,
                                   cost_source="provider"))
    return policy.id


def _call(principal: str = "alice", n: int = 0) -> CallRequest:
    # gpt-4o: 1,000 input + 1,000 output tokens at list price, about $0.0125 worst case
    return CallRequest(principal=principal, team="ml", model="gpt-4o", provider="openai", input_tokens=1000,
                       max_tokens=1000, request_id=f"call-{principal}-{n}")


def _settled(auth_request: str, cost: int, principal: str = "alice") -> UsageEvent:
    return UsageEvent(ts_ms=NOW_MS, request_id=auth_request, provider="openai", model="gpt-4o", team="ml",
                      principal=principal, input_tokens=500, output_tokens=100, cost_nanos=cost,
                      cost_source="provider")


async def test_retries_of_a_blocked_call_open_one_request(engine: Engine) -> None:
    policy_id = await _strict(engine)
    ids = set()
    for n in range(5):
        auth = await engine.authorize(_call(n=n))
        assert not auth.allowed and auth.evaluation.decision == "needs_approval"
        ids.add(auth.override_request_id)
    assert len(ids) == 1
    (request,) = await engine.override_requests()
    assert request.subject == f"usage-budget:{policy_id}" and request.requester == "alice"
    assert request.policy["name"] == "ML strict" and request.evaluation["decision"] == "needs_approval"
    other = await engine.authorize(_call("bob"))  # another requester gets a request of their own
    assert other.override_request_id not in ids and len(await engine.override_requests()) == 2


async def test_an_approval_grants_exactly_its_amount_and_stops_at_its_expiry(engine: Engine,
                                                                            clock: FrozenClock) -> None:
    await _strict(engine)
    request_id = (await engine.authorize(_call())).override_request_id
    assert request_id
    engine.actor = "olga"
    worst = engine.worst_case(_call()).usd
    granted = await engine.approve(request_id, amount=3 * worst, duration_ms=60_000)
    assert granted.granted == 3 * worst
    # two calls run at their worst case, using the grant up exactly...
    for n in (1, 2):
        auth = await engine.authorize(_call(n=n))
        assert auth.allowed and auth.grant_id == request_id
        await engine.settle(auth.hold_id or "", _settled(f"call-alice-{n}", worst))
    # ...a third holds the last worst case; while it is in flight nothing is left
    third = await engine.authorize(_call(n=3))
    assert third.allowed
    assert not (await engine.authorize(_call(n=4))).allowed
    # it costs less than its worst case: the rest comes back to the grant, still short of a worst case
    await engine.settle(third.hold_id or "", _settled("call-alice-3", worst // 2))
    assert (await engine.override_request(request_id)).grant_used == 2 * worst + worst // 2
    assert not (await engine.authorize(_call(n=5))).allowed
    # the grant is one requester's: bob is still blocked
    assert not (await engine.authorize(_call("bob"))).allowed


async def test_a_grant_ends_at_its_expiry_and_a_failed_call_gives_its_hold_back(engine: Engine,
                                                                              clock: FrozenClock) -> None:
    await _strict(engine)
    request_id = (await engine.authorize(_call())).override_request_id or ""
    engine.actor = "olga"
    await engine.approve(request_id, amount=DOLLAR, duration_ms=60_000)
    auth = await engine.authorize(_call(n=1))
    assert auth.allowed
    await engine.release(auth.hold_id or "")
    assert (await engine.override_request(request_id)).grant_used == 0
    clock.advance(60_001)
    assert not (await engine.authorize(_call(n=2))).allowed


async def test_denied_and_expired_requests_grant_nothing(engine: Engine, clock: FrozenClock) -> None:
    await _strict(engine)
    first = (await engine.authorize(_call())).override_request_id or ""
    engine.actor = "olga"
    with pytest.raises(Exception, match="reason: is empty"):
        await engine.deny(first, "  ")
    denied = await engine.deny(first, "not this month")
    assert denied.status == "denied" and denied.decision_reason == "not this month"
    again = (await engine.authorize(_call(n=1)))
    assert not again.allowed and again.override_request_id != first  # a new request, still blocked
    clock.advance(engine.budgets.pending_ttl_ms + 1)
    assert await engine.override_requests() == []
    expired = await engine.override_request(again.override_request_id or "")
    assert expired.status == "expired"
    with pytest.raises(ApprovalError, match="already expired"):
        await engine.approve(expired.id)


async def test_nobody_approves_their_own_request(engine: Engine) -> None:
    await _strict(engine)
    request_id = (await engine.authorize(_call())).override_request_id or ""
    engine.actor = "alice"
    with pytest.raises(ApprovalError, match="alice cannot approve their own request"):
        await engine.approve(request_id)
    assert (await engine.override_request(request_id)).status == "pending"


async def test_two_operators_approving_at_once_decide_once(db_path: Path, clock: FrozenClock) -> None:
    async with await Engine.open(db_path, clock=clock, actor="setup") as engine:
        await _strict(engine)
        request_id = (await engine.authorize(_call())).override_request_id or ""
    first = await Engine.open(db_path, clock=clock, actor="olga")
    second = await Engine.open(db_path, clock=clock, actor="oscar")
    try:
        results = await asyncio.gather(first.approve(request_id, amount=DOLLAR),
                                       second.approve(request_id, amount=2 * DOLLAR), return_exceptions=True)
        wins = [r for r in results if not isinstance(r, BaseException)]
        losses = [r for r in results if isinstance(r, ApprovalError)]
        assert len(wins) == 1 and len(losses) == 1 and "already approved by" in str(losses[0])
        stored = await first.override_request(request_id)
        assert stored.decided_by == wins[0].decided_by and stored.granted == wins[0].granted
        decisions = [e for e in await first.audit_entries() if e.action == "override.approve"]
        assert len(decisions) == 1
    finally:
        await first.close()
        await second.close()


async def test_undo_puts_a_fresh_decision_back(engine: Engine, clock: FrozenClock) -> None:
    await _strict(engine)
    request_id = (await engine.authorize(_call())).override_request_id or ""
    engine.actor = "olga"
    await engine.approve(request_id)
    restored = await engine.undo_decision(request_id)
    assert restored.status == "pending" and restored.granted is None
    await engine.deny(request_id, "wrong team")
    clock.advance(11_000)
    with pytest.raises(ApprovalError, match="older than 10 s"):
        await engine.undo_decision(request_id)


async def test_a_request_by_hand_and_the_roles_that_may_decide(engine: Engine) -> None:
    policy_id = await _strict(engine)
    engine.actor = "owner1"
    await engine.set_member("owner1", "owner")
    await engine.set_member("vic", "viewer")
    await engine.set_member("ops", "operator")
    engine.actor = "vic"
    with pytest.raises(AccessDenied, match="vic \\(viewer\\) lacks the request_overrides permission"):
        await engine.request_override(policy_id, 5 * DOLLAR, 3_600_000, "batch eval")
    engine.actor = "ops"
    request, created = await engine.request_override(policy_id, 5 * DOLLAR, 3_600_000, "batch eval")
    assert created and request.requester == "ops"
    assert (await engine.request_override(policy_id, DOLLAR, 60_000, "again"))[1] is False
    engine.actor = "vic"
    with pytest.raises(AccessDenied, match="vic \\(viewer\\) lacks the approve_overrides permission"):
        await engine.approve(request.id)
    engine.actor = "owner1"
    assert (await engine.approve(request.id)).status == "approved"
