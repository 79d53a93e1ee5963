"""A token with a known prefix and a wrong secret is refused after the same work as one with
an unknown prefix: the same SQLite steps (counted by a progress handler, not timed)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from engine import tokens
from engine.engine import Engine
from engine.ledger import LedgerView
from tests.conftest import NOW_MS


def _steps(conn: sqlite3.Connection, secret: str) -> int:
    """SQLite virtual-machine steps ``authenticate`` takes to refuse ``secret``."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    conn.set_progress_handler(count, 1)
    try:
        with pytest.raises(tokens.TokenRefused) as refused:
            tokens.authenticate(LedgerView(conn), secret, NOW_MS, touch=False)
    finally:
        conn.set_progress_handler(None, 1)
    assert refused.value.reason == "wrong" and str(refused.value) == "invalid token"
    return steps


@pytest.mark.sqlite_only  # counts SQLite's statements
async def test_a_known_prefix_with_a_wrong_secret_takes_the_steps_of_an_unknown_prefix(
        engine: Engine, db_path: Path) -> None:
    made = [await engine.create_token(name=f"t{i}", principal="alice") for i in range(20)]
    prefixes = sorted(t.prefix for t, _ in made)
    _, secret = made[0]
    wrong = secret[:12] + ("A" if secret[12] != "A" else "B") + secret[13:]
    unknown = next(f"bgt_{p[:7]}{c}{secret[12:]}" for p in prefixes for c in "-0Aa_"
                   if f"{p[:7]}{c}" not in prefixes and f"{p[:7]}{c}" < prefixes[-1])
    conn = sqlite3.connect(db_path)
    try:
        _steps(conn, unknown)  # the connection reads the schema once
        assert _steps(conn, wrong) == _steps(conn, unknown)
        assert tokens.authenticate(LedgerView(conn), secret, NOW_MS, touch=False).id == made[0][0].id
    finally:
        conn.close()
