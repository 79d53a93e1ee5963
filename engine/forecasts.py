"""Forecasts and backtests: where a policy's burn rate leads, and a draft policy replayed
against the ledger's history (pure functions of what they are given)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from engine.clock import HOUR_MS
from engine.rules import Policy, window_bounds

# ----------------------------------------------------------------------------- forecasts and backtests


@dataclass(frozen=True, slots=True)
class Forecast:
    """Where a policy is heading at its recent rate of spend."""

    policy: Policy
    consumed: int
    burn_per_hour: int  # in the policy's unit
    projected: int  # at the end of a calendar window; the steady state of a rolling one
    limit_at_ms: int | None  # when the hard limit is reached at this rate, if within the window
    window_end_ms: int | None

    @property
    def overrun(self) -> bool:
        return self.projected > self.policy.hard


def forecast(policy: Policy, consumed: int, recent: int, recent_ms: int, now_ms: int) -> Forecast:
    """Project ``consumed`` forward at the rate of ``recent`` per ``recent_ms`` (integer arithmetic).

    A calendar window is projected to its end; the hard limit's time is when
    consumed + rate x t reaches it, if that is before the window ends. A rolling
    window is projected to its steady state: the rate times its span.
    """
    burn_per_hour = recent * HOUR_MS // recent_ms if recent_ms > 0 else 0
    limit_at: int | None
    if not policy.window.calendar:
        projected = recent * policy.window.rolling_ms // recent_ms if recent_ms > 0 else consumed
        limit_at = now_ms if consumed >= policy.hard else None
        return Forecast(policy, consumed, burn_per_hour, projected, limit_at, None)
    _, end = window_bounds(policy.window, now_ms)
    remaining_ms = end - now_ms
    projected = consumed + (recent * remaining_ms // recent_ms if recent_ms > 0 else 0)
    if consumed >= policy.hard:
        limit_at = now_ms
    elif recent <= 0 or recent_ms <= 0:
        limit_at = None
    else:
        limit_at = now_ms - (-(policy.hard - consumed) * recent_ms // recent)  # ceiling division
        if limit_at >= end:
            limit_at = None
    return Forecast(policy, consumed, burn_per_hour, projected, limit_at, end)


@dataclass(slots=True)
class Backtest:
    """What a draft policy would have done to a past period of the ledger."""

    policy: Policy
    start_ms: int
    end_ms: int
    calls: int = 0  # calls in scope
    blocked: int = 0  # calls it would have blocked
    first_block_ms: int | None = None
    prevented: int = 0  # in the policy's unit: what the blocked calls consumed
    allowed_total: int = 0
    windows_hit: int = 0  # windows in which it blocked at least once
    soft_crossings: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.to_json(), "start_ms": self.start_ms, "end_ms": self.end_ms,
                "calls": self.calls, "blocked": self.blocked, "first_block_ms": self.first_block_ms,
                "prevented": self.prevented, "allowed_total": self.allowed_total, "windows_hit": self.windows_hit,
                "soft_crossings": self.soft_crossings}


def backtest(policy: Policy, rows: Iterable[tuple[int, int, int, str]], start_ms: int, end_ms: int) -> Backtest:
    """Replay (ts_ms, cost_nanos, tokens, status) rows, oldest first, through ``policy`` as if
    enforced: a call that would pass the hard limit is blocked and its usage not counted."""
    result = Backtest(policy, start_ms, end_ms)
    metric = policy.metric
    hard, soft = policy.hard, policy.soft
    calendar = policy.window.calendar
    span = policy.window.rolling_ms
    window_end = -1
    consumed = 0
    hit_this_window = soft_this_window = False
    recent: deque[tuple[int, int]] = deque()
    for ts, cost, tokens, status in rows:
        if status == "blocked":
            continue
        amount = cost if metric == "usd" else tokens if metric == "tokens" else 1
        result.calls += 1
        if calendar:
            if ts >= window_end:
                _, window_end = window_bounds(policy.window, ts)
                consumed = 0
                hit_this_window = soft_this_window = False
        else:
            while recent and recent[0][0] <= ts - span:
                consumed -= recent.popleft()[1]
            if soft is not None and consumed <= soft:
                soft_this_window = False  # a rolling window crosses again once it has fallen back
        if consumed + amount > hard:
            result.blocked += 1
            result.prevented += amount
            if result.first_block_ms is None:
                result.first_block_ms = ts
            if not hit_this_window:
                result.windows_hit += 1
                hit_this_window = True
            continue
        consumed += amount
        result.allowed_total += amount
        if not calendar:
            recent.append((ts, amount))
            hit_this_window = False  # the next block is a new episode
        if soft is not None and consumed > soft and not soft_this_window:
            result.soft_crossings += 1
            soft_this_window = True
    return result


def consumption_series(policy: Policy, amounts: Mapping[int, int], start_ms: int, end_ms: int,
                       bucket_ms: int) -> list[tuple[int, int]]:
    """What the policy's window held at the end of each bucket of [start, end): the running
    total since the calendar window began (back to zero when a new one starts), or the sum
    over the trailing rolling span. ``amounts`` is the policy's amount per bucket (keyed by
    bucket start), from before ``start_ms`` far enough back to cover the first window.
    Resolution is the bucket: a window that starts inside a bucket is counted from it."""
    first = start_ms - start_ms % bucket_ms
    out: list[tuple[int, int]] = []
    if policy.window.calendar:
        window_start, window_end = window_bounds(policy.window, first)
        consumed = sum(v for b, v in amounts.items() if window_start <= b < first)
        for b in range(first, end_ms, bucket_ms):
            if b >= window_end:
                window_start, window_end = window_bounds(policy.window, b)
                consumed = 0
            consumed += amounts.get(b, 0)
            out.append((b, consumed))
        return out
    span = policy.window.rolling_ms
    keys = sorted(amounts)
    total, lo, hi = 0, 0, 0  # the sum over keys[lo:hi], the buckets inside the trailing span
    for b in range(first, end_ms, bucket_ms):
        while hi < len(keys) and keys[hi] <= b:
            total += amounts[keys[hi]]
            hi += 1
        while lo < hi and keys[lo] < b + bucket_ms - span:
            total -= amounts[keys[lo]]
            lo += 1
        out.append((b, total))
    return out
