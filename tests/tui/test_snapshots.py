"""Snapshots of every screen at 80x24 and 160x48 on a deterministic demo ledger with a
frozen clock (regenerate with ``pytest tests/tui --snapshot-update`` after a deliberate change)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine.clock import FrozenClock
from engine.demo import demo_policies, generate_demo
from engine.engine import Engine
from tui.app import BudgeteerApp

NOW = 1_795_003_200_000


@pytest.fixture(scope="session")
def demo_ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("snapshots") / "demo.db"

    async def build() -> None:
        async with await Engine.open(path, clock=FrozenClock(NOW), durable=False) as engine:
            for batch in generate_demo(days=7, seed=7, end_ms=NOW):
                await engine.bulk_record(batch)
            for policy in demo_policies(NOW):
                await engine.add_policy(policy)
            await engine.alerts()  # raise the alerts now, so every snapshot starts from the same ledger

    asyncio.run(build())
    return path


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
@pytest.mark.parametrize("key", ["1", "2", "3", "4", "0"], ids=["overview", "usage", "budgets", "alerts", "calls"])
def test_screen_snapshot(snap_compare: Callable[..., bool], demo_ledger: Path, tmp_path: Path, key: str,
                         size: tuple[int, int]) -> None:
    db = tmp_path / "demo.db"
    shutil.copy(demo_ledger, db)
    app = BudgeteerApp(db_path=db, clock=FrozenClock(NOW), refresh_seconds=3600, label="demo ledger")

    async def run_before(pilot: Any) -> None:
        await pilot.press(key)
        await pilot.app.workers.wait_for_complete()
        await pilot.pause(0.3)
        await pilot.app.workers.wait_for_complete()

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("theme", ["ansi-dark", "ansi-light"])
@pytest.mark.parametrize("key", ["1", "2"], ids=["overview", "usage"])
def test_ansi_theme_snapshot(snap_compare: Callable[..., bool], demo_ledger: Path, tmp_path: Path, key: str,
                             theme: str) -> None:
    """The terminal's own colours: gauges, tables and the plot canvas included."""
    db = tmp_path / "demo.db"
    shutil.copy(demo_ledger, db)
    app = BudgeteerApp(db_path=db, clock=FrozenClock(NOW), refresh_seconds=3600, label="demo ledger", theme=theme)

    async def run_before(pilot: Any) -> None:
        await pilot.press(key)
        await pilot.app.workers.wait_for_complete()
        await pilot.pause(0.3)
        await pilot.app.workers.wait_for_complete()

    assert snap_compare(app, terminal_size=(120, 36), run_before=run_before)
