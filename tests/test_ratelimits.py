"""Sliding-window rate limits: no double burst at a boundary, all-or-none across limits,
and the numbers response headers need."""

from __future__ import annotations

from engine.ratelimits import Limit, RateLimiter

T0 = 1_795_003_200_000


def rpm(key: str, limit: int) -> Limit:
    return Limit(key, "requests", limit, 1)


def test_a_burst_at_the_boundary_of_a_minute_gets_no_second_allowance() -> None:
    limiter = RateLimiter()
    # 10 requests at 00:59.9 of one minute...
    assert all(limiter.take([rpm("tok", 10)], T0 + 59_900).allowed for _ in range(10))
    # ...and none at 01:00.1 of the next: a fixed window would allow ten more here.
    refused = limiter.take([rpm("tok", 10)], T0 + 60_100)
    assert not refused.allowed
    assert refused.retry_after_ms == 59_800  # when the first of the ten leaves the window
    assert limiter.take([rpm("tok", 10)], T0 + 119_900).allowed  # exactly one window later


def test_exactly_the_limit_passes_within_any_sixty_seconds() -> None:
    limiter = RateLimiter()
    allowed = [limiter.take([rpm("tok", 5)], T0 + i * 10_000).allowed for i in range(12)]
    # at t = 0, 10, 20, 30, 40 s: allowed; 50 s: the sixth in a minute, refused; 60 s: the first has left
    assert allowed == [True] * 5 + [False] + [True] * 5 + [False]


def test_tokens_and_requests_are_taken_together_or_not_at_all() -> None:
    limiter = RateLimiter()
    both = [rpm("tok", 100), Limit("tok", "tokens", 1000, 800)]
    assert limiter.take(both, T0).allowed
    second = limiter.take([rpm("tok", 100), Limit("tok", "tokens", 1000, 300)], T0 + 1)
    assert not second.allowed and second.limit is not None and second.limit.kind == "tokens"
    assert limiter.check([rpm("tok", 1)], T0 + 2).allowed is False  # one request was taken, not two


def test_remaining_reset_and_headers() -> None:
    limiter = RateLimiter()
    limiter.take([rpm("p", 3)], T0)
    verdict = limiter.take([rpm("p", 3)], T0 + 15_000)
    assert verdict.allowed and verdict.remaining == 1 and verdict.reset_ms == 45_000
    assert verdict.headers["x-ratelimit-remaining-requests"] == "1"
    limiter.take([rpm("p", 3)], T0 + 16_000)
    refused = limiter.take([rpm("p", 3)], T0 + 20_000)
    assert refused.headers["retry-after"] == "40"
    assert refused.headers["x-ratelimit-limit-requests"] == "3"


def test_a_request_larger_than_the_limit_can_never_fit() -> None:
    refused = RateLimiter().take([Limit("k", "tokens", 100, 101)], T0)
    assert not refused.allowed and refused.retry_after_ms is None
    assert "retry-after" not in refused.headers


def test_keys_are_independent_and_estimates_can_be_corrected() -> None:
    limiter = RateLimiter()
    assert limiter.take([Limit("a", "tokens", 100, 100)], T0).allowed
    assert limiter.take([Limit("b", "tokens", 100, 100)], T0).allowed
    assert not limiter.check([Limit("a", "tokens", 100, 50)], T0 + 1).allowed
    limiter.adjust("a", "tokens", -60, T0 + 1)  # the call used 40 of the 100 estimated
    assert limiter.check([Limit("a", "tokens", 100, 50)], T0 + 2).allowed
