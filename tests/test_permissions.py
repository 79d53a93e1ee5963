"""Every change goes through one path: checked against the permission matrix and journaled in
the same transaction (issue 17, finding 1: a viewer or a non-member priced gpt-4o at $0).

Every public coroutine of ``Engine`` is classified here as a read, a runtime write (made for
a token-authenticated call or as upkeep, never an operator's change), a change, or a change
journaled on another ledger (a copy's, on its target), and an
unclassified one fails: a new method has to be placed, and a change is then held to the
matrix for every role, on a real ledger file."""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from engine import access, audit
from engine.access import MATRIX, Permission
from engine.budgets import build_policy
from engine.clock import FrozenClock
from engine.engine import CallRequest, Engine
from engine.services.core import Core
from tests.conftest import NOW_MS, event
from tests.test_otlp import payload, span
from tui.cli import main

#: Reads: nothing an operator changes (some keep derived state current, as expiring requests).
READS = {
    "open", "close", "totals", "timeline", "breakdown", "usage_report", "event_count", "data_version", "policies",
    "policy", "policy_status", "forecasts", "spend_forecast", "backtest", "policy_timeline", "check", "open_holds",
    "open_override_requests", "override_requests", "override_request", "tokens", "members", "role", "may",
    "audit_entries", "verify_audit", "would_blocks", "alerts", "webhooks", "deliveries", "vault_status",
    "vault_entries", "credential", "providers", "provider", "catalog", "provider_health", "routing_decisions",
    "routing_summary", "gateways", "audit_anchor", "overshoots", "recent_calls", "member_notice",
}
#: Writes that are no operator's change, with the reason they are not held to the matrix.
RUNTIME = {
    "settle_call": "settle, or the spill journal when the ledger refuses the write (engine.spill)",
    "replay_spill": "the spill journal's settlements written back, each once, by request id",
    "post_audit_anchor": "the gateway's daily post of the journal's head to the webhooks",
    "record": "a call's usage, for a token the gateway or the governed transport checked",
    "record_many": "the same, in one transaction",
    "bulk_record": "the same, in bulk (an operator's import is import_usage)",
    "ingest_otlp": "the gateway's /v1/traces, for a token scoped for it (an operator's file is import_otlp)",
    "authorize": "a call's hold, on the hot path: no member lookup",
    "authorize_limited": "a call's rate limits and hold, in one operation, on the hot path",
    "adjust_rate": "the same, corrected once the call's tokens are known",
    "settle": "a call's usage and the release of its hold",
    "release": "the hold of a failed call",
    "expire_holds": "upkeep: holds past their time to live",
    "authenticate": "a token's check (and its last use)",
    "touch_tokens": "tokens' last use, in batches",
    "check_forecasts": "upkeep: alerts follow from the ledger, whoever asks",
    "test_connection": "a probe: a breaker follows the provider's answer, whoever asks",
    "route": "a call's routing decision",
    "gateway_heartbeat": "a gateway says it is alive",
    "vault_unlock": "this process's passphrase; nothing stored changes",
}
#: Changes journaled on another ledger than the engine's, each held to the matrix by its own tests.
ELSEWHERE = {
    "copy_ledger": "the copy's entry goes on the target, after the copied chain (tests/test_ledger_copy.py: "
                   "manage_members, and the entry)",
    "export_audit_key": "the journal's key, read from this machine's vault (manage_members; tests/test_audit_hosts.py)",
    "import_audit_key": "the journal's key, kept in this machine's vault once it verifies the journal "
                        "(manage_members; tests/test_audit_hosts.py)",
}

DOLLAR = 1_000_000_000
OWNER = "olivia"
USERS: dict[str | None, str] = {"owner": OWNER, "admin": "adam", "operator": "opal", "viewer": "vera",
                                None: "nobody"}
WEBHOOK = "https://hooks.example.org/services/T0/B0?token=hook-secret-123"
VAULT_SECRET = "sk-vault-secret-456"

Call = Callable[[], Awaitable[Any]]


async def _policy(engine: Engine, action: str = "block") -> str:
    policy = build_policy(scope="global", metric="usd", window="day", hard="1", action=action, now_ms=NOW_MS)
    await engine.add_policy(policy)
    return policy.id


async def _request(engine: Engine, requester: str) -> str:
    policy_id = await _policy(engine, "approval_required")
    request, _ = await engine.request_override(policy_id, DOLLAR, 3_600_000, "eval run", requester=requester)
    return request.id


async def _alert(engine: Engine) -> int:
    await _policy(engine)
    await engine.record(event(1, cost_nanos=DOLLAR))
    return (await engine.alerts())[0].id


async def _set_policy(e: Engine, who: str) -> Call:
    return lambda: e.add_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="5", now_ms=NOW_MS))


async def _update_policy(e: Engine, who: str) -> Call:
    policy = await e.policy(await _policy(e))
    return lambda: e.update_policy(build_policy(scope="global", metric="usd", window="day", hard="2",
                                                now_ms=NOW_MS, policy_id=policy.id))


async def _remove_policy(e: Engine, who: str) -> Call:
    policy_id = await _policy(e)
    return lambda: e.remove_policy(policy_id)


async def _request_override(e: Engine, who: str) -> Call:
    policy_id = await _policy(e, "approval_required")
    return lambda: e.request_override(policy_id, DOLLAR, 3_600_000, "eval run")


async def _approve(e: Engine, who: str) -> Call:
    request_id = await _request(e, "rita")
    return lambda: e.approve(request_id)


async def _deny(e: Engine, who: str) -> Call:
    request_id = await _request(e, "rita")
    return lambda: e.deny(request_id, "not now")


async def _undo(e: Engine, who: str) -> Call:
    request_id = await _request(e, "rita")
    await e.approve(request_id)
    return lambda: e.undo_decision(request_id)


async def _cancel(e: Engine, who: str) -> Call:
    request_id = await _request(e, who)  # one's own request
    return lambda: e.cancel_request(request_id)


async def _create_token(e: Engine, who: str) -> Call:
    return lambda: e.create_token(name="ci", principal="alice")


async def _revoke_token(e: Engine, who: str) -> Call:
    token, _ = await e.create_token(name="ci", principal="alice")
    return lambda: e.revoke_token(token.id)


async def _rotate_token(e: Engine, who: str) -> Call:
    token, _ = await e.create_token(name="ci", principal="alice")
    return lambda: e.rotate_token(token.id)


async def _set_member(e: Engine, who: str) -> Call:
    return lambda: e.set_member("newbie", "viewer")


async def _remove_member(e: Engine, who: str) -> Call:
    await e.set_member("leaving", "viewer")
    return lambda: e.remove_member("leaving")


async def _ack_alert(e: Engine, who: str) -> Call:
    alert_id = await _alert(e)
    return lambda: e.ack_alert(alert_id)


async def _add_webhook(e: Engine, who: str) -> Call:
    return lambda: e.add_webhook(WEBHOOK, "slack")


async def _remove_webhook(e: Engine, who: str) -> Call:
    webhook_id = await e.add_webhook(WEBHOOK)
    return lambda: e.remove_webhook(webhook_id)


async def _import_prices(e: Engine, who: str) -> Call:
    free = {"gpt-4o": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 0,
                       "output_cost_per_token": 0}}
    return lambda: e.import_prices(free, source="free.json")


async def _import_usage(e: Engine, who: str) -> Call:
    return lambda: e.import_usage([event(7), event(8)], source="events.jsonl")


async def _import_otlp(e: Engine, who: str) -> Call:
    return lambda: e.import_otlp(payload(span(1)), "traces.json")


async def _vault_set(e: Engine, who: str) -> Call:
    return lambda: e.vault_set("openai-prod", VAULT_SECRET)


async def _vault_remove(e: Engine, who: str) -> Call:
    await e.vault_set("openai-prod", VAULT_SECRET)
    return lambda: e.vault_remove("openai-prod")


async def _add_provider(e: Engine, who: str) -> Call:
    return lambda: e.add_provider(name="local", kind="openai", base_url="http://127.0.0.1:1/v1",
                                  models=["llama-3.1-8b"])


async def _remove_provider(e: Engine, who: str) -> Call:
    await e.add_provider(name="local", kind="openai", base_url="http://127.0.0.1:1/v1", models=["llama-3.1-8b"])
    return lambda: e.remove_provider("local")


#: Changes: (the permission, the journal actions one call appends, a setup made as the owner
#: that returns the call to make as the user under test).
CHANGES: dict[str, tuple[Permission, list[str], Callable[[Engine, str], Awaitable[Call]]]] = {
    "add_policy": ("edit_policies", ["policy.add"], _set_policy),
    "update_policy": ("edit_policies", ["policy.edit"], _update_policy),
    "remove_policy": ("edit_policies", ["policy.remove"], _remove_policy),
    "request_override": ("request_overrides", ["override.request"], _request_override),
    "approve": ("approve_overrides", ["override.approve"], _approve),
    "deny": ("approve_overrides", ["override.deny"], _deny),
    "undo_decision": ("approve_overrides", ["override.undo"], _undo),
    "cancel_request": ("request_overrides", ["override.cancel"], _cancel),
    "create_token": ("manage_tokens", ["token.create"], _create_token),
    "revoke_token": ("manage_tokens", ["token.revoke"], _revoke_token),
    "rotate_token": ("manage_tokens", ["token.rotate", "token.create"], _rotate_token),
    "set_member": ("manage_members", ["member.set"], _set_member),
    "remove_member": ("manage_members", ["member.remove"], _remove_member),
    "ack_alert": ("ack_alerts", ["alert.ack"], _ack_alert),
    "add_webhook": ("manage_alerts", ["webhook.add"], _add_webhook),
    "remove_webhook": ("manage_alerts", ["webhook.remove"], _remove_webhook),
    "import_prices": ("manage_prices", ["prices.import"], _import_prices),
    "import_usage": ("import_usage", ["usage.import"], _import_usage),
    "import_otlp": ("import_usage", ["usage.import"], _import_otlp),
    "vault_set": ("manage_vault", ["vault.set"], _vault_set),
    "vault_remove": ("manage_vault", ["vault.remove"], _vault_remove),
    "add_provider": ("manage_providers", ["provider.add"], _add_provider),
    "remove_provider": ("manage_providers", ["provider.remove"], _remove_provider),
}


@pytest.fixture(autouse=True)
def _vault_passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUDGETEER_VAULT_PASSPHRASE", "a passphrase for the tests")


def test_every_public_engine_coroutine_is_classified() -> None:
    public = {name for name, fn in inspect.getmembers(Engine)
              if not name.startswith("_") and inspect.iscoroutinefunction(fn)}
    listed = [READS, set(RUNTIME), set(CHANGES), set(ELSEWHERE)]
    assert not (unclassified := public - set().union(*listed)), (
        f"classify {sorted(unclassified)} in tests/test_permissions.py: a read, a runtime write, "
        "or a change held to the matrix and journaled")
    assert not (gone := set().union(*listed) - public), f"no such Engine coroutine: {sorted(gone)}"
    assert sum(map(len, listed)) == len(set().union(*listed)), "a method is classified twice"


def _ledger_state(db: Path, engine: Engine) -> tuple[Any, ...]:
    """Every row of every table, the vault file, and the prices the engine holds in memory."""
    with sqlite3.connect(db) as conn:
        tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        rows = {t: sorted(map(repr, conn.execute(f'SELECT * FROM "{t}"'))) for t in tables}
    conn.close()
    vault = engine.vault().path
    price = engine.price_for("gpt-4o")
    return rows, vault.read_bytes() if vault.exists() else None, price


async def _journal(engine: Engine) -> list[tuple[str, str, str]]:
    return [(e.actor, e.action, json.dumps([e.before, e.after])) for e in reversed(await engine.audit_entries(1000))]


@pytest.mark.parametrize("role", list(USERS))
@pytest.mark.parametrize("method", list(CHANGES))
async def test_every_change_is_held_to_the_matrix_and_journaled_once(
        engine: Engine, db_path: Path, method: str, role: str | None) -> None:
    permission, actions, setup = CHANGES[method]
    user = USERS[role]
    engine.actor = OWNER
    await engine.set_member(OWNER, "owner")
    for r, u in USERS.items():
        if r not in ("owner", None):
            await engine.set_member(u, r)
    await engine.set_member("rita", "operator")  # a requester who is none of the users under test
    call = await setup(engine, user)
    engine.actor = user
    before, journal = _ledger_state(db_path, engine), await _journal(engine)
    if role is not None and permission in MATRIX[role]:  # type: ignore[index]
        await call()
        added = (await _journal(engine))[len(journal):]
        assert [(actor, action) for actor, action, _ in added] == [(user, a) for a in actions]
        assert not any(secret in change for _, _, change in added for secret in ("hook-secret", VAULT_SECRET))
    else:
        who = f"{user} ({role})" if role else f"{user} (not a member)"
        with pytest.raises(Exception, match=f"^{who.replace('(', '[(]').replace(')', '[)]')} lacks the "
                                            f"{permission} permission$") as refused:
            await call()
        assert type(refused.value).__name__ == "AccessDenied"
        assert _ledger_state(db_path, engine) == before  # nothing changed, nothing journaled


@pytest.mark.parametrize("method", [m for m in CHANGES if CHANGES[m][0] != "manage_members"])
async def test_a_ledger_without_members_lets_anyone_change_anything_and_still_journals(
        engine: Engine, method: str) -> None:
    _, actions, setup = CHANGES[method]
    engine.actor = "someone"
    call = await setup(engine, "someone")
    journal = await _journal(engine)
    await call()
    assert [a for _, a, _ in (await _journal(engine))[len(journal):]] == actions


@pytest.mark.parametrize("method", list(CHANGES))
async def test_every_change_is_checked_and_journaled_inside_the_one_path(
        engine: Engine, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Structurally: each change's permission check and every journal entry it appends happen
    inside ``Core.applied``, once per transaction, never by a method's own hand (a check outside
    it is only the early one of ``Core.permitted``, before a long or interactive step)."""
    permission, actions, setup = CHANGES[method]
    engine.actor = OWNER
    await engine.set_member(OWNER, "owner")
    call = await setup(engine, OWNER)
    depth = threading.local()  # the writer's thread runs the transaction
    seen: list[tuple[str, str, bool]] = []
    applied, require, append = Core.applied, access.require, audit.append

    def in_applied(self: Core, *args: Any, **kwargs: Any) -> Any:
        depth.n = getattr(depth, "n", 0) + 1
        try:
            return applied(self, *args, **kwargs)
        finally:
            depth.n -= 1

    def checked(conn: Any, user: str, perm: Permission) -> None:
        seen.append(("require", perm, getattr(depth, "n", 0) > 0))
        require(conn, user, perm)

    def journaled(conn: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(("append", args[2], getattr(depth, "n", 0) > 0))
        return append(conn, *args, **kwargs)

    monkeypatch.setattr(Core, "applied", in_applied)
    monkeypatch.setattr(access, "require", checked)
    monkeypatch.setattr(audit, "append", journaled)
    await call()
    assert [(kind, what) for kind, what, inside in seen if inside] == [("require", permission)] + [
        ("append", a) for a in actions]
    assert {(kind, what) for kind, what, inside in seen if not inside} <= {("require", permission)}


def test_only_the_one_path_checks_permissions_and_appends_to_the_journal() -> None:
    """No engine module but engine/services/core.py calls ``access.require`` or ``audit.append``:
    a new change cannot check or journal by hand."""
    root = Path(__file__).parent.parent / "engine"
    callers = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(f := node.func, ast.Attribute) and isinstance(
                    f.value, ast.Name) and (f.value.id, f.attr) in (("access", "require"), ("audit", "append")):
                callers.add(f"{path.relative_to(root.parent)}: {f.value.id}.{f.attr}")
    assert callers == {"engine/services/core.py: access.require", "engine/services/core.py: audit.append"}


@pytest.mark.sqlite_only  # counts the statements SQLite's writer runs
async def test_a_priced_call_pays_for_no_member_lookup(engine: Engine) -> None:
    """The gateway's hot path (authorize, settle) checks no member: the token was checked."""
    engine.actor = OWNER
    await engine.set_member(OWNER, "owner")
    await _policy(engine)
    engine.actor = "gateway-process-user"  # not a member: it must not matter
    statements: list[str] = []
    engine.store._writer.conn.set_trace_callback(statements.append)
    try:
        auth = await engine.authorize(CallRequest(principal="alice", model="gpt-4o", input_tokens=10, max_tokens=10))
        assert auth.allowed and auth.hold_id is not None
        await engine.settle(auth.hold_id, event(9, model="gpt-4o", input_tokens=10, output_tokens=10))
    finally:
        engine.store._writer.conn.set_trace_callback(None)
    assert statements and not [s for s in statements if "members" in s]


# ------------------------------------------------------------------------ the command line

FREE_GPT_4O = {"gpt-4o": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 0,
                          "output_cost_per_token": 0}}


async def _cli_ledger(db: Path, clock: FrozenClock) -> tuple[Any, ...]:
    async with await Engine.open(db, clock=clock, actor=OWNER) as engine:
        if not await engine.members():
            await engine.set_member(OWNER, "owner")
            await engine.set_member("vera", "viewer")
        return _ledger_state(db, engine)


@pytest.mark.parametrize("user,who", [("vera", "vera (viewer)"), ("mallory", "mallory (not a member)")])
def test_the_cli_refuses_prices_webhooks_and_imports_to_a_viewer_and_a_stranger(
        tmp_path: Path, db_path: Path, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], user: str, who: str) -> None:
    before = asyncio.run(_cli_ledger(db_path, clock))
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps(FREE_GPT_4O))
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps({"ts_ms": NOW_MS, "request_id": "r1", "provider": "openai", "model": "gpt-4o",
                                  "input_tokens": 10, "output_tokens": 1}) + "\n")
    traces = tmp_path / "traces.json"
    traces.write_text(json.dumps(payload(span(1))))
    monkeypatch.setenv("BUDGETEER_USER", user)
    for argv, permission in ((["pricing", "import", str(prices)], "manage_prices"),
                             (["alerts", "webhook", WEBHOOK], "manage_alerts"),
                             (["import", str(events)], "import_usage"),
                             (["import", str(traces)], "import_usage")):
        code = main(["--db", str(db_path), *argv])
        out, err = capsys.readouterr()
        assert code == 1, (argv, out, err)
        assert err == f"budgeteer: {who} lacks the {permission} permission\n", argv
    assert asyncio.run(_cli_ledger(db_path, clock)) == before
