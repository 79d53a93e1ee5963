"""The bare SQLite ceiling the ledger's bulk writes are measured against (``bench.ledger``):
plain ``executemany`` into a table with no index, in WAL mode, one transaction per chunk."""

from __future__ import annotations

import sqlite3
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def bare_insert_rate(rows: Sequence[tuple[Any, ...]], chunk: int = 50_000) -> float:
    """Rows per second written into a fresh file, each row nine values (time, request id,
    workspace, team, principal, model, input and output tokens, cost)."""
    with tempfile.TemporaryDirectory() as tmp:
        conn = sqlite3.connect(Path(tmp) / "raw.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE e (ts INTEGER, rid TEXT, ws TEXT, team TEXT, who TEXT, model TEXT, "
                     "i INTEGER, o INTEGER, cost INTEGER)")
        started = time.perf_counter()
        for i in range(0, len(rows), chunk):
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO e VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows[i:i + chunk])
            conn.execute("COMMIT")
        elapsed = time.perf_counter() - started
        conn.close()
    return len(rows) / elapsed
