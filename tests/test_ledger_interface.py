"""The ledger package's interface: the store's clock, typed rows out of a transaction, and no
reach into a database driver's private parts (issue 19)."""

from __future__ import annotations

import ast
from pathlib import Path

from engine.clock import MINUTE_MS, FrozenClock
from engine.ledger import LedgerTx, SQLiteStore
from engine.ledger.results import EventRow, JournalRow, OvershootRow, PoliciesVersion
from tests.conftest import NOW_MS, event

ENGINE = Path(__file__).resolve().parent.parent / "engine"


async def test_the_store_answers_the_time_from_the_clock_it_is_given(db_path: Path) -> None:
    clock = FrozenClock(NOW_MS)
    store = await SQLiteStore.open(db_path, clock=clock)
    try:
        assert store.now_ms() == NOW_MS
        clock.advance(MINUTE_MS)
        assert store.now_ms() == NOW_MS + MINUTE_MS
    finally:
        await store.close()


async def test_a_transaction_gives_back_named_rows_not_a_drivers_tuples(db_path: Path) -> None:
    """What an operation reads comes back as the ledger's own typed rows, by field name."""
    store = await SQLiteStore.open(db_path)
    try:
        await store.record_many([event(1, principal="alice", cost_nanos=7), event(2, principal="bob", cost_nanos=5)])

        def read(tx: LedgerTx) -> tuple[list[EventRow], list[JournalRow], list[OvershootRow], PoliciesVersion]:
            tx.open_hold("h1", "req-9", NOW_MS, NOW_MS + MINUTE_MS, "{}", [("p1", 40)])
            tx.record_overshoot(NOW_MS, "req-9", "h1", "p1", 40, 55)
            return tx.events_since(0), tx.journal_since(0), tx.overshoots(), tx.policies_version()

        events, journal, overshoots, version = await store.transact(read)
        assert [(e.principal, e.cost_nanos) for e in events] == [("alice", 7), ("bob", 5)]
        assert [(j.policy_id, j.delta) for j in journal] == [("p1", 40)]
        assert [(o.held, o.settled) for o in overshoots] == [(40, 55)]
        assert (version.stored, version.updated_ms) == (0, 0)
    finally:
        await store.close()


def test_no_module_reaches_into_a_drivers_private_attributes() -> None:
    """The store keeps its own connections (engine.ledger.worker): no ``x._conn`` or
    ``x._execute`` of aiosqlite's anywhere in the engine."""
    reaches = []
    for path in sorted(ENGINE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in ("_conn", "_execute"):
                reaches.append(f"{path.relative_to(ENGINE.parent)}:{node.lineno} .{node.attr}")
    assert reaches == []
