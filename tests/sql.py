"""SQL run straight on a ledger's database, as someone with write access to it would: to show
what the ledger itself refuses, and what tampering its checks then find. Either backend."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from engine.ledger import is_dsn

T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to the end from synchronous code, whether or not an event loop runs here."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


#: The triggers that keep the audit journal append-only, by backend.
_SQLITE_GUARDS = ("audit_journal_no_update", "audit_journal_no_delete")


def raw_sql(location: Path | str, script: str, *, past_guards: bool = False) -> None:
    """Run ``script`` (statements separated by ``;``) on the ledger at ``location``, in one
    transaction. ``past_guards``: with its append-only triggers out of the way (SQLite: dropped;
    PostgreSQL: not fired, as a superuser may arrange)."""
    if is_dsn(location):
        _run(_pg(str(location), script, past_guards))
        return
    conn = sqlite3.connect(location)
    try:
        if past_guards:
            conn.executescript("".join(f"DROP TRIGGER IF EXISTS {name};" for name in _SQLITE_GUARDS))
        conn.executescript(f"BEGIN; {script}; COMMIT;")
    finally:
        conn.close()


async def _pg(dsn: str, script: str, past_guards: bool) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            if past_guards:
                await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(script)
    finally:
        await conn.close()


def guard_error() -> tuple[type[BaseException], ...]:
    """What a refused statement raises, on either backend."""
    import asyncpg

    return (sqlite3.IntegrityError, asyncpg.PostgresError)


def ledger_bytes(location: Path | str) -> bytes:
    """Everything the ledger's database holds, as bytes to search (SQLite: its files; PostgreSQL:
    every row of every table, as text)."""
    if is_dsn(location):
        return _run(_pg_rows(str(location))).encode()
    return b"".join(Path(f"{location}{suffix}").read_bytes() for suffix in ("", "-wal")
                    if Path(f"{location}{suffix}").exists())


async def _pg_rows(dsn: str) -> str:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        tables = [r[0] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        rows = []
        for table in tables:
            rows += [str(r[0]) for r in await conn.fetch(f'SELECT t::text FROM "{table}" t')]
        return "\n".join(rows)
    finally:
        await conn.close()
