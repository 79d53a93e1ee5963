"""Money is integer nano-dollars: parsing refuses what it cannot hold exactly."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.money import (
    MoneyError,
    cost_from_femtos,
    format_usd,
    format_usd_compact,
    format_usd_plain,
    parse_usd,
    rate_to_femtos,
)


@pytest.mark.parametrize(
    ("text", "nanos"),
    [
        ("12.5", 12_500_000_000),
        ("$12.50", 12_500_000_000),
        ("0.000002", 2_000),
        ("1,234.56", 1_234_560_000_000),
        ("$ 1,000,000", 1_000_000_000_000_000),
        (".5", 500_000_000),
        ("0.000000001", 1),
        ("7", 7_000_000_000),
        ("  3.25 USD ", 3_250_000_000),
    ],
)
def test_parse_usd_accepts_plain_and_dollar_forms(text: str, nanos: int) -> None:
    assert parse_usd(text) == nanos
    assert type(parse_usd(text)) is int


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("-1", "must not be negative"),
        ("-$0.01", "must not be negative"),
        ("nan", "finite"),
        ("NaN", "finite"),
        ("inf", "finite"),
        ("1.0000000001", "more than 9 decimal places"),
        ("abc", "not a dollar amount"),
        ("", "empty"),
        ("1,23.4", "thousands separators"),
        ("12.5.1", "not a dollar amount"),
        ("1e3", "not a dollar amount"),
    ],
)
def test_parse_usd_rejects_with_a_reason_naming_the_field(text: str, reason: str) -> None:
    with pytest.raises(MoneyError) as info:
        parse_usd(text, field="--hard")
    assert reason in str(info.value)
    assert str(info.value).startswith("--hard: ")
    assert info.value.field == "--hard"


def test_parse_usd_refuses_a_binary_float() -> None:
    with pytest.raises(MoneyError, match="float"):
        parse_usd(0.1)  # type: ignore[arg-type]


def test_parse_usd_takes_decimals_and_ints_exactly() -> None:
    assert parse_usd(Decimal("0.1")) == 100_000_000
    assert parse_usd(3) == 3_000_000_000


@pytest.mark.parametrize(
    ("nanos", "text"),
    [
        (0, "$0.00"),
        (1_234_560_000_000, "$1,234.56"),
        (12_345_000_000_000, "$12,345.00"),
        (10_000_000, "$0.01"),
        (4_200_000, "$0.0042"),  # sub-cent keeps two significant digits, never "$0.00"
        (2_000, "$0.000002"),
        (1, "$0.000000001"),
        (123_456_789_012, "$123.46"),
        (5_000_000, "$0.005"),
        (-1_500_000_000, "-$1.50"),
    ],
)
def test_format_usd_shows_cents_and_meaningful_sub_cent_amounts(nanos: int, text: str) -> None:
    assert format_usd(nanos) == text


def test_format_usd_precise_and_compact() -> None:
    assert format_usd(12_345_678_901, precise=True) == "$12.345678901"
    assert format_usd(1_000_000_000, precise=True) == "$1.00"
    assert format_usd_compact(12_345_000_000_000) == "$12.3k"
    assert format_usd_compact(4_560_000_000_000_000) == "$4.6M"
    assert format_usd_compact(999_000_000_000) == "$999.00"


def test_format_usd_refuses_floats() -> None:
    with pytest.raises(TypeError):
        format_usd(1.5)  # type: ignore[arg-type]


@given(st.integers(min_value=0, max_value=10**17))
def test_plain_format_round_trips_through_parse(nanos: int) -> None:
    assert parse_usd(format_usd_plain(nanos)) == nanos


def test_rates_and_rounding_are_integers() -> None:
    assert rate_to_femtos(2.5e-06) == 2_500_000_000
    assert rate_to_femtos(1.25e-07) == 125_000_000
    assert rate_to_femtos(2.0000000000000002e-07) == 200_000_000  # a float artefact, not a price
    assert cost_from_femtos(1_499_999) == 1
    assert cost_from_femtos(1_500_000) == 2  # half up
    with pytest.raises(MoneyError):
        rate_to_femtos(-1e-6)


def test_one_rounding_rule_for_percentages_down_as_thresholds_are_judged() -> None:
    from engine.money import format_percent, percent_of

    assert percent_of(10_760_000_000, 10_000_000_000) == 107  # 107.6 %: not 108
    assert percent_of(9_995, 10_000) == 99  # never 100 % before the limit is reached
    assert percent_of(8_000, 10_000) == 80 and percent_of(7_999, 10_000) == 79  # as the 80 % alert fires
    assert percent_of(5, 0) == 0 and format_percent(5, 0) == "-" and format_percent(1_076, 1_000) == "107%"
