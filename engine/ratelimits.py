"""Request and token rate limits over a sliding window.

Each key (a token, a principal, a model) keeps a log of what it took in the last window,
so a limit of N per minute means N in *any* 60 seconds: no burst of twice the limit
at a fixed-window boundary. Several limits are taken all together or not at all, and
every answer carries what response headers need (remaining, reset, retry after).

The gateway's limits live in the ledger (``take`` and ``adjust``, inside a ledger transaction):
the window is read, judged and taken under the ledger's write lock, so every gateway and
transport on one ledger shares one log per key, exactly, on SQLite as on PostgreSQL.
``RateLimiter`` keeps the same logs in one process's memory, by the same rules; ``Refusals``
remembers, in memory, refusals that nothing can overturn before their time (a request limit:
other processes only add to the log), so a flood of refused calls costs the ledger nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Final

from engine.clock import MINUTE_MS

if TYPE_CHECKING:
    from engine.ledger import LedgerView

DEFAULT_WINDOW_MS: Final = MINUTE_MS
#: Rows that have left a key's window are deleted once this many have piled up (``take``).
PRUNE_AFTER: Final = 32
#: The retry walk reads a key's log in pages of this many rows.
PAGE: Final = 256


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


def _verdict(limit: Limit, total: int, oldest_ms: int | None, entries: Callable[[], Iterable[tuple[int, int]]],
             now_ms: int, window_ms: int) -> RateDecision:
    """Would ``limit`` allow its amount now, given what its window holds (``total``, its
    oldest row at ``oldest_ms``)? ``entries``: the window's rows (ts_ms, amount), oldest first,
    read only when the answer is no (to tell when the request would fit)."""
    remaining = limit.limit - total
    reset = (oldest_ms + window_ms - now_ms) if oldest_ms is not None else 0
    if limit.amount <= remaining:
        return RateDecision(True, limit, remaining - limit.amount, reset, 0)
    if limit.amount > limit.limit:
        return RateDecision(False, limit, remaining, reset, None)
    # Walk the log until enough has left the window for this request to fit.
    need = limit.amount - remaining
    freed = 0
    for ts, amount in entries():
        freed += amount
        if freed >= need:
            return RateDecision(False, limit, remaining, reset, ts + window_ms - now_ms)
    return RateDecision(False, limit, remaining, reset, window_ms)  # pragma: no cover - unreachable


def _judge(limits: Sequence[Limit], verdicts: Iterable[RateDecision]) -> RateDecision:
    """The first refusal, else the tightest of the allowances (all limits together or none)."""
    tightest: RateDecision | None = None
    for verdict in verdicts:
        if not verdict.allowed:
            return verdict
        if tightest is None or verdict.remaining < tightest.remaining:
            tightest = verdict
    return tightest or RateDecision(True, None, 0, 0, 0)


# ---- in the ledger: every process on it shares one log per key


def _ledger_verdicts(ledger: LedgerView, limits: Sequence[Limit], now_ms: int, window_ms: int,
                     backlog: list[tuple[Limit, int]]) -> Iterator[RateDecision]:
    cutoff = now_ms - window_ms
    rates = ledger.rates
    for limit, window in zip(limits, rates.windows([(limit.key, limit.kind) for limit in limits], cutoff),
                             strict=True):
        backlog.append((limit, window.expired))

        def entries(limit: Limit = limit) -> Iterator[tuple[int, int]]:
            offset = 0
            while page := rates.entries(limit.key, limit.kind, cutoff, offset, PAGE):
                yield from page
                offset += len(page)

        yield _verdict(limit, window.total, window.oldest_ms, entries, now_ms, window_ms)


def check(ledger: LedgerView, limits: Sequence[Limit], now_ms: int,
          window_ms: int = DEFAULT_WINDOW_MS) -> RateDecision:
    """Would every limit allow this now, by the ledger's log? Nothing is taken."""
    return _judge(limits, _ledger_verdicts(ledger, limits, now_ms, window_ms, []))


def take(ledger: LedgerView, limits: Sequence[Limit], now_ms: int,
         window_ms: int = DEFAULT_WINDOW_MS) -> RateDecision:
    """Take from every limit, or from none if any of them refuses, in the ledger's log. Run it
    inside a ledger transaction (``Ledger.transact``): the read, the verdict and the take are
    then one, under the ledger's write lock, for every process on the ledger. A key's rows
    that have left its window are pruned once ``PRUNE_AFTER`` of them have piled up."""
    backlog: list[tuple[Limit, int]] = []
    verdict = _judge(limits, _ledger_verdicts(ledger, limits, now_ms, window_ms, backlog))
    if verdict.allowed:
        ledger.rates.add([(limit.key, limit.kind, now_ms, limit.amount) for limit in limits if limit.amount])
        for limit, expired in backlog:
            if expired >= PRUNE_AFTER:
                ledger.rates.prune(limit.key, limit.kind, now_ms - window_ms)
    return verdict


def adjust(ledger: LedgerView, key: str, kind: str, delta: int, now_ms: int) -> None:
    """Correct what was taken once the true amount is known (tokens estimated before a call,
    counted after it), in the ledger's log: a negative ``delta`` gives capacity back."""
    if delta:
        ledger.rates.add([(key, kind, now_ms, delta)])


@dataclass(frozen=True, slots=True)
class _Refused:
    until_ms: int  # when the request would fit again
    at_ms: int  # when the ledger said so
    decision: RateDecision


class Refusals:
    """Refusals of a request limit remembered until their retry time, in one process's memory:
    until then nothing can overturn them (other processes only add requests to the log, and
    request counts are never corrected), so the same key's calls are refused again without
    asking the ledger. Nothing is ever *allowed* from here: only the ledger allows."""

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._refused: dict[tuple[str, int], _Refused] = {}

    def remember(self, decision: RateDecision, now_ms: int) -> None:
        limit = decision.limit
        if decision.allowed or limit is None or limit.kind != "requests" or not decision.retry_after_ms:
            return
        if len(self._refused) >= self.size:
            self._refused = {k: r for k, r in self._refused.items() if r.until_ms > now_ms}
            if len(self._refused) >= self.size:
                return
        self._refused[(limit.key, limit.limit)] = _Refused(now_ms + decision.retry_after_ms, now_ms, decision)

    def refusal(self, limits: Sequence[Limit], now_ms: int) -> RateDecision | None:
        """A remembered refusal that still holds for one of ``limits`` (its headers brought up to
        ``now_ms``), or None: then the ledger decides."""
        for limit in limits:
            if limit.kind != "requests" or limit.amount < 1:
                continue
            found = self._refused.get((limit.key, limit.limit))
            if found is None:
                continue
            if found.until_ms <= now_ms:
                del self._refused[(limit.key, limit.limit)]
                continue
            elapsed = now_ms - found.at_ms
            d = found.decision
            return RateDecision(False, limit, d.remaining, max(0, d.reset_ms - elapsed), found.until_ms - now_ms)
        return None


# ---- in one process's memory


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
    """Sliding-window logs in this process's memory, one per key and kind (the ledger's
    ``take`` shares them between processes). Not thread-safe: use from one event loop."""

    def __init__(self, window_ms: int = DEFAULT_WINDOW_MS) -> None:
        self.window_ms = window_ms
        self._logs: dict[tuple[str, str], _Log] = {}

    def _log(self, limit: Limit, now_ms: int) -> _Log:
        log = self._logs.get((limit.key, limit.kind))
        if log is None:
            log = self._logs[(limit.key, limit.kind)] = _Log()
        log.trim(now_ms, self.window_ms)
        return log

    def _verdicts(self, limits: Sequence[Limit], now_ms: int) -> Iterator[RateDecision]:
        for limit in limits:
            log = self._log(limit, now_ms)
            yield _verdict(limit, log.total, log.entries[0][0] if log.entries else None, partial(iter, log.entries),
                           now_ms, self.window_ms)

    def check(self, limits: Sequence[Limit], now_ms: int) -> RateDecision:
        """Would every limit allow this now? Nothing is taken."""
        return _judge(limits, self._verdicts(limits, now_ms))

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
