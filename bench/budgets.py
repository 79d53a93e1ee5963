"""Budget benchmark: the in-memory authorize-plus-settle decision, and backtests.

Prints its figures; it is not a test. Targets on a 2-core machine (issue 3): decision
p50 <= 50 us and p99 <= 250 us with 4 hierarchy levels and 20 applicable policies;
backtest of 1,000,000 events <= 2 s.

    python -m bench.budgets [--events 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from bench.ledger import NOW_MS, _events
from engine.budgets import BudgetBook, CallCost, _Counter, build_policy, window_bounds
from engine.clock import FrozenClock
from engine.engine import Engine


def decision_latency(iterations: int = 20_000) -> tuple[float, float, int]:
    """authorize (evaluate + place the hold in memory) then settle (post usage, free the hold)."""
    clock = FrozenClock(NOW_MS)
    book = BudgetBook(clock.now_ms)
    scopes = ["global", "workspace:acme", "team:ml", "principal:alice"]  # four levels of the hierarchy
    extra = ["provider:openai", "model:gpt-4o", "team:ml+model:gpt-4o"]
    policies = []
    for i in range(20):
        scope = (scopes + extra)[i % 7]
        metric = ("usd", "tokens", "requests")[i % 3]
        window = ("day", "month", "rolling:1h", "hour", "week")[i % 5]
        policies.append(build_policy(scope=scope, metric=metric, window=window, hard="1000000000",
                                     soft="900000000", policy_id=f"p{i}"))
    for p in policies:
        counter = _Counter(p)
        if p.window.calendar:
            counter.start_ms, counter.end_ms = window_bounds(p.window, NOW_MS)
        book._counters[p.id] = counter
    book._stale = False
    context = {"workspace": "acme", "team": "ml", "principal": "alice", "token": "tok1", "provider": "openai",
               "model": "gpt-4o", "session": "", "agent": ""}
    cost = CallCost(usd=2_500_000, tokens=2_000)
    times = []
    applicable = 0
    for _ in range(iterations):
        started = time.perf_counter_ns()
        evaluation = book.evaluate(None, context, cost, NOW_MS)  # type: ignore[arg-type]
        assert evaluation.allowed
        counters = [book._counters[o.policy.id] for o in evaluation.outcomes]
        for c, o in zip(counters, evaluation.outcomes, strict=True):  # hold
            c.held += o.cost
        for c, o in zip(counters, evaluation.outcomes, strict=True):  # settle
            c.held -= o.cost
            c.consumed += c.amount(1_000_000, 1_500, "ok")
        times.append((time.perf_counter_ns() - started) / 1000)
        applicable = len(counters)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99)], applicable


async def backtest_time(events: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        async with await Engine.open(Path(tmp) / "b.db", clock=FrozenClock(NOW_MS), durable=False) as engine:
            await engine.bulk_record(_events(events))
            draft = build_policy(scope="global", metric="usd", window="day", hard="25")
            started = time.perf_counter()
            result = await engine.backtest(draft, 0, NOW_MS + 1)
            elapsed = time.perf_counter() - started
            assert result.calls > 0.99 * events
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    args = parser.parse_args()
    p50, p99, n = decision_latency()
    print(f"authorize + settle decision, {n} policies over 4 levels: p50 {p50:6.1f} us, p99 {p99:6.1f} us "
          f"(targets 50 / 250 us)")
    seconds = await backtest_time(args.events)
    print(f"backtest of a draft policy over {args.events:,} events: {seconds:.2f} s (target <= 2 s)")


if __name__ == "__main__":
    asyncio.run(main())
