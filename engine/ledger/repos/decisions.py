"""Decisions kept for review: the would-block verdicts of dry_run and suggest budget policies
(``budget_decisions``), and every model a call was routed to with the saving estimated
(``routing_decisions``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from engine.ledger.dbapi import Connection
from engine.ledger.results import BudgetDecision
from engine.routing import Recorded, Summary

_INSERT_ROUTING: Final = (
    "INSERT INTO routing_decisions (ts_ms, request_id, principal, mode, requested, chosen, applied, "
    "score, requested_cost, chosen_cost, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


class Decisions:
    __slots__ = ("conn",)

    def __init__(self, conn: Connection) -> None:
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


class RoutingDecisions:
    __slots__ = ("conn",)

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def record(self, decisions: Sequence[Recorded]) -> None:
        rows = [(d.ts_ms, d.request_id, d.principal, d.mode, d.requested, d.chosen, d.applied, d.score,
                 d.requested_cost, d.chosen_cost, d.reason) for d in decisions]
        defer = getattr(self.conn, "defer", None)
        if defer is not None and len(rows) == 1:  # PostgreSQL: it rides with the routed call's hold
            defer(_INSERT_ROUTING, rows[0])
            return
        self.conn.executemany(_INSERT_ROUTING, rows)

    def newest(self, limit: int) -> list[Recorded]:
        return [Recorded(*r) for r in self.conn.execute(
            "SELECT ts_ms, request_id, principal, mode, requested, chosen, applied, score, requested_cost, "
            "chosen_cost, reason FROM routing_decisions ORDER BY id DESC LIMIT ?", (limit,))]

    def summary(self, since_ms: int) -> Summary:
        """How often routing changed the model since ``since_ms``, and what that saved (applied,
        under enforced) or would have saved (suggest and dry_run)."""
        row = self.conn.execute(
            "SELECT count(*), coalesce(sum(CASE WHEN chosen != requested THEN 1 ELSE 0 END), 0), "
            "coalesce(sum(CASE WHEN mode = 'enforced' AND chosen != requested AND requested_cost > chosen_cost "
            "THEN requested_cost - chosen_cost ELSE 0 END), 0), "
            "coalesce(sum(CASE WHEN mode != 'enforced' AND chosen != requested AND requested_cost > chosen_cost "
            "THEN requested_cost - chosen_cost ELSE 0 END), 0) FROM routing_decisions WHERE ts_ms >= ?",
            (since_ms,)).fetchone()
        return Summary(*(int(v) for v in row))
