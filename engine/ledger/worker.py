"""A connection and the one thread it runs on.

SQLite's calls block, so each connection of the store lives on a thread of its own and the
event loop hands it work: ``await worker.run(fn, *args)`` runs ``fn`` there and returns its
result (or raises its error). One hop per job, however many statements the job runs: a
whole transaction is one hop. The standard library's executor, nothing else: no
driver's private queue is reached into.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")


class _Closing(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=_Closing)


class Worker(Generic[C]):
    """``conn`` is used on this worker's thread; a writer's (made with ``any_thread``) also on
    the event loop's, when its owner knows the thread is idle (the writer's lock)."""

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._connection: C | None = None

    @property
    def conn(self) -> C:
        if self._connection is None:
            raise RuntimeError("the connection is closed")
        return self._connection

    @classmethod
    async def open(cls, name: str, connect: Callable[[], C]) -> Worker[C]:
        """A worker whose connection ``connect`` makes, on the worker's own thread."""
        worker: Worker[C] = cls(name)
        try:
            worker._connection = await worker.run(connect)
        except BaseException:
            worker._executor.shutdown(wait=False)
            raise
        return worker

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run ``fn(*args)`` on this worker's thread (jobs run one at a time, in order)."""
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def close(self) -> None:
        """Close the connection on its thread, then let the thread end."""
        if self._connection is not None:
            conn, self._connection = self._connection, None
            await self.run(conn.close)
        self._executor.shutdown(wait=False)
