"""Secrecy: known secrets (a provider key in the vault, API token secrets) are stored and used
through every surface, then searched for, byte for byte, in the database and vault files,
every log line, the audit journal, the exports and the dashboard's screens. None is found."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from engine.engine import Engine
from engine.integrations.gateway import create_app
from engine.ledger import LedgerTx
from tests.asgi_servers import FakeOpenAI, serve
from tui.app import BudgeteerApp

PROVIDER_KEY = "sk-proj-SECRECYTEST-7c1d9e2f4a6b8c0d1e3f5a7b9c"


def _search(haystacks: dict[str, bytes], secrets: list[str]) -> list[str]:
    found = []
    for name, data in haystacks.items():
        for secret in secrets:
            for needle in (secret, secret[4:20]):  # the whole secret, or a telling piece of it
                if needle.encode() in data:
                    found.append(f"{needle[:6]}… in {name}")
    return found


def test_no_secret_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, at every level
    monkeypatch.setenv("BUDGETEER_VAULT_PASSPHRASE", "secrecy")
    db = tmp_path / "ledger.db"
    env = {**os.environ, "BUDGETEER_VAULT_PASSPHRASE": "secrecy", "BUDGETEER_VAULT_BACKEND": "file"}
    outputs: dict[str, bytes] = {}

    def cli(name: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "tui.cli", "--db", str(db), *args], input=stdin, text=True,
                              capture_output=True, env=env, timeout=120)
        outputs[f"cli {name}"] = (done.stdout + done.stderr).encode()
        return done

    fake = FakeOpenAI()
    with serve(fake.app()) as upstream:
        assert cli("vault set", "vault", "set", "openai", stdin=PROVIDER_KEY + "\n").returncode == 0
        assert cli("provider add", "provider", "add", "openai", "--kind", "openai", "--base-url",
                   f"{upstream}/v1", "--credential", "vault:openai", "--models", "gpt-4o-mini").returncode == 0
        created = cli("token create", "token", "create", "--name", "ci", "--principal", "alice", "--json")
        token_secret = __import__("json").loads(created.stdout)["secret"]
        del outputs["cli token create"]  # the one place the secret is meant to be shown, once
        rotated = cli("token rotate", "token", "rotate", "bgt_" + token_secret[4:12])
        new_secret = rotated.stdout.strip().splitlines()[-1].strip()
        del outputs["cli token rotate"]
        secrets = [PROVIDER_KEY, token_secret, new_secret]

        with (serve(create_app(db)) as base,
              openai.OpenAI(base_url=f"{base}/v1", api_key=new_secret, max_retries=0) as client):
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
            list(client.chat.completions.create(model="gpt-4o-mini", stream=True,
                                                messages=[{"role": "user", "content": "hi"}]))
            for wrong in (token_secret, new_secret[:-3] + "xyz"):  # revoked, and almost right
                response = httpx.post(f"{base}/v1/chat/completions", headers={"authorization": f"Bearer {wrong}"},
                                      json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
                assert response.status_code == 401
                outputs[f"gateway 401 {wrong[:8]}"] = response.content
            failed = httpx.post(f"{base}/v1/chat/completions", headers={"authorization": f"Bearer {new_secret}"},
                                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "#fail"}]})
            outputs["gateway 502"] = failed.content
        assert fake.requests[-1]["headers"]["authorization"] == f"Bearer {PROVIDER_KEY}"  # it was used

        cli("test-connection", "models", "test-connection")
        for name, args in (("export csv", ("export", "--format", "csv")), ("export jsonl", ("export", "--format",
                           "jsonl")), ("audit", ("audit", "list", "--json", "--limit", "1000")),
                           ("tokens", ("token", "list", "--json")), ("vault list", ("vault", "list", "--json")),
                           ("providers", ("provider", "list", "--json")), ("usage", ("usage", "--json"))):
            assert cli(name, *args).returncode == 0, outputs[f"cli {name}"]

    async def screens() -> None:
        app = BudgeteerApp(db_path=db, refresh_seconds=3600)
        async with app.run_test(size=(160, 48)) as pilot:
            for key in "123456789":
                await pilot.press(key)
                await app.workers.wait_for_complete()
                await pilot.pause(0.1)
                outputs[f"screen {key}"] = app.export_screenshot().encode()

    asyncio.run(screens())
    outputs["logs"] = "\n".join(r.getMessage() for r in caplog.records).encode()
    files = {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert any(name.startswith("ledger.db") for name in files) and "vault.json" in files
    assert _search({**outputs, **files}, secrets) == []


async def test_the_journal_refuses_a_record_with_a_secret_field(engine: Engine) -> None:
    from engine import audit

    def op(tx: LedgerTx) -> None:
        audit.append(tx, 1, "me", "x", "y", None, {"name": "t", "secret": "bgt_abc"})

    with pytest.raises(ValueError, match="secrets never enter the journal"):
        await engine.store.transact(op)
    assert await engine.audit_entries() == []
