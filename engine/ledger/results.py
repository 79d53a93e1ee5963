"""The ledger's typed results: what a write gives back and what a dashboard read sums.

Plain dataclasses, the same whatever the backend; no driver object or row reaches a caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Final, Literal, NamedTuple

#: What a chart needs: summed by default in timelines.
TIMELINE_FIELDS: Final = ("requests", "errors", "input_tokens", "output_tokens", "cost_nanos")


#: ``appended_id`` of an event sent ahead in a pipelined batch: its id is known once the batch's
#: queued writes are sent; nothing else is written between it and the events before it.
PENDING_ID: Final = -1


@dataclass(slots=True, frozen=True)
class ClosedHold:
    """What closing a hold gives back: its lines (policy, amount) and the override grant it drew on."""

    lines: list[tuple[str, int]]
    grant_id: str | None
    grant_amount: int


@dataclass(slots=True, frozen=True)
class RecordResult:
    request_id: str
    duplicate: bool
    cost_nanos: int
    cost_source: str


@dataclass(slots=True)
class Totals:
    """Sums over a set of rollup rows. Money is integer nano-dollars."""

    requests: int = 0
    errors: int = 0
    blocked: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost_nanos: int = 0
    unpriced: int = 0
    estimated: int = 0
    latency_ms: int = 0
    cache_write_1h_tokens: int = 0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def mean_latency_ms(self) -> float:
        return self.latency_ms / self.requests if self.requests else 0.0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_row(cls, row: Sequence[Any], offset: int = 0) -> Totals:
        return cls(*(int(v or 0) for v in row[offset:offset + _WIDTH]))


#: How many sums a row of Totals holds (the rollup columns, in this order: ``schema.SUM_COLUMNS``).
_WIDTH: Final = len(fields(Totals))


@dataclass(slots=True, frozen=True)
class TimelinePoint:
    bucket_ms: int
    group: str
    totals: Totals


@dataclass(slots=True, frozen=True)
class BreakdownRow:
    key: str
    totals: Totals


Metric = Literal["cost", "tokens", "requests", "errors"]


# ---- the rows repositories give back (plain values, never a driver's row)


class EventRow(NamedTuple):
    """An event as the budget book folds it into its counters."""

    id: int
    ts_ms: int
    workspace: str
    team: str
    principal: str
    token_id: str
    provider: str
    model: str
    session: str
    agent: str
    input_tokens: int
    output_tokens: int
    cost_nanos: int
    status: str


class UsageSums(NamedTuple):
    """Cost (nano-dollars), tokens and requests over a period (blocked calls not counted)."""

    cost_nanos: int
    tokens: int
    requests: int


class MinuteSums(NamedTuple):
    minute_ms: int
    cost_nanos: int
    tokens: int
    requests: int


class JournalRow(NamedTuple):
    id: int
    policy_id: str
    delta: int


class PoliciesVersion(NamedTuple):
    """How many policies were ever stored and when the last changed: it moves on every change."""

    stored: int
    updated_ms: int


class BudgetDecision(NamedTuple):
    ts_ms: int
    request_id: str
    policy_id: str
    decision: str
    mode: str


class AlertRow(NamedTuple):
    """An alert as stored (``engine.alerts.Alert`` takes these fields in this order)."""

    id: int
    policy_id: str
    window_start_ms: int
    kind: str
    threshold: int
    ts_ms: int
    value: int
    message: str
    acked_by: str | None
    acked_ms: int | None


class OvershootRow(NamedTuple):
    """A call settled above its hold on a policy, in the policy's metric."""

    id: int
    ts_ms: int
    request_id: str
    policy_id: str
    held: int
    settled: int


class Webhook(NamedTuple):
    id: str
    url: str  # a secret: callers redact it
    kind: str


class Delivery(NamedTuple):
    webhook_id: str
    attempt: int
    ok: bool
    detail: str
