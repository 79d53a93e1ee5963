"""Budget decisions kept for review: the would-block verdicts of dry_run and suggest policies."""

from __future__ import annotations

import sqlite3

from engine.ledger.results import BudgetDecision


class Decisions:
    __slots__ = ("conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def record(self, ts_ms: int, request_id: str, policy_id: str, decision: str, mode: str) -> None:
        """Keep a would-block verdict of a dry_run or suggest policy, for the operator to review."""
        self.conn.execute("INSERT INTO budget_decisions (ts_ms, request_id, policy_id, decision, mode) "
                          "VALUES (?, ?, ?, ?, ?)", (ts_ms, request_id, policy_id, decision, mode))

    def recent(self, limit: int) -> list[BudgetDecision]:
        """The newest ``limit`` decisions, newest first."""
        return [BudgetDecision(int(t), str(r), str(p), str(d), str(m)) for t, r, p, d, m in self.conn.execute(
            "SELECT ts_ms, request_id, policy_id, decision, mode FROM budget_decisions ORDER BY id DESC LIMIT ?",
            (limit,))]
