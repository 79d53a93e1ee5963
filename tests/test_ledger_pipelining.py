"""A second look at the pipelined batch on PostgreSQL (PgConnection.queue): the budget book's
counters and watermarks stay exact whatever a batch mixes, on both ledgers (conftest's
``engine`` runs each test on SQLite too, where nothing is pipelined and the same must hold)."""

from __future__ import annotations

import asyncio

import pytest

from engine.budgets import build_policy
from engine.clock import FrozenClock
from engine.engine import CallRequest, Engine
from engine.models import UsageEvent
from tests.conftest import NOW_MS

TS = NOW_MS + 125_000


def _call(n: int) -> CallRequest:
    return CallRequest(principal="alice", team="ml", model="gpt-4o-mini", input_tokens=100, max_tokens=100,
                       request_id=f"req-{n}")


def _usage(n: int, cost: int) -> UsageEvent:
    return UsageEvent(ts_ms=TS, request_id=f"req-{n}", provider="openai", model="gpt-4o-mini", team="ml",
                      principal="alice", input_tokens=100, output_tokens=10, cost_nanos=cost,
                      cost_source="provider")


async def _writable(engine: Engine) -> None:
    """Until the engine, refused a write, has found the ledger writable again (its retry)."""
    for _ in range(200):
        if engine.refusing is None:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"still refusing: {engine.refusing}")


async def _consumed(engine: Engine, policy_id: str) -> tuple[int, int]:
    status = {o.policy.id: o for o in await engine.policy_status()}
    return status[policy_id].consumed, status[policy_id].held


async def test_a_settlement_sent_ahead_then_one_that_is_not_fold_each_event_once(engine: Engine,
                                                                                  clock: FrozenClock) -> None:
    """One batch: first settlements of holds this process opened (sent ahead, their events
    folded before their ids are known), then one of a hold another process opened (not sent
    ahead: its statement sends the queue first, and its event's id is past theirs). Each
    event is folded once: the book's consumption is the ledger's, now and in the next batch."""
    from engine.engine import Engine as Other

    policy = await engine.add_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="10"))
    ours = await asyncio.gather(*(engine.authorize(_call(i)) for i in range(3)))
    async with await Other.open(engine.location, clock=clock) as other:
        theirs = await other.authorize(_call(3))
        assert theirs.hold_id
    results = await asyncio.gather(*(engine.settle(h.hold_id or "", _usage(i, 1_000 * (i + 1)))
                                     for i, h in enumerate([*ours, theirs])))
    assert not any(r.duplicate for r in results)
    assert await engine.open_holds() == 0
    assert await _consumed(engine, policy.id) == (10_000, 0)
    async with await Other.open(engine.location, clock=clock) as fresh:  # the ledger, read anew
        assert await _consumed(fresh, policy.id) == (10_000, 0)
    await engine.settle((await engine.authorize(_call(9))).hold_id or "", _usage(9, 5))  # a later batch
    assert await _consumed(engine, policy.id) == (10_005, 0)


async def test_a_settlement_of_an_expired_hold_after_ones_sent_ahead_folds_each_event_once(
        engine: Engine, clock: FrozenClock) -> None:
    """One process alone: a hold it expired is settled late (its closing not foretold), in the
    batch of settlements it sends ahead, after them, and an event already recorded is settled
    again after them too (a duplicate, not sent ahead either: another process opened its hold).
    The book's consumption stays the ledger's."""
    from engine.engine import Engine as Other

    policy = await engine.add_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="10"))
    engine.budgets.hold_ttl_ms = 60_000
    late = await engine.authorize(_call(0))
    engine.budgets.hold_ttl_ms = 3_600_000
    clock.advance(61_000)
    await engine.expire_holds()
    ours = await asyncio.gather(*(engine.authorize(_call(i)) for i in range(1, 4)))
    await engine.record(_usage(5, 700))
    async with await Other.open(engine.location, clock=clock) as other:
        theirs = await other.authorize(_call(5))
    settled = await asyncio.gather(*(engine.settle(h.hold_id or "", _usage(i, 1_000 * (i + 1)))
                                     for i, h in enumerate([late, *ours])),
                                   engine.settle(theirs.hold_id or "", _usage(5, 700)))
    assert [r.duplicate for r in settled] == [False] * 4 + [True]
    assert await engine.open_holds() == 0
    expected = 1_000 * (1 + 2 + 3 + 4) + 700
    assert await _consumed(engine, policy.id) == (expected, 0)
    async with await Other.open(engine.location, clock=clock) as fresh:
        assert await _consumed(fresh, policy.id) == (expected, 0)


@pytest.mark.parametrize("ledger_at", ["postgresql"], indirect=True)
async def test_a_connection_lost_as_a_pipelined_batch_goes_out_refuses_it_whole(
        engine: Engine, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch, postgres_dsn: str) -> None:
    """The server drops the connection just as a batch's queued writes go out (holds, then
    settlements): every operation of the batch is refused (LedgerRefusing, never
    PipelineFailed), nothing of it is in the ledger or in the book, and the next batch, on a new
    connection, is exact."""
    from engine.engine import Engine as Other
    from engine.ledger import LedgerRefusing
    from engine.ledger.pg.conn import PgConnection
    from tests.test_postgres_connection import _terminate

    policy = await engine.add_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="10"))
    send = PgConnection._send_queue
    lost: list[int] = []

    def dropped(self: PgConnection) -> None:
        if not lost:
            lost.append(self.raw.get_server_pid())
            _terminate(postgres_dsn, lost[0])
        send(self)

    monkeypatch.setattr(PgConnection, "_send_queue", dropped)
    refused = await asyncio.gather(*(engine.authorize(_call(i)) for i in range(4)), return_exceptions=True)
    assert lost and all(isinstance(r, LedgerRefusing) for r in refused), refused
    assert await engine.open_holds() == 0
    await _writable(engine)
    holds = await asyncio.gather(*(engine.authorize(_call(i)) for i in range(4)))
    lost.clear()
    refused = await asyncio.gather(*(engine.settle(h.hold_id or "", _usage(i, 1_000)) for i, h in enumerate(holds)),
                                   return_exceptions=True)
    assert lost and all(isinstance(r, LedgerRefusing) for r in refused), refused
    assert await engine.event_count() == 0 and await engine.open_holds() == 4
    worst = holds[0].cost.usd
    assert await _consumed(engine, policy.id) == (0, 4 * worst)
    await _writable(engine)
    results = await asyncio.gather(*(engine.settle(h.hold_id or "", _usage(i, 1_000)) for i, h in enumerate(holds)))
    assert not any(r.duplicate for r in results)
    assert await engine.open_holds() == 0 and await _consumed(engine, policy.id) == (4_000, 0)
    async with await Other.open(engine.location, clock=clock) as fresh:
        assert await _consumed(fresh, policy.id) == (4_000, 0)


@pytest.mark.parametrize("ledger_at", ["postgresql"], indirect=True)
async def test_routing_decisions_carried_by_an_operation_the_pipeline_fails_in_are_written_once(
        engine: Engine) -> None:
    """Routing decisions carried by an operation (``CatalogService.carry``) are put back for a
    later one if the operation fails. In a pipelined batch an operation can fail only because
    another's write sent ahead came back unforeseen (PipelineFailed, raised where the queue goes
    out): then every operation is run again, the carrier too, and its decisions are written by
    it. They must not be written a second time by the later operation they were put back for."""
    from engine.routing import Recorded

    await engine.add_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="10"))
    hold = await engine.authorize(_call(0))
    await engine.record(_usage(0, 1_000))  # the settlement's event is in the ledger already: not as foretold
    catalog = engine.services.catalog
    decisions = [Recorded(NOW_MS, f"routed-{n}", "alice", "suggest", "gpt-4o", "gpt-4o-mini", "gpt-4o", 0.5,
                          100, 10, "cheaper") for n in range(2)]

    async def carrier() -> None:
        catalog._decision_rows = list(decisions)  # two rows: written at once, which sends the queue first
        await engine.core.tx(lambda tx: None, sync=False)

    settled, _ = await asyncio.gather(engine.settle(hold.hold_id or "", _usage(0, 1_000)), carrier())
    assert settled.duplicate
    await asyncio.sleep(0.2)  # a put-back decision's own write (DECISION_WAIT_S)
    await catalog._decisions_written()
    kept = [d.request_id for d in await engine.store.transact(lambda tx: tx.routing.newest(20))]
    assert sorted(kept) == ["routed-0", "routed-1"], kept


async def test_two_processes_mixing_holds_settlements_releases_and_expiries_keep_exact_books(
        engine: Engine, clock: FrozenClock) -> None:
    """Two processes on one ledger, each batch mixing holds, settlements of its own holds and
    of the other's, releases, a duplicate and an expiry: after every round each book's
    consumption and holds are what a book read anew from the ledger says. (The duplicate is
    in the other process's batch: one not as foretold runs the batch again unpipelined.)"""
    from engine.engine import Engine as Other

    policy = await engine.add_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="100"))
    async with await Other.open(engine.location, clock=clock) as other, \
            await Other.open(engine.location, clock=clock) as reader:
        async def exact() -> None:
            reader.budgets.forget()  # read anew, from the ledger alone
            truth = await _consumed(reader, policy.id)
            assert await _consumed(engine, policy.id) == truth
            assert await _consumed(other, policy.id) == truth

        a = list(await asyncio.gather(*(engine.authorize(_call(i)) for i in range(6))))
        b = list(await asyncio.gather(*(other.authorize(_call(10 + i)) for i in range(6))))
        await exact()
        for round_ in range(3):
            base = 100 * (round_ + 1)
            await engine.record(_usage(base + 99, 7))  # a later settlement of this request is a duplicate
            done = await asyncio.gather(
                engine.authorize(_call(base)),
                engine.settle(a[0].hold_id or "", _usage(base + 1, 1_000)),
                engine.settle(b[0].hold_id or "", _usage(base + 2, 2_000)),
                engine.release(a[1].hold_id or ""),
                engine.settle(a[2].hold_id or "", _usage(base + 7, 5_000)),
                engine.authorize(_call(base + 3)),
                return_exceptions=True)
            assert not any(isinstance(r, BaseException) for r in done), done
            done = await asyncio.gather(
                other.settle(b[3].hold_id or "", _usage(base + 99, 7)),
                other.settle(a[3].hold_id or "", _usage(base + 4, 3_000)),
                other.authorize(_call(base + 5)),
                other.settle(b[1].hold_id or "", _usage(base + 6, 4_000)),
                other.release(b[2].hold_id or ""),
                return_exceptions=True)
            assert not any(isinstance(r, BaseException) for r in done), done
            await exact()
            clock.advance(engine.budgets.hold_ttl_ms + 1)  # what is left open expires, in the next batch
            a = list(await asyncio.gather(*(engine.authorize(_call(base + 20 + i)) for i in range(6))))
            b = list(await asyncio.gather(*(other.authorize(_call(base + 30 + i)) for i in range(6))))
            await exact()


@pytest.mark.parametrize("ledger_at", ["postgresql"], indirect=True)
async def test_a_connection_lost_as_an_operation_sends_the_queue_refuses_that_operation_alone(
        engine: Engine, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch, postgres_dsn: str) -> None:
    """The queue goes out first within an operation (a settlement not sent ahead: another
    process's hold), and the connection is lost then: that operation is refused
    (LedgerRefusing), the batch is run again on a new connection without it, the others'
    settlements are committed and reported so, and the books are exact."""
    from engine.engine import Engine as Other
    from engine.ledger import LedgerRefusing
    from engine.ledger.pg.conn import PgConnection
    from tests.test_postgres_connection import _terminate

    policy = await engine.add_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="10"))
    ours = await asyncio.gather(*(engine.authorize(_call(i)) for i in range(3)))
    async with await Other.open(engine.location, clock=clock) as other:
        theirs = await other.authorize(_call(3))
    send = PgConnection._send_queue
    lost: list[int] = []

    def dropped(self: PgConnection) -> None:
        if not lost:  # the first time: within the last operation (the others only queued)
            lost.append(self.raw.get_server_pid())
            _terminate(postgres_dsn, lost[0])
        send(self)

    monkeypatch.setattr(PgConnection, "_send_queue", dropped)
    results = await asyncio.gather(*(engine.settle(h.hold_id or "", _usage(i, 1_000 * (i + 1)))
                                     for i, h in enumerate([*ours, theirs])), return_exceptions=True)
    assert lost
    assert [type(r).__name__ for r in results] == ["RecordResult"] * 3 + ["LedgerRefusing"], results
    assert isinstance(results[3], LedgerRefusing)
    assert await engine.event_count() == 3 and await engine.open_holds() == 1
    async with await Other.open(engine.location, clock=clock) as fresh:
        truth = await _consumed(fresh, policy.id)
    assert truth[0] == 6_000 and await _consumed(engine, policy.id) == truth


async def test_granted_holds_in_pipelined_batches_keep_the_grant_and_the_books_exact(
        engine: Engine, clock: FrozenClock) -> None:
    """A batch mixing settlements sent ahead (holds of a plain policy) with holds taken from an
    approved grant (never sent ahead: their closing gives back to the grant), settled, released
    and opened: the grant's use is exact and so is every book."""
    from engine.engine import Engine as Other
    from tests.test_approvals import _call as strict_call
    from tests.test_approvals import _settled, _strict

    strict = await _strict(engine)
    plain = await engine.add_policy(build_policy(scope="team:ops", metric="usd", window="day", hard="10"))
    request_id = (await engine.authorize(strict_call())).override_request_id or ""
    engine.actor = "olga"
    worst = engine.worst_case(strict_call()).usd
    await engine.approve(request_id, amount=10 * worst, duration_ms=3_600_000)

    def ops_call(n: int) -> CallRequest:
        return CallRequest(principal="carol", team="ops", model="gpt-4o", provider="openai", input_tokens=1000,
                           max_tokens=1000, request_id=f"ops-{n}")

    def ops_usage(n: int, cost: int) -> UsageEvent:
        return UsageEvent(ts_ms=NOW_MS, request_id=f"ops-{n}", provider="openai", model="gpt-4o", team="ops",
                          principal="carol", input_tokens=500, output_tokens=100, cost_nanos=cost,
                          cost_source="provider")

    plain_holds = await asyncio.gather(*(engine.authorize(ops_call(n)) for n in range(3)))
    granted = await asyncio.gather(*(engine.authorize(strict_call(n=n)) for n in range(1, 4)))
    assert all(g.allowed and g.grant_id == request_id for g in granted)
    done = await asyncio.gather(
        engine.settle(plain_holds[0].hold_id or "", ops_usage(0, 1_000)),
        engine.settle(granted[0].hold_id or "", _settled("call-alice-1", worst)),
        engine.authorize(ops_call(3)),
        engine.settle(plain_holds[1].hold_id or "", ops_usage(1, 2_000)),
        engine.release(granted[1].hold_id or ""),
        engine.settle(granted[2].hold_id or "", _settled("call-alice-3", worst // 2)),
        engine.settle(plain_holds[2].hold_id or "", ops_usage(2, 3_000)),
        return_exceptions=True)
    assert not any(isinstance(r, BaseException) for r in done), done
    assert (await engine.override_request(request_id)).grant_used == worst + worst // 2
    async with await Other.open(engine.location, clock=clock) as fresh:
        for policy_id in (strict, plain.id):
            assert await _consumed(engine, policy_id) == await _consumed(fresh, policy_id)
    assert (await _consumed(engine, plain.id))[0] == 6_000


async def test_two_closings_of_one_hold_in_a_batch_meet_in_the_order_they_were_asked(engine: Engine) -> None:
    """The first closing of a hold this process opened is sent ahead; a second closing of it in
    the same batch is not (its lines are no longer foretold), so it goes out after the first and
    meets it: released then settled, the settlement is refused and its event not posted;
    settled then released, the release is refused. The books stay exact."""
    from engine.book import HoldError
    from engine.engine import Engine as Other

    policy = await engine.add_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="10"))
    first, second, bystander = await asyncio.gather(*(engine.authorize(_call(i)) for i in range(3)))
    results = await asyncio.gather(
        engine.release(first.hold_id or ""),
        engine.settle(first.hold_id or "", _usage(0, 1_000)),
        engine.settle(second.hold_id or "", _usage(1, 2_000)),
        engine.release(second.hold_id or ""),
        engine.settle(bystander.hold_id or "", _usage(2, 4_000)),
        return_exceptions=True)
    assert results[0] is None and results[3].__class__ is HoldError and results[1].__class__ is HoldError, results
    assert "released" in str(results[1]) and "settled" in str(results[3])
    assert await engine.event_count() == 2 and await engine.open_holds() == 0
    assert await _consumed(engine, policy.id) == (6_000, 0)
    async with await Other.open(engine.location, clock=engine.clock) as fresh:
        assert await _consumed(fresh, policy.id) == (6_000, 0)


async def test_a_refused_settlement_that_made_a_series_leaves_no_stale_series_id(
        engine: Engine, clock: FrozenClock) -> None:
    """A settlement whose event is the first of its series makes the series, then is refused
    (its hold was released by another process) and undone to its savepoint, the series with it.
    A later settlement of the same series, in the same batch and after it, must make the series
    again, not take the undone one's id (a foreign key error reaching the caller, and the id
    kept for every later event of the series). On PostgreSQL the batch first runs pipelined and
    fails as not foretold (the hold is not open), then runs again with savepoints: there the
    refused settlement fails for the first time."""
    from engine.book import HoldError
    from engine.engine import Engine as Other

    policy = await engine.add_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="10"))
    released, kept = await asyncio.gather(*(engine.authorize(_call(i)) for i in range(2)))
    async with await Other.open(engine.location, clock=clock) as other:
        await other.release(released.hold_id or "")

    def new_series(n: int, cost: int) -> UsageEvent:
        return UsageEvent(ts_ms=TS, request_id=f"req-{n}", provider="openai", model="gpt-4o-mini", team="ml",
                          principal="dave", input_tokens=100, output_tokens=10, cost_nanos=cost,
                          cost_source="provider")

    results = await asyncio.gather(engine.settle(released.hold_id or "", new_series(0, 1_000)),
                                   engine.settle(kept.hold_id or "", new_series(1, 2_000)),
                                   return_exceptions=True)
    assert isinstance(results[0], HoldError) and not isinstance(results[1], BaseException), results
    later = await engine.authorize(_call(2))
    assert not (await engine.settle(later.hold_id or "", new_series(2, 4_000))).duplicate  # the series as made
    assert await _consumed(engine, policy.id) == (6_000, 0)


async def test_rate_limited_calls_among_settlements_sent_ahead_take_exactly_their_limit(
        engine: Engine, clock: FrozenClock) -> None:
    """A token's request limit read and taken in each call's operation (statements not sent
    ahead, so each sends the queue first), in batches with settlements that are: the limit
    admits exactly its number of calls, and the books stay exact."""
    from engine.engine import Engine as Other
    from engine.ratelimits import Limit

    policy = await engine.add_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="10"))
    limit = [Limit("tok", "requests", 5, 1)]
    first = await asyncio.gather(*(engine.authorize_limited(_call(i), limit) for i in range(3)))
    assert all(decision.allowed and auth is not None for decision, auth in first)
    mixed = await asyncio.gather(
        *(engine.settle(auth.hold_id or "", _usage(i, 1_000)) for i, (_, auth) in enumerate(first) if auth),
        *(engine.authorize_limited(_call(10 + i), limit) for i in range(4)))
    admitted = [auth for _, auth in mixed[3:]]  # type: ignore[misc]
    assert sum(auth is not None for auth in admitted) == 2
    await asyncio.gather(*(engine.settle(auth.hold_id or "", _usage(10 + i, 500))
                           for i, auth in enumerate(admitted) if auth is not None))
    assert await _consumed(engine, policy.id) == (4_000, 0)
    async with await Other.open(engine.location, clock=clock) as fresh:
        assert await _consumed(fresh, policy.id) == (4_000, 0)
