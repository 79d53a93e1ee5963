"""Records shared by every engine module: usage events, token usage, the field errors
that name what was wrong with an input, and unique ids for calls.

A ``UsageEvent`` is a plain slotted dataclass because it sits on the hot path (bulk
imports of a million rows, group-committed writes); ``validate_event`` is the one place
that turns untrusted input (a JSONL line, a CSV row, an HTTP body) into one, with an
error that names the field and the reason.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from engine.errors import BadInput

_id_prefix = ""
_id_counter = itertools.count()


def _new_id_prefix() -> None:
    global _id_prefix, _id_counter
    _id_prefix, _id_counter = secrets.token_hex(6), itertools.count()


_new_id_prefix()
os.register_at_fork(after_in_child=_new_id_prefix)


def unique_hex() -> str:
    """Twenty hex digits (or more, past four billion) unique across processes: a random prefix
    drawn once per process (and again in a forked child) and a counter. For ids made on every
    call (a request, a hold): one system call for randomness each was 2 % of the gateway's
    time. Not secret: never use one as a credential."""
    return f"{_id_prefix}{next(_id_counter):08x}"


COST_SOURCES: Final = ("provider", "computed", "estimated", "unpriced")
STATUSES: Final = ("ok", "error", "blocked")
#: The dimensions rollups are kept by, in key order.
ROLLUP_DIMENSIONS: Final = ("workspace", "team", "principal", "token_id", "provider", "model")
#: Every dimension a breakdown or a filter may name.
DIMENSIONS: Final = ROLLUP_DIMENSIONS
TOKEN_FIELDS: Final = (
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "output_tokens",
    "reasoning_tokens",
)
MAX_ID_LEN: Final = 200
MAX_TOKENS: Final = 10**12
MAX_COST_NANOS: Final = 10**17  # $100M for one call: anything above is a unit mistake
DEFAULT_WORKSPACE: Final = "default"


#: Bad input naming its field: the hierarchy's ``BadInput`` (exit status 2, HTTP 400), by the
#: name the engine has always raised it under.
FieldError = BadInput


@dataclass(slots=True, frozen=True)
class Usage:
    """Token counts of one call.

    ``input_tokens`` is the whole prompt, cached reads and cache writes included (the
    OpenAI convention); ``cache_write_tokens`` includes ``cache_write_1h_tokens`` (writes
    to Anthropic's one-hour cache, charged at their own rate); ``output_tokens`` includes
    ``reasoning_tokens``. Anthropic's fields are added up into this shape where they are read.
    """

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_1h_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(slots=True)
class UsageEvent:
    """One model call as the ledger keeps it. ``cost_nanos`` None means: price it on record."""

    ts_ms: int
    request_id: str
    provider: str
    model: str
    workspace: str = DEFAULT_WORKSPACE
    team: str = ""
    principal: str = ""
    token_id: str = ""
    session: str = ""
    agent: str = ""
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0  # of which written to a one-hour cache
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost_nanos: int | None = None
    cost_source: str = "computed"
    latency_ms: int = 0
    status: str = "ok"
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def usage(self) -> Usage:
        return Usage(
            self.input_tokens,
            self.cached_input_tokens,
            self.cache_write_tokens,
            self.output_tokens,
            self.reasoning_tokens,
            self.cache_write_1h_tokens,
        )

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in EVENT_FIELDS}


@dataclass(slots=True, frozen=True)
class SettledCall:
    """A call as the ledger recorded it: its event and ``id``, the ledger's append order (the
    cursor a live view follows: a call recorded later has a higher id, whatever its time)."""

    id: int
    event: UsageEvent

    @property
    def policy(self) -> str:
        """For a blocked call, the policy that blocked it (``name (id)``) when its event names one."""
        tags = self.event.tags
        pid, name = tags.get("policy", ""), tags.get("policy_name", "")
        return f"{name} ({pid})" if name and pid and name != pid else pid or name


@dataclass(frozen=True, slots=True)
class GatewayStatus:
    """A gateway's heartbeat as the ledger keeps it: where it listens, since when, its counters."""

    id: str
    address: str
    pid: int
    started_ms: int
    seen_ms: int
    stopped_ms: int | None
    requests: int
    errors: int
    requests_last_min: int
    errors_last_min: int


EVENT_FIELDS: Final = tuple(UsageEvent.__dataclass_fields__)
_REQUIRED: Final = ("request_id", "provider", "model")
_TEXT_FIELDS: Final = ("request_id", "provider", "model", "workspace", "team", "principal", "token_id",
                       "session", "agent")


def _as_int(value: Any, name: str, *, maximum: int) -> int:
    if isinstance(value, bool):
        raise FieldError(name, "must be a whole number, not true/false")
    if isinstance(value, int):
        result = value
    elif isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise FieldError(name, f"must be a whole number (got {value!r})")
        result = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if not text:
            return 0
        try:
            result = int(text)
        except ValueError:
            raise FieldError(name, f"must be a whole number (got {value!r})") from None
    elif value is None:
        return 0
    else:
        raise FieldError(name, f"must be a whole number, not {type(value).__name__}")
    if result < 0:
        raise FieldError(name, f"must not be negative (got {result})")
    if result > maximum:
        raise FieldError(name, f"is implausibly large (got {result})")
    return result


def parse_timestamp_ms(value: Any, name: str = "ts") -> int:
    """UTC milliseconds from epoch milliseconds (int), or an ISO 8601 time (a zone is required)."""
    if isinstance(value, bool) or value is None or value == "":
        raise FieldError(name, "is required: epoch milliseconds or an ISO 8601 time with a zone")
    if isinstance(value, (int, float)) or (isinstance(value, str) and value.strip().isdigit()):
        ms = _as_int(value, name, maximum=253402300799999)
        if ms < 10**11:
            raise FieldError(name, f"looks like seconds, not milliseconds (got {value!r})")
        return ms
    if not isinstance(value, str):
        raise FieldError(name, f"must be epoch milliseconds or an ISO 8601 time, not {type(value).__name__}")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise FieldError(name, f"is not an ISO 8601 time (got {value!r})") from None
    if dt.tzinfo is None:
        raise FieldError(name, f"has no time zone; add Z or an offset such as +02:00 (got {value!r})")
    return _dt_ms(dt)


def _dt_ms(dt: datetime) -> int:
    delta = dt.astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def validate_event(raw: dict[str, Any]) -> UsageEvent:
    """Turn an untrusted mapping into a ``UsageEvent``, or raise ``FieldError`` naming the field.

    Unknown keys are refused (a misspelt column must not silently vanish). Costs are
    accepted only as integer nano-dollars (``cost_nanos``) or as a decimal string of
    dollars (``cost_usd``), never as a float.
    """
    if not isinstance(raw, dict):
        raise FieldError("event", f"must be an object, not {type(raw).__name__}")
    unknown = set(raw) - set(EVENT_FIELDS) - {"cost_usd", "ts"}
    if unknown:
        name = sorted(unknown)[0]
        if not name.strip():
            raise FieldError("event", "has a field with an empty name")
        raise FieldError(name, "is not a known event field")
    values: dict[str, Any] = {}
    ts_value = raw.get("ts_ms", raw.get("ts"))
    values["ts_ms"] = parse_timestamp_ms(ts_value, "ts_ms" if "ts_ms" in raw else "ts")
    for name in _TEXT_FIELDS:
        value = raw.get(name)
        if value is None or value == "":
            if name in _REQUIRED:
                raise FieldError(name, "is required")
            if name == "workspace":
                values[name] = DEFAULT_WORKSPACE
            continue
        if not isinstance(value, str):
            if isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            else:
                raise FieldError(name, f"must be text, not {type(value).__name__}")
        value = value.strip()
        if len(value) > MAX_ID_LEN:
            raise FieldError(name, f"is longer than {MAX_ID_LEN} characters")
        if any(ord(c) < 32 for c in value):
            raise FieldError(name, "contains control characters")
        values[name] = value
    for name in TOKEN_FIELDS:
        values[name] = _as_int(raw.get(name), name, maximum=MAX_TOKENS)
    if values["cached_input_tokens"] + values["cache_write_tokens"] > values["input_tokens"]:
        raise FieldError("cached_input_tokens",
                         "cached reads plus cache writes cannot exceed input_tokens (which includes them)")
    if values["cache_write_1h_tokens"] > values["cache_write_tokens"]:
        raise FieldError("cache_write_1h_tokens",
                         "cannot exceed cache_write_tokens (which includes the one-hour writes)")
    if values["reasoning_tokens"] > values["output_tokens"]:
        raise FieldError("reasoning_tokens", "cannot exceed output_tokens (which includes them)")
    values["latency_ms"] = _as_int(raw.get("latency_ms"), "latency_ms", maximum=10**9)
    status = raw.get("status") or "ok"
    if status not in STATUSES:
        raise FieldError("status", f"must be one of {', '.join(STATUSES)} (got {status!r})")
    values["status"] = status
    values.update(_cost_fields(raw))
    values["tags"] = _tags(raw.get("tags"))
    return UsageEvent(**values)


def _cost_fields(raw: dict[str, Any]) -> dict[str, Any]:
    from engine.money import parse_usd

    source = raw.get("cost_source") or None
    if source is not None and source not in COST_SOURCES:
        raise FieldError("cost_source", f"must be one of {', '.join(COST_SOURCES)} (got {source!r})")
    cost: int | None = None
    if raw.get("cost_nanos") not in (None, ""):
        cost = _as_int(raw["cost_nanos"], "cost_nanos", maximum=MAX_COST_NANOS)
        if isinstance(raw["cost_nanos"], float):
            raise FieldError("cost_nanos", "must be an integer count of nano-dollars, not a float")
    elif raw.get("cost_usd") not in (None, ""):
        cost = parse_usd(raw["cost_usd"], "cost_usd")  # a MoneyError: bad input naming cost_usd
        if cost > MAX_COST_NANOS:
            raise FieldError("cost_usd", "is implausibly large for one call")
    if cost is None:
        if source in ("provider",):
            raise FieldError("cost_source", "is 'provider' but no cost_nanos or cost_usd was given")
        # Priced on record; 'estimated' survives so estimated token counts stay marked.
        return {"cost_nanos": None, "cost_source": source if source == "estimated" else "computed"}
    if source == "unpriced" and cost:
        raise FieldError("cost_source", "is 'unpriced' but a cost above zero was given")
    return {"cost_nanos": cost, "cost_source": source or "provider"}


def _tags(value: Any) -> dict[str, str]:
    if value in (None, ""):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise FieldError("tags", "is not a JSON object") from None
    if not isinstance(value, dict):
        raise FieldError("tags", "must be an object of text keys and values")
    out: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(item, (str, int, bool)) or isinstance(item, float):
            raise FieldError(f"tags.{key}", "must be text, a whole number or true/false")
        out[str(key)] = str(item).lower() if isinstance(item, bool) else str(item)
    if len(json.dumps(out)) > 4096:
        raise FieldError("tags", "are larger than 4 KiB")
    return out
