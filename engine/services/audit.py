"""The audit journal: its entries, the verification of its chain, and its anchor (the head,
posted once a day to the webhooks).

A service of ``Engine`` (``engine.services.core``): the engine's methods of the same names
delegate here."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import httpx

from engine import audit
from engine.alerts import post_json, redact_url
from engine.clock import HOUR_MS
from engine.models import FieldError
from engine.services.core import Core, Service

log = logging.getLogger("budgeteer")


class AuditService(Service):
    def __init__(self, core: Core) -> None:
        super().__init__(core)
        self._anchor_day = -1  # the last day this process looked whether the anchor was posted

    async def audit_entries(self, limit: int = 200, text: str = "") -> list[audit.AuditEntry]:
        return await self._tx(lambda tx: audit.entries(tx, limit=limit, text=text))

    async def verify_audit(self, anchor: audit.Anchor | None = None) -> audit.Verification:
        """Walk the chain (keyed entries under the vault's key: VaultError if it cannot be read),
        and with an ``anchor`` check that its entry is still there, unchanged."""
        key = await self.store.read_with(lambda ledger: self.core._audit_key(ledger, create=False))
        verified: audit.Verification = await self.store.read_with(lambda ledger: audit.verify(ledger, key, anchor))
        if not verified.ok and key is None and await self.store.read_with(audit.keyed_elsewhere):
            verified = replace(verified, problem=f"{verified.problem}; or the chain is keyed by a key this "
                               "machine's vault does not hold (another machine's: carry it here with 'budgeteer "
                               "audit key export' there and 'budgeteer audit key import' here)")
        return verified

    async def export_audit_key(self) -> str:
        """The journal's chain key, as text to carry to another machine's vault (a secret: the
        caller writes it where the operator asked, never to a log). Needs manage_members."""
        await self.core.permitted("manage_members")
        key = await self.store.read_with(lambda ledger: self.core._audit_key(ledger, create=False))
        if key is None:
            raise FieldError("audit", "this machine's vault holds no key for this ledger's journal")
        return key.to_secret()

    async def import_audit_key(self, text: str) -> int:
        """Keep ``text`` (``export_audit_key``'s) as this ledger's chain key in this machine's
        vault, once it verifies the journal; how many entries it verified."""
        await self.core.permitted("manage_members")
        try:
            key = audit.ChainKey.from_secret(text.strip())
        except ValueError:
            raise FieldError("key", "is not an audit journal key exported by 'budgeteer audit key export'") from None
        checked: audit.Verification = await self.store.read_with(lambda ledger: audit.verify(ledger, key))
        if not checked.ok:
            raise FieldError("key", f"does not verify this ledger's journal ({checked.problem}); nothing was kept")
        ledger_id: str = await self.store.read_with(audit.ledger_id)
        await asyncio.to_thread(self.core.vault().backend.set, audit.key_ref(ledger_id), key.to_secret(),
                                self.now_ms())
        self.core._chain_key = None
        return checked.entries

    async def audit_anchor(self) -> audit.Anchor | None:
        """The journal's head (None while it is empty), for the operator to keep elsewhere."""
        head: audit.Anchor | None = await self.store.read_with(audit.head)
        return head

    async def post_audit_anchor(self) -> bool:
        """Post the anchor to the alert webhooks, once a UTC day across every process on this
        ledger (the first to claim the day posts); True if this call posted it."""
        now = self.now_ms()
        day = now // (24 * HOUR_MS)
        if day == self._anchor_day:
            return False
        anchor = await self.audit_anchor()
        if anchor is None:
            return False
        hooks: list[tuple[str, str, str]] = await self.store.transact(lambda tx: tx.webhooks(), sync=False)
        if not hooks or not await self._tx(lambda tx: audit.claim_anchor_post(tx, day, now, anchor),
                                           sync=False):
            self._anchor_day = day
            return False
        self._anchor_day = day
        body = {"source": "budgeteer", "audit_anchor": {**anchor.as_dict(), "ts_ms": now}}
        async with httpx.AsyncClient(timeout=10.0) as client:
            for _, url, kind in hooks:
                text = f"Budgeteer audit anchor: entry {anchor.entry}, hash {anchor.hash} (ledger {anchor.ledger})"
                attempts = await post_json(client, url, {"text": text} if kind == "slack" else body,
                                           self.core.webhook_retry_delays)
                if not attempts[-1][1]:
                    log.warning("the audit anchor was not delivered to %s: %s", redact_url(url), attempts[-1][2])
        return True
