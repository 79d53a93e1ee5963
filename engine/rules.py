"""Budget rules: policies, their scopes and windows, and the evaluation of a call against them.

Everything here is a pure function of its inputs (the clock is a parameter), so the
rules are tested without a database: parsing and validating a policy, the bounds of
a calendar or rolling window in a time zone, which policies apply to a call, and the
decision those policies reach for a call's worst-case cost. Money is integer
nano-dollars throughout. The stateful book that applies them is ``engine.book``;
forecasts and backtests are ``engine.forecasts``; ``engine.budgets`` names them all.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from engine.clock import DAY_MS, HOUR_MS, MINUTE_MS
from engine.models import FieldError
from engine.money import format_amount, format_usd, format_usd_plain, parse_usd

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
        return parse_usd(value if isinstance(value, (str, int)) else str(value), field_name)  # MoneyError: a BadInput
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
