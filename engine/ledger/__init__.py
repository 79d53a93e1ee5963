"""The ledger: the one package that knows SQL and a database driver.

Everything else in Budgeteer reaches the database through the names exported here: the
store (``SQLiteStore``, ``Engine.open``'s default), the transaction handed to a decision
(``LedgerTx``), the typed results of reads, and the ledger's errors.
"""

from engine.ledger.files import remove_ledger
from engine.ledger.sqlite import (
    SCHEMA_VERSION,
    TIMELINE_FIELDS,
    BreakdownRow,
    ClosedHold,
    LedgerRefusing,
    LedgerStore,
    LedgerTx,
    Metric,
    RecordResult,
    SchemaTooNewError,
    SQLiteStore,
    StoreError,
    TimelinePoint,
    Totals,
    range_segments,
    refusal,
)

__all__ = [
    "SCHEMA_VERSION",
    "TIMELINE_FIELDS",
    "BreakdownRow",
    "ClosedHold",
    "LedgerRefusing",
    "LedgerStore",
    "LedgerTx",
    "Metric",
    "RecordResult",
    "SQLiteStore",
    "SchemaTooNewError",
    "StoreError",
    "TimelinePoint",
    "Totals",
    "range_segments",
    "refusal",
    "remove_ledger",
]
