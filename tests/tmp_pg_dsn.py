"""TEMPORARY (branch ratelimit, until branch pgfixture is on main): a ``postgres_dsn`` fixture
for a server the developer started, named by PGTEST_ADMIN (a dsn of a database whose user may
create databases). The lead deletes this file, and the marked imports of it, at merge:
tests/conftest.py's ``postgres_dsn`` (tests/pg.py) replaces it."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest


@pytest.fixture
def postgres_dsn() -> Iterator[str]:
    admin = os.environ.get("PGTEST_ADMIN")
    if not admin:
        pytest.skip("PGTEST_ADMIN is not set: no PostgreSQL server to test against")
    import asyncpg  # type: ignore[import-untyped]

    name = "t_" + secrets.token_hex(6)

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(f"CREATE DATABASE {name}"))
    parts = urlsplit(admin)
    yield urlunsplit(parts._replace(path=f"/{name}"))
    asyncio.run(run(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
