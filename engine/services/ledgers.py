"""A ledger copied into another, empty one, across backends (``budgeteer ledger copy``).

A service of ``Engine`` (``engine.services.core``): the engine's method of the same name
delegates here. The copying itself is the ledger package's (``engine.ledger.copy``); this adds
the permission (``manage_members``: a copy carries every record, members and tokens included),
the journal's chain key shared with the target's vault, and the copy's own journal entry,
appended on the target after the copied chain, in the copy's transaction."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from engine import audit
from engine.ledger import CopyReport, LedgerView, copy_ledger, is_dsn, local_path, redacted
from engine.models import FieldError
from engine.services.core import Core, Journal, Service
from engine.services.credentials import CredentialService
from engine.vault import Vault, vault_path


class LedgerService(Service):
    def __init__(self, core: Core, credentials: CredentialService) -> None:
        super().__init__(core)
        self.credentials = credentials

    async def copy_ledger(self, to: str | Path, home: Path, progress: Any = None) -> CopyReport:
        """Copy this ledger into the empty ledger at ``to`` (a file or a PostgreSQL address):
        every record with its id, the ledger's id, the journal (its key put into the target's
        vault when that is another vault), then one ``ledger.copy`` entry on the target."""
        text = str(to).strip()
        if not text:
            raise FieldError("TO", "is empty; give a ledger file or a postgresql:// address")
        target: str | Path = text if is_dsn(text) else Path(text).expanduser().absolute()
        if _same(self.store.location, target):
            raise FieldError("TO", f"{redacted(target)} is the ledger being copied (FROM); name another")
        await self._permitted("manage_members")
        source = self.store.location if is_dsn(self.store.location) else str(self.store.path.absolute())
        where_from, where_to = redacted(source), redacted(target)

        async def prepare() -> None:
            key = await self.store.read_with(lambda ledger: self.core._audit_key(ledger, create=True))
            if key is not None:
                ledger_id: str = await self.store.read_with(audit.ledger_id)
                await asyncio.to_thread(self._share_key, ledger_id, key, vault_path(local_path(target, home=home)))

        def finish(ledger: LedgerView, report: CopyReport) -> None:
            after = {"from": where_from, "to": where_to, "events": report.events,
                     "cost_nanos": report.cost_nanos, "rows": report.rows}
            self.core.applied(ledger, "manage_members", "ledger.copy",
                              lambda: (None, Journal(f"ledger:{report.ledger_id}", None, after)))

        report, _ = await copy_ledger(source, target, home=home,
                                      prepare=prepare, finish=finish, progress=progress)
        return report

    def _share_key(self, ledger_id: str, key: audit.ChainKey, path: Path) -> None:
        """The journal's chain key into the target's vault, when that is not this one (the same
        keyring, or the same file, holds it already); never shown."""
        ref = audit.key_ref(ledger_id)
        vault = Vault(path, self.credentials.vault_passphrase)
        if vault.holds(ref):
            try:
                held = audit.ChainKey.from_secret(vault.backend.get(ref) or "")
            except ValueError:
                held = None
            if held != key:
                raise FieldError("TO", f"the vault {vault.status().location} already holds another audit journal "
                                       f"key for the ledger id {ledger_id}; nothing was written")
            return
        vault.backend.set(ref, key.to_secret(), self.now_ms())


def _same(source: str, target: str | Path) -> bool:
    if is_dsn(source) or is_dsn(target):
        return str(source) == str(target)
    try:
        return Path(source).resolve() == Path(target).resolve()
    except OSError:
        return False
