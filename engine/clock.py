"""The one clock, and the durations and periods people type.

Everything that needs the time takes a ``Clock``, so tests freeze it and the rules
stay pure functions of their inputs.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Protocol

from engine.models import FieldError

MINUTE_MS: Final = 60_000
HOUR_MS: Final = 3_600_000
DAY_MS: Final = 86_400_000
_UNITS: Final = {"s": 1000, "m": MINUTE_MS, "h": HOUR_MS, "d": DAY_MS, "w": 7 * DAY_MS}
_DURATION = re.compile(r"^\s*(\d{1,7})\s*([smhdw])\s*$", re.IGNORECASE)


class Clock(Protocol):
    def now_ms(self) -> int: ...


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


@dataclass
class FrozenClock:
    """A clock that moves only when told to (tests, screenshots)."""

    ms: int

    def now_ms(self) -> int:
        return self.ms

    def advance(self, ms: int) -> None:
        self.ms += ms


def parse_duration_ms(text: str, field: str = "duration") -> int:
    """``90s``, ``30m``, ``6h``, ``7d``, ``2w`` into milliseconds; anything else names ``field``."""
    m = _DURATION.match(text or "")
    if not m:
        raise FieldError(field, f"must be a number and a unit (s, m, h, d or w) like 30m or 7d, not {text!r}")
    value = int(m.group(1))
    if value <= 0:
        raise FieldError(field, f"must be longer than zero (got {text!r})")
    return value * _UNITS[m.group(2).lower()]


def format_duration(ms: int) -> str:
    """The inverse of ``parse_duration_ms``, in the largest unit that divides exactly: ``90m``, ``2h``, ``7d``."""
    for unit in ("w", "d", "h", "m"):
        if ms % _UNITS[unit] == 0:
            return f"{ms // _UNITS[unit]}{unit}"
    return f"{max(1, -(-ms // 1000))}s"


def format_span(ms: int) -> str:
    """A duration as people say it: ``45 s``, ``12 min``, ``3 h 05 min``, ``2 d 4 h``."""
    ms = max(0, ms)
    seconds = ms // 1000
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes:02d} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def _month_start(year: int, month: int) -> int:
    return int(datetime(year, month, 1, tzinfo=UTC).timestamp()) * 1000


def _date_ms(text: str, field: str, which: str) -> int:
    try:
        day = datetime.strptime(text.strip(), "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise FieldError(field, f"the {which} date must be a real date written YYYY-MM-DD, "
                                f"not {text.strip()!r}") from None
    return int(day.timestamp()) * 1000


def period_range(period: str | None, now_ms: int, field: str = "period") -> tuple[int, int]:
    """[start, end) for a period: ``24h``, ``7d``, ``30d``, ``90d`` (any duration), ``today``,
    ``week`` (since Monday), ``month``, ``last month`` (calendar, UTC), a range of days
    ``2026-11-01..2026-11-15`` (both days included) or ``all``."""
    text = " ".join((period or "all").strip().lower().split()).removeprefix("this ")
    if text == "all":
        return 0, now_ms + MINUTE_MS
    if text == "today":
        return now_ms - now_ms % DAY_MS, now_ms + MINUTE_MS
    if text == "week":  # ISO weeks start on Monday; the epoch (1970-01-01) was a Thursday
        return now_ms - (now_ms + 3 * DAY_MS) % (7 * DAY_MS), now_ms + MINUTE_MS
    now = datetime.fromtimestamp(now_ms / 1000, UTC)
    if text == "month":
        return _month_start(now.year, now.month), now_ms + MINUTE_MS
    if text == "last month":
        year, month = (now.year, now.month - 1) if now.month > 1 else (now.year - 1, 12)
        return _month_start(year, month), _month_start(now.year, now.month)
    if ".." in text:
        first, _, last = text.partition("..")
        start, end = _date_ms(first, field, "first"), _date_ms(last, field, "last") + DAY_MS
        if end <= start:
            raise FieldError(field, f"the range must start on or before its last day ({first.strip()} is after "
                                    f"{last.strip()})")
        return start, end
    return now_ms - parse_duration_ms(text, field), now_ms + MINUTE_MS


def iso(ms: int) -> str:
    """UTC ISO 8601 with milliseconds and a Z: the one text form of a time in files."""
    dt = datetime.fromtimestamp(ms // 1000, UTC).replace(microsecond=(ms % 1000) * 1000)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
