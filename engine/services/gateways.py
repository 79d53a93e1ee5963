"""Providers and gateways: the providers calls go to, their health and circuit breakers,
connection tests, and the gateways running on this ledger.

A service of ``Engine`` (``engine.services.core``): the engine's methods of the same names
delegate here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from engine import providers as prov
from engine.ledger import LedgerTx
from engine.models import GatewayStatus
from engine.services.core import Changed, Core, Journal, Service
from engine.services.credentials import CredentialService

HEALTH_REFRESH_S = 1.0  # how old provider health may be before a call starts a refresh (in the background)
log = logging.getLogger("budgeteer")


class GatewayService(Service):
    def __init__(self, core: Core, credentials: CredentialService) -> None:
        super().__init__(core)
        self.credentials = credentials
        self.providers_changed: Callable[[], None] = lambda: None  # the catalog forgets the models it kept
        # Provider health in memory: loaded once, then the new events added by one refresh at a
        # time, in the background when a call finds it older than HEALTH_REFRESH_S.
        self._health = prov.HealthBook()
        self._health_last_id: int | None = None
        self._health_at = 0.0  # time.monotonic() of the last refresh's start
        self._health_refresh: asyncio.Task[dict[str, prov.Breaker]] | None = None
        self._breakers: dict[str, prov.Breaker] | None = None

    async def add_provider(self, **spec: Any) -> prov.Provider:
        provider = prov.build_provider(**spec, now_ms=self.now_ms(), actor=self.actor)

        def op(tx: LedgerTx) -> Changed[prov.Provider]:
            prov.add(tx, provider)
            self.providers_changed()
            return provider, Journal(f"provider:{provider.name}", None, provider.as_dict())

        return await self._change("manage_providers", "provider.add", op)

    async def remove_provider(self, name: str) -> prov.Provider:
        def op(tx: LedgerTx) -> Changed[prov.Provider]:
            provider = prov.remove(tx, name)
            self.providers_changed()
            return provider, Journal(f"provider:{provider.name}", provider.as_dict(), None)

        return await self._change("manage_providers", "provider.remove", op)

    async def providers(self) -> list[prov.Provider]:
        listed: list[prov.Provider] = await self.store.read_with(prov.listing)
        return listed

    async def provider(self, name: str) -> prov.Provider:
        return await self._tx(lambda tx: prov.get(tx, name))

    def _routing_breakers(self) -> dict[str, prov.Breaker] | None:
        """The breakers as last judged (None before a process's first look: its first call waits
        for it). A call that finds them older than HEALTH_REFRESH_S starts a refresh in the
        background, unless one is already under way, and goes on with these."""
        if self._breakers is not None and self._health_refresh is None \
                and time.monotonic() - self._health_at >= HEALTH_REFRESH_S:
            self._start_health_refresh()
        return self._breakers

    def _start_health_refresh(self) -> asyncio.Task[dict[str, prov.Breaker]]:
        self._health_at = time.monotonic()
        task = self._health_refresh = asyncio.create_task(self._read_health())

        def done(t: asyncio.Task[dict[str, prov.Breaker]]) -> None:
            self._health_refresh = None
            if not t.cancelled() and (exc := t.exception()) is not None:
                log.warning("provider health not refreshed (kept as it was): %s", exc)

        task.add_done_callback(done)
        return task

    async def _refresh_health(self) -> dict[str, prov.Breaker]:
        """Bring health and breakers up to date now (joining a refresh under way)."""
        task = self._health_refresh or self._start_health_refresh()
        return await asyncio.shield(task)

    async def _read_health(self) -> dict[str, prov.Breaker]:
        now = self.now_ms()
        since = now - self._health.window_ms

        after = self._health_last_id
        read: tuple[list[prov.HealthRow], int, dict[str, prov.Breaker]] = await self.store.read_with(
            lambda ledger: (*prov.health_rows(ledger, after, since), prov.breakers(ledger)))
        rows, last, current = read
        self._health.add(rows)
        self._health.evict(now)
        self._health_last_id = last
        changes = prov.judge_breakers(current, self._health, now)
        if changes:
            await self._tx(lambda tx: prov.save_breakers(tx, changes))
            current.update((b.provider, b) for b in changes)
        self._breakers = current
        return current

    async def provider_health(self, window_ms: int = prov.HEALTH_WINDOW_MS
                              ) -> tuple[list[prov.Health], dict[str, prov.Breaker]]:
        """Health per provider and model over the window, and every breaker as it stands now;
        a model's calls are counted under its catalog name (``PriceBook.catalog_name``)."""
        breakers = await self._refresh_health()
        now = self.now_ms()
        name = self.prices.catalog_name  # a dated or prefixed id counts against its catalog entry
        if window_ms <= self._health.window_ms:
            return self._health.health(now, window_ms, name), breakers
        book = prov.HealthBook(window_ms)  # a longer span than the one kept: read once
        rows, _ = await self.store.read_with(lambda ledger: prov.health_rows(ledger, None, now - window_ms))
        book.add(rows)
        return book.health(now, name=name), breakers

    async def test_connection(self, name: str, timeout_s: float = 5.0) -> prov.ConnectionResult:
        """Check the provider's credential against its models endpoint. The outcome is also the
        probe of its breaker: success closes an open or half-open breaker, failure reopens it."""
        provider = await self.provider(name)
        secret = await self.credentials.credential(provider.credential) if provider.credential else None
        result = await prov.test_connection(provider, secret, timeout_s=timeout_s)
        del secret
        now = self.now_ms()

        def op(tx: LedgerTx) -> prov.Breaker | None:
            known = prov.breakers(tx).get(provider.name)
            if known is not None and known.state != "closed":
                return prov.record_probe(tx, provider.name, result.state == "ok", now,
                                         f"{result.state}, {result.detail}")
            return None

        probed: prov.Breaker | None = await self._tx(op)
        if probed is not None and self._breakers is not None:  # routing sees it at once, not at the next refresh
            self._breakers = {**self._breakers, probed.provider: probed}
        return result

    async def gateway_heartbeat(self, status: GatewayStatus) -> None:
        """A gateway says it is alive (every few seconds) with its counters; ``stopped_ms`` when it ends."""
        await self._tx(lambda tx: tx.gateways.heartbeat(status), sync=False)

    async def gateways(self, seen_within_ms: int = 15_000) -> list[GatewayStatus]:
        """The gateways running on this ledger: heard from recently and not stopped."""
        since = self.now_ms() - seen_within_ms
        return await self._tx(lambda tx: tx.gateways.running(since))

    async def close(self) -> None:
        if self._health_refresh is not None:
            await asyncio.wait([self._health_refresh])  # a failure is logged by the task itself
