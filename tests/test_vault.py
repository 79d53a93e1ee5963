"""The credential vault: the encrypted file backend, the keyring backend chosen when one
works (a test keyring, never the OS), and no secret anywhere it must not be."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import keyring
import keyring.backend
import pytest
from keyring.backends import fail

from engine.clock import FrozenClock
from engine.engine import Engine
from engine.models import FieldError
from engine.vault import Vault, VaultError, fingerprint, keyring_verdict, vault_path

SECRET = "sk-proj-TESTSECRET-9f8e7d6c5b4a3f2e1d0c"


class MemoryKeyring(keyring.backend.KeyringBackend):
    """A keyring that works, in memory: what a desktop's Secret Service would be."""

    priority = 5  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.store: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.store.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.store[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        if (service, username) not in self.store:
            raise keyring.errors.PasswordDeleteError(username)
        del self.store[(service, username)]


@pytest.fixture
def memory_keyring(monkeypatch: pytest.MonkeyPatch) -> Iterator[MemoryKeyring]:
    before = keyring.get_keyring()
    ring = MemoryKeyring()
    keyring.set_keyring(ring)
    monkeypatch.delenv("BUDGETEER_VAULT_BACKEND", raising=False)
    try:
        yield ring
    finally:
        keyring.set_keyring(before)


def test_file_backend_round_trip_across_processes_worth_of_instances(tmp_path: Path) -> None:
    path = tmp_path / "vault.json"
    vault = Vault(path, lambda: "correct horse", backend="file")
    entry = vault.set("openai-prod", SECRET, 1000)
    vault.set("vault:anthropic", "sk-ant-other", 2000)
    assert entry.fingerprint == fingerprint(SECRET) and SECRET not in entry.fingerprint
    again = Vault(path, lambda: "correct horse", backend="file")  # a fresh key derivation
    assert again.get("vault:openai-prod") == SECRET and again.get("anthropic") == "sk-ant-other"
    assert [e.ref for e in again.entries()] == ["anthropic", "openai-prod"]
    assert again.remove("openai-prod").ref == "openai-prod"
    with pytest.raises(VaultError, match="holds no credential vault:openai-prod"):
        again.get("openai-prod")
    raw = path.read_bytes()
    assert SECRET.encode() not in raw and b"sk-ant-other" not in raw


def test_a_wrong_passphrase_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "vault.json"
    Vault(path, lambda: "right", backend="file").set("openai", SECRET, 1)
    wrong = Vault(path, lambda: "wrong", backend="file")
    with pytest.raises(VaultError) as refused:
        wrong.get("openai")
    assert str(refused.value) == f"wrong passphrase for the vault file {path}"
    with pytest.raises(VaultError, match="wrong passphrase"):
        wrong.set("other", "x", 2)  # nothing written under another key
    assert [e.ref for e in Vault(path, lambda: "right", backend="file").entries()] == ["openai"]


def test_the_file_is_0600_and_written_atomically(tmp_path: Path) -> None:
    path = tmp_path / "vault.json"
    vault = Vault(path, lambda: "pw", backend="file")
    for n in range(3):
        vault.set(f"ref{n}", f"secret-{n}", n)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vault.json"]  # no temporary file left behind


def test_a_sealed_value_cannot_be_moved_to_another_name(tmp_path: Path) -> None:
    import json

    path = tmp_path / "vault.json"
    vault = Vault(path, lambda: "pw", backend="file")
    vault.set("cheap", "sk-cheap", 1)
    vault.set("prod", SECRET, 2)
    data = json.loads(path.read_text())
    data["entries"]["cheap"] = data["entries"]["prod"]  # swap a sealed value under another name
    path.write_text(json.dumps(data))
    with pytest.raises(VaultError, match="'cheap' does not decrypt"):
        Vault(path, lambda: "pw", backend="file").get("cheap")


def test_no_passphrase_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(VaultError, match="BUDGETEER_VAULT_PASSPHRASE"):
        Vault(tmp_path / "v.json", backend="file").set("openai", SECRET, 1)
    with pytest.raises(FieldError, match="ref: must be"):
        Vault(tmp_path / "v.json", lambda: "pw", backend="file").set("Bad Name!", SECRET, 1)
    monkeypatch.setenv("BUDGETEER_VAULT_BACKEND", "plaintext")
    with pytest.raises(FieldError, match="BUDGETEER_VAULT_BACKEND: must be keyring or file"):
        Vault(tmp_path / "v.json")


def test_the_keyring_is_chosen_when_one_works(tmp_path: Path, memory_keyring: MemoryKeyring) -> None:
    vault = Vault(tmp_path / "vault.json")
    status = vault.status()
    assert status.backend == "keyring" and "MemoryKeyring" in status.why
    vault.set("openai-prod", SECRET, 7)
    assert memory_keyring.store[("budgeteer", "openai-prod")] == SECRET
    assert vault.get("openai-prod") == SECRET
    assert [(e.ref, e.fingerprint) for e in vault.entries()] == [("openai-prod", fingerprint(SECRET))]
    index = memory_keyring.store[("budgeteer", "__budgeteer_vault_index__")]
    assert SECRET not in index
    vault.remove("openai-prod")
    assert vault.entries() == [] and ("budgeteer", "openai-prod") not in memory_keyring.store
    assert not (tmp_path / "vault.json").exists()


def test_no_keyring_means_the_file_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = keyring.get_keyring()
    keyring.set_keyring(fail.Keyring())
    monkeypatch.delenv("BUDGETEER_VAULT_BACKEND", raising=False)
    try:
        status = Vault(tmp_path / "vault.json", lambda: "pw").status()
        assert status.backend == "file" and "no keyring backend works here" in status.why
        monkeypatch.setenv("BUDGETEER_VAULT_BACKEND", "keyring")
        with pytest.raises(VaultError, match="BUDGETEER_VAULT_BACKEND=keyring, but no keyring backend"):
            Vault(tmp_path / "vault.json")
    finally:
        keyring.set_keyring(before)


async def test_the_vault_file_is_beside_the_ledger_unless_budgeteer_vault_file_moves_it(
        db_path: Path, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch) -> None:
    # One rule for the engine and the gateway's passphrase prompt (which had its own copy).
    assert vault_path(db_path) == db_path.with_name("vault.json")
    monkeypatch.setenv("HOME", str(db_path.parent / "home"))
    monkeypatch.setenv("BUDGETEER_VAULT_FILE", "~/secrets/vault.json")
    assert vault_path(db_path) == db_path.parent / "home" / "secrets" / "vault.json"
    async with await Engine.open(db_path, clock=clock) as engine:
        assert engine.vault().path == vault_path(db_path)


def test_keyrings_alt_plaintext_is_never_used(memory_keyring: MemoryKeyring) -> None:
    class PlaintextKeyring(MemoryKeyring):
        pass

    PlaintextKeyring.__module__ = "keyrings.alt.file"
    keyring.set_keyring(PlaintextKeyring())
    module, why = keyring_verdict()
    assert module is None and "refuses it" in why


def test_forcing_the_file_over_a_working_keyring(tmp_path: Path, memory_keyring: MemoryKeyring,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUDGETEER_VAULT_BACKEND", "file")
    status = Vault(tmp_path / "vault.json", lambda: "pw").status()
    assert status.backend == "file" and "forced" in status.why


async def test_changes_are_journaled_without_the_secret_and_need_manage_vault(db_path: Path, clock: FrozenClock,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUDGETEER_VAULT_PASSPHRASE", "pw")
    async with await Engine.open(db_path, clock=clock, actor="olivia") as engine:
        await engine.set_member("olivia", "owner")
        await engine.set_member("oscar", "operator")
        await engine.vault_set("openai-prod", SECRET)
        assert await engine.credential("vault:openai-prod") == SECRET
        await engine.vault_remove("openai-prod")
        entries = await engine.audit_entries()
        assert [e.action for e in entries[:2]] == ["vault.remove", "vault.set"]
        assert entries[1].after == {"ref": "openai-prod", "fingerprint": fingerprint(SECRET), "updated_ms": clock.ms}
        assert SECRET not in repr([e.as_dict() for e in entries])
        engine.actor = "oscar"
        from engine.access import AccessDenied

        with pytest.raises(AccessDenied, match="oscar \\(operator\\) lacks the manage_vault permission"):
            await engine.vault_set("x", "y")


def test_no_secret_in_any_output_file_or_row(tmp_path: Path) -> None:
    """The CLI end to end: set from stdin, list, status, a provider using it, a connection test
    that fails (nothing listens), rm; then search every output and file for the secret."""
    db = tmp_path / "ledger.db"
    env = {**os.environ, "BUDGETEER_VAULT_PASSPHRASE": "pw", "BUDGETEER_VAULT_BACKEND": "file"}
    outputs = []

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "tui.cli", "--db", str(db), *args], input=stdin, text=True,
                              capture_output=True, env=env, timeout=60)
        outputs.append(done.stdout + done.stderr)
        return done

    assert run("vault", "set", "openai-prod", stdin=SECRET + "\n").returncode == 0
    assert run("vault", "list").returncode == 0 and "openai-prod" in outputs[-1]
    assert run("vault", "status").returncode == 0
    assert run("provider", "add", "local", "--kind", "openai", "--base-url", "http://127.0.0.1:9/v1",
               "--credential", "vault:openai-prod").returncode == 0
    assert run("models", "test-connection", "--timeout", "2").returncode == 1
    assert "unreachable" in outputs[-1]
    assert run("audit", "list", "--json").returncode == 0
    assert run("vault", "rm", "openai-prod").returncode == 0
    bad = run("provider", "add", "oops", "--kind", "openai", "--base-url", "http://x/v1", "--credential", SECRET)
    assert bad.returncode == 2 and "must be a vault reference" in bad.stderr
    for text in outputs:
        assert SECRET not in text and SECRET[8:24] not in text
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
