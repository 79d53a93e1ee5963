"""Sliding-window rate limits: no double burst at a boundary, all-or-none across limits,
and the numbers response headers need. Every rule holds for the log in one process's memory
(``RateLimiter``) and for the ledger's (``ratelimits.take`` in a ledger transaction), on SQLite
and on PostgreSQL; the ledger's log is shared by every store open on it, and pruned."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import pytest

from engine import ratelimits
from engine.ledger import Store, open_ledger
from engine.ledger.repos.rates import RateWindow
from engine.ratelimits import PAGE, PRUNE_AFTER, Limit, RateDecision, RateLimiter, Refusals

# -- TEMPORARY (branch ratelimit): until branch pgfixture is on main; the lead deletes this line at merge.

# -- end TEMPORARY

T0 = 1_795_003_200_000


class Limiter(Protocol):
    def take(self, limits: Sequence[Limit], now_ms: int) -> RateDecision: ...
    def check(self, limits: Sequence[Limit], now_ms: int) -> RateDecision: ...
    def adjust(self, key: str, kind: str, delta: int, now_ms: int) -> None: ...


class LedgerLimiter:
    """The ledger's log, driven from a test: each take in a transaction of its own."""

    def __init__(self, store: Store, runner: asyncio.Runner) -> None:
        self.store, self.runner = store, runner

    def take(self, limits: Sequence[Limit], now_ms: int) -> RateDecision:
        return self.runner.run(self.store.transact(lambda tx: ratelimits.take(tx, limits, now_ms)))

    def check(self, limits: Sequence[Limit], now_ms: int) -> RateDecision:
        return self.runner.run(self.store.transact(lambda tx: ratelimits.check(tx, limits, now_ms)))

    def adjust(self, key: str, kind: str, delta: int, now_ms: int) -> None:
        self.runner.run(self.store.transact(lambda tx: ratelimits.adjust(tx, key, kind, delta, now_ms)))

    def window(self, key: str, kind: str, now_ms: int) -> RateWindow:
        return self.runner.run(self.store.transact(lambda tx: tx.rates.window(key, kind, now_ms - 60_000)))

    def rows(self, key: str, kind: str) -> int:
        """Rows of (key, kind) in the log, in the window or not (pruned ones are gone)."""
        return len(self.runner.run(self.store.transact(lambda tx: tx.rates.entries(key, kind, 0, 0, 1_000_000))))


def _location(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a ledger is: an SQLite file, or a fresh PostgreSQL database."""
    if backend == "postgresql":
        return str(request.getfixturevalue("postgres_dsn"))
    return str(tmp_path / "ledger.db")


@contextmanager
def _two_stores(location: str, home: Path) -> Iterator[tuple[LedgerLimiter, LedgerLimiter]]:
    with asyncio.Runner() as runner:
        opened = [runner.run(open_ledger(location, home=home)) for _ in range(2)]
        try:
            yield LedgerLimiter(opened[0], runner), LedgerLimiter(opened[1], runner)
        finally:
            for store in opened:
                runner.run(store.close())


@pytest.fixture(params=["sqlite", "postgresql"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[LedgerLimiter, LedgerLimiter]]:
    """Two stores open on one ledger (two gateways, as the ledger sees them)."""
    with _two_stores(_location(request.param, request, tmp_path), tmp_path / "home") as both:
        yield both


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def limiter(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Limiter]:
    """The log in memory, or in a ledger of either backend."""
    if request.param == "memory":
        yield RateLimiter()
        return
    with _two_stores(_location(request.param, request, tmp_path), tmp_path / "home") as (store, _):
        yield store


def rpm(key: str, limit: int) -> Limit:
    return Limit(key, "requests", limit, 1)


def test_a_burst_at_the_boundary_of_a_minute_gets_no_second_allowance(limiter: Limiter) -> None:
    # 10 requests at 00:59.9 of one minute...
    assert all(limiter.take([rpm("tok", 10)], T0 + 59_900).allowed for _ in range(10))
    # ...and none at 01:00.1 of the next: a fixed window would allow ten more here.
    refused = limiter.take([rpm("tok", 10)], T0 + 60_100)
    assert not refused.allowed
    assert refused.retry_after_ms == 59_800  # when the first of the ten leaves the window
    assert limiter.take([rpm("tok", 10)], T0 + 119_900).allowed  # exactly one window later


def test_exactly_the_limit_passes_within_any_sixty_seconds(limiter: Limiter) -> None:
    allowed = [limiter.take([rpm("tok", 5)], T0 + i * 10_000).allowed for i in range(12)]
    # at t = 0, 10, 20, 30, 40 s: allowed; 50 s: the sixth in a minute, refused; 60 s: the first has left
    assert allowed == [True] * 5 + [False] + [True] * 5 + [False]


def test_tokens_and_requests_are_taken_together_or_not_at_all(limiter: Limiter) -> None:
    both = [rpm("tok", 100), Limit("tok", "tokens", 1000, 800)]
    assert limiter.take(both, T0).allowed
    second = limiter.take([rpm("tok", 100), Limit("tok", "tokens", 1000, 300)], T0 + 1)
    assert not second.allowed and second.limit is not None and second.limit.kind == "tokens"
    assert limiter.check([rpm("tok", 1)], T0 + 2).allowed is False  # one request was taken, not two


def test_remaining_reset_and_headers(limiter: Limiter) -> None:
    limiter.take([rpm("p", 3)], T0)
    verdict = limiter.take([rpm("p", 3)], T0 + 15_000)
    assert verdict.allowed and verdict.remaining == 1 and verdict.reset_ms == 45_000
    assert verdict.headers["x-ratelimit-remaining-requests"] == "1"
    limiter.take([rpm("p", 3)], T0 + 16_000)
    refused = limiter.take([rpm("p", 3)], T0 + 20_000)
    assert refused.headers["retry-after"] == "40"
    assert refused.headers["x-ratelimit-limit-requests"] == "3"


def test_a_request_larger_than_the_limit_can_never_fit(limiter: Limiter) -> None:
    refused = limiter.take([Limit("k", "tokens", 100, 101)], T0)
    assert not refused.allowed and refused.retry_after_ms is None
    assert "retry-after" not in refused.headers


def test_keys_are_independent_and_estimates_can_be_corrected(limiter: Limiter) -> None:
    assert limiter.take([Limit("a", "tokens", 100, 100)], T0).allowed
    assert limiter.take([Limit("b", "tokens", 100, 100)], T0).allowed
    assert not limiter.check([Limit("a", "tokens", 100, 50)], T0 + 1).allowed
    limiter.adjust("a", "tokens", -60, T0 + 1)  # the call used 40 of the 100 estimated
    assert limiter.check([Limit("a", "tokens", 100, 50)], T0 + 2).allowed


# ---- the ledger's log: shared by every store on the ledger, pruned, the same verdicts as in memory


def test_two_stores_on_one_ledger_share_one_window(stores: tuple[LedgerLimiter, LedgerLimiter]) -> None:
    first, second = stores
    allowed = [(first if i % 2 else second).take([rpm("tok", 10)], T0 + i).allowed for i in range(30)]
    assert allowed == [True] * 10 + [False] * 20  # ten in all, not ten each
    refused = first.take([rpm("tok", 10)], T0 + 1_000)
    assert refused.retry_after_ms == 59_000 and refused.remaining == 0  # the first of the ten, taken by the other


def test_concurrent_takes_from_two_stores_never_pass_the_limit(stores: tuple[LedgerLimiter, LedgerLimiter]) -> None:
    first, second = stores

    async def flood() -> list[RateDecision]:
        takes = [s.store.transact(lambda tx: ratelimits.take(tx, [rpm("tok", 25), Limit("tok", "tokens", 10**6, 7)],
                                                             T0))
                 for _ in range(60) for s in (first, second)]
        return list(await asyncio.gather(*takes))

    decisions = first.runner.run(flood())
    assert sum(d.allowed for d in decisions) == 25
    assert first.window("tok", "requests", T0) == RateWindow(25, T0, 0)
    assert first.window("tok", "tokens", T0).total == 25 * 7  # the refused took nothing, of either limit


def test_the_ledger_decides_as_the_memory_does(stores: tuple[LedgerLimiter, LedgerLimiter]) -> None:
    """A random run of takes, corrections and time, on two stores and in memory: the same
    verdicts, remaining, resets and retry times, through many prunes of the log."""
    import random

    rng = random.Random(20)
    memory, ledgers = RateLimiter(), stores
    now = T0
    for step in range(500):
        now += rng.choice((0, 1, 250, 900, 2_500, 7_000))
        key = rng.choice(("a", "b"))
        if rng.random() < 0.2:
            delta = rng.randint(-40, 20)
            memory.adjust(key, "tokens", delta, now)
            ledgers[step % 2].adjust(key, "tokens", delta, now)
            continue
        limits = [rpm(key, 12), Limit(key, "tokens", 300, rng.randint(0, 60))][: rng.choice((1, 2))]
        assert ledgers[step % 2].take(limits, now) == memory.take(limits, now), step
    assert memory.take([rpm("a", 12)], now) == ledgers[0].take([rpm("a", 12)], now)


def test_rows_that_left_the_window_are_pruned(stores: tuple[LedgerLimiter, LedgerLimiter]) -> None:
    ledger = stores[0]
    for i in range(PRUNE_AFTER + 10):
        assert ledger.take([rpm("p", 5)], T0 + i * 60_000).allowed  # one a minute: each leaves before the next
    # The rows before the last prune are gone; what remains is less than a backlog's worth.
    assert ledger.rows("p", "requests") <= PRUNE_AFTER
    assert ledger.window("p", "requests", T0 + (PRUNE_AFTER + 9) * 60_000).total == 1  # and the total is exact


def test_a_retry_time_read_across_pages_of_the_log(stores: tuple[LedgerLimiter, LedgerLimiter]) -> None:
    memory, ledger = RateLimiter(), stores[0]
    count = PAGE * 2 + 10
    for i in range(count):
        one = [Limit("t", "tokens", count, 1)]
        assert ledger.take(one, T0 + i) == memory.take(one, T0 + i)
    big = [Limit("t", "tokens", count, PAGE + 20)]  # fits once PAGE + 20 rows have left
    refused = ledger.take(big, T0 + count)
    assert refused == memory.take(big, T0 + count)
    assert refused.retry_after_ms == (PAGE + 19) + 60_000 - count


def test_a_refusal_of_requests_is_remembered_until_its_retry_time() -> None:
    refusals = Refusals()
    limits = [rpm("k", 2)]
    memory = RateLimiter()
    memory.take(limits, T0)
    memory.take(limits, T0 + 10_000)
    refused = memory.take(limits, T0 + 20_000)
    refusals.remember(refused, T0 + 20_000)
    again = refusals.refusal(limits, T0 + 30_000)
    assert again is not None and not again.allowed and again.retry_after_ms == 30_000  # T0 + 60 s, as the ledger said
    assert again.headers["retry-after"] == "30"
    assert refusals.refusal(limits, T0 + 60_000) is None  # then the ledger decides again
    assert refusals.refusal([rpm("k", 3)], T0 + 30_000) is None  # another limit: not known
    memory.take([Limit("k", "tokens", 10, 8)], T0)
    tokens = memory.take([Limit("k", "tokens", 10, 5)], T0 + 1)
    assert not tokens.allowed and tokens.retry_after_ms
    refusals.remember(tokens, T0 + 1)  # a token limit is never remembered: a correction may give capacity back
    assert refusals.refusal([Limit("k", "tokens", 10, 5)], T0 + 2) is None
    assert refusals.refusal([Limit("k", "tokens", 10, 1), rpm("x", 1)], T0 + 2) is None
