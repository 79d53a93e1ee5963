"""The audit journal proves what it says: append-only to SQL, chained by a key kept in the
vault (re-chaining without it is caught), and anchored (deleting the newest entries is
caught against an anchor kept elsewhere)."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import time
from pathlib import Path

import pytest

from engine.audit import entry_hash
from engine.budgets import build_policy
from engine.clock import DAY_MS, FrozenClock
from engine.engine import Engine
from engine.models import FieldError
from engine.vault import Vault, VaultError
from tests.conftest import NOW_MS
from tests.sql import guard_error, raw_sql
from tests.test_alerts import FakeWebhook
from tests.test_cli import run

UNGUARD = "DROP TRIGGER IF EXISTS audit_journal_no_update; DROP TRIGGER IF EXISTS audit_journal_no_delete;"


async def _changes(engine: Engine, n: int) -> None:
    for i in range(n):
        await engine.add_policy(build_policy(scope=f"team:t{i}", metric="usd", window="day", hard="5",
                                             now_ms=NOW_MS))


def _rechain(db: Path, edit_id: int, key: bytes | None) -> None:
    """What one who can write the ledger file could do: drop the triggers, edit an entry, and
    recompute its hash and every later one (plain SHA-256, or HMAC under ``key``)."""
    conn = sqlite3.connect(db)
    conn.executescript(UNGUARD)
    conn.execute("UPDATE audit_journal SET actor = 'mallory' WHERE id = ?", (edit_id,))
    rows = conn.execute("SELECT id, ts_ms, actor, action, subject, before, after, prev_hash, hash "
                        "FROM audit_journal ORDER BY id").fetchall()
    prev = None
    for entry_id, ts, actor, action, subject, before, after, prev_hash, digest in rows:
        if entry_id >= edit_id:
            prev_hash = prev if prev is not None else prev_hash
            fields = (entry_id, ts, actor, action, subject, before, after, prev_hash)
            digest = entry_hash(*fields) if key is None else entry_hash(*fields, key)
            conn.execute("UPDATE audit_journal SET prev_hash = ?, hash = ? WHERE id = ?",
                         (prev_hash, digest, entry_id))
        prev = digest
    conn.commit()
    conn.close()


async def test_the_journal_refuses_update_and_delete(engine: Engine, ledger_at: Path | str) -> None:
    await _changes(engine, 2)
    with pytest.raises(guard_error(), match="append-only: an entry cannot be changed"):
        raw_sql(ledger_at, "UPDATE audit_journal SET actor = 'mallory' WHERE id = 1")
    with pytest.raises(guard_error(), match="append-only: an entry cannot be removed"):
        raw_sql(ledger_at, "DELETE FROM audit_journal WHERE id = 2")
    assert (await engine.verify_audit()).ok


@pytest.mark.parametrize("rekey", ["sha256", "wrong-hmac"])
async def test_an_edited_entry_re_chained_without_the_vaults_key_is_named(
        db_path: Path, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch, rekey: str) -> None:
    monkeypatch.setenv("BUDGETEER_VAULT_PASSPHRASE", "pw")
    async with await Engine.open(db_path, clock=clock) as engine:
        await _changes(engine, 4)
        result = await engine.verify_audit()
        assert result.ok and result.entries == 4
    _rechain(db_path, 2, None if rekey == "sha256" else b"k" * 32)
    async with await Engine.open(db_path, clock=clock) as engine:
        result = await engine.verify_audit()
    assert not result.ok and result.entry_id == 2 and "entry 2 was edited" in result.problem


async def test_the_key_is_in_the_vault_not_the_ledger_and_not_listed(
        db_path: Path, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUDGETEER_VAULT_PASSPHRASE", "pw")
    async with await Engine.open(db_path, clock=clock) as engine:
        await _changes(engine, 1)
        assert await engine.vault_entries() == []  # not a credential
        (ref,) = [e.ref for e in engine.vault().backend.entries()]
        key = json.loads(engine.vault().get(ref))["key"]
        with pytest.raises(FieldError, match="kept for the audit journal's key"):
            await engine.vault_remove(ref)
    wal = Path(f"{db_path}-wal")
    ledger = db_path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    assert base64.b64decode(key) not in ledger and key.encode() not in ledger


async def test_entries_before_the_key_are_checked_as_the_legacy_chain_and_bound_to_it(
        db_path: Path, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch) -> None:
    async with await Engine.open(db_path, clock=clock) as engine:  # no passphrase: no key can be made
        await _changes(engine, 2)
        result = await engine.verify_audit()
        assert result.ok and result.keyed_from is None
    monkeypatch.setenv("BUDGETEER_VAULT_PASSPHRASE", "pw")
    async with await Engine.open(db_path, clock=clock) as engine:
        await _changes(engine, 2)
        result = await engine.verify_audit()
        assert result.ok and result.entries == 4 and result.keyed_from == 3
    _rechain(db_path, 1, None)  # the legacy part re-chained with SHA-256: entry 3's keyed link breaks
    async with await Engine.open(db_path, clock=clock) as engine:
        result = await engine.verify_audit()
    assert not result.ok and result.entry_id == 3 and "entry 3 was edited" in result.problem


async def test_a_locked_vault_holding_the_key_refuses_the_change(
        db_path: Path, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUDGETEER_VAULT_PASSPHRASE", "pw")
    async with await Engine.open(db_path, clock=clock) as engine:
        await _changes(engine, 1)
    monkeypatch.delenv("BUDGETEER_VAULT_PASSPHRASE")
    async with await Engine.open(db_path, clock=clock) as engine:
        with pytest.raises(FieldError, match="holds the audit journal's key and is locked"):
            await engine.add_policy(build_policy(scope="global", metric="usd", window="day", hard="5"))
        assert len(await engine.policies()) == 1
        with pytest.raises(VaultError, match=r"locked: .* to verify the chain"):
            await engine.verify_audit()
        await engine.vault_unlock("pw")
        await engine.add_policy(build_policy(scope="global", metric="usd", window="day", hard="5"))
        assert (await engine.verify_audit()).ok


def test_deleting_the_newest_entries_is_named_against_an_anchor(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUDGETEER_VAULT_PASSPHRASE", "pw")
    db = str(tmp_path / "l.db")
    for n in range(4):
        assert run(capsys, "--db", db, "policy", "add", "--name", f"p{n}", "--scope", f"team:t{n}", "--hard",
                   "5", "--window", "day", "--metric", "usd")[0] == 0
    code, out, _ = run(capsys, "--db", db, "audit", "anchor")
    anchor = json.loads(out)
    assert code == 0 and anchor["entry"] == 4 and len(anchor["hash"]) == 64
    (tmp_path / "anchor.json").write_text(out)
    code, out, _ = run(capsys, "--db", db, "audit", "verify", "--anchor", str(tmp_path / "anchor.json"))
    assert code == 0 and "intact: 4 entries" in out and "keyed from entry 1" in out
    conn = sqlite3.connect(db)
    conn.executescript(UNGUARD + "DELETE FROM audit_journal WHERE id >= 3;")
    conn.close()
    assert run(capsys, "--db", db, "audit", "verify")[0] == 0  # a shorter chain still fits...
    code, _, err = run(capsys, "--db", db, "audit", "verify", "--anchor", str(tmp_path / "anchor.json"))
    assert code == 1 and "entries 3 to 4 are missing" in err  # ...but not the anchor


def test_an_anchor_whose_entry_was_rewritten_is_named(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "l.db")  # no vault: the legacy chain, which the anchor still guards
    for n in range(3):
        run(capsys, "--db", db, "policy", "add", "--name", f"p{n}", "--scope", f"team:t{n}", "--hard", "5",
            "--window", "day", "--metric", "usd")
    (tmp_path / "anchor.json").write_text(run(capsys, "--db", db, "audit", "anchor")[1])
    _rechain(Path(db), 2, None)
    assert run(capsys, "--db", db, "audit", "verify")[0] == 0
    code, _, err = run(capsys, "--db", db, "audit", "verify", "--anchor", str(tmp_path / "anchor.json"))
    assert code == 1 and "entry 3 does not match the anchor" in err


async def test_the_anchor_is_posted_to_the_webhooks_once_a_day(engine: Engine, clock: FrozenClock) -> None:
    hook = FakeWebhook(failures=0)
    server = await asyncio.start_server(hook.handle, "127.0.0.1", 0)
    hook.port = server.sockets[0].getsockname()[1]
    async with server:
        await engine.add_webhook(f"http://127.0.0.1:{hook.port}/hook")
        await _changes(engine, 2)
        head = await engine.audit_anchor()
        assert head is not None and await engine.post_audit_anchor()
        assert not await engine.post_audit_anchor()
        async with await Engine.open(engine.location, clock=clock) as other:  # another process, the same day
            assert not await other.post_audit_anchor()
        clock.advance(DAY_MS)
        assert await engine.post_audit_anchor()
    # the webhook's own entry, then the two changes
    assert [b["audit_anchor"]["entry"] for b in hook.bodies] == [3, 3]  # type: ignore[index]
    assert hook.bodies[0]["audit_anchor"]["hash"] == head.hash  # type: ignore[index]


def test_the_vault_refuses_the_reserved_name(tmp_path: Path) -> None:
    with pytest.raises(FieldError, match="kept for the audit journal's key"):
        Vault(tmp_path / "v.json", lambda: "pw", backend="file").set("audit-key.x", "s", 0)


def test_a_running_gateway_posts_the_anchor(db_path: Path) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    from engine.integrations.gateway import create_app
    from tests.asgi_servers import serve

    posted: list[dict[str, object]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            posted.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    async def prepare() -> str:
        async with await Engine.open(db_path) as engine:
            await engine.add_webhook(f"http://127.0.0.1:{server.server_address[1]}/hook")
            await _changes(engine, 3)
            head = await engine.audit_anchor()
            assert head is not None
            return head.hash

    with ThreadingHTTPServer(("127.0.0.1", 0), Hook) as server:
        Thread(target=server.serve_forever, daemon=True).start()
        head = asyncio.run(prepare())
        with serve(create_app(db_path)):
            for _ in range(100):
                if posted:
                    break
                time.sleep(0.05)
        server.shutdown()
    assert [p["audit_anchor"]["entry"] for p in posted] == [4]  # type: ignore[index]  # the webhook's entry, 3 changes
    assert posted[0]["audit_anchor"]["hash"] == head  # type: ignore[index]


async def test_every_amount_in_the_journal_is_shown_in_its_policys_unit(engine: Engine) -> None:
    """The journal keeps nano-dollars (and its chain verifies); what people read is dollars, or
    tokens for a token budget: a policy's limits, an override's amount, grant and use, a duration."""
    policy = await engine.add_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="20", soft="15",
                                                  action="approval_required", policy_id="ml"))
    await engine.update_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="30", soft="15",
                                            action="approval_required", policy_id=policy.id))
    await engine.add_policy(build_policy(scope="team:search", metric="tokens", window="day", hard="12000000",
                                         policy_id="search", action="approval_required"))
    engine.actor = "bob"
    request, _ = await engine.request_override("ml", 5_000_000_000, 3_600_000, "evals")
    await engine.request_override("search", 2_000_000, 3_600_000, "reindex")
    engine.actor = "ops"
    await engine.approve(request.id, amount=3_000_000_000)
    granted, asked_tokens, asked, tokens_policy, edit, added = (await engine.audit_entries())[:6]
    assert added.summary() == "created: hard $20.00, soft $15.00"
    assert edit.summary() == "hard $20.00→$30.00"  # the journal holds 20000000000→30000000000
    assert (edit.before or {})["hard"] == 20_000_000_000 and (edit.after or {})["hard"] == 30_000_000_000
    assert tokens_policy.summary() == "created: hard 12,000,000 tokens"
    assert asked.summary() == "created: amount $5.00" and asked_tokens.summary() == "created: amount 2,000,000 tokens"
    assert granted.summary(200).startswith("status pending→approved, granted -→$3.00, ")
    assert "grant_expires_ms -→11-18 13:00:00" in granted.summary(200)
    assert asked.shown("duration_ms", 3_600_000) == "1 h" and asked.shown("grant_used", 0) == "$0.00"
    assert (await engine.verify_audit()).ok
