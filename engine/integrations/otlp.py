"""OTLP/HTTP JSON traces into the ledger: spans that follow the OpenTelemetry GenAI semantic
conventions become usage events.

Read per span: ``gen_ai.provider.name`` (or the deprecated ``gen_ai.system``),
``gen_ai.response.model`` (else ``gen_ai.request.model``), ``gen_ai.usage.input_tokens``,
``output_tokens``, ``cache_read.input_tokens``, ``cache_creation.input_tokens`` and
``reasoning.output_tokens``; the span's start and end give the time and the latency, its
status an error. Who made the call: ``enduser.id`` or ``user.id`` (else the resource's
``service.name``), ``budgeteer.team``, ``budgeteer.workspace``, ``session.id`` or
``gen_ai.conversation.id``, ``gen_ai.agent.name``. Integers may come as strings (OTLP JSON
encodes 64-bit ints so) or numbers. A span is the event ``otlp:<trace id>:<span id>``, so
sending it twice records it once. Spans without a GenAI model are not model calls and are
skipped; a GenAI span that cannot be read is rejected with its reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.models import FieldError, UsageEvent, validate_event

_HEX = re.compile(r"^[0-9a-fA-F]+$")
MAX_REASONS = 20


class OtlpError(ValueError):
    """The payload as a whole is not OTLP/HTTP JSON traces; says what is wrong."""


@dataclass
class OtlpReport:
    spans: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    skipped: int = 0  # spans that are not model calls
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"spans": self.spans, "accepted": self.accepted, "duplicates": self.duplicates,
                "rejected": self.rejected, "skipped": self.skipped, "reasons": self.reasons,
                "partialSuccess": {"rejectedSpans": self.rejected,
                                   "errorMessage": "; ".join(self.reasons[:5])} if self.rejected else {}}


def _value(v: Any) -> Any:
    if not isinstance(v, Mapping):
        return None
    for key in ("stringValue", "intValue", "doubleValue", "boolValue"):
        if key in v:
            return v[key]
    return None


def _attributes(items: Any, where: str) -> dict[str, Any]:
    if items is None:
        return {}
    if not isinstance(items, list):
        raise OtlpError(f"{where}.attributes must be a list of key/value objects")
    out = {}
    for item in items:
        if isinstance(item, Mapping) and isinstance(item.get("key"), str):
            out[item["key"]] = _value(item.get("value"))
    return out


def _int(attrs: Mapping[str, Any], key: str) -> int:
    value = attrs.get(key)
    if value is None:
        return 0
    if isinstance(value, bool):
        raise FieldError(key, "must be an integer, not a boolean")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int) or value < 0:
        raise FieldError(key, f"must be a whole number of tokens, not {value!r}")
    return value


def _nanos(span: Mapping[str, Any], key: str) -> int:
    value = span.get(key)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise FieldError(key, "must be Unix nanoseconds as a number or a string of digits")


def spans(payload: Any) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(span, resource attributes) for every span; OtlpError when the shape is wrong."""
    if not isinstance(payload, Mapping) or not isinstance(payload.get("resourceSpans"), list):
        raise OtlpError("not OTLP/HTTP JSON traces: expected an object with a resourceSpans list")
    for r, resource_spans in enumerate(payload["resourceSpans"]):
        if not isinstance(resource_spans, Mapping):
            raise OtlpError(f"resourceSpans[{r}] must be an object")
        resource = resource_spans.get("resource") or {}
        attrs = _attributes(resource.get("attributes") if isinstance(resource, Mapping) else None,
                            f"resourceSpans[{r}].resource")
        scopes = resource_spans.get("scopeSpans", resource_spans.get("instrumentationLibrarySpans", []))
        if not isinstance(scopes, list):
            raise OtlpError(f"resourceSpans[{r}].scopeSpans must be a list")
        for s, scope in enumerate(scopes):
            items = scope.get("spans", []) if isinstance(scope, Mapping) else None
            if not isinstance(items, list):
                raise OtlpError(f"resourceSpans[{r}].scopeSpans[{s}].spans must be a list")
            for span in items:
                if not isinstance(span, Mapping):
                    raise OtlpError(f"resourceSpans[{r}].scopeSpans[{s}].spans holds a non-object")
                yield dict(span), attrs


def to_event(span: Mapping[str, Any], resource: Mapping[str, Any]) -> UsageEvent | None:
    """The usage event of a GenAI span; None for a span that is not a model call."""
    attrs = _attributes(span.get("attributes"), "span")
    model = attrs.get("gen_ai.response.model") or attrs.get("gen_ai.request.model")
    if not model:
        return None
    if not isinstance(model, str):
        raise FieldError("gen_ai.request.model", "must be a string")
    trace, span_id = span.get("traceId"), span.get("spanId")
    for name, value in (("traceId", trace), ("spanId", span_id)):
        if not isinstance(value, str) or not value or not _HEX.match(value):
            raise FieldError(name, "must be a hex string")
    start, end = _nanos(span, "startTimeUnixNano"), _nanos(span, "endTimeUnixNano")
    if end < start:
        raise FieldError("endTimeUnixNano", "is before startTimeUnixNano")
    reasoning, output = _int(attrs, "gen_ai.usage.reasoning.output_tokens"), _int(attrs, "gen_ai.usage.output_tokens")
    cached = _int(attrs, "gen_ai.usage.cache_read.input_tokens")
    written_1h = _int(attrs, "budgeteer.usage.cache_creation_1h.input_tokens")  # no GenAI name for it yet
    written = max(_int(attrs, "gen_ai.usage.cache_creation.input_tokens"), written_1h)
    status = span.get("status")
    failed = isinstance(status, Mapping) and status.get("code") in (2, "2", "STATUS_CODE_ERROR")
    provider = attrs.get("gen_ai.provider.name") or attrs.get("gen_ai.system") or ""
    principal = attrs.get("enduser.id") or attrs.get("user.id") or resource.get("service.name") or "otlp"
    return validate_event(dict(  # the checks every imported event gets: lengths, control characters
        ts_ms=end // 1_000_000, request_id=f"otlp:{str(trace).lower()}:{str(span_id).lower()}",
        provider=str(provider), model=model, principal=str(principal),
        team=str(attrs.get("budgeteer.team") or resource.get("budgeteer.team") or ""),
        workspace=str(attrs.get("budgeteer.workspace") or resource.get("budgeteer.workspace") or "default"),
        session=str(attrs.get("session.id") or attrs.get("gen_ai.conversation.id") or ""),
        agent=str(attrs.get("gen_ai.agent.name") or ""),
        input_tokens=max(_int(attrs, "gen_ai.usage.input_tokens"), cached + written),
        cached_input_tokens=cached, cache_write_tokens=written, cache_write_1h_tokens=written_1h,
        output_tokens=max(output, reasoning),
        reasoning_tokens=reasoning, latency_ms=(end - start) // 1_000_000, status="error" if failed else "ok",
        tags={"source": "otlp"}))


def read(payload: Any) -> tuple[list[UsageEvent], OtlpReport]:
    """The events of a payload and a report of what was rejected or skipped; OtlpError when
    the payload is not OTLP JSON at all (nothing of it is then written)."""
    report = OtlpReport()
    events = []
    for span, resource in spans(payload):
        report.spans += 1
        try:
            event = to_event(span, resource)
        except FieldError as exc:
            report.rejected += 1
            if len(report.reasons) < MAX_REASONS:
                report.reasons.append(f"span {span.get('spanId', '?')}: {exc.field}: {exc.reason}")
            continue
        if event is None:
            report.skipped += 1
        else:
            events.append(event)
    return events, report
