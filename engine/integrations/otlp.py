"""OTLP/HTTP traces into the ledger: spans that follow the OpenTelemetry GenAI semantic
conventions become usage events.

A payload is an ``ExportTraceServiceRequest`` in protobuf (what the stock exporters send,
decoded with ``opentelemetry-proto``) or in OTLP JSON, either one gzip- or deflate-compressed;
a body is read and inflated chunk by chunk, never past the size limit. Read per span:
``gen_ai.provider.name`` (or the deprecated ``gen_ai.system``), mapped to the price table's
vendor (``VENDORS``), ``gen_ai.response.model`` (else ``gen_ai.request.model``), and the usage
attributes of ``USAGE_ATTRIBUTES`` (current names and deprecated ones such as
``gen_ai.usage.prompt_tokens``); the span's start and end give the time and the latency, its
status an error. A span that carries no token count at all is recorded ``unpriced``, never as
a computed $0. Who made the call: ``enduser.id`` or ``user.id`` (else the resource's
``service.name``), ``budgeteer.team``, ``budgeteer.workspace``, ``session.id`` or
``gen_ai.conversation.id``, ``gen_ai.agent.name``. Integers may come as strings (OTLP JSON
encodes 64-bit ints so) or numbers. A span is the event ``otlp:<trace id>:<span id>``, so
sending it twice records it once. Spans without a GenAI model are not model calls and are
skipped; a GenAI span that cannot be read is rejected with its reason.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import AsyncIterable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.errors import EXIT_USAGE, BudgeteerError
from engine.integrations import contract
from engine.models import FieldError, UsageEvent, validate_event

_HEX = re.compile(r"^[0-9a-fA-F]+$")
MAX_REASONS = 20

# gen_ai.provider.name values (and the deprecated gen_ai.system ones) -> the price table's vendor
# names (LiteLLM's provider prefixes), tried in order: the first under which the table knows the
# span's model is recorded (Gemini on Vertex AI is priced from Gemini's rates when the table has
# no vertex_ai entry). A name not listed is kept as sent.
VENDORS: dict[str, tuple[str, ...]] = {
    "openai": ("openai",),
    "anthropic": ("anthropic",),
    "gcp.gemini": ("gemini",), "gemini": ("gemini",),
    "gcp.gen_ai": ("gemini", "vertex_ai"),
    "gcp.vertex_ai": ("vertex_ai", "gemini"), "vertex_ai": ("vertex_ai", "gemini"),
    "mistral_ai": ("mistral",), "mistral": ("mistral",),
    "aws.bedrock": ("bedrock",),
    "azure.ai.openai": ("azure",), "az.ai.openai": ("azure",),
    "azure.ai.inference": ("azure_ai",), "az.ai.inference": ("azure_ai",),
    "cohere": ("cohere",),
    "ibm.watsonx.ai": ("watsonx",),
    "perplexity": ("perplexity",),
    "x_ai": ("xai",), "xai": ("xai",),
    "deepseek": ("deepseek",),
    "groq": ("groq",),
}

# Each usage field of an event and the span attributes that carry it: the current semantic
# convention's name first, then deprecated ones and those of common instrumentations.
USAGE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "input_tokens": ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens"),
    "output_tokens": ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens"),
    "cached_input_tokens": ("gen_ai.usage.cache_read.input_tokens", "gen_ai.usage.cache_read_input_tokens"),
    "cache_write_tokens": ("gen_ai.usage.cache_creation.input_tokens", "gen_ai.usage.cache_creation_input_tokens"),
    "reasoning_tokens": ("gen_ai.usage.reasoning.output_tokens", "gen_ai.usage.reasoning_tokens"),
    # the part of the cache writes that went to Anthropic's one-hour cache: no GenAI name for it yet
    "cache_write_1h_tokens": ("budgeteer.usage.cache_creation_1h.input_tokens",),
}

JSON, PROTOBUF = "application/json", "application/x-protobuf"


class OtlpError(BudgeteerError, ValueError):
    """The payload as a whole is not OTLP traces; says what is wrong (of the body: ``field``)."""

    exit_status, http_status, code = EXIT_USAGE, 400, "invalid_value"
    field = "body"


class OtlpUnsupported(OtlpError):
    """A content type or content encoding that is not OTLP/HTTP's."""

    http_status, code = 415, "unsupported_media_type"


class OtlpTooLarge(OtlpError):
    """A body past the size limit, as sent or once inflated."""

    http_status, code = 413, "body_too_large"


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


def _usage(attrs: Mapping[str, Any]) -> dict[str, int] | None:
    """The usage fields a span carries (each from the first of its attributes present, 0 when
    none is); None when it carries no token count at all."""
    usage, found = {}, False
    for name, keys in USAGE_ATTRIBUTES.items():
        key = next((k for k in keys if attrs.get(k) is not None), keys[0])
        found = found or attrs.get(key) is not None
        usage[name] = _int(attrs, key)
    return usage if found else None


def vendor(name: str, model: str, known: Callable[[str, str], bool] | None = None) -> str:
    """The price table's vendor for a semantic-convention provider name: the first of its
    vendors under which ``known(model, vendor)`` (the table has the model), else the first."""
    vendors = VENDORS.get(name.strip().lower())
    if not vendors:
        return name
    return next((v for v in vendors if known is not None and known(model, v)), vendors[0])


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


def to_event(span: Mapping[str, Any], resource: Mapping[str, Any],
             known: Callable[[str, str], bool] | None = None) -> UsageEvent | None:
    """The usage event of a GenAI span; None for a span that is not a model call. ``known``
    tells whether the price table has a model under a vendor (see ``vendor``)."""
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
    usage = _usage(attrs)
    tokens = usage or dict.fromkeys(USAGE_ATTRIBUTES, 0)
    reasoning, output = tokens["reasoning_tokens"], tokens["output_tokens"]
    cached = tokens["cached_input_tokens"]
    written_1h = tokens["cache_write_1h_tokens"]
    written = max(tokens["cache_write_tokens"], written_1h)
    status = span.get("status")
    failed = isinstance(status, Mapping) and status.get("code") in (2, "2", "STATUS_CODE_ERROR")
    provider = vendor(str(attrs.get("gen_ai.provider.name") or attrs.get("gen_ai.system") or ""), model, known)
    principal = attrs.get("enduser.id") or attrs.get("user.id") or resource.get("service.name") or "otlp"
    return validate_event(dict(  # the checks every imported event gets: lengths, control characters
        ts_ms=end // 1_000_000, request_id=f"otlp:{str(trace).lower()}:{str(span_id).lower()}",
        provider=str(provider), model=model, principal=str(principal),
        team=str(attrs.get("budgeteer.team") or resource.get("budgeteer.team") or ""),
        workspace=str(attrs.get("budgeteer.workspace") or resource.get("budgeteer.workspace") or "default"),
        session=str(attrs.get("session.id") or attrs.get("gen_ai.conversation.id") or ""),
        agent=str(attrs.get("gen_ai.agent.name") or ""),
        input_tokens=max(tokens["input_tokens"], cached + written),
        cached_input_tokens=cached, cache_write_tokens=written, cache_write_1h_tokens=written_1h,
        output_tokens=max(output, reasoning),
        reasoning_tokens=reasoning, latency_ms=(end - start) // 1_000_000, status="error" if failed else "ok",
        # no token count at all: nothing to price, and a computed $0 would pass for a free call
        **({} if usage is not None else {"cost_nanos": 0, "cost_source": "unpriced"}),
        tags={"source": "otlp", **({} if usage is not None else {"unpriced": "the span has no token counts"})}))


def read(payload: Any, known: Callable[[str, str], bool] | None = None) -> tuple[list[UsageEvent], OtlpReport]:
    """The events of a payload (OTLP JSON, or ``decode``'s dict of a protobuf one) and a report
    of what was rejected or skipped; OtlpError when the payload is not OTLP traces at all
    (nothing of it is then written)."""
    report = OtlpReport()
    events = []
    for span, resource in spans(payload):
        report.spans += 1
        try:
            event = to_event(span, resource, known)
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


# ---------------------------------------------------------------------------- OTLP/HTTP bodies

def media_type(content_type: str | None) -> str:
    """``JSON`` or ``PROTOBUF`` from a Content-Type (JSON when there is none); OtlpUnsupported
    for any other."""
    kind = (content_type or JSON).split(";", 1)[0].strip().lower()
    if kind in (PROTOBUF, "application/protobuf"):
        return PROTOBUF
    if kind == JSON:
        return JSON
    raise OtlpUnsupported(f"Content-Type {kind!r} is not OTLP/HTTP's: send {PROTOBUF} or {JSON}")


def _too_large(limit: int) -> OtlpTooLarge:
    return OtlpTooLarge(f"body: larger than the limit of {limit:,} bytes (as sent or decompressed)")


class _Inflater:
    """Inflates a gzip or deflate body chunk by chunk, never making more than ``limit`` bytes
    of output: a bomb is refused after at most ``limit`` bytes of work."""

    def __init__(self, encoding: str, limit: int) -> None:
        # gzip: members one after another; deflate: zlib's format, as HTTP means it (or gzip's)
        self.encoding, self.limit, self.size = encoding, limit, 0
        self.wbits = 31 if encoding == "gzip" else 47
        self.inflater = zlib.decompressobj(wbits=self.wbits)

    def feed(self, data: bytes) -> bytes:
        out = []
        while data:
            if self.inflater.eof:  # another gzip member follows
                self.inflater = zlib.decompressobj(wbits=self.wbits)
            try:
                chunk = self.inflater.decompress(data, self.limit - self.size + 1)
            except zlib.error:
                raise OtlpError(f"body: is not valid {self.encoding} data") from None
            self.size += len(chunk)
            if self.size > self.limit:
                raise _too_large(self.limit)
            out.append(chunk)
            data = self.inflater.unused_data if self.inflater.eof else self.inflater.unconsumed_tail
        return b"".join(out)

    def finish(self) -> None:
        if not self.inflater.eof:
            raise OtlpError(f"body: its {self.encoding} data is cut short")


def _encoding(content_encoding: str | None) -> str:
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("gzip", "x-gzip"):
        return "gzip"
    if encoding not in ("identity", "deflate"):
        raise OtlpUnsupported(f"Content-Encoding {encoding!r} is not supported: send gzip, deflate or none")
    return encoding


async def read_body(chunks: AsyncIterable[bytes], content_encoding: str | None, limit: int,
                    content_length: str | None = None) -> bytes:
    """A request body, inflated as its Content-Encoding says, read chunk by chunk;
    OtlpTooLarge as soon as the body as sent or inflated passes ``limit`` bytes."""
    encoding = _encoding(content_encoding)
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise _too_large(limit)
    inflater = _Inflater(encoding, limit) if encoding != "identity" else None
    out, sent = [], 0
    async for chunk in chunks:
        sent += len(chunk)
        if sent > limit:
            raise _too_large(limit)
        out.append(inflater.feed(chunk) if inflater else chunk)
    if inflater is not None and sent:
        inflater.finish()
    return b"".join(out)


def inflate(data: bytes, content_encoding: str | None, limit: int) -> bytes:
    """``data`` inflated as ``content_encoding`` says (a file's body, for instance)."""
    encoding = _encoding(content_encoding)
    if encoding == "identity":
        return data
    inflater = _Inflater(encoding, limit)
    out = inflater.feed(data)
    if data:
        inflater.finish()
    return out


_ANY_VALUE = {"string_value": "stringValue", "int_value": "intValue", "double_value": "doubleValue",
              "bool_value": "boolValue"}


def _proto_attributes(items: Any) -> list[dict[str, Any]]:
    out = []
    for item in items:
        kind = item.value.WhichOneof("value")
        # arrays, key/value lists and bytes carry no usage: kept as keys without a value
        out.append({"key": item.key, "value": {_ANY_VALUE[kind]: getattr(item.value, kind)}
                    if kind in _ANY_VALUE else {}})
    return out


def _from_protobuf(body: bytes) -> dict[str, Any]:
    """An ExportTraceServiceRequest in protobuf as the OTLP JSON dict that ``read`` takes (ids
    as hex, as OTLP JSON writes them)."""
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except (DecodeError, ValueError, RecursionError):
        raise OtlpError("body: is not an OTLP ExportTraceServiceRequest in protobuf") from None
    return {"resourceSpans": [
        {"resource": {"attributes": _proto_attributes(resource_spans.resource.attributes)},
         "scopeSpans": [{"spans": [
             {"traceId": span.trace_id.hex(), "spanId": span.span_id.hex(), "name": span.name,
              "startTimeUnixNano": span.start_time_unix_nano, "endTimeUnixNano": span.end_time_unix_nano,
              "attributes": _proto_attributes(span.attributes), "status": {"code": span.status.code}}
             for span in scope.spans]} for scope in resource_spans.scope_spans]}
        for resource_spans in request.resource_spans]}


def decode(body: bytes, media: str) -> Any:
    """The payload of a body of the given media type, for ``read``; OtlpError when it does not
    decode."""
    if media == PROTOBUF:
        return _from_protobuf(body)
    try:
        return contract.loads(body)  # its nesting bounded, as a model call's body
    except FieldError as exc:
        raise OtlpError(str(exc)) from None


def export_response(report: OtlpReport, media: str) -> bytes:
    """The ExportTraceServiceResponse of a report in the request's media type: empty on full
    success, ``partial_success`` naming the rejected spans (JSON adds the report's counts)."""
    if media == JSON:
        return json.dumps(report.as_dict()).encode()
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

    response = ExportTraceServiceResponse()
    if report.rejected:
        response.partial_success.rejected_spans = report.rejected
        response.partial_success.error_message = "; ".join(report.reasons[:5])
    return bytes(response.SerializeToString())


# ---------------------------------------------------------------------------- OTLP files

PROTOBUF_SUFFIXES = (".pb", ".binpb", ".protobuf")
MAX_FILE = 1 << 30  # a compressed file inflates to at most this many bytes


def is_otlp_file(name: str, head: bytes) -> bool:
    """Whether a file may hold OTLP traces, from its name and first bytes: gzip-compressed, a
    protobuf suffix, or JSON that names ``resourceSpans`` early."""
    name = name.lower().removesuffix(".gz")
    return head.startswith(b"\x1f\x8b") or name.endswith(PROTOBUF_SUFFIXES) or b'"resourceSpans"' in head


def load_file(data: bytes, name: str) -> Any | None:
    """The OTLP traces payload of a file: one OTLP JSON document, JSON lines of them (what
    the Collector's file exporter writes), or an ExportTraceServiceRequest in protobuf (by its
    suffix: .pb, .binpb, .protobuf), any of them gzip-compressed. None when it is not OTLP
    traces; OtlpError when it is but does not decode."""
    name = name.lower()
    if data.startswith(b"\x1f\x8b"):
        data, name = inflate(data, "gzip", MAX_FILE), name.removesuffix(".gz")
    if name.endswith(PROTOBUF_SUFFIXES):
        return decode(data, PROTOBUF)
    if b'"resourceSpans"' not in data[:65536]:
        return None
    try:
        payload = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        payload = None
    if isinstance(payload, dict):
        return payload if "resourceSpans" in payload else None
    if payload is not None:
        return None
    resource_spans = []
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            document = json.loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None  # neither one JSON document nor JSON lines: not OTLP JSON
        if not isinstance(document, dict) or not isinstance(document.get("resourceSpans"), list):
            raise OtlpError(f"line {n}: not OTLP JSON traces: expected an object with a resourceSpans list")
        resource_spans += document["resourceSpans"]
    return {"resourceSpans": resource_spans}
