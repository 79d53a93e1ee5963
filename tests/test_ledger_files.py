"""A ledger is removed with its write-ahead log and shared-memory index (``-wal``, ``-shm``):
the rule ``budgeteer demo --replace`` relies on, kept in the ledger package."""

from __future__ import annotations

import shutil
from pathlib import Path

from engine.clock import FrozenClock
from engine.engine import Engine
from engine.ledger import remove_ledger
from tests.conftest import event


async def test_a_removed_ledger_takes_its_wal_and_shm_with_it(db_path: Path, clock: FrozenClock,
                                                               tmp_path: Path) -> None:
    removed, kept = tmp_path / "removed.db", tmp_path / "kept.db"
    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.record_many([event(n) for n in range(5)])
        # Two copies of the ledger as a crash leaves it: its recent writes in the -wal.
        for copy in (removed, kept):
            for suffix in ("", "-wal", "-shm"):
                shutil.copyfile(f"{db_path}{suffix}", f"{copy}{suffix}")

    remove_ledger(removed)

    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("removed")] == []
    remove_ledger(removed)  # nothing left to remove is no error
    async with await Engine.open(removed, clock=clock) as engine:
        assert await engine.event_count() == 0  # a fresh ledger, nothing of the old one
    async with await Engine.open(kept, clock=clock) as engine:
        assert await engine.event_count() == 5  # what the copy held, with its -wal
