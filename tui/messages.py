"""What crosses the dashboard's screens and widgets, as typed Textual messages, and the one
rule that turns a failed piece of work into words.

Screens never reach into the app's internals or another screen's widgets: they post one of
these, it bubbles up to the app (a screen's parent), and the app acts (the status line, the
next poll, a notice). Engine calls run in workers (``@work``), whose failure Textual reports
to the node that started the worker; ``ReportsFailures`` passes it on up as ``WorkFailed``,
which the app's one handler shows as a notice.
"""

from __future__ import annotations

from textual.message import Message
from textual.worker import Worker, WorkerState

from engine.errors import BudgeteerError

# Worker groups, one per kind of engine work. Exclusive groups are per screen: a newer read
# (or backtest, or look) cancels the one of the same screen under way; changes are not exclusive.
READS = "screen-load"  #: a screen's read of what it shows
CHANGES = "change"  #: a change to the ledger (a policy, a token, a decision...)
BACKTESTS = "backtest"  #: a policy replayed against past calls
LOOKS = "look"  #: a one-off read a key asks for (verify the journal, explain a prompt, test a provider)


def in_words(error: BaseException) -> str | None:
    """The sentence an operator reads for an error Budgeteer raises on purpose; None for any other
    (a bug, an error of a library), which the dashboard calls an unexpected error."""
    if isinstance(error, BudgeteerError):
        return str(error)
    return None


class WorkFailed(Message):
    """A piece of work (an engine call in a worker) raised ``error``; ``title`` says what did not
    happen ("Not revoked"), ``group`` which kind of work it was (``READS``: a screen's read)."""

    def __init__(self, error: BaseException, title: str, group: str) -> None:
        super().__init__()
        self.error, self.title, self.group = error, title, group


class LedgerRead(Message):
    """A screen read the ledger and shows what it read: the status line says "updated 0 s ago"."""


class ReadEnded(Message):
    """The shown screen's read ended (read, failed or cancelled): the next poll counts from now."""


class LedgerChanged(Message):
    """This dashboard changed the ledger (a policy saved, a token revoked...): what shows it reads again."""


class StatusOutdated(Message):
    """The status line on screen is not the app's state (a screen shown again): draw it now."""


class ReportsFailures:
    """For a screen (or the app) that runs engine work: a worker of it that failed is reported up
    as ``WorkFailed``, titled by the worker's ``description``. Its workers are started with
    ``exit_on_error=False``, so a failure is a state of the worker, never the end of the app."""

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        worker = event.worker
        if event.state is WorkerState.ERROR and worker.error is not None:
            self.post_message(WorkFailed(worker.error, worker.description, worker.group))  # type: ignore[attr-defined]
