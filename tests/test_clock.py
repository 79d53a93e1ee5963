"""Calendar periods people type: this week, last month and a range of days, in UTC."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from engine.clock import MINUTE_MS, period_range
from engine.models import FieldError


def _ms(*parts: int) -> int:
    return int(datetime(*parts, tzinfo=UTC).timestamp()) * 1000  # type: ignore[misc]


NOW = _ms(2026, 12, 1, 17, 51)  # a Tuesday


@pytest.mark.parametrize(("period", "start", "end"), [
    ("today", _ms(2026, 12, 1), NOW + MINUTE_MS),
    ("this week", _ms(2026, 11, 30), NOW + MINUTE_MS),  # since Monday
    ("this month", _ms(2026, 12, 1), NOW + MINUTE_MS),
    ("last month", _ms(2026, 11, 1), _ms(2026, 12, 1)),
    ("2026-11-01..2026-11-15", _ms(2026, 11, 1), _ms(2026, 11, 16)),  # the last day included
    ("2026-11-15..2026-11-15", _ms(2026, 11, 15), _ms(2026, 11, 16)),
])
def test_calendar_periods(period: str, start: int, end: int) -> None:
    assert period_range(period, NOW) == (start, end)


def test_last_month_in_january_is_last_december() -> None:
    assert period_range("last month", _ms(2027, 1, 10)) == (_ms(2026, 12, 1), _ms(2027, 1, 1))


@pytest.mark.parametrize(("period", "message"), [
    ("2026-11-31..2026-12-02", "period: the first date must be a real date written YYYY-MM-DD, not '2026-11-31'"),
    ("2026-11-01..15", "period: the last date must be a real date written YYYY-MM-DD, not '15'"),
    ("2026-11-15..2026-11-01", "period: the range must start on or before its last day (2026-11-15 is after"),
])
def test_a_bad_range_names_what_is_wrong(period: str, message: str) -> None:
    with pytest.raises(FieldError) as info:
        period_range(period, NOW)
    assert str(info.value).startswith(message)
