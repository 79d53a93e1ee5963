"""The write hot path of a governed call (hold, then settlement), on both ledgers.

On PostgreSQL every statement is a round trip to the server, so the hot path there runs in
fewer statements than on SQLite (engine/ledger/pg/store.py, repos/holds.py, repos/events.py):
a batch's savepoints share round trips, a hold and its journal rows are one statement, a
settlement's event and its three rollups one, the closing of its hold and its journal rows
one. These tests hold both ledgers to the same results (conftest's ``engine`` runs each test on
both), and PostgreSQL to its round trips.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from engine.budgets import build_policy
from engine.clock import DAY_MS, FrozenClock
from engine.engine import CallRequest, Engine
from engine.ledger import LedgerTx
from engine.models import UsageEvent
from engine.routing import Recorded
from tests.conftest import NOW_MS


def _call(n: int) -> CallRequest:
    return CallRequest(principal="alice", team="ml", model="gpt-4o-mini", input_tokens=100, max_tokens=100,
                       request_id=f"req-{n}")


TS = NOW_MS + 125_000  # within the day, the hour and a minute that NOW_MS does not start


def _usage(n: int, cost: int, ts: int = TS) -> UsageEvent:
    return UsageEvent(ts_ms=ts, request_id=f"req-{n}", provider="openai", model="gpt-4o-mini", team="ml",
                      principal="alice", input_tokens=100, output_tokens=10 + n, cost_nanos=cost,
                      cost_source="provider")


async def test_settlements_in_batches_fold_into_every_rollup_and_close_their_holds(engine: Engine) -> None:
    """Twenty calls held and settled concurrently (so in shared batches): the rollups of every
    size sum what the raw events sum, a repeated settlement's event is not folded twice, no
    hold is left and the hold journal nets to nothing."""
    policy = await engine.add_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="10"))
    calls = [_call(n) for n in range(20)]
    holds = await asyncio.gather(*(engine.authorize(c) for c in calls))
    assert all(h.allowed and h.hold_id for h in holds)
    worst = holds[0].cost.usd
    assert engine.budgets.held(policy.id) == 20 * worst
    costs = [1_000 * (n + 1) for n in range(20)]
    await asyncio.gather(*(engine.settle(h.hold_id or "", _usage(n, costs[n])) for n, h in enumerate(holds)))
    duplicate = await engine.record(_usage(3, costs[3]))  # the same request id again: a duplicate
    assert duplicate.duplicate
    assert await engine.open_holds() == 0 and engine.budgets.held(policy.id) == 0
    day = TS - TS % DAY_MS
    hour = TS - TS % 3_600_000
    for start, end in ((day, day + DAY_MS), (hour, hour + 2 * 3_600_000), (TS - TS % 60_000, TS + 1)):
        totals = await engine.totals(start, end)  # from the coarsest rollups covering the range
        assert (totals.cost_nanos, totals.requests, totals.output_tokens) == (sum(costs), 20,
                                                                              sum(10 + n for n in range(20)))
    status = {o.policy.id: o for o in await engine.policy_status()}
    assert (status[policy.id].consumed, status[policy.id].held) == (sum(costs), 0)
    journal = await engine.store.transact(lambda tx: tx.journal_since(0))
    assert {row.policy_id for row in journal} == {policy.id} and len(journal) == 40
    assert sum(row.delta for row in journal) == 0 and sorted(row.delta for row in journal)[-1] == worst
    assert [row.id for row in journal] == sorted({row.id for row in journal})


async def test_a_failing_operation_is_undone_alone_in_its_batch(engine: Engine) -> None:
    """Three operations in one batch, the middle one failing after it wrote: its write is
    undone, the others' are committed."""
    def op(n: int, fail: bool, tx: LedgerTx) -> int:
        tx.record_decision(NOW_MS, f"req-{n}", "pol_x", "would_block", "shadow")
        if fail:
            raise ValueError(f"operation {n} fails")
        return n

    results = await asyncio.gather(*(engine.store.transact(lambda tx, n=n: op(n, n == 1, tx)) for n in range(3)),
                                   return_exceptions=True)
    assert results[0] == 0 and results[2] == 2 and isinstance(results[1], ValueError)
    decisions = await engine.store.transact(lambda tx: tx.decisions(10))
    assert sorted(d.request_id for d in decisions) == ["req-0", "req-2"]  # once each


async def test_a_failing_operation_is_run_once(engine: Engine) -> None:
    """On PostgreSQL a batch runs without savepoints and again with them if an operation fails:
    the failed one is not run again (what it did outside the transaction, it does once), the
    others give the results of the run that is committed."""
    runs: list[int] = []

    def op(n: int, tx: LedgerTx) -> int:
        runs.append(n)
        tx.record_decision(NOW_MS, f"req-{n}", "pol_x", "would_block", "shadow")
        if n in (1, 3):
            raise ValueError(f"operation {n} fails")
        return n * 10

    results = await asyncio.gather(*(engine.store.transact(lambda tx, n=n: op(n, tx)) for n in range(5)),
                                   return_exceptions=True)
    assert [r if isinstance(r, int) else str(r) for r in results] == [
        0, "operation 1 fails", 20, "operation 3 fails", 40]
    assert runs.count(1) == 1 and runs.count(3) == 1
    decisions = await engine.store.transact(lambda tx: tx.decisions(10))
    assert sorted(d.request_id for d in decisions) == ["req-0", "req-2", "req-4"]


@pytest.mark.parametrize("ledger_at", ["postgresql"], indirect=True)
async def test_a_batch_of_calls_takes_the_same_round_trips_whatever_its_size_on_postgresql(engine: Engine) -> None:
    """Pipelined (PgConnection.queue): a batch of n holds is four round trips to the server
    (BEGIN, the write lock, the n holds together, COMMIT), and so is a batch of n settlements
    (each settlement's event and its hold's closing one statement), for n = 1, 2, 8 or 32; and
    the ledger is exact after it."""
    heard = asyncio.Event()
    engine.on_change(lambda kind: heard.set())
    policy = await engine.add_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="10"))
    # The engine hears of its own change too (LISTEN/NOTIFY) and reads its policies again at
    # the next batch: heard before the warm-up, not in the middle of what is counted.
    await asyncio.wait_for(heard.wait(), 10)
    await engine.settle((await engine.authorize(_call(999))).hold_id or "", _usage(999, 1))  # series, expiry: made
    conn = engine.store._writer.conn
    settled = 1
    for n in (1, 2, 8, 32):
        calls = [_call(1000 * n + i) for i in range(n)]
        before = conn.round_trips
        holds = await asyncio.gather(*(engine.authorize(c) for c in calls))
        assert all(h.allowed for h in holds) and conn.round_trips - before == 4
        before = conn.round_trips
        await asyncio.gather(*(engine.settle(h.hold_id or "", _usage(1000 * n + i, 1_000))
                               for i, h in enumerate(holds)))
        assert conn.round_trips - before == 4
        settled += 1_000 * n
    assert await engine.open_holds() == 0 and await engine.event_count() == 44
    status = {o.policy.id: o for o in await engine.policy_status()}
    assert (status[policy.id].consumed, status[policy.id].held) == (settled, 0)
    assert engine.budgets.held(policy.id) == 0


@pytest.mark.parametrize("ledger_at", ["postgresql"], indirect=True)
async def test_a_pipelined_batch_that_meets_the_unforeseen_is_run_again_exactly(engine: Engine,
                                                                                 clock: FrozenClock) -> None:
    """A batch sent ahead foretells its results: a settlement's event is new, a hold this
    process opened is still open. Here one settlement's event is already in the ledger and
    another process released one hold meanwhile: the batch is run again a statement at a time,
    and each settlement meets its own outcome (a duplicate; a hold already released, refused
    and its event undone with it), the others are settled, and what the budget book holds and has
    consumed is what the ledger says."""
    from engine.engine import Engine as Other

    policy = await engine.add_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="10"))
    holds = await asyncio.gather(*(engine.authorize(_call(i)) for i in range(6)))
    await engine.record(_usage(2, 5_000))  # call 2's event, already recorded (a replay, say)
    async with await Other.open(engine.location, clock=clock) as other:
        await other.release(holds[4].hold_id or "")
    results = await asyncio.gather(*(engine.settle(h.hold_id or "", _usage(i, 1_000)) for i, h in enumerate(holds)),
                                   return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["RecordResult"] * 4 + ["HoldError", "RecordResult"], results
    assert [r.duplicate for r in results if not isinstance(r, BaseException)] == [False, False, True, False, False]
    assert await engine.open_holds() == 0 and engine.budgets.held(policy.id) == 0
    status = {o.policy.id: o for o in await engine.policy_status()}
    assert status[policy.id].consumed == 4 * 1_000 + 5_000  # call 4's usage is not posted: its hold was released
    journal = await engine.store.transact(lambda tx: tx.journal_since(0))
    assert sum(row.delta for row in journal) == 0


def _decision(request_id: str) -> Recorded:
    return Recorded(NOW_MS, request_id, "alice", "suggest", "gpt-4o", "gpt-4o-mini", "gpt-4o", 0.5, 100, 10, "cheaper")


async def test_a_routing_decision_is_written_with_its_operation_or_not_at_all(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A routed call's decision row rides with the call's hold (on PostgreSQL, a part of the
    hold's own statement: no round trip of its own); an operation that writes nothing after it
    still writes it; an operation that fails after it leaves no row."""
    def routed(n: int, tx: LedgerTx) -> int:
        tx.routing.record([_decision(f"req-{n}")])
        if n in (0, 2):  # the second one fails in the database (hold_0 is taken): its transaction aborts
            tx.open_hold("hold_0", f"req-{n}", NOW_MS, NOW_MS + 60_000, "{}", [("pol_x", 5)])
        return n

    results = await asyncio.gather(*(engine.store.transact(lambda tx, n=n: routed(n, tx)) for n in range(3)),
                                   return_exceptions=True)
    assert results[:2] == [0, 1] and isinstance(results[2], Exception), results
    kept = await engine.store.transact(lambda tx: tx.routing.newest(10))
    assert sorted(d.request_id for d in kept) == ["req-0", "req-1"]
    alone = await engine.store.transact(lambda tx: routed(1, tx))  # a batch of one: flushed before its commit
    assert alone == 1 and len(await engine.store.transact(lambda tx: tx.routing.newest(10))) == 3
    if "postgresql" not in engine.location:
        return
    from engine.ledger.pg.conn import PgConnection

    sent: list[str] = []
    execute = PgConnection.execute

    def counted(self: PgConnection, sql: str, parameters: Any = (), /) -> Any:
        sent.append(sql)
        return execute(self, sql, parameters)

    monkeypatch.setattr(PgConnection, "execute", counted)
    await engine.store.transact(lambda tx: tx.open_hold("hold_a", "req-a", NOW_MS, NOW_MS + 60_000, "{}",
                                                        [("pol_x", 5)]))
    plain = len(sent)
    sent.clear()
    await engine.store.transact(lambda tx: (tx.routing.record([_decision("req-b")]),
                                            tx.open_hold("hold_b", "req-b", NOW_MS, NOW_MS + 60_000, "{}",
                                                         [("pol_x", 5)])))
    assert len(sent) == plain, sent  # the decision went with the hold
    assert "req-b" in {d.request_id for d in await engine.store.transact(lambda tx: tx.routing.newest(10))}
    # In a pipelined batch (several operations) too: five routed holds are four round trips.
    conn = engine.store._writer.conn
    before = conn.round_trips
    await asyncio.gather(*(engine.store.transact(
        lambda tx, n=n: (tx.routing.record([_decision(f"req-c{n}")]),
                         tx.open_hold(f"hold_c{n}", f"req-c{n}", NOW_MS, NOW_MS + 60_000, "{}", [("pol_x", 5)])))
        for n in range(5)))
    assert conn.round_trips - before == 4
    kept = {d.request_id for d in await engine.store.transact(lambda tx: tx.routing.newest(20))}
    assert {f"req-c{n}" for n in range(5)} <= kept


@pytest.mark.parametrize("ledger_at", ["postgresql"], indirect=True)
async def test_a_batch_whose_next_is_waiting_begins_it_with_its_commit(engine: Engine) -> None:
    """Under load the writer's next batch is waiting when one commits: COMMIT AND CHAIN begins
    its transaction in the same round trip, so the next batch sends no BEGIN (three round trips:
    the write lock, its writes, COMMIT); the last batch, with nothing waiting, commits plainly
    and leaves no transaction open. Both batches' writes are in the ledger."""
    import threading

    conn = engine.store._writer.conn
    started, gate = threading.Event(), threading.Event()

    def slow(tx: LedgerTx) -> None:  # the first batch, held on the writer's thread until the next waits
        started.set()
        gate.wait(30)
        tx.open_hold("hold_slow", "req-slow", NOW_MS, NOW_MS + 60_000, "{}", [("pol_x", 5)])

    first = asyncio.ensure_future(engine.store.transact(slow))
    assert await asyncio.to_thread(started.wait, 30)
    waiting = [asyncio.ensure_future(engine.store.transact(
        lambda tx, n=n: tx.open_hold(f"hold_{n}", f"req-{n}", NOW_MS, NOW_MS + 60_000, "{}", [("pol_x", 5)])))
        for n in range(3)]
    await asyncio.sleep(0)  # they are queued for the next batch
    sent = conn.round_trips
    gate.set()
    await first
    await asyncio.gather(*waiting)
    # the first: its hold, COMMIT AND CHAIN; the next: the lock, its three holds together, COMMIT
    assert conn.round_trips - sent == 5
    assert not conn.in_transaction and await engine.open_holds() == 4
