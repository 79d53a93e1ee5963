"""Changes other processes made, as the ledger pushes them (PostgreSQL's LISTEN/NOTIFY): the
engine's own caches are dropped at once, then its subscribers (a gateway's token cache, the
governor's providers, the dashboard's refresh) are told.

What each kind drops here (``engine.ledger.changes``):

- ``policy``: the budget book reads every policy again at its next batch (a batch would see a
  policy that moved anyway, by the ledger's version; routing's advice from memory would not).
- ``provider``: the catalog of models is built again at its next use.
- ``price``: the price book reads the ledger's price versions again (another process imported
  them: without this a running process would price by the versions it found when it opened),
  then the catalog is built again; subscribers hear of it once the new prices are in.
- ``changes.ANY`` (the listener was away): all of these.

On SQLite nothing is pushed (``notifies`` is False) and nothing here runs.

A service of ``Engine`` (``engine.services.core``): the engine's methods of the same names
delegate here."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from engine.ledger.changes import ANY, POLICY, PRICE, PROVIDER, Subscribers
from engine.pricing import ModelPrice
from engine.services.catalog import CatalogService
from engine.services.core import Core, Service

log = logging.getLogger("budgeteer")


class ChangeService(Service):
    def __init__(self, core: Core, catalog: CatalogService) -> None:
        super().__init__(core)
        self.catalog = catalog
        self._subscribers = Subscribers()
        self._prices: asyncio.Task[None] | None = None  # the price book being read again
        self._prices_again = False  # and read once more when that is done
        self._price_told = False  # a price change, told to the subscribers once the prices are read
        core.store.on_change(self._changed)

    def on_change(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call ``callback(kind)`` on the event loop when any process commits a change of
        ``kind`` (a policy, token, approval, price, provider or member; ``"*"``: anything may
        have changed), after this engine has dropped what it kept of it. Only on a ledger that
        pushes its changes (``notifies``: PostgreSQL). Returns what unsubscribes."""
        return self._subscribers.add(callback)

    @property
    def notifies(self) -> bool:
        """Changes of other processes are pushed to this engine as they commit (listening now)."""
        return self.store.notifies

    def _changed(self, kind: str) -> None:
        if kind in (POLICY, ANY):
            self.budgets.forget()
        if kind in (PROVIDER, PRICE, ANY):
            self.catalog.forget()
        if kind in (PRICE, ANY):
            self._read_prices()
            if kind == PRICE:
                self._price_told = True  # told once the prices are read
                return
        self._tell(kind)

    def _tell(self, kind: str) -> None:
        self._subscribers.tell(kind)

    def _read_prices(self) -> None:
        if self._prices is not None:
            self._prices_again = True  # a version committed after that read began
            return
        self._prices = asyncio.get_running_loop().create_task(self._reload_prices())

    async def _reload_prices(self) -> None:
        try:
            while True:
                self._prices_again = False
                for attempt in (1, 2):  # a connection found lost by the first is made again by the second
                    try:
                        specs = await self.store.load_prices()
                    except Exception as exc:  # kept as they were; the next change or reconnection tries again
                        if attempt == 2:
                            log.warning("price versions not read again: %s: %s", type(exc).__name__, exc)
                        continue
                    self.prices.extend(ModelPrice.from_json(json.loads(spec)) for spec in specs)
                    break
                self.catalog.forget()
                if not self._prices_again:
                    break
        finally:
            self._prices = None
        if self._price_told:
            self._price_told = False
            self._tell(PRICE)

    async def close(self) -> None:
        if (task := self._prices) is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
