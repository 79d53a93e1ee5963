"""The credential vault beside the ledger: provider keys by reference (the secret never reaches
the journal).

A service of ``Engine`` (``engine.services.core``): the engine's methods of the same names
delegate here."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from engine import vault as vault_mod
from engine.services.core import Core, Journal, Service
from engine.vault import Vault


class CredentialService(Service):
    def __init__(self, core: Core) -> None:
        super().__init__(core)
        self._vault: Vault | None = None
        # Asked when the file vault needs its passphrase and BUDGETEER_VAULT_PASSPHRASE is unset.
        self.vault_passphrase: Callable[[], str] | None = None

    def vault(self) -> Vault:
        """The credential vault beside this ledger (``BUDGETEER_VAULT_FILE`` moves its file)."""
        if self._vault is None:
            self._vault = Vault(vault_mod.vault_path(self.store.path), self.vault_passphrase)
        return self._vault

    async def vault_unlock(self, passphrase: str) -> None:
        """Use this passphrase for the file vault from now on, checked first (VaultError if wrong)."""
        vault = Vault(self.vault().path, lambda: passphrase)
        await asyncio.to_thread(vault.unlock)
        self.vault_passphrase = lambda: passphrase
        self._vault = vault

    async def vault_status(self) -> vault_mod.Status:
        return self.vault().status()

    async def vault_entries(self) -> list[vault_mod.Entry]:
        return await asyncio.to_thread(self.vault().entries)

    async def _vault_change(self, action: str, ref: str, change: Callable[[], vault_mod.Entry],
                            created: bool) -> vault_mod.Entry:
        """The vault (a file or the keyring) cannot share the ledger's transaction, and its change
        may ask for the passphrase: it is made on a thread after the actor is checked, and then
        journaled (its reference and fingerprint, never the secret) through ``_change``."""
        await self._permitted("manage_vault")
        before = {e.ref: e for e in await self.vault_entries()}.get(vault_mod.parse_ref(ref))
        entry = await asyncio.to_thread(change)
        return await self._change("manage_vault", action, lambda tx: (entry, Journal(
            f"vault:{entry.ref}", before.as_dict() if before else None, entry.as_dict() if created else None)))

    async def vault_set(self, ref: str, secret: str) -> vault_mod.Entry:
        """Store a credential (only its reference and fingerprint reach the journal)."""
        now = self.now_ms()
        return await self._vault_change("vault.set", ref, lambda: self.vault().set(ref, secret, now), True)

    async def vault_remove(self, ref: str) -> vault_mod.Entry:
        return await self._vault_change("vault.remove", ref, lambda: self.vault().remove(ref), False)

    async def credential(self, ref: str) -> str:
        """The secret behind ``vault:REF``, decrypted now, for the one call that needs it."""
        return await asyncio.to_thread(self.vault().get, ref)
