"""The ledger store: WAL, migrations, append-only events, exact rollups, group commit."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import sys
import threading
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.clock import DAY_MS, HOUR_MS, MINUTE_MS
from engine.ledger import (
    SCHEMA_VERSION,
    SchemaTooNewError,
    SQLiteStore,
    Store,
    StoreError,
    Totals,
    is_dsn,
    range_segments,
)
from engine.ledger import writer as store_module
from engine.models import ROLLUP_DIMENSIONS, FieldError, UsageEvent
from tests.conftest import NOW_MS, event
from tests.sql import guard_error, raw_sql

#: ``await open_store()``: a store on the test's ledger, of each backend in turn (conftest).
OpenStore = Callable[..., Awaitable[Store]]


async def test_ledger_uses_wal_and_records_its_schema_version(db_path: Path) -> None:
    store = await SQLiteStore.open(db_path)
    await store.close()
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


async def test_a_newer_schema_is_refused_with_a_clear_message(db_path: Path) -> None:
    store = await SQLiteStore.open(db_path)
    await store.close()
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 3}")
    conn.commit()
    conn.close()
    with pytest.raises(SchemaTooNewError, match=rf"schema version {SCHEMA_VERSION + 3}, newer than .*upgrade"):
        await SQLiteStore.open(db_path)


async def test_a_foreign_sqlite_file_is_not_taken_for_a_ledger(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE customers (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not a Budgeteer ledger"):
        await SQLiteStore.open(path)


async def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("these are not the pages you are looking for" * 100)
    with pytest.raises(StoreError, match="not a Budgeteer ledger"):
        await SQLiteStore.open(path)


async def test_writing_the_same_request_twice_is_a_duplicate_not_a_double_charge(open_store: OpenStore) -> None:
    store = await open_store()
    first = await store.record(event(1))
    again = await store.record(event(1, cost_nanos=999_999_999))
    assert (first.duplicate, again.duplicate) == (False, True)
    totals = await store.totals(0, NOW_MS + DAY_MS)
    assert totals.requests == 1
    assert totals.cost_nanos == 270_000
    assert await store.event_count() == 1
    await store.close()


async def test_a_repeat_inside_one_batch_is_reported_as_duplicate(open_store: OpenStore) -> None:
    store = await open_store()
    results = await store.record_many([event(1), event(2), event(1)])
    assert [r.duplicate for r in results] == [False, False, True]
    assert (await store.totals(0, NOW_MS + DAY_MS)).requests == 2
    await store.close()


async def test_usage_events_are_append_only(open_store: OpenStore, ledger_at: Path | str) -> None:
    store = await open_store()
    await store.record(event(1))
    await store.close()
    with pytest.raises(guard_error(), match="append-only"):
        raw_sql(ledger_at, "UPDATE usage_events SET cost_nanos = 0")
    with pytest.raises(guard_error(), match="append-only"):
        raw_sql(ledger_at, "DELETE FROM usage_events")


async def test_a_batch_with_a_bad_event_writes_nothing(open_store: OpenStore) -> None:
    store = await open_store()
    await store.record(event(0))
    with pytest.raises(ValueError, match="integer nano-dollar cost"):
        await store.record_many([event(1), event(2, cost_nanos=0.5)])
    with pytest.raises(ValueError, match="integer nano-dollar cost"):
        await store.record_many([event(3), event(4, cost_nanos=None)])
    totals = await store.totals(0, NOW_MS + DAY_MS)
    assert (totals.requests, totals.cost_nanos) == (1, 270_000)
    assert await store.event_count() == 1
    await store.close()


async def test_an_atomic_bulk_write_is_all_or_nothing(open_store: OpenStore) -> None:
    store = await open_store()
    events = [event(i) for i in range(10)] + [event(99, cost_nanos=None)]
    with pytest.raises(ValueError):
        await store.bulk_record(events, chunk=3, atomic=True)
    assert await store.event_count() == 0
    assert (await store.totals(0, NOW_MS + DAY_MS)).requests == 0
    # A later write is unaffected by the rolled-back series ids.
    assert (await store.bulk_record([event(i) for i in range(10)], chunk=3, atomic=True)) == (10, 0)
    assert (await store.totals(0, NOW_MS + DAY_MS, {"principal": "alice"})).requests == 10
    await store.close()


async def test_200_concurrent_records_share_transactions_and_survive_reopen(open_store: OpenStore) -> None:
    store = await open_store()
    results = await asyncio.gather(*(store.record(event(i, principal=f"p{i % 7}")) for i in range(200)))
    assert all(not r.duplicate for r in results)
    assert store.commits < 200  # group commit: far fewer transactions than calls
    await store.close()
    reopened = await open_store()
    assert await reopened.event_count() == 200
    totals = await reopened.totals(0, NOW_MS + DAY_MS)
    assert (totals.requests, totals.cost_nanos) == (200, 200 * 270_000)
    await reopened.close()


async def test_record_returns_only_after_commit_visible_to_another_connection(open_store: OpenStore) -> None:
    store, other = await open_store(), await open_store()
    await store.record(event(5))
    assert await other.event_count() == 1


async def _synchronous(store: SQLiteStore) -> int:
    """The writer connection's synchronous setting: 2 FULL (fsync at commit), 1 NORMAL."""
    conn = store._writer.conn
    row = await store._writer.run(lambda: conn.execute("PRAGMA synchronous").fetchone())
    return int(row[0]) if row else -1


async def test_with_a_sync_interval_an_operation_is_committed_at_once_and_fsynced_at_close(db_path: Path) -> None:
    store = await SQLiteStore.open(db_path, sync_interval_s=60)
    results = await asyncio.gather(*(store.transact(lambda tx, i=i: tx.append([event(i)])) for i in range(20)))
    assert len(results) == 20 and await _synchronous(store) == 1  # committed without waiting for the disk
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT count(*) FROM usage_events").fetchone()[0] == 20  # visible: committed
    conn.close()
    assert store.syncs == 0  # the minute has not passed
    await store.close()
    assert store.syncs == 1  # closing does not wait for the interval


async def test_with_a_sync_interval_the_log_is_fsynced_within_it(db_path: Path) -> None:
    store = await SQLiteStore.open(db_path, sync_interval_s=0.05)
    await store.transact(lambda tx: tx.append([event(1)]))
    deadline = asyncio.get_running_loop().time() + 5
    while store.syncs == 0 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    assert store.syncs == 1
    await store.transact(lambda tx: tx.append([event(2)]))  # a later commit gets a sync of its own
    while store.syncs == 1 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    assert store.syncs == 2
    await store.close()
    assert store.syncs == 2  # nothing left to sync


async def test_a_record_after_an_operation_that_needed_no_fsync_is_fsynced(db_path: Path) -> None:
    store = await SQLiteStore.open(db_path)
    await store.transact(lambda tx: None, sync=False)
    assert await _synchronous(store) == 1
    await store.record(event(1))
    assert await _synchronous(store) == 2  # the event's commit waited for the disk
    await store.transact(lambda tx: None, sync=False)
    await store.bulk_record([event(2), event(3)])
    assert await _synchronous(store) == 2
    assert store.syncs == 0  # no interval: every durable commit fsyncs itself
    await store.close()


async def test_an_operation_waits_for_another_process_without_stalling_the_event_loop(db_path: Path) -> None:
    """Small batches run on the event loop when the ledger is free; when another connection
    holds its write lock they wait on the writer's thread, and the loop goes on meanwhile."""
    store = await SQLiteStore.open(db_path)
    locked, release = threading.Event(), threading.Event()

    def other_process() -> None:
        conn = sqlite3.connect(db_path, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait(30)
        conn.execute("COMMIT")
        conn.close()

    holder = threading.Thread(target=other_process)
    holder.start()
    assert await asyncio.to_thread(locked.wait, 10)
    task = asyncio.ensure_future(store.transact(lambda tx: tx.append([event(1)])))
    await asyncio.sleep(0.05)  # returns only if the waiting operation leaves the loop free
    assert not task.done()
    release.set()
    (result,) = await task
    assert not result.duplicate and await store.event_count() == 1
    await asyncio.to_thread(holder.join)
    await store.close()


async def test_a_store_checkpoints_what_it_wrote_when_it_closes_while_others_keep_the_ledger_open(
        db_path: Path) -> None:
    """Short-lived writers (a CLI command) must not leave the log to grow while a dashboard
    keeps the ledger open: closing checkpoints what the store wrote."""
    keeper = await SQLiteStore.open(db_path)
    writer = await SQLiteStore.open(db_path)
    await writer.record_many([event(i) for i in range(10)])
    await writer.close()
    assert writer.checkpoints == 1
    assert await keeper.event_count() == 10
    await keeper.close()


async def test_the_log_is_checkpointed_by_the_reader_as_writes_accumulate(db_path: Path) -> None:
    store = await SQLiteStore.open(db_path)
    for n in range(5):
        await store.record_many([event(n * 1000 + i) for i in range(1000)])
    deadline = asyncio.get_running_loop().time() + 10
    while store.checkpoints == 0 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    assert store.checkpoints >= 1  # while the store is open, not only at close
    await store.close()
    reopened = await SQLiteStore.open(db_path)
    assert await reopened.event_count() == 5000
    await reopened.close()


async def test_the_log_starts_again_from_its_beginning_under_steady_writes(
        db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint copies what was committed when it began, and operations go on meanwhile;
    the log must still be wholly copied now and then, so that it starts again from its
    beginning instead of growing for as long as writes never pause."""
    monkeypatch.setattr(store_module, "CHECKPOINT_EVERY", 100)
    store = await SQLiteStore.open(db_path)
    for i in range(3000):  # some 18,000 frames of log: an operation changes half a dozen pages
        await store.transact(lambda tx, i=i: tx.append([event(i)]))
    other = sqlite3.connect(db_path)
    for _ in range(500):  # until the store's own checkpoint, if one is under way, is done
        busy, frames, _ = other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if not busy:
            break
        await asyncio.sleep(0.01)
    other.close()
    assert store.checkpoints >= 10 and busy == 0
    assert 0 < frames < 3000  # what the last two hundred operations or so wrote, not all of it
    assert await store.event_count() == 3000
    await store.close()


def test_range_segments_cover_exactly_the_minutes_asked() -> None:
    start = NOW_MS - 3 * DAY_MS - 5 * HOUR_MS - 17 * MINUTE_MS
    end = NOW_MS + 2 * HOUR_MS + 3 * MINUTE_MS
    segments = range_segments(start, end)
    assert [s[0] for s in segments] == ["minute", "hour", "day", "hour", "minute"]
    assert segments[0][1] == start and segments[-1][2] == end
    for (_, _, hi), (_, lo, _) in itertools.pairwise(segments):
        assert hi == lo
    sizes = {"minute": MINUTE_MS, "hour": HOUR_MS, "day": DAY_MS}
    for table, lo, hi in segments:
        assert lo % sizes[table] == 0 and hi % sizes[table] == 0
    assert range_segments(NOW_MS, NOW_MS) == []
    assert range_segments(NOW_MS + 1, NOW_MS + 2) == [("minute", NOW_MS, NOW_MS + MINUTE_MS)]


_dims = st.sampled_from(["a", "b", "c"])
_event = st.builds(
    lambda n, ts, ws, team, who, model, inp, out, cost, status: UsageEvent(
        ts_ms=NOW_MS - 3 * DAY_MS + ts, request_id=f"r{n}", provider="openai" if model != "m3" else "anthropic",
        model=model, workspace=ws, team=team, principal=who, input_tokens=inp, output_tokens=out,
        cost_nanos=cost, cost_source="provider", status=status, latency_ms=n % 500),
    st.integers(0, 10**9), st.integers(0, 6 * DAY_MS), _dims, _dims, _dims, st.sampled_from(["m1", "m2", "m3"]),
    st.integers(0, 10**6), st.integers(0, 10**5), st.integers(0, 10**12), st.sampled_from(["ok", "error", "blocked"]),
)


def _raw_totals(events: list[UsageEvent], start: int, end: int, **filters: str) -> Totals:
    t = Totals()
    for e in events:
        if start <= e.ts_ms < end and all(getattr(e, k) == v for k, v in filters.items()):
            t.requests += 1
            t.errors += e.status == "error"
            t.blocked += e.status == "blocked"
            t.input_tokens += e.input_tokens
            t.output_tokens += e.output_tokens
            t.cost_nanos += e.cost_nanos or 0
            t.latency_ms += e.latency_ms
    return t


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=st.lists(_event, min_size=1, max_size=120, unique_by=lambda e: e.request_id),
       cut_a=st.integers(0, 6 * DAY_MS), cut_b=st.integers(0, 6 * DAY_MS))
def test_rollups_always_equal_the_raw_sums(tmp_path_factory: pytest.TempPathFactory, events: list[UsageEvent],
                                           cut_a: int, cut_b: int) -> None:
    path = tmp_path_factory.mktemp("rollups") / "ledger.db"

    async def check() -> None:
        store = await SQLiteStore.open(path)
        half = len(events) // 2
        # Written in two ways: group-committed singles and one batch.
        await asyncio.gather(*(store.record(e) for e in events[:half]))
        await store.record_many(events[half:])
        # Every rollup level, bucket by bucket and series by series, equals the raw events.
        conn = sqlite3.connect(path)
        for table, size in (("minute", MINUTE_MS), ("hour", HOUR_MS), ("day", DAY_MS)):
            expected: dict[tuple[object, ...], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
            for e in events:
                key = (e.ts_ms - e.ts_ms % size, *(getattr(e, d) for d in ROLLUP_DIMENSIONS))
                row = expected[key]
                row[0] += 1
                row[1] += e.input_tokens
                row[2] += e.output_tokens
                row[3] += e.cost_nanos or 0
            got = {
                (r[0], *r[1:7]): list(r[7:])
                for r in conn.execute(
                    f"SELECT r.bucket_ms, s.workspace, s.team, s.principal, s.token_id, s.provider, s.model, "
                    f"r.requests, r.input_tokens, r.output_tokens, r.cost_nanos FROM rollup_{table} r "
                    f"JOIN series s ON s.id = r.series_id")
            }
            assert got == dict(expected), table
        conn.close()
        # The read API (which mixes levels) agrees with the raw sums over any minute-aligned range.
        lo, hi = sorted((cut_a, cut_b))
        start = NOW_MS - 3 * DAY_MS + lo - lo % MINUTE_MS
        end = NOW_MS - 3 * DAY_MS + hi - hi % MINUTE_MS
        assert await store.totals(start, end) == _raw_totals(events, start, end)
        assert await store.totals(start, end, {"team": "a"}) == _raw_totals(events, start, end, team="a")
        rows = await store.breakdown(start, end, "model", limit=10)
        for row in rows:
            assert row.totals == _raw_totals(events, start, end, model=row.key)
        assert sum(r.totals.requests for r in rows) == _raw_totals(events, start, end).requests
        await store.close()

    asyncio.run(check())


async def test_small_batches_and_large_ones_fold_into_identical_rollups(tmp_path: Path) -> None:
    """A few events fold into the rollups from Python, many through SQL: every column of every
    rollup level must come out the same either way (duplicates included, never counted)."""
    events = [UsageEvent(ts_ms=NOW_MS - n * 7_919_000, request_id=f"r{n % 150}", provider="openai",
                         model=("gpt-4o", "gpt-4o-mini")[n % 2], team=("a", "b", "c")[n % 3], principal=f"p{n % 5}",
                         input_tokens=n * 13, cached_input_tokens=n * 3, cache_write_tokens=n % 4,
                         output_tokens=n * 7, reasoning_tokens=n % 11, cost_nanos=n * 1_001,
                         cost_source=("provider", "estimated", "unpriced")[n % 3],
                         status=("ok", "error", "blocked", "ok")[n % 4], latency_ms=n % 900) for n in range(200)]
    small, large = await SQLiteStore.open(tmp_path / "small.db"), await SQLiteStore.open(tmp_path / "large.db")
    for n in range(0, len(events), 3):
        await small.record_many(events[n:n + 3])  # repeats of request ids r0..r49 are duplicates
    await large.bulk_record(events)
    await small.close()
    await large.close()
    for table in ("minute", "hour", "day"):
        rows = []
        for path in (tmp_path / "small.db", tmp_path / "large.db"):
            conn = sqlite3.connect(path)
            rows.append(sorted(conn.execute(
                f"SELECT r.*, s.team, s.principal, s.model FROM rollup_{table} r JOIN series s ON s.id = r.series_id"
            ).fetchall(), key=lambda r: (r[0], *r[-3:])))
            conn.close()
        assert [r[:1] + r[2:] for r in rows[0]] == [r[:1] + r[2:] for r in rows[1]], table
        assert sum(r[2] for r in rows[0]) == 150  # requests: each request id counted once


async def test_timeline_buckets_sum_to_the_totals(open_store: OpenStore) -> None:
    store = await open_store()
    events = [event(i, ts_ms=NOW_MS - DAY_MS + i * 7 * MINUTE_MS, model=("a", "b")[i % 2]) for i in range(200)]
    await store.record_many(events)
    start, end = NOW_MS - DAY_MS, NOW_MS + MINUTE_MS
    hourly = await store.timeline(start, end, HOUR_MS)
    assert sum(p.totals.requests for p in hourly) == 200
    assert all(p.bucket_ms % HOUR_MS == 0 for p in hourly)
    per_model = await store.timeline(start, end, 6 * HOUR_MS, group_by="model")
    assert {p.group for p in per_model} == {"a", "b"}
    assert sum(p.totals.cost_nanos for p in per_model) == 200 * 270_000
    minutes = await store.timeline(NOW_MS - HOUR_MS, end, 5 * MINUTE_MS)
    assert sum(p.totals.requests for p in minutes) == (await store.totals(NOW_MS - HOUR_MS, end)).requests
    await store.close()


async def test_reads_group_and_filter_by_agent_and_session(open_store: OpenStore) -> None:
    """agent and session are columns of raw events only: breakdown, timeline and totals sum the
    events themselves, and agree with the rollup reads they sit beside."""
    store = await open_store()
    events = [event(i, ts_ms=NOW_MS - DAY_MS + i * 7 * MINUTE_MS, agent=("ra", "rb", "")[i % 3],
                    session=f"s{i % 4}", team=("ml", "web")[i % 2]) for i in range(120)]
    await store.record_many(events)
    start, end = NOW_MS - DAY_MS, NOW_MS + MINUTE_MS
    by_agent = await store.breakdown(start, end, "agent", limit=10)
    assert [(r.key, r.totals.requests) for r in by_agent] == [("", 40), ("ra", 40), ("rb", 40)]
    assert sum(r.totals.cost_nanos for r in by_agent) == (await store.totals(start, end)).cost_nanos
    ml_sessions = await store.breakdown(start, end, "session", filters={"team": "ml", "agent": "ra"})
    assert {r.key: r.totals.requests for r in ml_sessions} == {"s0": 10, "s2": 10}  # i = 0, 6, 12...
    assert (await store.totals(start, end, {"agent": "rb"})).requests == 40
    per_model = await store.timeline(start, end, 6 * HOUR_MS, filters={"agent": "ra"}, group_by="model")
    assert sum(p.totals.requests for p in per_model) == 40 and all(p.bucket_ms % (6 * HOUR_MS) == 0 for p in per_model)
    with pytest.raises(FieldError, match=r"by: must be one of .*agent, session"):
        await store.breakdown(start, end, "colour")
    await store.close()


async def test_breakdown_orders_by_the_metric_asked(open_store: OpenStore) -> None:
    store = await open_store()
    await store.record_many([
        event(1, principal="big-spender", cost_nanos=10**10, input_tokens=10, output_tokens=0),
        event(2, principal="chatty", cost_nanos=1, input_tokens=10**6, output_tokens=0),
        event(3, principal="chatty", cost_nanos=1, input_tokens=10**6, output_tokens=0),
    ])
    by_cost = await store.breakdown(0, NOW_MS + DAY_MS, "principal", order="cost")
    by_tokens = await store.breakdown(0, NOW_MS + DAY_MS, "principal", order="tokens")
    assert [r.key for r in by_cost] == ["big-spender", "chatty"]
    assert [r.key for r in by_tokens] == ["chatty", "big-spender"]
    assert (await store.breakdown(0, NOW_MS + DAY_MS, "principal", limit=1))[0].key == "big-spender"
    await store.close()


async def test_reads_name_a_bad_dimension(open_store: OpenStore) -> None:
    from engine.models import FieldError

    store = await open_store()
    with pytest.raises(FieldError, match="by: must be one of"):
        await store.breakdown(0, 1, "colour")
    with pytest.raises(FieldError, match="filter: cannot filter by 'x; DROP TABLE'"):
        await store.totals(0, NOW_MS, {"x; DROP TABLE": "1"})
    await store.close()


async def test_events_read_back_exactly_as_written(open_store: OpenStore) -> None:
    store = await open_store()
    original = event(7, session="s-1", agent="planner", tags={"env": "prod"}, cached_input_tokens=300,
                     reasoning_tokens=50, status="error")
    await store.record(original)
    back = [e async for e in store.iter_events(0, NOW_MS + DAY_MS)]
    assert back == [original]
    await store.close()


async def test_iter_events_pages_through_many_events_in_time_order(open_store: OpenStore) -> None:
    store = await open_store()
    events = [event(i, ts_ms=NOW_MS - (i % 50) * 1000) for i in range(1200)]
    await store.record_many(events)
    seen = [e async for e in store.iter_events(NOW_MS - 30_000, NOW_MS + 1, batch=100)]
    assert len(seen) == sum(1 for e in events if e.ts_ms >= NOW_MS - 30_000)
    assert [e.ts_ms for e in seen] == sorted(e.ts_ms for e in seen)
    assert len({e.request_id for e in seen}) == len(seen)
    await store.close()


async def test_two_processes_writing_one_ledger_lose_nothing(open_store: OpenStore, ledger_at: Path | str,
                                                             tmp_path: Path) -> None:
    store = await open_store()
    await store.close()
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from engine.ledger import open_ledger\n"
        "from engine.models import UsageEvent\n"
        "async def main(tag):\n"
        f"    s = await open_ledger({str(ledger_at)!r}, home=Path({str(tmp_path / 'home')!r}))\n"
        f"    await asyncio.gather(*(s.record(UsageEvent(ts_ms={NOW_MS} + i, request_id=f'{{tag}}-{{i}}', "
        "provider='openai', model='m', principal=tag, cost_nanos=7)) for i in range(300)))\n"
        "    await s.close()\n"
        "asyncio.run(main(sys.argv[1]))\n"
    )
    procs = [await asyncio.create_subprocess_exec(sys.executable, "-c", script, tag) for tag in ("p1", "p2")]
    assert [await p.wait() for p in procs] == [0, 0]
    store = await open_store()
    assert await store.event_count() == 600
    totals = await store.totals(NOW_MS, NOW_MS + MINUTE_MS)
    assert (totals.requests, totals.cost_nanos) == (600, 4200)
    assert [(r.key, r.totals.requests) for r in await store.breakdown(NOW_MS, NOW_MS + MINUTE_MS, "principal")] \
        == [("p1", 300), ("p2", 300)]
    await store.close()


async def test_recent_calls_read_the_ledgers_tail_after_a_cursor(ledger_at: Path | str) -> None:
    """The live Calls screen's read: the newest calls first, only those after the last one it
    holds, a call recorded late with an older time included (a cursor on time would skip it),
    and a search by the primary key from the end, never a scan of a large ledger."""
    from engine.clock import FrozenClock
    from engine.engine import Engine
    from engine.ledger.reads import RECENT_EVENTS_OF_STATUS_SQL, RECENT_EVENTS_SQL
    from engine.models import FieldError

    async with await Engine.open(ledger_at, clock=FrozenClock(NOW_MS)) as engine:
        await engine.record_many([event(i) for i in range(5)])
        first = await engine.recent_calls(limit=3)
        assert [c.event.request_id for c in first] == ["req-4", "req-3", "req-2"]
        assert first[0].id > first[1].id > first[2].id and first[0].event.principal == "alice"
        assert await engine.recent_calls(after=first[0].id) == []
        await engine.record(event(99, ts_ms=NOW_MS - 86_400_000))  # recorded now, a day old
        [late] = await engine.recent_calls(after=first[0].id)
        assert late.event.request_id == "req-99" and late.id > first[0].id
        await engine.record(event(100, status="blocked", cost_nanos=0))
        assert [c.event.request_id for c in await engine.recent_calls(status="blocked")] == ["req-100"]
        assert [c.event.request_id for c in await engine.recent_calls(limit=2, status="ok")] == ["req-99", "req-4"]
        for bad, field in (({"after": -1}, "after"), ({"limit": 0}, "limit"), ({"limit": 10**6}, "limit"),
                           ({"status": "fine"}, "status")):
            with pytest.raises(FieldError) as exc:
                await engine.recent_calls(**bad)  # type: ignore[arg-type]
            assert exc.value.field == field
    if is_dsn(ledger_at):
        return  # the query plan below is SQLite's
    conn = sqlite3.connect(ledger_at)
    for sql, params in ((RECENT_EVENTS_SQL, (0, 10)), (RECENT_EVENTS_OF_STATUS_SQL, (0, "blocked", 10))):
        plan = " ".join(str(r[3]) for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))
        assert "SCAN" not in plan and "USING INTEGER PRIMARY KEY" in plan and "TEMP B-TREE" not in plan, plan
    conn.close()
