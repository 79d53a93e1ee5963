"""The part of a DB-API connection the ledger's SQL runs on, whichever the database.

``sqlite3.Connection`` is one. The PostgreSQL store's ``PgConnection`` (``engine.ledger.pg.conn``)
is the other: the same calls, bridged to asyncpg, with each statement's placeholders and the
few words the two dialects spell differently translated once. Repositories, reads and the
group-commit writer are written against this, so the SQL of a record kind lives in one place
for both backends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    @property
    def lastrowid(self) -> int | None: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Cursor: ...

    @property
    def in_transaction(self) -> bool: ...


class Pipeline(Protocol):
    """A connection that sends writes ahead (``engine.ledger.pg.conn.PgConnection.queue``)."""

    def queue(self, sql: str, parameters: Sequence[Any], /, rows_each: int | None = None,
              check: Callable[[list[tuple[Any, ...]]], None] | None = None) -> None: ...


def pipeline(conn: Connection) -> Pipeline | None:
    """``conn`` if it sends writes ahead now (PostgreSQL, in a pipelined batch), else None."""
    return conn if getattr(conn, "pipelining", False) else None  # type: ignore[return-value]
