"""Listening for the ledger's changes: ``LISTEN budgeteer`` on a connection of its own.

The store's writer and reader connections live on worker threads, each on an event loop of its
own, and are busy with batches; a notification must reach the application while it waits for
nothing. So the listener is one more asyncpg connection, on the application's event loop: asyncpg
reads the notification as it arrives and calls ``deliver(kind)`` there, where the engine's
caches live (no thread to cross, no lock).

It looks after itself: when the connection is lost (the server restarted, a failover, a network
cut noticed by the ping every ``PING_S``), it connects again, waiting longer each time up to
``RETRY_MAX_S``, and once listening again delivers ``changes.ANY``: what was sent while it was
away is lost, so anything may have changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Final

from engine.ledger.changes import ANY, CHANNEL

if TYPE_CHECKING:
    import asyncpg  # type: ignore[import-untyped]

CONNECT_TIMEOUT_S: Final = 5.0
PING_S: Final = 5.0  # a quiet connection is asked a question this often: a silent network cut is found
PING_TIMEOUT_S: Final = 5.0
RETRY_MIN_S: Final = 0.1  # the first wait before connecting again; doubled at each failure
RETRY_MAX_S: Final = 2.0
log = logging.getLogger("budgeteer")


class Listener:
    """``LISTEN`` on the ledger's channel at ``dsn``, each notification's payload handed to
    ``deliver`` on the event loop that started it (``start``)."""

    def __init__(self, dsn: str, where: str, deliver: Callable[[str], None] | None = None) -> None:
        self.dsn = dsn
        self.where = where  # the address without its password, for the log
        self.deliver = deliver  # None: what arrives is dropped (while the store is still opening)
        self._task: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self.connects = 0  # connections made (the first and every one after a loss)
        self._late = False  # the first connection came after start() stopped waiting for it
        self.received = 0  # notifications received

    @property
    def listening(self) -> bool:
        """Connected and listening now."""
        return self._listening.is_set()

    def start_soon(self) -> None:
        """Start connecting, in the background (on the running event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="ledger-listener")

    async def start(self, wait_s: float = CONNECT_TIMEOUT_S) -> bool:
        """Start listening, waiting up to ``wait_s`` for the first connection; True when it
        listens. If it does not yet, it goes on trying in the background, and says ``ANY`` once
        it does (what was committed meanwhile was not heard)."""
        self.start_soon()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), wait_s)
        self._late = not self.listening
        return self.listening

    async def wait_listening(self, timeout_s: float) -> bool:
        """Wait until it listens (again), up to ``timeout_s``; True when it does."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), timeout_s)
        return self.listening

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.received += 1
        self._hand(payload)

    def _hand(self, kind: str) -> None:
        if self.deliver is None:
            return
        try:
            self.deliver(kind)
        except Exception as exc:  # a subscriber's failure is its own; the listener goes on
            log.warning("a subscriber to the ledger's changes failed on %r: %s: %s", kind, type(exc).__name__, exc)

    async def _run(self) -> None:
        import asyncpg

        delay = RETRY_MIN_S
        while True:
            try:
                conn = await asyncpg.connect(self.dsn, timeout=CONNECT_TIMEOUT_S,
                                             server_settings={"application_name": "budgeteer-listen"})
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the server is down or refuses: try again, waiting longer each time
                if self.connects:
                    log.debug("listening for ledger changes at %s: cannot connect (%s), retrying", self.where, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            lost = asyncio.Event()
            conn.add_termination_listener(partial(_set, lost))
            try:
                await conn.add_listener(CHANNEL, self._notified)
                self.connects += 1
                self._listening.set()
                delay = RETRY_MIN_S
                if self.connects > 1 or self._late:
                    log.info("listening for ledger changes at %s again", self.where)
                    self._late = False
                    self._hand(ANY)  # what was sent while it was away is lost
                await self._watch(conn, lost)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("listening for ledger changes at %s: %s", self.where, exc)
            finally:
                self._listening.clear()
                if not conn.is_closed():
                    conn.terminate()
            log.warning("lost the connection listening for ledger changes at %s; reconnecting", self.where)
            await asyncio.sleep(delay)

    async def _watch(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        """Until the connection is lost: a server that ends it is noticed at once (its
        termination), a silent network by the ping."""
        while not lost.is_set() and not conn.is_closed():
            try:
                await asyncio.wait_for(lost.wait(), PING_S)
            except TimeoutError:
                try:
                    await asyncio.wait_for(conn.fetchval("SELECT 1"), PING_TIMEOUT_S)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    return


def _set(event: asyncio.Event, _conn: Any) -> None:
    event.set()
