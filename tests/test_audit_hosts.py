"""The audit journal's chain on a ledger several machines share (PostgreSQL): one key, carried.

Each machine keeps the chain's key in its own vault. A second machine that has not been given
the key must neither start a chain of its own after the first's entries (the journal would no
longer verify anywhere) nor call the chain broken: it refuses, saying how to carry the key, and
once it is carried both machines extend and verify the one chain.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.budgets import build_policy
from engine.engine import Engine
from engine.errors import BadInput
from tests.conftest import NOW_MS


async def _open_as(machine: Path, dsn: str, monkeypatch: pytest.MonkeyPatch) -> Engine:
    monkeypatch.setenv("BUDGETEER_HOME", str(machine))
    monkeypatch.setenv("BUDGETEER_VAULT_PASSPHRASE", f"pass-{machine.name}")
    return await Engine.open(dsn)


async def test_a_second_machine_carries_the_key_rather_than_forking_the_chain(
        postgres_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = await _open_as(tmp_path / "a", postgres_dsn, monkeypatch)
    await first.add_policy(build_policy(scope="team:a", metric="usd", window="day", hard="5", now_ms=NOW_MS))
    second = await _open_as(tmp_path / "b", postgres_dsn, monkeypatch)
    try:
        with pytest.raises(BadInput, match="another machine keyed: carry it here"):
            await second.add_policy(build_policy(scope="team:b", metric="usd", window="day", hard="5", now_ms=NOW_MS))
        unverified = await second.verify_audit()
        assert not unverified.ok and "audit key import" in unverified.problem
        assert len(await second.policies()) == 1  # nothing was changed

        monkeypatch.setenv("BUDGETEER_VAULT_PASSPHRASE", "pass-a")
        exported = await first.export_audit_key()
        monkeypatch.setenv("BUDGETEER_VAULT_PASSPHRASE", "pass-b")
        with pytest.raises(BadInput, match="key: is not an audit journal key"):
            await second.import_audit_key("not a key")
        assert await second.import_audit_key(exported) == 1
        await second.add_policy(build_policy(scope="team:b", metric="usd", window="day", hard="5", now_ms=NOW_MS))
        assert (await second.verify_audit()).ok
        monkeypatch.setenv("BUDGETEER_VAULT_PASSPHRASE", "pass-a")
        await first.add_policy(build_policy(scope="team:c", metric="usd", window="day", hard="5", now_ms=NOW_MS))
        result = await first.verify_audit()
        assert result.ok and result.entries == 3
    finally:
        await second.close()
        await first.close()
