"""One repository module per record kind: the SQL that reads and writes it, and nothing else.

A repository is built on one connection; its methods take plain values and return the
domain's records (``Token``, ``Member``, ``OverrideRequest``, ...) or named tuples, never a
cursor, a row or the connection. The domain modules keep the rules and reach the rows
through a ``LedgerView``: a transaction (``LedgerTx`` is one) or what
``SQLiteStore.read_with`` hands its function.
"""

from __future__ import annotations

import sqlite3

from engine.ledger.repos.approvals import ApprovalRepo
from engine.ledger.repos.audit import AuditRepo
from engine.ledger.repos.decisions import RoutingDecisionRepo
from engine.ledger.repos.gateways import GatewayRepo
from engine.ledger.repos.members import MemberRepo
from engine.ledger.repos.providers import ProviderRepo
from engine.ledger.repos.tokens import TokenRepo


class LedgerView:
    """The ledger's records through their repositories, on one connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.tokens = TokenRepo(conn)
        self.members = MemberRepo(conn)
        self.approvals = ApprovalRepo(conn)
        self.audit = AuditRepo(conn)
        self.providers = ProviderRepo(conn)
        self.routing = RoutingDecisionRepo(conn)
        self.gateways = GatewayRepo(conn)


__all__ = ["ApprovalRepo", "AuditRepo", "GatewayRepo", "LedgerView", "MemberRepo", "ProviderRepo",
           "RoutingDecisionRepo", "TokenRepo"]
