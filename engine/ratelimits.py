"""Request and token rate limits over a sliding window.

Each key (a token, a principal, a model) keeps a log of what it took in the last window,
so a limit of N per minute means N in *any* 60 seconds: no burst of twice the limit
at a fixed-window boundary. Several limits are taken all together or not at all, and
every answer carries what response headers need (remaining, reset, retry after).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from engine.clock import MINUTE_MS

DEFAULT_WINDOW_MS: Final = MINUTE_MS


@dataclass(frozen=True, slots=True)
class Limit:
    """``limit`` units of ``kind`` (requests or tokens) per window, for ``key``."""

    key: str
    kind: str
    limit: int
    amount: int


@dataclass(frozen=True, slots=True)
class RateDecision:
    allowed: bool
    limit: Limit | None  # the limit that refused, or the tightest one when allowed
    remaining: int
    reset_ms: int  # when the window's oldest entry leaves it (capacity starts to come back)
    retry_after_ms: int | None  # how long until this request would fit; None if it never can

    @property
    def headers(self) -> dict[str, str]:
        """``x-ratelimit-*`` headers (and ``Retry-After`` when refused)."""
        if self.limit is None:
            return {}
        kind = self.limit.kind
        out = {
            f"x-ratelimit-limit-{kind}": str(self.limit.limit),
            f"x-ratelimit-remaining-{kind}": str(max(0, self.remaining)),
            f"x-ratelimit-reset-{kind}": f"{max(0, self.reset_ms) / 1000:.3f}s",
        }
        if not self.allowed and self.retry_after_ms is not None:
            out["retry-after"] = str(max(1, -(-self.retry_after_ms // 1000)))
        return out


@dataclass(slots=True)
class _Log:
    entries: deque[tuple[int, int]] = field(default_factory=deque)  # (ts_ms, amount), oldest first
    total: int = 0

    def trim(self, now_ms: int, window_ms: int) -> None:
        cutoff = now_ms - window_ms
        entries = self.entries
        while entries and entries[0][0] <= cutoff:
            self.total -= entries.popleft()[1]


class RateLimiter:
    """Sliding-window logs, one per key and kind. Not thread-safe: use from one event loop."""

    def __init__(self, window_ms: int = DEFAULT_WINDOW_MS) -> None:
        self.window_ms = window_ms
        self._logs: dict[tuple[str, str], _Log] = {}

    def _log(self, limit: Limit, now_ms: int) -> _Log:
        log = self._logs.get((limit.key, limit.kind))
        if log is None:
            log = self._logs[(limit.key, limit.kind)] = _Log()
        log.trim(now_ms, self.window_ms)
        return log

    def _verdict(self, limit: Limit, log: _Log, now_ms: int) -> RateDecision:
        remaining = limit.limit - log.total
        reset = (log.entries[0][0] + self.window_ms - now_ms) if log.entries else 0
        if limit.amount <= remaining:
            return RateDecision(True, limit, remaining - limit.amount, reset, 0)
        if limit.amount > limit.limit:
            return RateDecision(False, limit, remaining, reset, None)
        # Walk the log until enough has left the window for this request to fit.
        need = limit.amount - remaining
        freed = 0
        for ts, amount in log.entries:
            freed += amount
            if freed >= need:
                return RateDecision(False, limit, remaining, reset, ts + self.window_ms - now_ms)
        return RateDecision(False, limit, remaining, reset, self.window_ms)  # pragma: no cover - unreachable

    def check(self, limits: Sequence[Limit], now_ms: int) -> RateDecision:
        """Would every limit allow this now? Nothing is taken."""
        tightest: RateDecision | None = None
        for limit in limits:
            verdict = self._verdict(limit, self._log(limit, now_ms), now_ms)
            if not verdict.allowed:
                return verdict
            if tightest is None or verdict.remaining < tightest.remaining:
                tightest = verdict
        return tightest or RateDecision(True, None, 0, 0, 0)

    def take(self, limits: Sequence[Limit], now_ms: int) -> RateDecision:
        """Take from every limit, or from none if any of them refuses."""
        verdict = self.check(limits, now_ms)
        if verdict.allowed:
            for limit in limits:
                if limit.amount:
                    log = self._log(limit, now_ms)
                    log.entries.append((now_ms, limit.amount))
                    log.total += limit.amount
        return verdict

    def adjust(self, key: str, kind: str, delta: int, now_ms: int) -> None:
        """Correct what was taken once the true amount is known (tokens estimated before a
        call, counted after it): a negative ``delta`` gives capacity back."""
        log = self._logs.get((key, kind))
        if log is None or not delta:
            return
        log.trim(now_ms, self.window_ms)
        log.entries.append((now_ms, delta))
        log.total += delta
