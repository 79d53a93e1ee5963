"""What every domain service is given: the ledger, the prices, the clock, the budget book,
who acts, and the two paths to the ledger: ``tx`` (one group-committed operation) and
``change`` (an operator's change: the permission checked and the journal appended in the
change's own transaction, the one path that does both).

``Engine`` builds one ``Core`` and hands it to each service in ``engine.services``; a service
is a ``Service``, whose ``_tx``, ``_change`` and ``now_ms`` are the core's.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from engine import access, audit
from engine import vault as vault_mod
from engine.alerts import RETRY_DELAYS_S
from engine.budgets import BudgetBook
from engine.clock import Clock
from engine.ledger import LedgerTx, LedgerView, Store
from engine.models import FieldError
from engine.pricing import PriceBook
from engine.vault import Vault

T = TypeVar("T")
Op = Callable[[LedgerTx], Any]


@dataclass(frozen=True, slots=True)
class Journal:
    """One audit journal entry of a change: what it changed, before and after (no secret:
    ``audit.append`` refuses one). ``action`` when not the change's own."""

    subject: str
    before: Mapping[str, Any] | None
    after: Mapping[str, Any] | None
    action: str = ""


#: What a change's operation returns: its result and its journal entries (none when it
#: found nothing to change).
Changed = tuple[T, Journal | Sequence[Journal]]


def _unwired() -> Vault:
    raise RuntimeError("no vault: the engine wires one into its core")


class Core:
    """The state the services share. ``carry`` lets an operation take along what waits for
    the next transaction (routing decisions); ``deliver`` sends the alerts a transaction
    raised, after its commit; ``vault`` is the credential vault (the journal's chain key is in
    it). The engine sets the three when it wires its services."""

    def __init__(self, store: Store, prices: PriceBook, clock: Clock, budgets: BudgetBook, actor: str) -> None:
        self.store = store
        self.prices = prices
        self.clock = clock
        self.budgets = budgets
        self.actor = actor
        self.carry: Callable[[Op], Op] | None = None
        self.deliver: Callable[[list[int]], Coroutine[Any, Any, None]] | None = None
        self.vault: Callable[[], Vault] = _unwired
        self.webhook_retry_delays: tuple[float, ...] = RETRY_DELAYS_S
        self.deliveries: set[asyncio.Task[None]] = set()
        self._chain_key: tuple[str, audit.ChainKey] | None = None  # (ledger id, key) once read or made

    def now_ms(self) -> int:
        return self.clock.now_ms()

    async def tx(self, op: Callable[[LedgerTx], T], *, sync: bool = True) -> T:
        """A group-committed ledger operation; alerts it raised are delivered after the commit.
        ``sync=False`` for changes that need not survive a power cut (``SQLiteStore.transact``)."""
        run: Op = op
        if self.carry is not None:  # routing decisions ride with the next operation (mostly the routed call's hold)
            run = self.carry(op)
        result: T = await self.store.transact(run, sync=sync)
        raised = self.budgets.committed()
        if raised:
            self.spawn_delivery(raised)
        return result

    def spawn_delivery(self, alert_ids: list[int]) -> None:
        if self.deliver is None:
            return
        task = asyncio.create_task(self.deliver(alert_ids))
        self.deliveries.add(task)
        task.add_done_callback(self.deliveries.discard)

    async def change(self, permission: access.Permission, action: str, op: Callable[[LedgerTx], Changed[T]]) -> T:
        """The path of every change an operator makes (tests/test_permissions.py holds every
        public method to it): in one transaction the actor is checked against the permission
        matrix, ``op`` makes the change, and its journal entries are appended, so a change is
        never made unchecked or unjournaled, nor journaled without being made. A ledger with no
        members lets anyone change anything, and still journals it. Calls authenticated by an
        API token (authorize, settle, record) do not come this way: the gateway checks their
        scopes, and they pay for no member lookup."""
        return await self.tx(lambda tx: self.applied(tx, permission, action, partial(op, tx)))

    def applied(self, ledger: LedgerView, permission: access.Permission, action: str,
                make: Callable[[], Changed[T]]) -> T:
        """Inside a transaction (``change``'s, or the store's own for a bulk import's chunk):
        the actor checked, then ``make`` makes the change, then its journal entries are
        appended. The one place that checks a change and journals it."""
        access.require(ledger, self.actor, permission)  # before make, which may touch more than the ledger
        result, entries = make()
        now = self.now_ms()
        key = self._audit_key(ledger, create=True)
        for e in (entries,) if isinstance(entries, Journal) else entries:
            audit.append(ledger, now, self.actor, e.action or action, e.subject, e.before, e.after, key=key)
        return result

    async def permitted(self, permission: access.Permission) -> None:
        """AccessDenied now, before a long or interactive step (an import, a passphrase);
        the change itself is checked again in its own transaction."""
        await self.store.read_with(lambda ledger: access.require(ledger, self.actor, permission))

    def _audit_key(self, ledger: LedgerView, *, create: bool) -> audit.ChainKey | None:
        """The ledger's chain key from the vault, kept in memory once read or made. None while the
        vault holds none; with ``create`` one is made (its first entry the next) when the vault
        opens without asking anyone (the keyring, a known or environment passphrase), else the
        entry joins the legacy chain. A vault that holds the key but is locked refuses the change
        (no prompt here: this runs under the ledger's write lock)."""
        ledger_id = audit.ledger_id(ledger)
        if self._chain_key is not None and self._chain_key[0] == ledger_id:
            return self._chain_key[1]
        vault, ref = self.vault(), audit.key_ref(ledger_id)
        if vault.holds(ref):
            if not vault.open_without_asking:
                unlock = "unlock it (set BUDGETEER_VAULT_PASSPHRASE, or the dashboard's vault screen)"
                if not create:
                    raise vault_mod.VaultError(f"the vault holds the audit journal's key and is locked: {unlock} "
                                               "to verify the chain")
                raise FieldError("vault", f"holds the audit journal's key and is locked: {unlock} to make changes; "
                                          "nothing was changed")
            try:
                key = audit.ChainKey.from_secret(vault.get(ref))
            except ValueError as exc:
                raise vault_mod.VaultError(str(exc)) from None
        elif create and audit.keyed_elsewhere(ledger):  # another machine keyed the chain: never fork it
            raise FieldError("vault", f"holds no key for the audit journal of ledger {ledger_id}, which another "
                                      "machine keyed: carry it here ('budgeteer audit key export' there, 'budgeteer "
                                      "audit key import' here) before making changes; nothing was changed")
        elif create and vault.open_without_asking:
            key = audit.ChainKey(secrets.token_bytes(32), audit.next_id(ledger))
            vault.backend.set(ref, key.to_secret(), self.now_ms())
        else:
            return None
        self._chain_key = (ledger_id, key)
        return key


class Service:
    """A domain service: the core's paths under the names the engine's methods used."""

    def __init__(self, core: Core) -> None:
        self.core = core

    @property
    def store(self) -> Store:
        return self.core.store

    @property
    def prices(self) -> PriceBook:
        return self.core.prices

    @property
    def budgets(self) -> BudgetBook:
        return self.core.budgets

    @property
    def actor(self) -> str:
        return self.core.actor

    def now_ms(self) -> int:
        return self.core.clock.now_ms()

    async def _tx(self, op: Callable[[LedgerTx], T], *, sync: bool = True) -> T:
        return await self.core.tx(op, sync=sync)

    async def _change(self, permission: access.Permission, action: str, op: Callable[[LedgerTx], Changed[T]]) -> T:
        return await self.core.change(permission, action, op)

    async def _permitted(self, permission: access.Permission) -> None:
        await self.core.permitted(permission)
