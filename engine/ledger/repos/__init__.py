"""One repository module per record kind: the SQL that reads and writes it, and nothing else.

A repository is built on one connection; its methods take plain values and return the
domain's records (``Token``, ``Member``, ``OverrideRequest``, ...) or named tuples, never a
cursor, a row or the connection. The domain modules keep the rules and reach the rows
through a ``LedgerView``: a transaction (``LedgerTx`` is one) or what
``SQLiteStore.read_with`` hands its function.
"""

from __future__ import annotations

from functools import cached_property

from engine.ledger.dbapi import Connection
from engine.ledger.repos.approvals import Approvals
from engine.ledger.repos.audit import AuditJournal
from engine.ledger.repos.decisions import RoutingDecisions
from engine.ledger.repos.gateways import Gateways
from engine.ledger.repos.members import Members
from engine.ledger.repos.providers import Providers
from engine.ledger.repos.rates import RateLog
from engine.ledger.repos.tokens import Tokens


class LedgerView:
    """The ledger's records through their repositories, on one connection; each repository is
    made when first used (a transaction or a read mostly needs one or two)."""

    def __init__(self, conn: Connection) -> None:
        self._connection = conn

    @cached_property
    def tokens(self) -> Tokens:
        return Tokens(self._connection)

    @cached_property
    def members(self) -> Members:
        return Members(self._connection)

    @cached_property
    def approvals(self) -> Approvals:
        return Approvals(self._connection)

    @cached_property
    def audit(self) -> AuditJournal:
        return AuditJournal(self._connection)

    @cached_property
    def providers(self) -> Providers:
        return Providers(self._connection)

    @cached_property
    def routing(self) -> RoutingDecisions:
        """Routing decisions."""
        return RoutingDecisions(self._connection)

    @cached_property
    def gateways(self) -> Gateways:
        """Gateway heartbeats."""
        return Gateways(self._connection)

    @cached_property
    def rates(self) -> RateLog:
        """Rate-limit windows (inside a write transaction only: reading one prunes nothing, but
        a take must be decided under the ledger's write lock)."""
        return RateLog(self._connection)


__all__ = ["Approvals", "AuditJournal", "Gateways", "LedgerView", "Members", "Providers",
           "RateLog", "RoutingDecisions", "Tokens"]
