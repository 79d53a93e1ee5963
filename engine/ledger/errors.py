"""The ledger's errors: it cannot be opened or written (``StoreError``), its schema is newer
than this Budgeteer (``SchemaTooNewError``), or it refuses writes for now (``LedgerRefusing``,
and ``refusal``, which tells a driver's passing failures from the others)."""

from __future__ import annotations

import sqlite3
from typing import Final

from engine.errors import LedgerUnavailable


class StoreError(LedgerUnavailable, RuntimeError):
    """The ledger cannot be opened or written; the message says why in one sentence."""


class SchemaTooNewError(StoreError):
    pass


class LedgerRefusing(StoreError):
    """The ledger refuses writes for now (``refusal`` says why); a later write may succeed."""


class PipelineFailed(StoreError):
    """A write sent ahead in a pipelined batch (PostgreSQL's ``PgConnection.queue``) failed, or
    came back other than its operation took it to be: the writer undoes the batch and runs it
    again a statement at a time, where each operation meets its own outcome."""


#: The SQLite errors by which a ledger refuses a write for now, with what they mean.
_REFUSALS: Final = {
    sqlite3.SQLITE_FULL: "the disk is full", sqlite3.SQLITE_IOERR: "an I/O error",
    sqlite3.SQLITE_BUSY: "another connection held the write lock too long",
    sqlite3.SQLITE_LOCKED: "the ledger is locked", sqlite3.SQLITE_READONLY: "the ledger is read-only",
    sqlite3.SQLITE_CANTOPEN: "a file of the ledger cannot be opened",
}


def refusal(exc: BaseException) -> str | None:
    """Why the ledger refused a write, when ``exc`` says it did for a passing reason (a full
    disk, an I/O error, a lock held too long): a short reason; None for any other error."""
    if isinstance(exc, LedgerRefusing):
        return str(exc)
    if isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) is not None:
        reason = _REFUSALS.get(exc.sqlite_errorcode & 0xFF)
        return f"{reason} ({exc})" if reason else None
    if (reason := unreachable(exc)) is not None:
        return reason
    if isinstance(exc, OSError) and exc.errno is not None:  # the log's fsync, or a file of the ledger
        return f"an I/O error ({exc.strerror or exc})"
    return None



#: PostgreSQL's classes of errors (SQLSTATE's first two characters) by which a ledger refuses
#: writes for now: resources, the server shutting down or starting, the connection.
_PG_REFUSALS: Final = {
    "08": "the connection to the ledger's database failed", "53": "the ledger's database is out of resources",
    "57": "the ledger's database is shutting down or starting", "58": "the ledger's database had a system error",
    "40": "the ledger's database rolled a transaction back", "25": "the ledger's database is read-only",
}


def unreachable(exc: BaseException) -> str | None:
    """Why PostgreSQL's server cannot take a statement for now (down, starting, shutting down,
    the connection lost, out of resources), when ``exc`` says so; None for any other error."""
    if type(exc).__module__.startswith("asyncpg"):
        return _pg_refusal(exc)
    if isinstance(exc, ConnectionError | TimeoutError):
        return f"the ledger's database cannot be reached ({exc.strerror or exc.__class__.__name__})"
    if isinstance(exc, OSError) and exc.errno is not None and type(exc) is OSError:  # e.g. no route to the host
        return f"the ledger's database cannot be reached ({exc.strerror})"
    return None


def _pg_refusal(exc: BaseException) -> str | None:
    state = str(getattr(exc, "sqlstate", "") or "")
    if state[:2] in _PG_REFUSALS:
        return f"{_PG_REFUSALS[state[:2]]} ({state})"
    name = type(exc).__name__
    if name in ("ConnectionDoesNotExistError", "InterfaceError", "InternalClientError", "ConnectionFailureError"):
        return "the connection to the ledger's database was lost"
    return None


def in_one_line(exc: BaseException) -> str:
    """A driver's error in one line (never a password: drivers do not print it, and a ledger's
    location in a message is shown without it)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
