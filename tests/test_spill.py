"""The spill journal beside the ledger (``<ledger>.spill``): what a process left there is
replayed into the ledger when the next one opens it, each settlement once, by its request id.
(The full disk itself, under a gateway and under the transport: tests/reliability/test_full_disk.py.)"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from engine.budgets import build_policy
from engine.clock import FrozenClock
from engine.engine import CallRequest, Engine
from engine.spill import Spilled, SpillJournal
from tests.conftest import NOW_MS, event


async def _held_call(db_path: Path, clock: FrozenClock) -> str:
    """A process holds a call's worst case and ends (its settlement refused by the ledger)."""
    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.add_policy(build_policy(scope="global", metric="usd", window="day", hard="10", name="All",
                                             policy_id="all"))
        auth = await engine.authorize(CallRequest(principal="alice", model="gpt-4o-mini", input_tokens=1000,
                                                  max_tokens=200, request_id="req-held"))
        assert auth.allowed and auth.hold_id is not None
        assert await engine.open_holds() == 1
        return auth.hold_id


async def test_a_spill_left_at_start_is_replayed_once_on_open(db_path: Path, clock: FrozenClock,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    hold_id = await _held_call(db_path, clock)
    journal = SpillJournal(Path(f"{db_path}.spill"))
    held, free = Spilled(hold_id, event(1, request_id="req-held")), Spilled(None, event(2, request_id="req-free"))
    journal.append(held)
    journal.append(free)
    assert journal.path.exists()

    caplog.set_level(logging.WARNING, logger="budgeteer")
    async with await Engine.open(db_path, clock=clock) as engine:
        ids = [e.request_id async for e in engine.iter_events(0, clock.now_ms())]
        assert sorted(ids) == ["req-free", "req-held"]
        assert await engine.open_holds() == 0  # the hold ended settled, not left to its TTL
        [status] = await engine.policy_status()
        assert status.held == 0 and status.consumed == 2 * 270_000
    assert not journal.pending()
    assert "replayed 2 settlements from the spill journal" in caplog.text

    # The same journal again (a process killed between the replay's commit and emptying the file),
    # then an open with none: nothing is written twice.
    journal.append(held)
    journal.append(free)
    for _ in range(2):
        async with await Engine.open(db_path, clock=clock) as engine:
            assert await engine.event_count() == 2
            assert (await engine.policy_status())[0].consumed == 2 * 270_000
        assert not journal.pending()


async def test_a_line_torn_by_a_crash_is_skipped_and_the_next_append_starts_afresh(
        db_path: Path, clock: FrozenClock, caplog: pytest.LogCaptureFixture) -> None:
    async with await Engine.open(db_path, clock=clock):
        pass
    journal = SpillJournal(Path(f"{db_path}.spill"))
    journal.append(Spilled(None, event(1)))
    with open(journal.path, "ab") as f:
        f.write(Spilled(None, event(2)).line()[:40])  # the process died in the middle of this append
    journal.append(Spilled(None, event(3)))

    caplog.set_level(logging.WARNING, logger="budgeteer")
    async with await Engine.open(db_path, clock=clock) as engine:
        assert sorted([e.request_id async for e in engine.iter_events(0, clock.now_ms())]) == ["req-1", "req-3"]
    assert "line 2 is not a settlement, skipped" in caplog.text
    assert "Traceback" not in caplog.text


async def test_a_settlement_spilled_while_the_ledger_comes_back_is_replayed_too(tmp_path: Path) -> None:
    """A settlement spilled while the background retry's replay runs (the ledger still counted as
    refusing) is written once the ledger is back, not left for the next outage."""
    clock = FrozenClock(NOW_MS)
    async with await Engine.open(tmp_path / "l.db", clock=clock) as engine:
        await engine.add_policy(build_policy(scope="global", metric="usd", window="day", hard="10", name="All",
                                             policy_id="all"))
        a = await engine.authorize(CallRequest(principal="alice", model="gpt-4o-mini", input_tokens=1000,
                                               max_tokens=200, request_id="req-a"))
        b = await engine.authorize(CallRequest(principal="alice", model="gpt-4o-mini", input_tokens=1000,
                                               max_tokens=200, request_id="req-b"))
        svc = engine.services.calls
        svc._refused("simulated outage")            # the ledger refused a write
        assert await engine.settle_call(a.hold_id, event(1, request_id="req-a")) is False  # spilled
        slow_one = svc._replay_one
        async def replay_one(record):                 # the replay takes a moment (a round trip)
            await asyncio.sleep(0.05)
            await slow_one(record)
        svc._replay_one = replay_one  # type: ignore[method-assign]
        while not svc._replaying.locked():            # wait for the retry's replay to begin
            await asyncio.sleep(0.005)
        assert await engine.settle_call(b.hold_id, event(2, request_id="req-b")) is False  # spilled meanwhile
        await svc._retry_writes
        assert svc.refusing is None                   # writable again, retry task finished
        ids = [e.request_id async for e in engine.iter_events(0, clock.now_ms() + 1)]
        assert sorted(ids) == ["req-a", "req-b"] and not svc.spill.pending()
        assert await engine.open_holds() == 0
