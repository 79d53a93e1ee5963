"""Usage: what the ledger records (priced, in bulk, an operator's import, OTLP spans) and the reads of it
(totals, timelines, breakdowns, the tail of calls).

A service of ``Engine`` (``engine.services.core``): the engine's methods of the same names
delegate here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from engine.clock import period_range
from engine.ledger import TIMELINE_FIELDS, BreakdownRow, LedgerView, Metric, RecordResult, TimelinePoint, Totals
from engine.models import STATUSES, FieldError, SettledCall, UsageEvent
from engine.services.core import Journal, Service

MAX_RECENT_CALLS = 10_000  # the most calls one read of the ledger's tail returns


class UsageService(Service):
    def priced(self, event: UsageEvent) -> UsageEvent:
        """Settle the event's cost in place and return it: the provider's if given, else from
        the price table of the event's own day, else marked ``unpriced`` (never a silent $0)."""
        if event.cost_nanos is None:
            event.cost_nanos, event.cost_source = self.prices.price_event(event)
        return event

    async def record(self, event: UsageEvent) -> RecordResult:
        """Append one event (group-committed); returns once it is durable."""
        return await self.store.record(self.priced(event))

    async def record_many(self, events: Iterable[UsageEvent]) -> list[RecordResult]:
        """Append events in one transaction: all or none."""
        return await self.store.record_many([self.priced(e) for e in events])

    async def bulk_record(self, events: Iterable[UsageEvent], *, atomic: bool = False) -> tuple[int, int]:
        """Append a large stream; returns (recorded, duplicates). ``atomic``: one transaction."""
        return await self.store.bulk_record(events, atomic=atomic, prepare=self.priced)

    async def import_usage(self, events: Iterable[UsageEvent], *, atomic: bool = False,
                           source: str = "") -> tuple[int, int]:
        """``bulk_record`` as an operator's import (``budgeteer import``): the actor needs
        import_usage, and each of its transactions (one when ``atomic``, else one per chunk)
        journals what it wrote, in that transaction."""
        await self._permitted("import_usage")  # before the first line is read

        def journal(ledger: LedgerView, recorded: int, duplicates: int) -> None:  # through the one change path
            self.core.applied(ledger, "import_usage", "usage.import", lambda: (None, Journal(
                f"usage:{source or 'events'}", None, {"recorded": recorded, "duplicates": duplicates})))

        return await self.store.bulk_record(events, atomic=atomic, prepare=self.priced, journal=journal)

    async def ingest_otlp(self, payload: Any) -> Any:
        """Record the GenAI spans of an OTLP traces payload (OTLP JSON, or ``otlp.decode``'s of
        protobuf), deduplicated by trace and span id; an ``OtlpReport``. OtlpError, and nothing
        written, if the payload is not OTLP traces. The gateway's ``/v1/traces``, for a token
        scoped for it; an operator's file goes through ``import_otlp``."""
        return await self._ingest_otlp(payload, lambda events: self.bulk_record(events, atomic=True))

    async def import_otlp(self, payload: Any, source: str = "") -> Any:
        """``ingest_otlp`` as an operator's import, held to import_usage and journaled."""
        await self._permitted("import_usage")
        return await self._ingest_otlp(payload, lambda events: self.import_usage(events, atomic=True, source=source))

    async def _ingest_otlp(self, payload: Any, write: Callable[[list[UsageEvent]], Awaitable[tuple[int, int]]]) -> Any:
        from engine.integrations import otlp  # its contract (pydantic) only for an OTLP payload, as engine._caller

        events, report = otlp.read(payload, known=lambda model, vendor: self.prices.resolve(model, vendor) is not None)
        if events:
            report.accepted, report.duplicates = await write(events)
        return report

    def period(self, period: str | None) -> tuple[int, int]:
        return period_range(period, self.now_ms())

    async def totals(self, start_ms: int, end_ms: int, filters: Mapping[str, str] | None = None) -> Totals:
        return await self.store.totals(start_ms, end_ms, filters)

    async def timeline(self, start_ms: int, end_ms: int, bucket_ms: int, *,
                       filters: Mapping[str, str] | None = None,
                       group_by: str | None = None,
                       fields: Sequence[str] = TIMELINE_FIELDS) -> list[TimelinePoint]:
        return await self.store.timeline(start_ms, end_ms, bucket_ms, filters, group_by, fields)

    async def breakdown(self, start_ms: int, end_ms: int, by: str, *, limit: int = 10,
                        order: Metric = "cost",
                        filters: Mapping[str, str] | None = None) -> list[BreakdownRow]:
        return await self.store.breakdown(start_ms, end_ms, by, limit=limit, order=order, filters=filters)

    async def usage_report(self, period: str | None, by: str, limit: int = 50) -> dict[str, Any]:
        """What ``budgeteer usage`` prints: totals and a breakdown for a period."""
        start, end = self.period(period)
        totals = await self.totals(start, end)
        rows = await self.breakdown(start, end, by, limit=limit)
        return {"period": period or "all", "start_ms": start, "end_ms": end, "by": by,
                "totals": totals, "rows": rows}

    async def event_count(self) -> int:
        return await self.store.event_count()

    async def recent_calls(self, after: int = 0, limit: int = 200, status: str | None = None) -> list[SettledCall]:
        """The last ``limit`` calls recorded after call id ``after`` (0: from the start), of one
        ``status`` or all, newest first: the tail of the ledger, for a live view that asks only
        for what is new (a status reads back to ``after`` at most: keep it near the end)."""
        if status is not None and status not in STATUSES:
            raise FieldError("status", f"must be one of {', '.join(STATUSES)} (got {status!r})")
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise FieldError("after", f"must be a call id, a whole number from 0 (got {after!r})")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_RECENT_CALLS:
            raise FieldError("limit", f"must be a whole number from 1 to {MAX_RECENT_CALLS} (got {limit!r})")
        return [SettledCall(i, e) for i, e in await self.store.recent_events(after, limit, status)]

    def iter_events(self, start_ms: int, end_ms: int) -> AsyncIterator[UsageEvent]:
        return self.store.iter_events(start_ms, end_ms)

    async def data_version(self) -> int:
        return await self.store.data_version()
