"""Money: integer nano-dollars (1e-9 USD), parsed from and formatted for people.

Below the display every amount is an ``int`` of nano-dollars. Parsing goes through
``Decimal`` so no binary float ever rounds a price or a limit; a float handed to
``parse_usd`` is refused outright.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from engine.errors import BadInput

NANOS_PER_USD = 1_000_000_000
NANOS_PER_CENT = 10_000_000
#: Rates are kept as femto-dollars per token (1e-15 USD), which is the same number
#: as nano-dollars per million tokens; LiteLLM's per-token prices are exact at it.
FEMTOS_PER_NANO = 1_000_000

_AMOUNT = re.compile(
    r"^\s*(?P<sign>[-+]?)\s*\$?\s*(?P<num>[0-9][0-9,_]*(?:\.[0-9]*)?|\.[0-9]+)\s*(?:usd)?\s*$", re.IGNORECASE)
_GROUPED = re.compile(r"^[0-9]{1,3}(?:,[0-9]{3})*$")


class MoneyError(BadInput):
    """An amount that cannot be accepted: ``field`` names it, ``reason`` says why."""


def parse_usd(text: str | int | Decimal, field: str = "amount") -> int:
    """Parse a dollar amount (``12.5``, ``$12.50``, ``1,234.56``, ``0.000002``) into nano-dollars.

    Refuses negatives, NaN and infinities, more than nine decimal places (finer than
    a nano-dollar), floats and anything that is not a plain number, naming ``field``.
    """
    if isinstance(text, (bool, float)):
        raise MoneyError(field, "must be given as text or an integer, not a binary float")
    if isinstance(text, int):
        if text < 0:
            raise MoneyError(field, f"must not be negative (got {text})")
        return text * NANOS_PER_USD
    if isinstance(text, Decimal):
        return _decimal_to_nanos(text, field, str(text))
    if not isinstance(text, str):
        raise MoneyError(field, f"must be a dollar amount, not {type(text).__name__}")
    raw = text.strip()
    if not raw:
        raise MoneyError(field, "is empty; give a dollar amount such as 12.50")
    if raw.lower().lstrip("+-$ ") in {"nan", "inf", "infinity", "snan"}:
        raise MoneyError(field, f"must be a finite number (got {raw!r})")
    m = _AMOUNT.match(raw)
    if not m:
        raise MoneyError(field, f"is not a dollar amount (got {raw!r}); write it like 12.50 or $12.50")
    if m.group("sign") == "-":
        raise MoneyError(field, f"must not be negative (got {raw!r})")
    num = m.group("num").replace("_", "")
    whole = num.split(".", 1)[0]
    if "," in whole:
        if not _GROUPED.match(whole):
            raise MoneyError(field, f"has misplaced thousands separators (got {raw!r})")
        num = num.replace(",", "")
    return _decimal_to_nanos(Decimal(num), field, raw)


def _decimal_to_nanos(value: Decimal, field: str, shown: str) -> int:
    if not value.is_finite():
        raise MoneyError(field, f"must be a finite number (got {shown!r})")
    if value < 0:
        raise MoneyError(field, f"must not be negative (got {shown!r})")
    try:
        nanos = value.scaleb(9)
        exact = nanos.to_integral_value()
    except InvalidOperation as exc:  # pragma: no cover - absurdly large exponents
        raise MoneyError(field, f"is out of range (got {shown!r})") from exc
    if nanos != exact:
        raise MoneyError(field, f"has more than 9 decimal places, finer than a nano-dollar (got {shown!r})")
    result = int(exact)
    if result >= 2**63:
        raise MoneyError(field, f"is too large (got {shown!r})")
    return result


def usd_decimal(nanos: int) -> Decimal:
    """The exact dollar value of ``nanos`` as a Decimal (for JSON and CSV output)."""
    return Decimal(nanos).scaleb(-9).normalize() if nanos else Decimal(0)


def format_usd_plain(nanos: int) -> str:
    """Exact, machine-friendly dollars with no symbol or grouping: ``1234.5``, ``0.000002``."""
    sign = "-" if nanos < 0 else ""
    whole, frac = divmod(abs(nanos), NANOS_PER_USD)
    if not frac:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:09d}".rstrip("0")


def format_usd(nanos: int, *, precise: bool = False) -> str:
    """Format for people: ``$1,234.56``; amounts under a cent keep their significant digits.

    ``$0.0042`` rather than ``$0.00``, so a cheap call never looks free; ``precise``
    shows every nano-dollar (``$12.345678901``).
    """
    if not isinstance(nanos, int) or isinstance(nanos, bool):
        raise TypeError(f"format_usd takes integer nano-dollars, not {type(nanos).__name__}")
    sign = "-" if nanos < 0 else ""
    n = abs(nanos)
    whole, frac = divmod(n, NANOS_PER_USD)
    if precise:
        digits = f"{frac:09d}".rstrip("0")
        digits = digits.ljust(2, "0")
        return f"{sign}${whole:,}.{digits}"
    if n == 0:
        return "$0.00"
    if n < NANOS_PER_CENT:
        # Sub-cent: two significant digits, at most nine decimals.
        digits = f"{n:09d}"
        first = len(digits) - len(digits.lstrip("0"))
        keep = min(9, first + 2)
        text = digits[:keep].rstrip("0") or "0"
        text = text.ljust(max(2, len(text)), "0")
        return f"{sign}$0.{text}"
    cents = (n + NANOS_PER_CENT // 2) // NANOS_PER_CENT  # round half up to the cent
    return f"{sign}${cents // 100:,}.{cents % 100:02d}"


def format_amount(amount: int, metric: str) -> str:
    """An amount of a budget's metric for people: ``$20.00`` for ``usd`` (nano-dollars), else a
    count and its unit (``12,000,000 tokens``). Budgets, approvals and the journal all use it."""
    return format_usd(amount) if metric == "usd" else f"{amount:,} {metric}"


def percent_of(part: int, whole: int) -> int:
    """How much of ``whole`` ``part`` is, in whole percent, rounded down: the one rule of every
    percentage shown (dashboard and command line alike). Down, in integers, because that is how
    thresholds are judged (an 80 % alert fires when ``part * 100 >= whole * 80``): a gauge reads
    80 % exactly when that alert has fired, and 100 % never before the hard limit is reached,
    where rounding to the nearest would show 100 % at 99.5 % and 108 % at 107.6 %. 0 when
    ``whole`` is 0."""
    return part * 100 // whole if whole > 0 else 0


def format_percent(part: int, whole: int) -> str:
    """``percent_of`` as text: ``107%``; ``-`` when ``whole`` is 0 (no limit to be a share of)."""
    return f"{percent_of(part, whole)}%" if whole > 0 else "-"


def format_usd_compact(nanos: int) -> str:
    """Short form for tiles and axes: ``$12.3k``, ``$4.56M``; small amounts as ``format_usd``."""
    n = abs(nanos)
    sign = "-" if nanos < 0 else ""
    for threshold, unit, suffix in ((10**9, 10**9, "B"), (10**6, 10**6, "M"), (10**4, 10**3, "k")):
        if n >= threshold * NANOS_PER_USD:
            scale = unit * NANOS_PER_USD
            tenths = (n * 10 + scale // 2) // scale
            return f"{sign}${tenths // 10:,}.{tenths % 10}{suffix}"
    return format_usd(nanos)


def cost_from_femtos(femtos: int) -> int:
    """Round a cost in femto-dollars to nano-dollars, half up (costs are never negative)."""
    if femtos < 0:
        raise ValueError("a cost cannot be negative")
    return (femtos + FEMTOS_PER_NANO // 2) // FEMTOS_PER_NANO


def rate_to_femtos(value: object, field: str = "rate") -> int:
    """A per-token price as published (``2.5e-06`` USD) into integer femto-dollars per token.

    Prices arrive as JSON numbers; ``repr`` of the float gives its shortest decimal
    form, which is what the publisher wrote, so ``Decimal(repr(x))`` recovers it exactly.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        raise MoneyError(field, f"must be a number, not {type(value).__name__}")
    try:
        dec = Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value))
    except InvalidOperation as exc:
        raise MoneyError(field, f"is not a number (got {value!r})") from exc
    if not dec.is_finite():
        raise MoneyError(field, f"must be a finite number (got {value!r})")
    if dec < 0:
        raise MoneyError(field, f"must not be negative (got {value!r})")
    return int(dec.scaleb(15).to_integral_value())
