"""The ledger: the one package that knows SQL and a database driver.

Everything else in Budgeteer reaches the database through the names exported here: the
interface (``Ledger``, and ``Transaction``, what an operation may do), the SQLite store that
implements it (``SQLiteStore``, ``Engine.open``'s default) and its transaction (``LedgerTx``),
the typed results of reads, and the ledger's errors.

Inside: ``schema`` (migrations, connecting), ``rollups`` (the rollup SQL), ``worker`` (a
connection on its own thread), ``writer`` (group commit), ``tx`` (the transaction), ``reads``
(the dashboard's reads), ``repos`` (one repository per record kind), ``sqlite`` (the store),
``protocol`` (the interface), ``results`` and ``errors``; ``store`` (what both backends share) and
``pg`` (the PostgreSQL ledger); ``copy`` (a ledger copied into an empty one, across backends).
"""

from pathlib import Path

from engine.ledger.copy import COPIED_TABLES, CopyReport, check_target, copy_ledger
from engine.ledger.errors import LedgerRefusing, SchemaTooNewError, StoreError, refusal
from engine.ledger.files import is_dsn, local_name, redacted, remove_ledger
from engine.ledger.protocol import Ledger, Transaction
from engine.ledger.repos import LedgerView
from engine.ledger.results import (
    PENDING_ID,
    TIMELINE_FIELDS,
    BreakdownRow,
    ClosedHold,
    Metric,
    RecordResult,
    TimelinePoint,
    Totals,
)
from engine.ledger.rollups import range_segments
from engine.ledger.schema import SCHEMA_VERSION
from engine.ledger.sqlite import SQLiteStore
from engine.ledger.store import Store
from engine.ledger.tx import LedgerTx

__all__ = [
    "COPIED_TABLES",
    "PENDING_ID",
    "SCHEMA_VERSION",
    "TIMELINE_FIELDS",
    "BreakdownRow",
    "ClosedHold",
    "CopyReport",
    "Ledger",
    "LedgerRefusing",
    "LedgerTx",
    "LedgerView",
    "Metric",
    "RecordResult",
    "SQLiteStore",
    "SchemaTooNewError",
    "Store",
    "StoreError",
    "TimelinePoint",
    "Totals",
    "Transaction",
    "check_target",
    "copy_ledger",
    "is_dsn",
    "local_name",
    "local_path",
    "open_ledger",
    "range_segments",
    "redacted",
    "refusal",
    "remove_ledger",
]


async def open_ledger(location: str | Path, *, home: Path, durable: bool = True,
                      sync_interval_s: float = 0.0) -> Store:
    """The ledger at ``location``: a PostgreSQL database (``postgresql://user@host:port/db``) or
    an SQLite file. ``home``: where this machine keeps a PostgreSQL ledger's local files."""
    if is_dsn(location):
        from engine.ledger.pg.store import PostgresStore

        return await PostgresStore.open(str(location), home=home)
    return await SQLiteStore.open(Path(location), durable=durable, sync_interval_s=sync_interval_s)


def local_path(location: str | Path, *, home: Path) -> Path:
    """Where this machine keeps the files of the ledger at ``location`` (its vault and spill
    journal sit beside it): the SQLite file itself; for PostgreSQL, a local name under ``home``."""
    return local_name(str(location), home) if is_dsn(location) else Path(location)
