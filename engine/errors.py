"""Every error Budgeteer raises on purpose, under one base.

Four kinds, each with what a front end does with it:

- ``BadInput``: the input is wrong; ``field`` names what, ``reason`` says why. Exit status 2,
  HTTP 400. Fix the input and try again.
- ``Refused``: the input is understood but the answer is no (no permission, a budget, a token
  revoked, a hold already closed, an approval already decided). Exit status 1, an HTTP 4xx
  (``http_status`` says which).
- ``LedgerUnavailable``: the ledger cannot be read or written now (disk full, locked, a
  database down). Exit status 1, HTTP 503 with ``Retry-After``; a later try may succeed.
- ``BudgeteerError`` itself, for the rest (a vault that cannot open, a file that cannot be
  read): exit status 1, HTTP 500. A class of the rest may set its own statuses (a price file
  or an OTLP payload that cannot be read as a whole: exit status 2, HTTP 400).

``exit_status``, ``http_status`` and ``code`` (the machine-readable code of an HTTP answer's
body) are class attributes an instance may override: a token refused for its scope is a 403,
any other refused token a 401. ``engine.integrations.governor.refusal_of`` turns any of them
into the gateway's (and the governed transport's) answer.

A front end catches ``BudgeteerError`` and nothing narrower to turn an error into words: the
message is the one sentence an operator reads; it never holds a secret or a traceback.
"""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_USAGE = 2


class BudgeteerError(Exception):
    """An error Budgeteer raises on purpose; ``str(error)`` is the sentence a user reads."""

    exit_status: int = EXIT_FAILURE
    http_status: int = 500
    code: str = "internal_error"


class BadInput(BudgeteerError, ValueError):
    """Bad input: ``field`` is what was wrong, ``reason`` why, in words for the operator."""

    exit_status: int = EXIT_USAGE
    http_status: int = 400
    code: str = "invalid_value"

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class Refused(BudgeteerError):
    """Understood, and refused: a permission, a budget, a token, a state that does not allow it."""

    http_status: int = 403
    code: str = "refused"


class LedgerUnavailable(BudgeteerError):
    """The ledger cannot be read or written for now; a later try may succeed."""

    http_status: int = 503
    code: str = "ledger_unavailable"
