"""The credential vault: provider keys kept out of configuration and out of the ledger.

Configuration and the database name a credential by reference (``vault:openai-prod``); the
secret itself lives in one of two places:

- the operating system's keyring (macOS Keychain, Secret Service, Windows Credential
  Locker) when ``keyring`` finds a working backend;
- otherwise, as on a server reached over SSH, an encrypted file: every secret sealed with
  AES-256-GCM (its reference as associated data, so a sealed value cannot be moved to
  another name), under a key derived by scrypt from a passphrase taken from
  ``BUDGETEER_VAULT_PASSPHRASE`` or asked for at the terminal. The file is written
  atomically with mode 0600; a wrong passphrase is refused by name.

Never keyrings.alt's plaintext file. ``BUDGETEER_VAULT_BACKEND=keyring|file`` forces a
choice; ``Vault.status()`` says which is in use and why. Secrets are decrypted in memory
only when asked for by ``get``, never logged, and never part of an error message.

The vault also keeps each ledger's audit chain key (``audit-key.<ledger id>``, see
``engine.audit``): it is not listed with the credentials and cannot be set or removed by
hand (``Vault.set``/``remove`` refuse its name).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, Protocol

from engine.audit import KEY_REF_PREFIX
from engine.errors import BudgeteerError
from engine.models import FieldError

SERVICE: Final = "budgeteer"
INDEX_KEY: Final = "__budgeteer_vault_index__"
REF = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_CHECK: Final = b"budgeteer-vault-v1"
SCRYPT_N: Final = 2**15  # 32 MiB and about 0.1 s a derivation: once a process
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1

BackendName = Literal["keyring", "file"]


class VaultError(BudgeteerError):
    """The vault cannot do what was asked (wrong passphrase, no such reference, unreadable
    file...); the message says why and never contains a secret."""


def parse_ref(text: str) -> str:
    """``openai-prod`` or ``vault:openai-prod`` to ``openai-prod``."""
    ref = text.strip().removeprefix("vault:")
    if not REF.match(ref):
        # The text is not echoed: a secret pasted into the wrong box must not be shown back.
        raise FieldError("ref", "must be 1-64 lower-case letters, digits, '.', '_' or '-', like openai-prod")
    return ref


def fingerprint(secret: str) -> str:
    """A short, one-way name for a secret: tells two keys apart without showing either."""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class Entry:
    ref: str
    fingerprint: str
    updated_ms: int

    def as_dict(self) -> dict[str, Any]:
        return {"ref": self.ref, "fingerprint": self.fingerprint, "updated_ms": self.updated_ms}


@dataclass(frozen=True, slots=True)
class Status:
    backend: BackendName
    why: str
    location: str


class Backend(Protocol):
    def get(self, ref: str) -> str | None: ...
    def set(self, ref: str, secret: str, updated_ms: int) -> Entry: ...
    def remove(self, ref: str) -> Entry | None: ...
    def entries(self) -> list[Entry]: ...


class KeyringBackend:
    """Secrets in the OS keyring under the service ``budgeteer``; the keyring cannot list
    what it holds, so an index of references and fingerprints (no secret) sits beside them."""

    def __init__(self, keyring_module: Any) -> None:
        self.kr = keyring_module

    def _index(self) -> dict[str, dict[str, Any]]:
        raw = self.kr.get_password(SERVICE, INDEX_KEY)
        try:
            return dict(json.loads(raw)) if raw else {}
        except ValueError as exc:
            raise VaultError("the keyring's vault index is damaged; remove and set the credentials again") from exc

    def get(self, ref: str) -> str | None:
        value = self.kr.get_password(SERVICE, ref)
        return None if value is None else str(value)

    def set(self, ref: str, secret: str, updated_ms: int) -> Entry:
        self.kr.set_password(SERVICE, ref, secret)
        index = self._index()
        index[ref] = {"fingerprint": fingerprint(secret), "updated_ms": updated_ms}
        self.kr.set_password(SERVICE, INDEX_KEY, json.dumps(index))
        return Entry(ref, index[ref]["fingerprint"], updated_ms)

    def remove(self, ref: str) -> Entry | None:
        index = self._index()
        known = index.pop(ref, None)
        try:
            self.kr.delete_password(SERVICE, ref)
        except Exception:  # keyring.errors.PasswordDeleteError: nothing stored under it
            if known is None:
                return None
        self.kr.set_password(SERVICE, INDEX_KEY, json.dumps(index))
        return Entry(ref, known["fingerprint"], known["updated_ms"]) if known else Entry(ref, "?", 0)

    def entries(self) -> list[Entry]:
        return [Entry(ref, v["fingerprint"], v["updated_ms"]) for ref, v in sorted(self._index().items())]


class FileBackend:
    """An encrypted file: JSON with the scrypt parameters and salt, a sealed check value
    (how a wrong passphrase is told from a damaged file) and one sealed value a reference."""

    def __init__(self, path: Path, passphrase: Callable[[], str]) -> None:
        self.path = path
        self._passphrase = passphrase
        self._key: bytes | None = None

    # -- the file

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise VaultError(f"the vault file {self.path} cannot be read: {exc.__class__.__name__}") from exc
        if not isinstance(data, dict) or data.get("version") != 1:
            raise VaultError(f"the vault file {self.path} is not a Budgeteer vault (version 1)")
        return data

    def _write(self, data: dict[str, Any]) -> None:
        """Atomically: a new file (mode 0600 from its creation) synced, then renamed over the old."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".vault-", dir=self.path.parent)  # mkstemp creates it 0600
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    # -- the key

    def _derive(self, salt: bytes, n: int, r: int, p: int) -> bytes:
        from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

        passphrase = self._passphrase()
        if not passphrase:
            raise VaultError("the vault passphrase is empty; set BUDGETEER_VAULT_PASSPHRASE or type it when asked")
        return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode())

    def _unlock(self, data: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
        """The key for this file, checked against its sealed check value; a new file gets a new salt."""
        if not data:
            salt = secrets.token_bytes(16)
            data = {"version": 1, "kdf": {"name": "scrypt", "salt": _b64(salt), "n": SCRYPT_N, "r": SCRYPT_R,
                                          "p": SCRYPT_P}, "entries": {}}
            key = self._key or self._derive(salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
            data["check"] = _seal(key, _CHECK, b"check")
            self._key = key
            return key, data
        if self._key is None:
            kdf = data["kdf"]
            key = self._derive(_unb64(kdf["salt"]), int(kdf["n"]), int(kdf["r"]), int(kdf["p"]))
            try:
                matches = _open(key, data["check"], b"check") == _CHECK
            except VaultError:
                matches = False
            if not matches:
                raise VaultError(f"wrong passphrase for the vault file {self.path}")
            self._key = key
        return self._key, data

    # -- the backend

    def get(self, ref: str) -> str | None:
        data = self._read()
        sealed = data.get("entries", {}).get(ref)
        if sealed is None:
            return None
        key, _ = self._unlock(data)
        return _open(key, sealed, ref.encode()).decode()

    def set(self, ref: str, secret: str, updated_ms: int) -> Entry:
        key, data = self._unlock(self._read())
        entry = Entry(ref, fingerprint(secret), updated_ms)
        data["entries"][ref] = {**_seal(key, secret.encode(), ref.encode()), "fingerprint": entry.fingerprint,
                                "updated_ms": updated_ms}
        self._write(data)
        return entry

    def remove(self, ref: str) -> Entry | None:
        data = self._read()
        sealed = data.get("entries", {}).get(ref)
        if sealed is None:
            return None
        self._unlock(data)  # only the passphrase holder removes
        del data["entries"][ref]
        self._write(data)
        return Entry(ref, sealed["fingerprint"], sealed["updated_ms"])

    def entries(self) -> list[Entry]:
        return [Entry(ref, v["fingerprint"], v["updated_ms"])
                for ref, v in sorted(self._read().get("entries", {}).items())]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _seal(key: bytes, plaintext: bytes, aad: bytes) -> dict[str, str]:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = secrets.token_bytes(12)
    return {"nonce": _b64(nonce), "ct": _b64(AESGCM(key).encrypt(nonce, plaintext, aad))}


def _open(key: bytes, sealed: dict[str, Any], aad: bytes) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        return AESGCM(key).decrypt(_unb64(sealed["nonce"]), _unb64(sealed["ct"]), aad)
    except (InvalidTag, KeyError, ValueError) as exc:
        what = "the check value" if aad == b"check" else f"the entry {aad.decode()!r}"
        raise VaultError(f"{what} does not decrypt: a wrong passphrase or a damaged vault file") from exc


def keyring_verdict() -> tuple[Any | None, str]:
    """The keyring module when it has a backend that really stores secrets, and why or why not."""
    try:
        import keyring
        from keyring.backends import chainer, fail
    except Exception as exc:  # keyring itself cannot load here
        return None, f"the keyring library cannot load ({exc.__class__.__name__})"
    backend = keyring.get_keyring()
    name = f"{type(backend).__module__}.{type(backend).__name__}"
    if isinstance(backend, fail.Keyring):
        return None, "no keyring backend works here (no Secret Service, Keychain or Credential Locker)"
    if isinstance(backend, chainer.ChainerBackend) and not backend.backends:
        return None, "the keyring chain holds no working backend"
    if name.startswith("keyrings.alt"):
        return None, f"{name} keeps secrets in a plain or weakly protected file; Budgeteer refuses it"
    if getattr(backend, "priority", 1) <= 0:
        return None, f"{name} has no priority (it does not store secrets)"
    return keyring, f"the operating system's keyring works ({name})"


def vault_path(ledger: Path) -> Path:
    """Where the file vault of the ledger at ``ledger`` is: ``BUDGETEER_VAULT_FILE``, else
    ``vault.json`` beside the ledger."""
    return Path(os.environ.get("BUDGETEER_VAULT_FILE") or ledger.with_name("vault.json")).expanduser()


class Vault:
    """The vault in use: the keyring when one works, else the encrypted file (or what
    ``BUDGETEER_VAULT_BACKEND`` forces)."""

    def __init__(self, path: Path, passphrase: Callable[[], str] | None = None,
                 backend: str | None = None) -> None:
        self.path = path
        forced = (backend or os.environ.get("BUDGETEER_VAULT_BACKEND") or "").strip().lower()
        if forced not in ("", "keyring", "file"):
            raise FieldError("BUDGETEER_VAULT_BACKEND", f"must be keyring or file, not {forced!r}")
        module, why = keyring_verdict()
        ask = passphrase or _env_passphrase
        self.backend: Backend
        if forced == "file" or (not forced and module is None):
            reason = "forced by BUDGETEER_VAULT_BACKEND=file" if forced else why + "; using the encrypted file"
            self.backend = FileBackend(path, ask)
            self._status = Status("file", reason, str(path))
        elif module is None:
            raise VaultError(f"BUDGETEER_VAULT_BACKEND=keyring, but {why}")
        else:
            self.backend = KeyringBackend(module)
            reason = "forced by BUDGETEER_VAULT_BACKEND=keyring; " + why if forced else why
            self._status = Status("keyring", reason, f"service {SERVICE!r} in {why.split('(')[-1].rstrip(')')}")

    def status(self) -> Status:
        return self._status

    def get(self, ref: str) -> str:
        """The secret behind a reference, decrypted now; VaultError when there is none."""
        ref = parse_ref(ref)
        secret = self.backend.get(ref)
        if secret is None:
            raise VaultError(f"the vault holds no credential vault:{ref} ({self._status.backend} backend)")
        return secret

    def set(self, ref: str, secret: str, updated_ms: int) -> Entry:
        ref = _not_reserved(parse_ref(ref))
        secret = secret.strip()
        if not secret:
            raise FieldError("secret", "is empty")
        if len(secret) > 8192:
            raise FieldError("secret", "is longer than 8192 characters")
        return self.backend.set(ref, secret, updated_ms)

    def remove(self, ref: str) -> Entry:
        ref = _not_reserved(parse_ref(ref))
        entry = self.backend.remove(ref)
        if entry is None:
            raise VaultError(f"the vault holds no credential vault:{ref}")
        return entry

    def entries(self) -> list[Entry]:
        """The credentials (not the audit chain keys)."""
        return [e for e in self.backend.entries() if not e.ref.startswith(KEY_REF_PREFIX)]

    def holds(self, ref: str) -> bool:
        """Whether an entry of that name exists (known without the passphrase)."""
        return any(e.ref == ref for e in self.backend.entries())

    @property
    def open_without_asking(self) -> bool:
        """The keyring, or a file vault whose key is known or whose passphrase the environment gives."""
        return not isinstance(self.backend, FileBackend) or self.backend._key is not None or \
            bool(os.environ.get("BUDGETEER_VAULT_PASSPHRASE"))

    def unlock(self) -> None:
        """Check the passphrase now (the file backend; the keyring needs none): VaultError if wrong."""
        if isinstance(self.backend, FileBackend):
            data = self.backend._read()
            if data:
                self.backend._unlock(data)

    @property
    def needs_passphrase(self) -> bool:
        """A file vault whose key is not known yet and no BUDGETEER_VAULT_PASSPHRASE to derive it."""
        return isinstance(self.backend, FileBackend) and self.backend._key is None and \
            not os.environ.get("BUDGETEER_VAULT_PASSPHRASE") and self.backend._passphrase is _env_passphrase


def _not_reserved(ref: str) -> str:
    if ref.startswith(KEY_REF_PREFIX):
        raise FieldError("ref", f"names starting with {KEY_REF_PREFIX} are kept for the audit journal's key")
    return ref


def _env_passphrase() -> str:
    value = os.environ.get("BUDGETEER_VAULT_PASSPHRASE")
    if not value:
        raise VaultError("the vault file needs a passphrase: set BUDGETEER_VAULT_PASSPHRASE or run this at a "
                         "terminal to be asked for it")
    return value
