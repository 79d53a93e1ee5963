"""The approvals, tokens and audit screens driven by keys only, on a real ledger: approving
(with a changed amount), denying with a reason, undoing; a request from another process
announced; creating a token (secret shown once, copied by OSC 52) and revoking it; the
journal filtered and its tampering found."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from textual.widgets import Input, Static

from engine.budgets import build_policy
from engine.clock import FrozenClock
from engine.engine import Engine
from engine.money import parse_usd
from engine.tokens import TokenRefused
from tui.app import BudgeteerApp
from tui.screens.approvals import ApprovalsScreen
from tui.screens.form import FormModal
from tui.screens.message import MessageModal
from tui.screens.tokens import SecretModal, TokensScreen
from tui.widgets.vim_table import VimTable


async def _settle(pilot: object, app: BudgeteerApp) -> None:
    await app.workers.wait_for_complete()
    await pilot.pause(0.05)  # type: ignore[attr-defined]


def _notes(app: BudgeteerApp) -> list[str]:
    return [str(n.message) for n in app._notifications]


def _cells(app: BudgeteerApp, table_id: str, column: str) -> list[str]:
    table = app.screen.query_one(table_id, VimTable)
    return [str(table.get_cell(row, column)) for row in table.rows]


@pytest.fixture
async def requests(db_path: Path, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Two pending requests on an approval_required policy, by bob then carol; the dashboard acts as ops."""
    async with await Engine.open(db_path, clock=clock, actor="bob") as engine:
        await engine.add_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="10", name="ML daily",
                                             action="approval_required", policy_id="ml-day"))
        first, _ = await engine.request_override("ml-day", parse_usd("5"), 3_600_000, "nightly evals")
        clock.advance(60_000)
        engine.actor = "carol"
        second, _ = await engine.request_override("ml-day", parse_usd("3"), 1_800_000, "demo for a customer")
    monkeypatch.setenv("BUDGETEER_USER", "ops")
    return [first.id, second.id]


async def test_approve_with_a_changed_amount_undo_and_deny_by_keys(db_path: Path, clock: FrozenClock,
                                                                   requests: list[str], refresh: float) -> None:
    bobs, carols = requests
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(160, 48)) as pilot:
        await _settle(pilot, app)
        assert any("2 override requests wait" in n for n in _notes(app))
        await pilot.press("5")
        await _settle(pilot, app)
        assert isinstance(app.screen, ApprovalsScreen)
        assert _cells(app, "#requests", "requester") == ["bob", "carol"]  # oldest first
        app.screen.query_one("#requests", VimTable).focus()

        await pilot.press("a")
        await _settle(pilot, app)
        assert isinstance(app.screen, FormModal)
        assert app.screen.query_one("#f-amount", Input).value == "5"
        await pilot.press("ctrl+u", "2", ".", "5", "enter")
        await _settle(pilot, app)
        assert isinstance(app.screen, ApprovalsScreen)
        async with await Engine.open(db_path, clock=clock) as engine:
            approved = await engine.override_request(bobs)
        assert (approved.status, approved.granted, approved.decided_by) == ("approved", parse_usd("2.5"), "ops")
        assert approved.grant_expires_ms == clock.now_ms() + 3_600_000
        assert _cells(app, "#requests", "requester") == ["carol"]

        await pilot.press("u")
        await _settle(pilot, app)
        async with await Engine.open(db_path, clock=clock) as engine:
            assert (await engine.override_request(bobs)).status == "pending"
        assert _cells(app, "#requests", "requester") == ["bob", "carol"]

        app.screen.query_one("#requests", VimTable).move_cursor(row=1)
        await pilot.press("d")
        await _settle(pilot, app)
        await pilot.press("enter")  # an empty reason is refused in the form, under its field
        await _settle(pilot, app)
        assert isinstance(app.screen, FormModal)
        error = app.screen.query_one("#e-reason", Static)
        assert error.display and "reason: is empty" in str(error.content)
        await pilot.press(*"not this week", "enter")
        await _settle(pilot, app)
        async with await Engine.open(db_path, clock=clock) as engine:
            denied = await engine.override_request(carols)
        assert (denied.status, denied.decision_reason, denied.decided_by) == ("denied", "not this week", "ops")

        await pilot.press("h")
        await _settle(pilot, app)
        assert _cells(app, "#requests", "status") == ["denied"]
        # 160 columns: the details pane beside the table shows what enter's modal shows below 140.
        details = str(app.screen.query_one("#details-body", Static).content)
        assert "denied by ops" in details and "not this week" in details


async def test_details_show_the_evaluation_that_opened_a_request(db_path: Path, clock: FrozenClock,
                                                                 requests: list[str], refresh: float) -> None:
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("5")
        await _settle(pilot, app)
        app.screen.query_one("#requests", VimTable).focus()
        await pilot.press("enter")
        await _settle(pilot, app)
        assert isinstance(app.screen, MessageModal)
        body = app.screen.body_text
        assert "requester      bob" in body and "nightly evals" in body and "evaluation" in body
        assert "ML daily (team:ml, hard $10.00 per day, enforced)" in body


async def test_a_request_from_another_process_is_announced_and_listed(db_path: Path, clock: FrozenClock,
                                                                      requests: list[str], refresh: float) -> None:
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("5")
        await _settle(pilot, app)
        assert len(_cells(app, "#requests", "requester")) == 2
        env = {**os.environ, "BUDGETEER_USER": "dave"}
        subprocess.run([sys.executable, "-m", "tui.cli", "--db", str(db_path), "approvals", "request", "--policy",
                        "ml-day", "--amount", "4", "--ttl", "2h", "--reason", "retraining run"],
                       check=True, timeout=60, env=env, capture_output=True)
        await pilot.press("r")  # one refresh
        await _settle(pilot, app)
        assert any("dave asks $4.00 past ML daily: retraining run" in n for n in _notes(app))
        assert _cells(app, "#requests", "requester")[-1] == "dave"


async def test_self_approval_and_a_missing_permission_are_refused_on_screen(db_path: Path, clock: FrozenClock,
                                                                            requests: list[str],
                                                                            monkeypatch: pytest.MonkeyPatch,
                                                                            refresh: float) -> None:
    async with await Engine.open(db_path, clock=clock, actor="olivia") as engine:
        await engine.set_member("olivia", "owner")
        await engine.set_member("bob", "admin")
        await engine.set_member("vera", "viewer")
    for user, expected in (("vera", "vera (viewer) lacks the approve_overrides permission"),
                           ("bob", "bob cannot decide their own request")):
        monkeypatch.setenv("BUDGETEER_USER", user)
        app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
        async with app.run_test(size=(120, 36)) as pilot:
            await pilot.press("5")
            await _settle(pilot, app)
            app.screen.query_one("#requests", VimTable).focus()
            await pilot.press("a")
            await _settle(pilot, app)
            assert isinstance(app.screen, ApprovalsScreen)  # no form opened
            assert any(expected in n for n in _notes(app)), _notes(app)
    async with await Engine.open(db_path, clock=clock) as engine:
        assert [r.status for r in await engine.override_requests(pending=None)] == ["pending", "pending"]


async def test_create_a_token_copy_its_secret_once_rotate_and_revoke_it(db_path: Path, clock: FrozenClock,
                                                                        refresh: float) -> None:
    async with await Engine.open(db_path, clock=clock):
        pass
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.press("6")
        await _settle(pilot, app)
        assert isinstance(app.screen, TokensScreen)
        await pilot.press("n")
        await _settle(pilot, app)
        await pilot.press(*"ci bot", "tab", *"svc-ci", "tab", "tab", "tab", *"120", "enter")
        await _settle(pilot, app)
        assert isinstance(app.screen, SecretModal)
        secret = str(app.screen.query_one("#secret", Static).content)
        assert secret.startswith("bgt_") and len(secret) >= 4 + 43
        await pilot.press("c")
        assert app.clipboard == secret  # written to the terminal as OSC 52
        await pilot.press("escape")
        await _settle(pilot, app)
        assert isinstance(app.screen, TokensScreen)
        assert _cells(app, "#tokens-table", "state") == ["active"]
        assert _cells(app, "#tokens-table", "rpm") == ["120"]
        async with await Engine.open(db_path, clock=clock) as engine:
            token = await engine.authenticate(secret, "chat")
            assert (token.name, token.principal, token.rpm) == ("ci bot", "svc-ci", 120)
            assert token.expires_ms == clock.now_ms() + 90 * 86_400_000  # the form's default lifetime
            journal = [e.as_dict() for e in await engine.audit_entries()]
        assert secret not in repr(journal) and secret[4:20] not in repr(journal)

        app.screen.query_one("#tokens-table", VimTable).focus()
        await pilot.press("R", "y")  # rotate: a new secret, shown once; the old one stops
        await _settle(pilot, app)
        assert isinstance(app.screen, SecretModal)
        rotated = str(app.screen.query_one("#secret", Static).content)
        await pilot.press("escape")
        await _settle(pilot, app)
        assert _cells(app, "#tokens-table", "state") == ["active", "revoked"]  # the new one selected, first
        async with await Engine.open(db_path, clock=clock) as engine:
            assert (await engine.authenticate(rotated, "chat")).rotated_from == token.id
            with pytest.raises(TokenRefused):
                await engine.authenticate(secret, "chat")

        await pilot.press("x", "y")
        await _settle(pilot, app)
        assert _cells(app, "#tokens-table", "state") == ["revoked", "revoked"]
        async with await Engine.open(db_path, clock=clock) as engine:
            with pytest.raises(TokenRefused) as refused:
                await engine.authenticate(rotated, "chat")
        assert refused.value.reason == "revoked"


async def test_a_bad_token_form_names_the_field_and_creates_nothing(db_path: Path, clock: FrozenClock,
                                                                    refresh: float) -> None:
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("6")
        await _settle(pilot, app)
        await pilot.press("n")
        await _settle(pilot, app)
        await pilot.press(*"x", "tab", *"svc", "tab", "tab", "ctrl+u", *"chat,sudo", "enter")
        await _settle(pilot, app)
        assert isinstance(app.screen, FormModal)
        assert "scopes: unknown scope 'sudo'" in str(app.screen.query_one("#e-scopes", Static).content)
        await pilot.press("escape")
    async with await Engine.open(db_path, clock=clock) as engine:
        assert await engine.tokens() == []


async def test_the_audit_screen_filters_and_finds_tampering(db_path: Path, clock: FrozenClock,
                                                            requests: list[str], refresh: float) -> None:
    async with await Engine.open(db_path, clock=clock, actor="ops") as engine:
        await engine.create_token(name="one", principal="bob")
        await engine.deny(requests[0], "no")
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.press("7")
        await _settle(pilot, app)
        assert _cells(app, "#audit-table", "action") == ["override.deny", "token.create", "override.request",
                                                          "override.request", "policy.add"]
        await pilot.press("slash", *"token")
        await _settle(pilot, app)
        assert _cells(app, "#audit-table", "action") == ["token.create"]
        await pilot.press("escape")
        await _settle(pilot, app)
        await pilot.press("v")
        await _settle(pilot, app)
        assert any("chain of 5 entries is intact" in n for n in _notes(app))
        with sqlite3.connect(db_path) as conn:
            conn.executescript("DROP TRIGGER audit_journal_no_update; DROP TRIGGER audit_journal_no_delete;")
            conn.execute("UPDATE audit_journal SET actor = 'mallory' WHERE id = 3")
        await pilot.press("v")
        await _settle(pilot, app)
        assert any("entry 3 was edited" in n for n in _notes(app))


@pytest.mark.parametrize("refresh_seconds", [2, 3600])
async def test_token_details_word_the_limits_as_the_command_line_does(db_path: Path, clock: FrozenClock,
                                                                     refresh_seconds: int) -> None:
    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.create_token(name="ci", principal="bob", rpm=60)
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh_seconds)
    async with app.run_test(size=(120, 40)) as pilot:  # below 140 columns: enter opens the details modal
        await pilot.press("6")
        await _settle(pilot, app)
        await pilot.press("enter")
        await _settle(pilot, app)
        assert isinstance(app.screen, MessageModal)
        assert "rate limits   60 requests a minute, no token limit\n" in app.screen.body_text


@pytest.mark.parametrize("refresh_seconds", [2, 3600])
async def test_the_audit_screen_shows_amounts_in_dollars(db_path: Path, clock: FrozenClock, requests: list[str],
                                                         refresh_seconds: int) -> None:
    async with await Engine.open(db_path, clock=clock, actor="ops") as engine:
        await engine.update_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="20",
                                                name="ML daily", action="approval_required", policy_id="ml-day"))
        await engine.approve(requests[0], amount=parse_usd("4"))
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh_seconds)
    async with app.run_test(size=(130, 40)) as pilot:  # below 140 columns: enter opens the details modal
        await pilot.press("7")
        await _settle(pilot, app)
        changes = _cells(app, "#audit-table", "change")
        whole = "status pending→approved, granted -→$4.00"
        assert changes[0] == whole or (changes[0].endswith("…") and whole.startswith(changes[0][:-1]))  # elided
        assert changes[1] == "hard $10.00→$20.00"  # the journal keeps 10000000000→20000000000
        assert changes[-1] == "created: hard $10.00"
        await pilot.press("enter")
        await _settle(pilot, app)
        assert isinstance(app.screen, MessageModal)
        assert "  granted: - → $4.00" in app.screen.body_text and "  duration_ms: 1 h → 1 h" not in app.screen.body_text
        await pilot.press("escape", "j", "enter")
        await _settle(pilot, app)
        assert isinstance(app.screen, MessageModal)
        assert "  hard: $10.00 → $20.00" in app.screen.body_text


async def test_the_vault_screen_asks_the_passphrase_stores_hidden_tests_and_removes(
        db_path: Path, clock: FrozenClock, tmp_path: Path, refresh: float) -> None:
    from tests.fake_servers import http_server
    from tui.screens.vault import VaultScreen

    secret = "sk-live-VAULTSCREEN-0123456789"
    body = b'{"object": "list", "data": [{"id": "gpt-4o-mini"}]}'
    with http_server({"/v1/models": (200, {"content-type": "application/json"}, body)}) as (base, seen):
        async with await Engine.open(db_path, clock=clock) as engine:
            await engine.add_provider(name="local", kind="openai", base_url=f"{base}/v1", credential="vault:local")
        app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
        async with app.run_test(size=(160, 48)) as pilot:
            await pilot.press("9")
            await _settle(pilot, app)
            assert isinstance(app.screen, VaultScreen)
            status = str(app.screen.query_one("#vault-status", Static).content)
            assert "[b]file[/b] backend: forced by BUDGETEER_VAULT_BACKEND=file" in status
            await pilot.press("n")
            await _settle(pilot, app)
            assert isinstance(app.screen, FormModal) and app.screen.title_text == "Vault passphrase"
            await pilot.press(*"open sesame", "enter")
            await _settle(pilot, app)
            assert isinstance(app.screen, FormModal) and app.screen.title_text == "Add a credential"
            assert app.screen.query_one("#f-secret", Input).password  # typed hidden
            await pilot.press(*"local", "tab", *secret, "enter")
            await _settle(pilot, app)
            assert isinstance(app.screen, VaultScreen)
            assert _cells(app, "#vault-table", "used by") == ["local"]
            fingerprint = _cells(app, "#vault-table", "fingerprint")[0]
            assert fingerprint.startswith("sha256:") and secret not in fingerprint
            screen_text = app.export_screenshot()
            assert secret not in screen_text

            app.screen.query_one("#vault-table", VimTable).focus()
            await pilot.press("t")
            await _settle(pilot, app)
            await pilot.pause(0.3)
            await _settle(pilot, app)
            assert any(n.startswith("ok in") for n in _notes(app)), _notes(app)
            assert seen[-1]["authorization"] == f"Bearer {secret}"  # decrypted for the call only

            await pilot.press("x", "y")
            await _settle(pilot, app)
            assert _cells(app, "#vault-table", "reference") == ["No credentials: press n to add one."]
    vault_file = tmp_path / "vault.json"
    assert vault_file.exists() and secret.encode() not in vault_file.read_bytes()
    async with await Engine.open(db_path, clock=clock) as engine:
        journal = [e.as_dict() for e in await engine.audit_entries()]
    assert [e["action"] for e in journal[:2]] == ["vault.remove", "vault.set"] and secret not in repr(journal)
    assert secret.encode() not in db_path.read_bytes()


async def test_the_models_screen_explains_a_prompt_typed_in_its_box(db_path: Path, clock: FrozenClock,
                                                                    refresh: float) -> None:
    from tui.screens.models import ModelsScreen

    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.add_provider(name="openai", kind="openai", base_url="http://127.0.0.1:1/v1",
                                  models=["gpt-4o-mini", "gpt-4.1", "gpt-4o"])
        await engine.route({"messages": [{"role": "user", "content": "hi"}]}, principal="alice", model="gpt-4o",
                           mode="enforced")
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.press("8")
        await _settle(pilot, app)
        assert isinstance(app.screen, ModelsScreen)
        assert _cells(app, "#catalog", "model") == ["gpt-4o-mini", "gpt-4.1", "gpt-4o"]
        assert _cells(app, "#catalog", "tier") == ["1", "3", "3"]
        assert _cells(app, "#decisions", "route") == ["gpt-4o → gpt-4o-mini"]
        summary = str(app.screen.query_one("#routing-summary", Static).content)
        assert "1 decisions, model changed in 1 (100%)" in summary
        await pilot.press("e", *"translate hello into French", "enter")
        await _settle(pilot, app)
        result = str(app.screen.query_one("#explain-result", Static).content)
        assert "tier 1+" in result and "gpt-4o-mini" in result and "against gpt-4o" in result
        app.screen.query_one("#explain", Input).value = ""
        await pilot.press(*"@gpt-4.1 Prove step by step why this algorithm is optimal and compare trade-offs",
                          "enter")
        await _settle(pilot, app)
        result = str(app.screen.query_one("#explain-result", Static).content)
        assert "tier 2+" in result and "against gpt-4.1" in result and "reasoning +0.20" in result
    async with await Engine.open(db_path, clock=clock) as engine:
        assert len(await engine.routing_decisions()) == 1  # explaining records nothing


@pytest.mark.parametrize("refresh_seconds", [2, 3600])
async def test_explain_names_the_budget_that_blocks(db_path: Path, clock: FrozenClock, refresh_seconds: int) -> None:
    from tests.conftest import NOW_MS, event

    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.add_provider(name="openai", kind="openai", base_url="http://127.0.0.1:1/v1",
                                  models=["gpt-4o-mini", "gpt-4o"])
        await engine.add_policy(build_policy(scope="global", metric="usd", window="day", hard="6", name="Org daily"))
        await engine.record(event(1, cost_nanos=6_100_000_000, ts_ms=NOW_MS - 60_000))
    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh_seconds)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.press("8")
        await _settle(pilot, app)
        await pilot.press("e", *"hello", "enter")
        await _settle(pilot, app)
        result = str(app.screen.query_one("#explain-result", Static).content)
        assert ("0 of 2 candidates kept (dropped: 2 budget Org daily ($6.10 of $6.00 this day spent or held) would "
                "block it); no candidate meets the need") in " ".join(result.split())


async def test_the_overview_shows_a_running_gateway_and_its_rates(db_path: Path, clock: FrozenClock,
                                                                  refresh: float) -> None:
    from engine.engine import GatewayStatus

    app = BudgeteerApp(db_path=db_path, clock=clock, refresh_seconds=refresh)
    async with app.run_test(size=(160, 48)) as pilot:
        await _settle(pilot, app)
        assert "[b]Gateway:[/b] none running on this ledger" in str(app.screen.query_one("#attention", Static).content)
        async with await Engine.open(db_path, clock=clock) as engine:  # a gateway's heartbeat, as another process
            now = clock.now_ms()
            await engine.gateway_heartbeat(GatewayStatus("gw_1", "127.0.0.1:8787", 4242, now - 60_000, now, None,
                                                         500, 7, 40, 2))
        await pilot.press("r")
        await _settle(pilot, app)
        line = str(app.screen.query_one("#attention", Static).content)
        assert "[b]Gateway:[/b] 127.0.0.1:8787 · 40 req/min · 5.0% errors" in line
