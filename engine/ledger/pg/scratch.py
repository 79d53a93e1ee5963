"""Scratch databases on a PostgreSQL server, for benchmarks: a fresh, empty database for each
measured ledger, dropped afterwards. (Only here: the ledger is the one package that knows SQL
and the driver; a benchmark asks for a database by name.)"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import urlsplit, urlunsplit

from engine.ledger.errors import StoreError
from engine.ledger.files import redacted
from engine.ledger.pg.conn import CONNECT_TIMEOUT_S

_NAME: Final = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def database_dsn(dsn: str, name: str) -> str:
    """``dsn`` with its database replaced by ``name``."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def create_database(dsn: str, name: str) -> str:
    """Create the empty database ``name`` (dropped first if it exists) on the server of ``dsn``,
    connecting as ``dsn`` says (the role needs CREATEDB); the new database's dsn."""
    await _admin(dsn, name, drop=True, create=True)
    return database_dsn(dsn, name)


async def drop_database(dsn: str, name: str) -> None:
    """Drop the database ``name`` on the server of ``dsn`` (its connections ended first)."""
    await _admin(dsn, name, drop=True, create=False)


async def _admin(dsn: str, name: str, *, drop: bool, create: bool) -> None:
    import asyncpg  # type: ignore[import-untyped]

    if not _NAME.match(name):
        raise StoreError(f"database name: {name!r} is not a plain lower-case name")
    try:
        conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise StoreError(f"cannot reach the database server at {redacted(dsn)}: {exc}") from None
    try:
        if drop:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if create:
            await conn.execute(f'CREATE DATABASE "{name}"')
    except asyncpg.PostgresError as exc:
        raise StoreError(f"database {name}: {exc}") from None
    finally:
        await conn.close()
