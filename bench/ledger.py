"""Ledger benchmark: bulk import, acknowledged group-committed writes, dashboard reads.

Prints its figures; it is not a test. Targets on a 2-core machine (issue 2):
bulk >= 150,000 events/s; acknowledged >= 20,000 events/s with 64 writers; every
dashboard read <= 50 ms on a 1,000,000-event ledger.

    python -m bench.ledger [--events 1000000] [--writers 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from engine.clock import DAY_MS, HOUR_MS, FrozenClock, period_range
from engine.demo import generate_demo
from engine.engine import Engine
from engine.ledger.baseline import bare_insert_rate
from engine.models import UsageEvent

NOW_MS = 1_795_003_200_000


def _events(count: int) -> list[UsageEvent]:
    per_day = count // 30 + 1
    out: list[UsageEvent] = []
    for batch in generate_demo(days=30, seed=11, end_ms=NOW_MS, events_per_day=per_day):
        out.extend(batch)
    return out[:count]


def raw_sqlite_rate(events: list[UsageEvent]) -> float:
    """Plain executemany into a bare table with the same columns: the ceiling for the ledger."""
    return bare_insert_rate([(e.ts_ms, e.request_id, e.workspace, e.team, e.principal, e.model, e.input_tokens,
                              e.output_tokens, 0) for e in events])


async def bench_bulk(path: Path, events: list[UsageEvent]) -> float:
    async with await Engine.open(path, clock=FrozenClock(NOW_MS)) as engine:
        started = time.perf_counter()
        recorded, _ = await engine.bulk_record(events)
        elapsed = time.perf_counter() - started
    assert recorded == len(events)
    return len(events) / elapsed


async def bench_file_import(tmp: Path, events: list[UsageEvent], count: int = 200_000) -> float:
    """``budgeteer import`` of a JSONL file: parsing and validating each line included."""
    from engine.integrations.files import import_events

    path = tmp / "events.jsonl"
    with path.open("w") as handle:
        for e in events[:count]:
            record = {k: v for k, v in e.as_dict().items() if v not in ("", 0, {}, None) or k == "request_id"}
            record.pop("cost_source", None)
            handle.write(json.dumps(record) + "\n")
    async with await Engine.open(tmp / "file-import.db", clock=FrozenClock(NOW_MS)) as engine:
        started = time.perf_counter()
        report = await import_events(engine, path)
        elapsed = time.perf_counter() - started
    assert report.recorded == min(count, len(events)) and not report.errors
    return report.recorded / elapsed


async def bench_acknowledged(path: Path, writers: int, per_writer: int) -> tuple[float, int]:
    async with await Engine.open(path, clock=FrozenClock(NOW_MS)) as engine:
        commits_before = engine.store.commits

        async def writer(w: int) -> None:
            for i in range(per_writer):
                await engine.record(UsageEvent(
                    ts_ms=NOW_MS - 1000, request_id=f"ack-{w}-{i}", provider="openai", model="gpt-4o-mini",
                    workspace="bench", team="load", principal=f"writer-{w}", input_tokens=800,
                    output_tokens=200, latency_ms=300))

        started = time.perf_counter()
        await asyncio.gather(*(writer(w) for w in range(writers)))
        elapsed = time.perf_counter() - started
        commits = engine.store.commits - commits_before
    return writers * per_writer / elapsed, commits


async def bench_reads(path: Path, repeats: int = 25) -> dict[str, tuple[float, float]]:
    async with await Engine.open(path, clock=FrozenClock(NOW_MS)) as engine:
        now = NOW_MS
        reads = {
            "totals (today)": lambda: engine.totals(*period_range("today", now)),
            "totals (this month)": lambda: engine.totals(*period_range("month", now)),
            "totals (30 days)": lambda: engine.totals(now - 30 * DAY_MS, now),
            "timeline (30 days, hourly)": lambda: engine.timeline(now - 30 * DAY_MS, now, HOUR_MS),
            "timeline (30 days, daily by model)": lambda: engine.timeline(
                now - 30 * DAY_MS, now, DAY_MS, group_by="model"),
            "timeline (7 days, hourly by model)": lambda: engine.timeline(
                now - 7 * DAY_MS, now, HOUR_MS, group_by="model"),
            "timeline (24 hours, 15-minute by team)": lambda: engine.timeline(
                now - DAY_MS, now, 15 * 60_000, group_by="team"),
            "top-10 principals (30 days)": lambda: engine.breakdown(now - 30 * DAY_MS, now, "principal", limit=10),
            "top-10 models (24 hours)": lambda: engine.breakdown(now - DAY_MS, now, "model", limit=10),
        }
        results: dict[str, tuple[float, float]] = {}
        for name, read in reads.items():
            await read()  # warm the page cache as a running dashboard would be
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                await read()
                times.append((time.perf_counter() - started) * 1000)
            results[name] = (statistics.median(times), max(times))
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--writers", type=int, default=64)
    parser.add_argument("--per-writer", type=int, default=500)
    args = parser.parse_args()

    print(f"generating {args.events:,} demo events ...", flush=True)
    started = time.perf_counter()
    events = _events(args.events)
    print(f"  generated in {time.perf_counter() - started:.1f} s (not counted)")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        path = Path(tmp) / "bench.db"
        print(f"raw SQLite insert (ceiling):          {raw_sqlite_rate(events):>10,.0f} rows/s")
        bulk = await bench_bulk(path, events)
        print(f"bulk import, {len(events):,} events:     {bulk:>10,.0f} events/s   (target >= 150,000)")
        for e in events[:200_000]:
            e.cost_nanos, e.cost_source = None, "computed"  # priced again by the import
        rate = await bench_file_import(Path(tmp), events)
        print(f"JSONL file import, 200,000 lines:     {rate:>10,.0f} events/s   (no target; parse + validate)")
        del events
        ack, commits = await bench_acknowledged(path, args.writers, args.per_writer)
        total = args.writers * args.per_writer
        print(f"acknowledged record(), {args.writers} writers: {ack:>10,.0f} events/s   (target >= 20,000; "
              f"{total:,} events in {commits:,} commits)")
        print(f"dashboard reads on a {args.events:,}-event ledger (median / max of 25, target <= 50 ms):")
        for name, (median, worst) in (await bench_reads(path)).items():
            print(f"  {name:<40} {median:7.2f} ms / {worst:7.2f} ms")


if __name__ == "__main__":
    asyncio.run(main())
