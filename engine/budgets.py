"""Budgets: policies, their windows, and the rules that evaluate a call against them.

Everything here is a pure function of its inputs (the clock is a parameter), so the
rules are tested without a database: parsing and validating a policy, the bounds of
a calendar or rolling window in a time zone, which policies apply to a call, and the
decision those policies reach for a call's worst-case cost. Money is integer
nano-dollars throughout.
"""

from __future__ import annotations

import json
import re
import secrets
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from engine import approvals
from engine.clock import DAY_MS, HOUR_MS, MINUTE_MS
from engine.ledger import ClosedHold, LedgerTx, RecordResult
from engine.models import FieldError, UsageEvent, unique_hex
from engine.money import MoneyError, format_amount, format_usd, format_usd_plain, parse_usd

Metric = Literal["usd", "tokens", "requests"]
Mode = Literal["enforced", "dry_run", "suggest"]
Action = Literal["block", "approval_required", "downgrade"]
METRICS: Final = ("usd", "tokens", "requests")
MODES: Final = ("enforced", "dry_run", "suggest")
ACTIONS: Final = ("block", "approval_required", "downgrade")
SCOPE_KINDS: Final = ("workspace", "team", "principal", "token", "session", "agent", "provider", "model")
CALENDAR_UNITS: Final = ("hour", "day", "week", "month", "quarter")
DEFAULT_THRESHOLDS: Final = (50, 80, 100)
#: The worst case of a call that does not say its max_tokens: this many output tokens.
DEFAULT_MAX_OUTPUT_TOKENS: Final = 4096
ALERTED_KEPT: Final = 10_000  # alerts a budget book remembers as stored (a rolling policy makes one a window)
_ROLLING = re.compile(r"^rolling:(\d{1,6})([mhd])$")
_SCOPE_ID = re.compile(r"^[^\s+:]{1,200}$")
_SCOPE_LEVELS: Final = {"workspace": 1, "team": 2, "principal": 3, "session": 4, "agent": 4, "token": 5,
                        "provider": 1, "model": 2}


# ----------------------------------------------------------------------------- scope


@dataclass(frozen=True, slots=True)
class Scope:
    """``global``, or one or two ``kind:id`` parts that must all match a call."""

    parts: tuple[tuple[str, str], ...] = ()
    #: How specific the scope is, for ordering a hierarchy (global 0 ... token 5): worked out
    #: once, as every call's decision sorts its policies by it.
    level: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "level", max((_SCOPE_LEVELS[k] for k, _ in self.parts), default=0))

    def __str__(self) -> str:
        return "+".join(f"{k}:{v}" for k, v in self.parts) if self.parts else "global"

    def matches(self, call: Mapping[str, str]) -> bool:
        for kind, value in self.parts:  # noqa: SIM110 - a loop, not all(): this runs for every policy on every call
            if call.get(kind) != value:
                return False
        return True


def parse_scope(text: str, field_name: str = "scope") -> Scope:
    """``global``, ``team:ml``, ``team:ml+model:gpt-4o``; anything else names the field and the reason."""
    raw = (text or "").strip()
    if raw == "global":
        return Scope()
    if not raw:
        raise FieldError(field_name, "is empty; use global, or KIND:ID such as team:ml")
    pieces = raw.split("+")
    if len(pieces) > 2:
        raise FieldError(field_name, f"joins at most two parts with + (got {raw!r})")
    parts: list[tuple[str, str]] = []
    for piece in pieces:
        kind, sep, value = piece.partition(":")
        if not sep:
            raise FieldError(field_name, f"part {piece!r} is not KIND:ID (kinds: global, {', '.join(SCOPE_KINDS)})")
        if kind not in SCOPE_KINDS:
            raise FieldError(field_name, f"has an unknown kind {kind!r}; use one of {', '.join(SCOPE_KINDS)}")
        if not _SCOPE_ID.match(value):
            raise FieldError(field_name, f"has an empty or malformed id in {piece!r}")
        if any(k == kind for k, _ in parts):
            raise FieldError(field_name, f"names {kind} twice")
        parts.append((kind, value))
    return Scope(tuple(sorted(parts)))


# ----------------------------------------------------------------------------- windows


@dataclass(frozen=True, slots=True)
class Window:
    """A calendar unit in a time zone, or a rolling span of ``rolling_ms``."""

    unit: str  # hour, day, week, month, quarter, or "rolling"
    rolling_ms: int = 0
    tz: str = "UTC"

    def __str__(self) -> str:
        if self.unit != "rolling":
            return self.unit
        for size, suffix in ((DAY_MS, "d"), (HOUR_MS, "h"), (MINUTE_MS, "m")):
            if self.rolling_ms % size == 0:
                return f"rolling:{self.rolling_ms // size}{suffix}"
        raise AssertionError("a rolling window is a whole number of minutes")

    @property
    def calendar(self) -> bool:
        return self.unit != "rolling"


def parse_window(text: str, tz: str = "UTC", field_name: str = "window") -> Window:
    raw = (text or "").strip().lower()
    zone(tz)  # validates
    if raw in CALENDAR_UNITS:
        return Window(raw, 0, tz)
    m = _ROLLING.match(raw)
    if m:
        count = int(m.group(1))
        if count <= 0:
            raise FieldError(field_name, f"a rolling window must be longer than zero (got {text!r})")
        size = {"m": MINUTE_MS, "h": HOUR_MS, "d": DAY_MS}[m.group(2)]
        if count * size > 400 * DAY_MS:
            raise FieldError(field_name, f"a rolling window can be at most 400 days (got {text!r})")
        return Window("rolling", count * size, tz)
    raise FieldError(field_name, f"must be hour, day, week, month, quarter or rolling:N[m|h|d] (got {text!r})")


def zone(name: str, field_name: str = "tz") -> ZoneInfo:
    try:
        if not name or name != name.strip():
            raise ZoneInfoNotFoundError(name)
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise FieldError(field_name, f"is not an IANA time zone such as Europe/Paris or UTC (got {name!r})") from None


def _local_start(unit: str, now: datetime) -> datetime:
    if unit == "hour":
        return now.replace(minute=0, second=0, microsecond=0)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if unit == "day":
        return day
    if unit == "week":
        return day - timedelta(days=day.weekday())
    if unit == "month":
        return day.replace(day=1)
    if unit == "quarter":
        return day.replace(month=(day.month - 1) // 3 * 3 + 1, day=1)
    raise ValueError(unit)


def _local_next(unit: str, start: datetime) -> datetime:
    if unit == "hour":
        return start + timedelta(hours=1)  # wall-clock arithmetic; converted back through the zone
    if unit == "day":
        return start + timedelta(days=1)
    if unit == "week":
        return start + timedelta(days=7)
    months = 1 if unit == "month" else 3
    month = start.month - 1 + months
    return start.replace(year=start.year + month // 12, month=month % 12 + 1, day=1)


def _to_ms(local: datetime, tz: ZoneInfo) -> int:
    # Wall-clock times are resolved through the zone: a start that falls in a DST gap
    # moves to the first instant after it.
    aware = local.replace(tzinfo=tz, fold=0)
    utc = aware.astimezone(UTC)
    round_trip = utc.astimezone(tz).replace(tzinfo=None)
    if round_trip != local.replace(tzinfo=None):  # the wall time does not exist (a spring-forward gap)
        utc = local.replace(tzinfo=tz, fold=1).astimezone(UTC)
    return int(utc.timestamp() * 1000)


def window_bounds(window: Window, now_ms: int) -> tuple[int, int]:
    """[start, end) in UTC milliseconds of the window that contains ``now_ms``.

    Calendar windows follow the wall clock of their zone: a day is 23 or 25 hours long
    across a DST change, weeks start on Monday, quarters in January, April, July and
    October. A rolling window ends at ``now_ms``.
    """
    if not window.calendar:
        return now_ms - window.rolling_ms, now_ms
    tz = ZoneInfo(window.tz)
    if window.unit == "hour" and window.tz in ("UTC", "GMT"):
        start = now_ms - now_ms % HOUR_MS
        return start, start + HOUR_MS
    local_now = datetime.fromtimestamp(now_ms / 1000, tz).replace(tzinfo=None)
    if window.unit == "hour":
        # An hour is an hour of absolute time, aligned to the zone's offset.
        offset = int(datetime.fromtimestamp(now_ms / 1000, tz).utcoffset().total_seconds() * 1000)  # type: ignore[union-attr]
        start = now_ms - (now_ms + offset) % HOUR_MS
        return start, start + HOUR_MS
    start_local = _local_start(window.unit, local_now)
    return _to_ms(start_local, tz), _to_ms(_local_next(window.unit, start_local), tz)


# ----------------------------------------------------------------------------- policies


@dataclass(frozen=True, slots=True)
class Policy:
    id: str
    name: str
    scope: Scope
    metric: str
    window: Window
    hard: int
    soft: int | None = None
    thresholds: tuple[int, ...] = DEFAULT_THRESHOLDS
    mode: str = "enforced"
    action: str = "block"
    enabled: bool = True
    created_by: str = ""
    created_ms: int = 0
    updated_by: str = ""
    updated_ms: int = 0

    def format_amount(self, amount: int) -> str:
        return format_amount(amount, self.metric)

    def format_short(self, amount: int) -> str:
        """For table cells: ``$1,077.70``, ``130.6k tok``, ``12.0M tok``, ``950 req``."""
        if self.metric == "usd":
            return format_usd(amount)
        unit = {"tokens": "tok", "requests": "req"}.get(self.metric, self.metric)
        for size, suffix in ((10**9, "B"), (10**6, "M"), (10**3, "k")):
            if amount >= size:
                tenths = amount * 10 // size
                return f"{tenths // 10:,}.{tenths % 10}{suffix} {unit}"
        return f"{amount:,} {unit}"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "scope": str(self.scope), "metric": self.metric,
            "window": str(self.window), "tz": self.window.tz, "hard": self.hard, "soft": self.soft,
            "thresholds": list(self.thresholds), "mode": self.mode, "action": self.action,
            "enabled": self.enabled, "created_by": self.created_by, "created_ms": self.created_ms,
            "updated_by": self.updated_by, "updated_ms": self.updated_ms,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Policy:
        return cls(
            id=data["id"], name=data["name"], scope=parse_scope(data["scope"]), metric=data["metric"],
            window=parse_window(data["window"], data.get("tz", "UTC")), hard=int(data["hard"]),
            soft=None if data.get("soft") is None else int(data["soft"]),
            thresholds=tuple(int(t) for t in data.get("thresholds", DEFAULT_THRESHOLDS)),
            mode=data.get("mode", "enforced"), action=data.get("action", "block"),
            enabled=bool(data.get("enabled", True)), created_by=data.get("created_by", ""),
            created_ms=int(data.get("created_ms", 0)), updated_by=data.get("updated_by", ""),
            updated_ms=int(data.get("updated_ms", 0)),
        )


def parse_amount(value: str | int, metric: str, field_name: str) -> int:
    """A limit in the metric's unit: dollars (``12.50``, ``$12.50``) for usd, a count otherwise."""
    if metric == "usd":
        try:
            return parse_usd(value if isinstance(value, (str, int)) else str(value), field_name)
        except MoneyError as exc:
            raise FieldError(exc.field, exc.reason) from None
    text = str(value).strip().replace(",", "").replace("_", "")
    if not text.isdigit():
        if text.startswith("-") and text[1:].isdigit():
            raise FieldError(field_name, f"must not be negative (got {value!r})")
        raise FieldError(field_name, f"must be a whole number of {metric} (got {value!r})")
    return int(text)


def build_policy(*, scope: str, metric: str, window: str, hard: str | int, soft: str | int | None = None,
                 mode: str = "enforced", action: str = "block", tz: str = "UTC", name: str | None = None,
                 thresholds: Sequence[int] | None = None, enabled: bool = True, actor: str = "",
                 now_ms: int = 0, policy_id: str | None = None) -> Policy:
    """Validate what a person typed into a ``Policy``; every refusal names the field."""
    if metric not in METRICS:
        raise FieldError("metric", f"must be one of {', '.join(METRICS)} (got {metric!r})")
    if mode not in MODES:
        raise FieldError("mode", f"must be one of {', '.join(MODES)} (got {mode!r})")
    if action not in ACTIONS:
        raise FieldError("action", f"must be one of {', '.join(ACTIONS)} (got {action!r})")
    parsed_scope = parse_scope(scope)
    parsed_window = parse_window(window, tz)
    hard_amount = parse_amount(hard, metric, "hard")
    if hard_amount <= 0:
        raise FieldError("hard", "must be above zero")
    soft_amount = None if soft in (None, "") else parse_amount(soft, metric, "soft")
    if soft_amount is not None and soft_amount > hard_amount:
        raise FieldError("soft", "must not be above the hard limit")
    levels = tuple(sorted(set(thresholds))) if thresholds else DEFAULT_THRESHOLDS
    for level in levels:
        if not 1 <= level <= 1000:
            raise FieldError("thresholds", f"are percentages of the hard limit from 1 to 1000 (got {level})")
    label = (name or "").strip() or f"{parsed_scope} {metric} per {parsed_window}"
    if len(label) > 120:
        raise FieldError("name", "is longer than 120 characters")
    return Policy(
        id=policy_id or "pol_" + secrets.token_hex(4), name=label, scope=parsed_scope, metric=metric,
        window=parsed_window, hard=hard_amount, soft=soft_amount, thresholds=levels, mode=mode, action=action,
        enabled=enabled, created_by=actor, created_ms=now_ms, updated_by=actor, updated_ms=now_ms,
    )


#: What an edit may change: build_policy's fields.
EDITABLE: Final = ("scope", "metric", "window", "hard", "soft", "mode", "action", "tz", "name", "thresholds",
                   "enabled")


def edited_policy(old: Policy, changes: Mapping[str, Any], *, actor: str = "", now_ms: int = 0) -> Policy:
    """``old`` with ``changes`` (build_policy's fields as a person typed them; a field absent or
    None keeps its value), validated as build_policy validates: the same id and creation, updated
    by ``actor`` at ``now_ms``. A new metric keeps neither limit: the hard one must be given again.
    The command line's ``policy edit`` and the dashboard's policy form both edit through here."""
    for name in changes:
        if name not in EDITABLE:
            raise FieldError(name, f"is not a field of a policy (one of {', '.join(EDITABLE)})")
    given = {name: value for name, value in changes.items() if value is not None}
    metric = given.get("metric", old.metric)
    same_unit = metric == old.metric
    amount = format_usd_plain if old.metric == "usd" else str
    current: dict[str, Any] = {
        "scope": str(old.scope), "metric": old.metric, "window": str(old.window), "tz": old.window.tz,
        "hard": amount(old.hard) if same_unit else "",
        "soft": amount(old.soft) if old.soft is not None and same_unit else None,
        "mode": old.mode, "action": old.action, "name": old.name, "thresholds": old.thresholds,
        "enabled": old.enabled}
    policy = build_policy(**{**current, **given}, actor=actor, now_ms=now_ms, policy_id=old.id)
    return replace(policy, created_by=old.created_by, created_ms=old.created_ms)


# ----------------------------------------------------------------------------- evaluation


@dataclass(frozen=True, slots=True)
class CallCost:
    """What a call may consume at worst, in every metric a policy can count."""

    usd: int
    tokens: int
    requests: int = 1
    priced: bool = True  # False: the model has no price, so its dollar cost cannot be bounded

    def of(self, metric: str) -> int:
        return self.usd if metric == "usd" else self.tokens if metric == "tokens" else self.requests


Status = Literal["ok", "soft", "over"]
Decision = Literal["allow", "allow_with_warning", "would_block", "block", "needs_approval", "downgrade"]
_RANK: Final = {"allow": 0, "allow_with_warning": 1, "would_block": 2, "downgrade": 3, "needs_approval": 4,
                "block": 5}


@dataclass(slots=True)
class Outcome:
    """One policy's view of one call (not frozen: twenty are made for every call)."""

    policy: Policy
    consumed: int
    held: int
    cost: int
    window_start_ms: int
    window_end_ms: int
    status: Status
    priced: bool = True

    @property
    def message(self) -> str:
        policy, fmt = self.policy, self.policy.format_amount
        if not self.priced and policy.metric == "usd":
            return f"{policy.name}: the model has no price, so this call's cost cannot be held against the limit"
        if self.status == "over":
            return (f"{policy.name}: {fmt(self.consumed)} spent and {fmt(self.held)} held of {fmt(policy.hard)}; "
                    f"this call's worst case of {fmt(self.cost)} would pass the hard limit")
        if self.status == "soft":
            return f"{policy.name}: {fmt(self.projected)} would pass the soft limit of {fmt(policy.soft or 0)}"
        return f"{policy.name}: {fmt(self.projected)} of {fmt(policy.hard)} after this call"

    @property
    def projected(self) -> int:
        return self.consumed + self.held + self.cost

    @property
    def headroom(self) -> int:
        return self.policy.hard - self.consumed - self.held

    def as_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.id, "name": self.policy.name, "scope": str(self.policy.scope),
                "metric": self.policy.metric, "mode": self.policy.mode, "action": self.policy.action,
                "consumed": self.consumed, "held": self.held, "cost": self.cost, "projected": self.projected,
                "limit": self.policy.hard, "soft_limit": self.policy.soft, "status": self.status,
                "message": self.message}


@dataclass(frozen=True, slots=True)
class Evaluation:
    decision: Decision
    outcomes: tuple[Outcome, ...] = field(default_factory=tuple)
    deciding: Outcome | None = None

    @property
    def allowed(self) -> bool:
        return self.decision in ("allow", "allow_with_warning", "would_block")

    def as_dict(self) -> dict[str, Any]:
        return {"decision": self.decision, "deciding_policy": self.deciding.policy.id if self.deciding else None,
                "outcomes": [o.as_dict() for o in self.outcomes]}


def applicable(policies: Iterable[Policy], call: Mapping[str, str]) -> list[Policy]:
    """Every enabled policy whose scope matches the call, most specific first."""
    return sorted((p for p in policies if p.enabled and p.scope.matches(call)),
                  key=lambda p: (-p.scope.level, p.id))


def outcome(policy: Policy, consumed: int, held: int, cost: int, bounds: tuple[int, int],
            *, priced: bool = True) -> Outcome:
    """One policy's verdict on a call of worst case ``cost``; a limit may be met exactly, not passed."""
    projected = consumed + held + cost
    status: Status
    if (not priced and policy.metric == "usd") or projected > policy.hard:
        status = "over"
    elif policy.soft is not None and projected > policy.soft:
        status = "soft"
    else:
        status = "ok"
    return Outcome(policy, consumed, held, cost, bounds[0], bounds[1], status, priced)


def decide(outcomes: Sequence[Outcome]) -> Evaluation:
    """The tightest policy decides: the most severe outcome wins; among equals, the least headroom.

    An enforced hard limit blocks (or asks for approval, or downgrades, per its action);
    in dry_run it is recorded as would_block and in suggest it is only reported, and
    the call goes through; a soft limit allows with a warning.
    """
    decision: Decision = "allow"
    deciding: Outcome | None = None
    for o in outcomes:
        if o.status == "over":
            if o.policy.mode == "enforced":
                this: Decision = {"block": "block", "approval_required": "needs_approval",
                                  "downgrade": "downgrade"}[o.policy.action]  # type: ignore[assignment]
            else:
                this = "would_block"
        elif o.status == "soft":
            this = "allow_with_warning"
        else:
            this = "allow"
        better = _RANK[this] > _RANK[decision] or (
            _RANK[this] == _RANK[decision] and deciding is not None and o.headroom < deciding.headroom)
        if deciding is None or better:
            decision, deciding = this, o
    return Evaluation(decision, tuple(outcomes), deciding if outcomes else None)


# ----------------------------------------------------------------------------- live state and holds

#: Call-context keys, as scopes name them, and the ledger columns they come from.
CONTEXT_COLUMNS: Final = {"workspace": "workspace", "team": "team", "principal": "principal", "token": "token_id",
                          "session": "session", "agent": "agent", "provider": "provider", "model": "model"}
DEFAULT_HOLD_TTL_MS: Final = 10 * MINUTE_MS
EXPIRY_CHECK_MS: Final = 1_000  # how often decision batches look for holds past their time to live


class HoldError(ValueError):
    """A hold that cannot be settled or released as asked (unknown, or already closed)."""


@dataclass(slots=True)
class _Counter:
    """What one policy has consumed and holds, kept current inside write transactions."""

    policy: Policy
    held: int = 0
    consumed: int = 0  # calendar windows: the sum within [start, end)
    start_ms: int = 0
    end_ms: int = 0
    minutes: dict[int, int] = field(default_factory=dict)  # rolling windows: amount per minute
    rolling_total: int = 0

    def amount(self, cost: int, tokens: int, status: str) -> int:
        metric = self.policy.metric
        if metric == "usd":
            return cost
        if status == "blocked":
            return 0
        return tokens if metric == "tokens" else 1

    def consumed_at(self, now_ms: int) -> int:
        if self.policy.window.calendar:
            return self.consumed
        cutoff = now_ms - self.policy.window.rolling_ms
        cutoff -= cutoff % MINUTE_MS  # the oldest minute counts whole: never under-count
        # Minutes arrive in order, so the first key is the oldest; a late event's older
        # minute is caught by the same sweep whenever the window moves.
        if self.minutes and next(iter(self.minutes)) < cutoff:
            for minute in [m for m in self.minutes if m < cutoff]:
                self.rolling_total -= self.minutes.pop(minute)
        return self.rolling_total


@dataclass(frozen=True, slots=True)
class Overshoot:
    """A call that settled above its hold on a policy, in the policy's metric."""

    id: int
    ts_ms: int
    request_id: str
    policy_id: str
    held: int
    settled: int

    @property
    def excess(self) -> int:
        return self.settled - self.held


@dataclass(frozen=True, slots=True)
class Authorization:
    """The answer to a call: its evaluation and, if it may go ahead, the hold placed for it."""

    evaluation: Evaluation
    hold_id: str | None
    cost: CallCost
    request_id: str
    override_request_id: str | None = None
    model: str | None = None  # set when a downgrade moved the call to a cheaper model
    grant_id: str | None = None  # the approved override request whose headroom let the call through

    @property
    def allowed(self) -> bool:
        return self.evaluation.allowed or (self.hold_id is not None and (self.model is not None
                                                                         or self.grant_id is not None))


class BudgetBook:
    """In-memory counters for every policy, rebuilt from the ledger and kept exact.

    Every method taking a ``tx`` runs on the ledger's writer thread inside a write
    transaction (see ``SQLiteStore.transact``): ``begin`` first folds in whatever other
    processes committed since the last batch, so each decision sees the whole ledger
    and every hold, and two calls can never both spend the last dollar.
    """

    def __init__(self, now_ms: Callable[[], int], hold_ttl_ms: int = DEFAULT_HOLD_TTL_MS,
                 pending_ttl_ms: int = approvals.DEFAULT_PENDING_TTL_MS) -> None:
        self._now = now_ms
        self.hold_ttl_ms = hold_ttl_ms
        self.pending_ttl_ms = pending_ttl_ms  # how long an override request waits for a decision
        self._counters: dict[str, _Counter] = {}
        self._last_event = 0
        self._last_journal = 0
        self._policies_version: tuple[int, int] | None = None
        self._stale = True
        self._dirty: set[str] = set()  # policies whose consumption moved in this batch
        self._raising: list[int] = []
        self._alerted: set[tuple[str, int, str, int]] = set()  # (policy, window, kind, threshold) stored
        self._batch_mark = 0
        self._expiry_due = 0  # when the next batch looks for holds past their time to live
        #: Some policy names a model or a provider. Only such a policy can refuse one model and
        #: allow another for the same call: any other counts the same tokens and requests for
        #: every model and fewer dollars for a cheaper one, so it fits the cheapest whenever it
        #: fits any (routing need not ask it which model to choose).
        self.tells_models_apart = True

    # ---- transaction hooks

    def begin(self, tx: LedgerTx) -> None:
        self._batch_mark = len(self._raising)
        now = self._now()
        if self._stale or not tx.quiet:  # else nothing was written since the last batch but by it
            version = tx.policies_version()
            if self._stale or version != self._policies_version:
                self._rebuild(tx, now, version)
            elif not self._counters:  # no policy to fold events into: only note how far the ledger goes
                self._last_event = tx.max_event_id()
                self._last_journal = tx.max_journal_id()
            else:
                for row in tx.events_since(self._last_event):
                    self._fold_event(row)
                for journal_id, policy_id, delta in tx.journal_since(self._last_journal):
                    counter = self._counters.get(policy_id)
                    if counter is not None:
                        counter.held += delta
                    self._last_journal = journal_id
        for counter in list(self._counters.values()):
            self._current(tx, counter, now)  # windows that ended start again from the ledger
        if now >= self._expiry_due:  # a hold is released at most EXPIRY_CHECK_MS after its time to live
            self.expire(tx)
        self.end(tx)  # crossings from what others wrote are visible to this batch's operations

    def expire(self, tx: LedgerTx) -> None:
        """Close every hold past its time to live now."""
        now = self._now()
        self._expiry_due = now + EXPIRY_CHECK_MS
        for hold_id in tx.expired_holds(now):
            self._close(tx, hold_id, "expired", now)

    def abort(self) -> None:
        self._stale = True
        del self._raising[self._batch_mark:]  # alerts of a rolled-back batch were never stored

    def end(self, tx: LedgerTx) -> None:
        """Store the alerts whose thresholds consumption has now reached (first and last in a batch)."""
        if not self._dirty:
            return
        from engine.alerts import crossed, crossing_message

        now = self._now()
        for policy_id in sorted(self._dirty):
            counter = self._counters.get(policy_id)
            if counter is None:
                continue
            consumed = counter.consumed_at(now)
            window = counter.policy.window
            key = counter.start_ms if window.calendar else now - now % window.rolling_ms
            for kind, threshold in crossed(counter.policy, consumed):
                # Once stored (or found stored), an alert is not asked for again in its window:
                # a policy past 80 % would otherwise cost two INSERTs on every call.
                if (mark := (policy_id, key, kind, threshold)) in self._alerted:
                    continue
                message = crossing_message(counter.policy, kind, threshold, consumed)
                alert_id = tx.raise_alert(policy_id, key, kind, threshold, now, consumed, message)
                if len(self._alerted) >= ALERTED_KEPT:  # past windows' marks: the ledger remembers them
                    self._alerted.clear()
                self._alerted.add(mark)
                if alert_id is not None:
                    self._raising.append(alert_id)
        self._dirty.clear()

    def committed(self) -> list[int]:
        """Alert ids raised by the last committed batch (taken once)."""
        out, self._raising = self._raising, []
        return out

    def _rebuild(self, tx: LedgerTx, now: int, version: tuple[int, int]) -> None:
        self._counters = {}
        self._alerted.clear()  # the ledger's own uniqueness says again what was stored
        for spec in tx.policy_specs():
            policy = Policy.from_json(json.loads(spec))
            self._counters[policy.id] = self._load(tx, policy, now)
        held = tx.held_totals()
        for policy_id, amount in held.items():
            if policy_id in self._counters:
                self._counters[policy_id].held = amount
        self._last_event = tx.max_event_id()
        self._last_journal = tx.max_journal_id()
        self._policies_version = version
        self._expiry_due = 0
        self._stale = False
        self._dirty.update(self._counters)  # thresholds already passed are stored (once) now
        self.tells_models_apart = any(kind in ("model", "provider") for counter in self._counters.values()
                                      for kind, _ in counter.policy.scope.parts)

    def _load(self, tx: LedgerTx, policy: Policy, now: int) -> _Counter:
        counter = _Counter(policy)
        where = {CONTEXT_COLUMNS[kind]: value for kind, value in policy.scope.parts}
        raw = any(column in ("session", "agent") for column in where)
        metric_index = METRICS.index(policy.metric)
        if policy.window.calendar:
            counter.start_ms, counter.end_ms = window_bounds(policy.window, now)
            sums = (tx.events_between if raw else tx.rollup_between)(counter.start_ms, counter.end_ms, where)
            counter.consumed = sums[metric_index]
        else:
            start = now - policy.window.rolling_ms
            start -= start % MINUTE_MS
            for row in tx.minute_sums(start, now + MINUTE_MS, where, raw=raw):
                amount = row[1 + metric_index]
                if amount:
                    counter.minutes[row[0]] = amount
                    counter.rolling_total += amount
        return counter

    def _fold_event(self, row: Sequence[Any]) -> None:
        (event_id, ts, workspace, team, principal, token_id, provider, model, session, agent,
         input_tokens, output_tokens, cost, status) = row
        context = {"workspace": workspace, "team": team, "principal": principal, "token": token_id,
                   "provider": provider, "model": model, "session": session, "agent": agent}
        for counter in self._counters.values():
            if not counter.policy.scope.matches(context):
                continue
            amount = counter.amount(cost, input_tokens + output_tokens, status)
            if not amount:
                continue
            self._dirty.add(counter.policy.id)
            if counter.policy.window.calendar:
                if counter.start_ms <= ts < counter.end_ms:
                    counter.consumed += amount
            else:
                minute = ts - ts % MINUTE_MS
                counter.minutes[minute] = counter.minutes.get(minute, 0) + amount
                counter.rolling_total += amount
        self._last_event = max(self._last_event, event_id)

    # ---- decisions

    def counters_for(self, tx: LedgerTx | None, context: Mapping[str, str], now: int) -> list[_Counter]:
        matched = []
        for counter in list(self._counters.values()):
            policy = counter.policy
            if policy.enabled and policy.scope.matches(context):
                matched.append(self._current(tx, counter, now))
        matched.sort(key=lambda c: (-c.policy.scope.level, c.policy.id))
        return matched

    def evaluate(self, tx: LedgerTx | None, context: Mapping[str, str], cost: CallCost, now: int) -> Evaluation:
        outcomes = []
        for counter in self.counters_for(tx, context, now):
            policy = counter.policy
            bounds = (counter.start_ms, counter.end_ms) if policy.window.calendar else window_bounds(policy.window, now)
            outcomes.append(outcome(policy, counter.consumed_at(now), counter.held, cost.of(policy.metric), bounds,
                                    priced=cost.priced))
        return decide(outcomes)

    def evaluate_in_memory(self, context: Mapping[str, str], cost: CallCost, now: int) -> Evaluation | None:
        """What ``evaluate`` says from the counters as the last batch left them, without the
        ledger; None when they are not loaded yet or a window that ended needs the ledger. For
        advice (routing); a hold is only ever decided under the write lock."""
        if self._stale:
            return None
        try:
            return self.evaluate(None, context, cost, now)
        except RuntimeError:  # a calendar window ended: its new counter needs the ledger
            return None

    def authorize(self, tx: LedgerTx, context: Mapping[str, str], cost: CallCost, request_id: str,
                  alternatives: Iterable[tuple[str, str, CallCost]] = ()) -> Authorization:
        """Decide, and if the call may go ahead place one hold on every applicable policy at once.

        When the deciding policy's action is ``downgrade``, ``alternatives`` (model,
        provider, worst case; preferred first) are tried in the same transaction and the
        first that every policy allows is held instead; they are only iterated then, so the
        caller may pass a lazy iterable.
        """
        now = self._now()
        evaluation = self.evaluate(tx, context, cost, now)
        if evaluation.decision == "downgrade":
            for model, provider, alt_cost in alternatives:
                alt_context = {**context, "model": model, "provider": provider}
                alt = self.evaluate(tx, alt_context, alt_cost, now)
                if alt.allowed:
                    hold_id = self._hold(tx, alt, request_id, alt_context, now)
                    return Authorization(evaluation, hold_id, alt_cost, request_id, model=model)
        if not evaluation.allowed:
            override = None
            if evaluation.decision == "needs_approval" and evaluation.deciding is not None:
                requester = context.get("principal", "")
                granted = self._granted(tx, evaluation, requester, now)
                if granted is not None:
                    allowed, grant_id, amount = granted
                    hold_id = self._hold(tx, allowed, request_id, context, now)
                    approvals.attach_grant(tx.conn, hold_id, grant_id, amount)
                    return Authorization(allowed, hold_id, cost, request_id, grant_id=grant_id)
                deciding = evaluation.deciding
                request, _ = approvals.open_request(
                    tx.conn, policy_id=deciding.policy.id, policy_snapshot=deciding.policy.to_json(),
                    requester=requester, amount=max(deciding.cost, 1), duration_ms=approvals.DEFAULT_GRANT_MS,
                    reason=f"blocked call: {deciding.message}", evaluation=evaluation.as_dict(), now_ms=now,
                    pending_ttl_ms=self.pending_ttl_ms)
                override = request.id
            return Authorization(evaluation, None, cost, request_id, override)
        if evaluation.decision == "would_block":
            for o in evaluation.outcomes:
                if o.status == "over" and o.policy.mode != "enforced":
                    tx.record_decision(now, request_id, o.policy.id, "would_block", o.policy.mode)
        return Authorization(evaluation, self._hold(tx, evaluation, request_id, context, now), cost, request_id)

    def _granted(self, tx: LedgerTx, evaluation: Evaluation, requester: str,
                 now: int) -> tuple[Evaluation, str, int] | None:
        """The call allowed by the requester's approved override on the one approval policy
        it is over, when the grant has the call's worst case left: (evaluation, grant, amount)."""
        over = [o for o in evaluation.outcomes if o.status == "over" and o.policy.mode == "enforced"]
        if len(over) != 1 or over[0].policy.action != "approval_required" or not over[0].priced:
            return None
        target = over[0]
        grant = approvals.active_grant(tx.conn, target.policy.id, requester, now, target.cost)
        if grant is None:
            return None
        allowed = decide([replace(o, status="ok") if o is target else o for o in evaluation.outcomes])
        return (allowed, grant.id, target.cost) if allowed.allowed else None

    def _hold(self, tx: LedgerTx, evaluation: Evaluation, request_id: str, context: Mapping[str, str],
              now: int) -> str:
        # The time first: a new hold goes at the end of the ledger's holds, not somewhere within.
        hold_id = f"hold_{max(now, 0):011x}{unique_hex()}"
        lines = [(o.policy.id, o.cost) for o in evaluation.outcomes]
        self._last_journal = tx.open_hold(hold_id, request_id, now, now + self.hold_ttl_ms,
                                          json.dumps(dict(context)), lines)
        for policy_id, amount in lines:
            self._counters[policy_id].held += amount
        return hold_id

    def settle(self, tx: LedgerTx, hold_id: str, event: UsageEvent) -> RecordResult:
        """Post the call's actual usage and release its hold, in one transaction. A hold that
        expired meanwhile has nothing left to release: the usage is posted all the same.

        Everything that can fail (the append, the close) comes before the counters in memory
        change: a failed operation is rolled back to its savepoint alone, and memory must not
        keep what the ledger does not."""
        (result,) = tx.append([event])
        now = self._now()
        actual = {"usd": event.cost_nanos or 0, "tokens": event.input_tokens + event.output_tokens,
                  "requests": 0 if event.status == "blocked" else 1}
        closed = self._close(tx, hold_id, "settled", now, actual)
        if closed is None:
            state = tx.hold_state(hold_id)
            if state is None:
                raise HoldError(f"hold {hold_id} does not exist")
            if state in ("settled", "released"):
                raise HoldError(f"hold {hold_id} is already {state}")
        else:
            self._overshoots(tx, hold_id, event, closed.lines, actual, now)
        if tx.appended_id == self._last_event + 1:  # nothing came between: fold the event from here
            self._fold_event((tx.appended_id, event.ts_ms, event.workspace, event.team, event.principal,
                              event.token_id, event.provider, event.model, event.session, event.agent,
                              event.input_tokens, event.output_tokens, event.cost_nanos or 0, event.status))
        else:
            for row in tx.events_since(self._last_event):
                self._fold_event(row)
        return result

    def _overshoots(self, tx: LedgerTx, hold_id: str, event: UsageEvent, lines: Sequence[tuple[str, int]],
                    actual: Mapping[str, int], now: int) -> None:
        """Record, and alert on, each policy the call settled above its hold on: the provider
        counted more than the hold's bound, so the hard limit may be passed by the difference."""
        from engine.alerts import overshoot_message

        for policy_id, held in lines:
            counter = self._counters.get(policy_id)
            if counter is None or (settled := actual[counter.policy.metric]) <= held:
                continue
            overshoot_id = tx.record_overshoot(now, event.request_id, hold_id, policy_id, held, settled)
            alert_id = tx.raise_alert(policy_id, now, "overshoot", overshoot_id, now, settled - held,
                                      overshoot_message(counter.policy, event, held, settled))
            if alert_id is not None:
                self._raising.append(alert_id)

    def release(self, tx: LedgerTx, hold_id: str) -> None:
        """Give a hold back (the call failed before costing anything)."""
        if self._close(tx, hold_id, "released", self._now()) is None:
            state = tx.hold_state(hold_id)
            raise HoldError(f"hold {hold_id} does not exist" if state is None else f"hold {hold_id} is already {state}")

    def _close(self, tx: LedgerTx, hold_id: str, state: str, now: int,
               actual: dict[str, int] | None = None) -> ClosedHold | None:
        """Close the hold if it is open; give its grant back what the call did not use
        (``actual`` None: all of it, the call did not run)."""
        closed = tx.close_hold(hold_id, state, now)
        if closed is None:
            return None
        if closed.grant_id is not None:
            approvals.settle_grant(tx.conn, hold_id, closed.grant_id, closed.grant_amount, actual)
        for policy_id, amount in closed.lines:
            counter = self._counters.get(policy_id)
            if counter is not None:
                counter.held -= amount
        if closed.lines:
            self._last_journal = tx.last_journal_id
        return closed

    def snapshot(self, tx: LedgerTx) -> list[Outcome]:
        """Every policy as it stands now (a call of no cost): consumed, held, window, status."""
        now = self._now()
        out = []
        for policy_id in sorted(self._counters):
            counter = self._current(tx, self._counters[policy_id], now)
            policy = counter.policy
            bounds = (counter.start_ms, counter.end_ms) if policy.window.calendar else window_bounds(policy.window, now)
            out.append(outcome(policy, counter.consumed_at(now), counter.held, 0, bounds))
        return out

    def _current(self, tx: LedgerTx | None, counter: _Counter, now: int) -> _Counter:
        """The counter for the window containing ``now``; a calendar window that has ended
        starts again from the ledger."""
        policy = counter.policy
        if policy.window.calendar and now >= counter.end_ms:
            if tx is None:
                raise RuntimeError("a new budget window needs the ledger")
            fresh = self._load(tx, policy, now)
            fresh.held = counter.held
            self._counters[policy.id] = counter = fresh
            self._dirty.add(policy.id)
        return counter

    def held(self, policy_id: str) -> int:
        counter = self._counters.get(policy_id)
        return counter.held if counter else 0


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
