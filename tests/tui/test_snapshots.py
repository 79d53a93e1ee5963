"""Snapshots of every screen at 80x24 and 160x48 on a deterministic demo ledger with a
frozen clock (regenerate with ``pytest tests/tui --snapshot-update`` after a deliberate change)."""

from __future__ import annotations

import asyncio
import base64
import random
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Input

from engine import approvals as approvals_module
from engine import tokens as tokens_module
from engine import vault as vault_module
from engine.clock import FrozenClock
from engine.demo import demo_policies, generate_demo, populate
from engine.engine import Engine
from engine.services import alerts as alerts_service
from engine.services import calls as calls_service
from engine.services import catalog as catalog_service
from engine.services import core as core_service
from tests.conftest import isolated_home
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

    with isolated_home(path.parent / "home"):
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


class _SeededSecrets:
    """``secrets`` with a seed, for the ledger the snapshots below are drawn from: token,
    request and chain-key ids come out the same in every run, so the SVGs can be compared."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)

    def token_bytes(self, n: int = 32) -> bytes:
        return self._random.randbytes(n)

    def token_hex(self, n: int = 32) -> str:
        return self.token_bytes(n).hex()

    def token_urlsafe(self, n: int = 32) -> str:
        return base64.urlsafe_b64encode(self.token_bytes(n)).rstrip(b"=").decode()

    def compare_digest(self, a: Any, b: Any) -> bool:
        return bool(secrets.compare_digest(a, b))


@pytest.fixture(scope="session")
def full_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo as `budgeteer demo` writes it (tokens, override requests in every state, providers,
    routing decisions, the journal), two days of history, with seeded ids."""
    path = tmp_path_factory.mktemp("full-demo") / "demo.db"
    seeded = _SeededSecrets(18)
    modules = [m for m in (core_service, calls_service, alerts_service, catalog_service, approvals_module,
                           tokens_module, vault_module) if hasattr(m, "secrets")]
    saved = [m.secrets for m in modules]

    async def build() -> None:
        async with await Engine.open(path, clock=FrozenClock(NOW), durable=False) as engine:
            await populate(engine, days=2, end_ms=NOW)
            await engine.alerts()

    for m in modules:
        m.secrets = seeded  # type: ignore[assignment]
    try:
        with isolated_home(path.parent / "home"):
            asyncio.run(build())
    finally:
        for m, original in zip(modules, saved, strict=True):
            m.secrets = original
    return path


def _app_on(full_demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> BudgeteerApp:
    monkeypatch.setattr(tokens_module, "secrets", _SeededSecrets(6))  # a token made on screen shows its secret
    monkeypatch.setenv("BUDGETEER_VAULT_FILE", "/srv/budgeteer/vault.json")  # the path is on screen; never written
    db = tmp_path / "demo.db"
    shutil.copy(full_demo, db)
    app = BudgeteerApp(db_path=db, clock=FrozenClock(NOW), refresh_seconds=3600, label="demo ledger")
    # Every snapshot below shows the notice of the ledger's pending requests, given at start: kept
    # until the snapshot is drawn, however long the keys take on a loaded machine (the default
    # 5 s was about what the token's twelve keys take, and a slower run drew it gone).
    app.NOTIFICATION_TIMEOUT = 600
    return app


async def _keys(pilot: Any, keys: str) -> None:
    """Press each key (space-separated names) and let every read land before the next."""
    for key in keys.split():
        await pilot.press(key)
        await pilot.app.workers.wait_for_complete()
        await pilot.pause(0.2)
        await pilot.app.workers.wait_for_complete()
    for box in pilot.app.screen.query(Input):  # a blinking cursor would be drawn in either state
        box.cursor_blink = False
    await pilot.pause()


#: screen -> its key, and any keys that show its second view
OTHER_SCREENS = {"approvals": "5", "approvals-history": "5 h", "tokens": "6", "audit": "7", "models": "8",
                 "vault": "9"}


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
@pytest.mark.parametrize("keys", list(OTHER_SCREENS.values()), ids=list(OTHER_SCREENS))
def test_governance_screen_snapshot(snap_compare: Callable[..., bool], full_demo: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch, keys: str, size: tuple[int, int]) -> None:
    app = _app_on(full_demo, tmp_path, monkeypatch)
    assert snap_compare(app, terminal_size=size, run_before=lambda pilot: _keys(pilot, keys))


#: modal -> the keys that open it (drawn at 80x24, where every detail is a modal)
MODALS = {
    "help": "question_mark",
    "budget-detail": "3 enter",
    "policy-form": "3 a",
    "policy-delete": "3 d",
    "backtest": "3 b",
    "alert-detail": "4 enter",
    "request-detail": "5 enter",
    "approve-form": "5 a",
    "deny-form": "5 d",
    "token-detail": "6 enter",
    "token-form": "6 n",
    "token-revoke": "6 x",
    "token-secret": "6 n c i tab a l i c e enter",  # the secret shown once (seeded ids: the same every run)
    "audit-entry": "7 enter",
    "model-detail": "8 enter",
    "explain": "8 e h i enter",
    "vault-form": "9 n",
}


@pytest.mark.parametrize("keys", list(MODALS.values()), ids=list(MODALS))
def test_modal_snapshot(snap_compare: Callable[..., bool], full_demo: Path, tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch, keys: str) -> None:
    app = _app_on(full_demo, tmp_path, monkeypatch)
    assert snap_compare(app, terminal_size=(80, 24), run_before=lambda pilot: _keys(pilot, keys))
