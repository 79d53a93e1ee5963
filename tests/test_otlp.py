"""OTLP ingest: GenAI spans to usage events, through the gateway's /v1/traces (protobuf from
the stock OpenTelemetry exporter, JSON, either compressed) and ``budgeteer import``; integers
as strings or numbers, deduplication, rejects named, the semantic conventions' provider names
and deprecated attributes, spans without usage recorded unpriced, size limits after inflating."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import subprocess
import sys
import zlib
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from engine.engine import Engine
from engine.integrations.gateway import create_app
from engine.integrations.otlp import OtlpError, read
from engine.models import UsageEvent
from tests.asgi_servers import serve

START = 1_795_003_100_000_000_000  # ns


def _attr(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        return {"key": key, "value": {"stringValue": value}}
    return {"key": key, "value": {"intValue": value}}


def span(n: int, **attrs: Any) -> dict[str, Any]:
    values = {"gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o-mini",
              "gen_ai.usage.input_tokens": "1000", "gen_ai.usage.output_tokens": 200, **attrs}
    return {"traceId": "5b8efff798038103d269b633813fc60c", "spanId": f"{n:016x}", "name": "chat gpt-4o-mini",
            "startTimeUnixNano": str(START + n * 1_000_000_000),  # a string here, a number below
            "endTimeUnixNano": START + n * 1_000_000_000 + 850_000_000,
            "attributes": [_attr(k, v) for k, v in values.items() if v is not None]}


def payload(*spans: dict[str, Any]) -> dict[str, Any]:
    return {"resourceSpans": [{"resource": {"attributes": [_attr("service.name", "svc-search")]},
                               "scopeSpans": [{"scope": {"name": "openai"}, "spans": list(spans)}]}]}


def test_genai_spans_become_events_with_every_usage_field() -> None:
    events, report = read(payload(
        span(1, **{"gen_ai.usage.cache_read.input_tokens": "300", "gen_ai.usage.cache_creation.input_tokens": 50,
                   "gen_ai.usage.reasoning.output_tokens": "120", "enduser.id": "alice", "budgeteer.team": "ml"}),
        span(2, **{"gen_ai.provider.name": None, "gen_ai.system": "anthropic", "gen_ai.request.model": "claude-x",
                   "gen_ai.response.model": "claude-haiku-4-5"}),
        {"traceId": "ab", "spanId": "cd", "name": "http GET", "startTimeUnixNano": "1", "endTimeUnixNano": "2"}))
    assert (report.spans, report.skipped, report.rejected) == (3, 1, 0)
    first, second = events
    assert (first.provider, first.model, first.principal, first.team) == ("openai", "gpt-4o-mini", "alice", "ml")
    assert (first.input_tokens, first.cached_input_tokens, first.cache_write_tokens, first.output_tokens,
            first.reasoning_tokens, first.latency_ms) == (1000, 300, 50, 200, 120, 850)
    assert first.request_id == f"otlp:5b8efff798038103d269b633813fc60c:{1:016x}"
    assert first.ts_ms == (START + 1_000_000_000 + 850_000_000) // 1_000_000
    assert (second.provider, second.model, second.principal) == ("anthropic", "claude-haiku-4-5", "svc-search")


def test_bad_spans_are_rejected_by_name_and_a_bad_payload_as_a_whole() -> None:
    events, report = read(payload(span(1), span(2, **{"gen_ai.usage.input_tokens": "-5"}),
                                  {**span(3), "spanId": "not hex"}))
    assert len(events) == 1 and report.rejected == 2
    assert report.reasons[0].endswith("gen_ai.usage.input_tokens: must be a whole number of tokens, not '-5'")
    assert "spanId: must be a hex string" in report.reasons[1]
    for bad in ([], {"resourceSpans": {}}, {"resourceSpans": [{"scopeSpans": [{"spans": "x"}]}]}):
        with pytest.raises(OtlpError):
            read(bad)


def _tokens(db: Path) -> tuple[str, str]:
    """The secrets of a token with the traces scope and of one without it."""
    async def create() -> tuple[str, str]:
        async with await Engine.open(db) as engine:
            _t, traces = await engine.create_token(name="otel", principal="collector", scopes=["traces"])
            _t, chat = await engine.create_token(name="chat", principal="x")
            return traces, chat

    return asyncio.run(create())


def _all(db: Path) -> list[UsageEvent]:
    async def read_all() -> list[UsageEvent]:
        async with await Engine.open(db) as engine:
            return [e async for e in engine.store.iter_events(0, 2**62)]

    return asyncio.run(read_all())


def _events(db: Path) -> dict[str, UsageEvent]:
    """The ledger's events by model and principal (``model/principal``)."""
    return {f"{e.model}/{e.principal}": e for e in _all(db)}


def test_traces_through_the_gateway_dedupe_and_refuse_garbage(db_path: Path) -> None:
    traces, chat = _tokens(db_path)
    body = payload(span(1), span(2), span(3, **{"gen_ai.usage.output_tokens": "lots"}))
    with serve(create_app(db_path)) as base, httpx.Client(timeout=10) as http:
        auth = {"authorization": f"Bearer {traces}"}
        first = http.post(f"{base}/v1/traces", headers=auth, json=body)
        again = http.post(f"{base}/v1/traces", headers=auth, json=body)
        garbage = http.post(f"{base}/v1/traces", headers=auth, json={"spans": []})
        text = http.post(f"{base}/v1/traces", headers={**auth, "content-type": "text/plain"},
                         content=json.dumps(body))
        scope = http.post(f"{base}/v1/traces", headers={"authorization": f"Bearer {chat}"}, json=body)
    assert first.status_code == 200 and (first.json()["accepted"], first.json()["rejected"]) == (2, 1)
    assert first.json()["partialSuccess"]["rejectedSpans"] == 1
    assert (again.json()["accepted"], again.json()["duplicates"]) == (0, 2)
    assert garbage.status_code == 400 and "resourceSpans" in garbage.json()["error"]["message"]
    assert text.status_code == 415 and "text/plain" in text.json()["error"]["message"]
    assert scope.status_code == 403

    async def count() -> int:
        async with await Engine.open(db_path) as engine:
            return await engine.event_count()

    assert asyncio.run(count()) == 2


def test_budgeteer_import_reads_an_otlp_file(tmp_path: Path, db_path: Path) -> None:
    path = tmp_path / "traces.json"
    path.write_text(json.dumps(payload(span(1), span(2)), indent=2))
    run = [sys.executable, "-m", "tui.cli", "--db", str(db_path), "import", str(path)]
    done = subprocess.run(run, capture_output=True, text=True, timeout=60, env=os.environ)
    assert done.returncode == 0, done.stderr
    assert "Imported 2 model calls from 2 spans" in done.stdout
    again = subprocess.run([*run, "--json"], capture_output=True, text=True, timeout=60, env=os.environ)
    assert json.loads(again.stdout)["duplicates"] == 2


# ---------------------------------------------------------------- the stock exporter, protobuf, compression

PRICES = json.loads((Path(__file__).parent.parent / "engine" / "data" / "prices.json").read_text())["models"]


def expected_nanos(key: str, inp: int, out: int, cached: int = 0) -> int:
    """A call's cost by hand, from the price file's published rates."""
    rates = {k: Decimal(str(v)) for k, v in PRICES[key].items() if "cost" in k}
    usd = ((inp - cached) * rates["input_cost_per_token"] + cached * rates["cache_read_input_token_cost"]
           + out * rates["output_cost_per_token"])
    nanos = usd * 10**9
    assert nanos == nanos.to_integral_value()  # the figures are chosen to need no rounding
    return int(nanos)


NS = 1_795_003_100_000_000_000

# (span name, attributes): the semantic conventions' current and deprecated names, a call without
# usage, and a span that is not a model call.
SPANS: list[tuple[str, dict[str, Any]]] = [
    ("chat gpt-4o-mini", {"gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o-mini",
                          "gen_ai.usage.input_tokens": 1000, "gen_ai.usage.output_tokens": 200,
                          "gen_ai.usage.cache_read.input_tokens": 300, "enduser.id": "alice"}),
    ("chat gemini", {"gen_ai.system": "gcp.gemini", "gen_ai.request.model": "gemini-2.5-flash",
                     "gen_ai.usage.prompt_tokens": 2000, "gen_ai.usage.completion_tokens": 100, "enduser.id": "bob"}),
    ("chat mistral", {"gen_ai.provider.name": "mistral_ai", "gen_ai.request.model": "mistral-large-latest",
                      "gen_ai.usage.input_tokens": 500, "gen_ai.usage.output_tokens": 50, "enduser.id": "carol"}),
    ("chat no usage", {"gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o-mini", "enduser.id": "dave"}),
    ("GET /health", {"http.request.method": "GET"}),
]


def emit(provider: TracerProvider, spans: list[tuple[str, dict[str, Any]]] = SPANS) -> None:
    tracer = provider.get_tracer("budgeteer-tests")
    for n, (name, attributes) in enumerate(spans):
        span = tracer.start_span(name, attributes=attributes, start_time=NS + n * 1_000_000_000)
        span.end(end_time=NS + n * 1_000_000_000 + 850_000_000)


def recorded_spans(spans: list[tuple[str, dict[str, Any]]] = SPANS) -> list[ReadableSpan]:
    """The SDK's own spans (for the exporter's own encoder), without a server."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "svc-otel"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    emit(provider, spans)
    provider.shutdown()
    return list(memory.get_finished_spans())


def assert_landed(events: dict[str, UsageEvent]) -> None:
    assert set(events) == {"gpt-4o-mini/alice", "gemini-2.5-flash/bob", "mistral-large-latest/carol",
                           "gpt-4o-mini/dave"}
    openai, gemini, mistral = events["gpt-4o-mini/alice"], events["gemini-2.5-flash/bob"], \
        events["mistral-large-latest/carol"]
    assert (openai.provider, openai.input_tokens, openai.cached_input_tokens, openai.output_tokens,
            openai.latency_ms) == ("openai", 1000, 300, 200, 850)
    assert (openai.cost_nanos, openai.cost_source) == (expected_nanos("gpt-4o-mini", 1000, 200, 300), "computed")
    assert (gemini.provider, gemini.input_tokens, gemini.output_tokens) == ("gemini", 2000, 100)
    assert (gemini.cost_nanos, gemini.cost_source) == (expected_nanos("gemini/gemini-2.5-flash", 2000, 100),
                                                       "computed")
    assert (mistral.provider, mistral.cost_source) == ("mistral", "computed")
    assert mistral.cost_nanos == expected_nanos("mistral/mistral-large-latest", 500, 50)
    none = events["gpt-4o-mini/dave"]
    assert (none.input_tokens, none.output_tokens, none.cost_nanos, none.cost_source) == (0, 0, 0, "unpriced")


@pytest.fixture
def gateway(db_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A real gateway on 127.0.0.1 and the authorization header of a token with the traces scope."""
    traces, _chat = _tokens(db_path)
    with serve(create_app(db_path)) as base:
        yield base, {"authorization": f"Bearer {traces}"}


@pytest.mark.parametrize("compression", [Compression.NoCompression, Compression.Gzip, Compression.Deflate])
def test_the_stock_otlp_http_exporter_lands_genai_spans(db_path: Path, gateway: tuple[str, dict[str, str]],
                                                        compression: Compression) -> None:
    base, auth = gateway
    provider = TracerProvider(resource=Resource.create({"service.name": "svc-otel"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
        endpoint=f"{base}/v1/traces", headers=auth, compression=compression, timeout=10)))
    emit(provider)
    assert provider.force_flush(30_000)
    provider.shutdown()
    assert_landed(_events(db_path))


def test_protobuf_answers_in_protobuf_with_partial_success(db_path: Path,
                                                           gateway: tuple[str, dict[str, str]]) -> None:
    base, auth = gateway
    bad = ("chat bad", {"gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o-mini",
                        "gen_ai.usage.input_tokens": -5})
    body = encode_spans(recorded_spans([*SPANS, bad])).SerializeToString()
    headers = {**auth, "content-type": "application/x-protobuf"}
    with httpx.Client(timeout=10) as http:
        first = http.post(f"{base}/v1/traces", headers=headers, content=body)
        again = http.post(f"{base}/v1/traces", headers=headers, content=body)
        good = http.post(f"{base}/v1/traces", headers=headers,
                         content=encode_spans(recorded_spans(SPANS[:1])).SerializeToString())
    assert first.status_code == 200 and first.headers["content-type"] == "application/x-protobuf"
    answer = ExportTraceServiceResponse.FromString(first.content)
    assert answer.partial_success.rejected_spans == 1
    assert "gen_ai.usage.input_tokens: must be a whole number of tokens, not -5" in \
        answer.partial_success.error_message
    assert again.status_code == 200 and good.status_code == 200
    assert not ExportTraceServiceResponse.FromString(good.content).HasField("partial_success")
    assert_landed(_events(db_path))  # the duplicate batch added nothing


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_json_through_a_raw_post(db_path: Path, gateway: tuple[str, dict[str, str]],
                                            encoding: str) -> None:
    base, auth = gateway
    raw = json.dumps(payload(span(1), span(2, **{"gen_ai.usage.input_tokens": None,
                                                 "gen_ai.usage.prompt_tokens": "700"}))).encode()
    body = gzip.compress(raw) if encoding == "gzip" else zlib.compress(raw)
    with httpx.Client(timeout=10) as http:
        answer = http.post(f"{base}/v1/traces", content=body, headers={
            **auth, "content-type": "application/json", "content-encoding": encoding})
    assert answer.status_code == 200, answer.text
    assert (answer.json()["accepted"], answer.json()["rejected"]) == (2, 0)
    assert sorted(e.input_tokens for e in _all(db_path)) == [700, 1000]


def test_bad_bodies_get_the_right_status_and_a_clear_message(db_path: Path,
                                                             gateway: tuple[str, dict[str, str]]) -> None:
    base, auth = gateway
    good = json.dumps(payload(span(1))).encode()
    cases = [  # (content type, content encoding, body, status, words of the message)
        ("application/x-protobuf", None, b"not protobuf at all {", 400, "not an OTLP ExportTraceServiceRequest"),
        ("application/json", "gzip", b"not gzip", 400, "is not valid gzip data"),
        ("application/json", "gzip", gzip.compress(good)[:-12], 400, "cut short"),
        ("application/json", "br", good, 415, "Content-Encoding 'br'"),
        ("application/xml", None, good, 415, "application/x-protobuf"),
        ("application/json", None, b"{\"resourceSpans\": [", 400, "is not valid JSON"),
    ]
    with httpx.Client(timeout=10) as http:
        for content_type, encoding, body, status, words in cases:
            headers = {**auth, "content-type": content_type, **({"content-encoding": encoding} if encoding else {})}
            answer = http.post(f"{base}/v1/traces", headers=headers, content=body)
            assert answer.status_code == status, (content_type, encoding, answer.text)
            assert words in answer.json()["error"]["message"]
            assert "Traceback" not in answer.text
    assert _events(db_path) == {}


def _bomb(size: int) -> bytes:
    """``size`` bytes of zeros, gzip-compressed without ever holding them whole."""
    compressor, zeros, parts = zlib.compressobj(9, zlib.DEFLATED, 31), bytes(1 << 20), []
    for _ in range(size >> 20):
        parts.append(compressor.compress(zeros))
    parts.append(compressor.flush())
    return b"".join(parts)


def test_a_gzip_bomb_is_refused_by_its_inflated_size(db_path: Path) -> None:
    traces, _chat = _tokens(db_path)
    auth = {"authorization": f"Bearer {traces}"}
    bomb = _bomb(256 << 20)  # 256 MiB of zeros in about 256 KiB
    assert len(bomb) < 1 << 20
    within = gzip.compress(json.dumps(payload(span(1))).encode() + b" " * (900 << 10))  # ~0.9 MiB inflated
    with serve(create_app(db_path, max_body=1 << 20)) as base, httpx.Client(timeout=30) as http:
        answers = [http.post(f"{base}/v1/traces", content=bomb, headers={
            **auth, "content-type": content_type, "content-encoding": "gzip"})
            for content_type in ("application/json", "application/x-protobuf")]
        fits = http.post(f"{base}/v1/traces", content=within, headers={
            **auth, "content-type": "application/json", "content-encoding": "gzip"})
    for answer in answers:
        assert answer.status_code == 413, answer.text
        assert "larger than the limit of 1,048,576 bytes" in answer.json()["error"]["message"]
    assert fits.status_code == 200 and fits.json()["accepted"] == 1


async def test_a_bomb_is_refused_at_its_first_chunk_not_after_reading_it_whole() -> None:
    from engine.integrations.otlp import OtlpTooLarge, read_body

    bomb, read = _bomb(256 << 20), []

    async def chunks() -> Any:
        for at in range(0, len(bomb), 64 << 10):
            read.append(at)
            yield bomb[at:at + (64 << 10)]

    with pytest.raises(OtlpTooLarge):
        await read_body(chunks(), "gzip", 1 << 20)
    assert len(read) == 1 < len(bomb) // (64 << 10)  # its first 64 KiB already inflate past the limit


# ---------------------------------------------------------------- provider names, deprecated names, no usage

@pytest.mark.parametrize(("name", "model", "vendor", "key"), [
    ("gcp.gemini", "gemini-2.5-flash", "gemini", "gemini/gemini-2.5-flash"),
    ("gcp.gen_ai", "gemini-2.5-flash", "gemini", "gemini/gemini-2.5-flash"),
    # the bundled table has no vertex_ai entries: Gemini's own rates
    ("gcp.vertex_ai", "gemini-2.5-flash", "gemini", "gemini/gemini-2.5-flash"),
    ("vertex_ai", "gemini-2.5-flash", "gemini", "gemini/gemini-2.5-flash"),
    ("gemini", "gemini-2.5-flash", "gemini", "gemini/gemini-2.5-flash"),
    ("mistral_ai", "mistral-large-latest", "mistral", "mistral/mistral-large-latest"),
    ("azure.ai.openai", "gpt-4o-mini", "azure", "gpt-4o-mini"),
    ("az.ai.openai", "gpt-4o-mini", "azure", "gpt-4o-mini"),
    ("aws.bedrock", "claude-haiku-4-5", "bedrock", "claude-haiku-4-5"),
])
@pytest.mark.parametrize("attribute", ["gen_ai.provider.name", "gen_ai.system"])
async def test_semantic_convention_provider_names_are_priced(engine: Engine, name: str, model: str, vendor: str,
                                                             key: str, attribute: str) -> None:
    body = payload(span(1, **{"gen_ai.provider.name": None, attribute: name, "gen_ai.request.model": model}))
    report = await engine.ingest_otlp(body)
    assert report.accepted == 1
    [event] = [e async for e in engine.store.iter_events(0, 2**62)]
    assert (event.provider, event.cost_source) == (vendor, "computed")
    assert event.cost_nanos == expected_nanos(key, 1000, 200)


def test_deprecated_and_instrumentation_usage_names_are_read() -> None:
    events, report = read(payload(
        span(1, **{"gen_ai.usage.input_tokens": None, "gen_ai.usage.output_tokens": None,
                   "gen_ai.usage.prompt_tokens": "1500", "gen_ai.usage.completion_tokens": 300,
                   "gen_ai.usage.cache_read_input_tokens": 400, "gen_ai.usage.cache_creation_input_tokens": "100",
                   "gen_ai.usage.reasoning_tokens": 50}),
        # the current name wins over a deprecated one on the same span
        span(2, **{"gen_ai.usage.prompt_tokens": 1, "gen_ai.usage.completion_tokens": 1})))
    assert report.rejected == 0
    first, second = events
    assert (first.input_tokens, first.output_tokens, first.cached_input_tokens, first.cache_write_tokens,
            first.reasoning_tokens, first.cost_source) == (1500, 300, 400, 100, 50, "computed")
    assert (second.input_tokens, second.output_tokens) == (1000, 200)


async def test_a_span_without_token_counts_is_unpriced_never_a_computed_zero(engine: Engine) -> None:
    report = await engine.ingest_otlp(payload(
        span(1, **{"gen_ai.usage.input_tokens": None, "gen_ai.usage.output_tokens": None}),
        span(2, **{"gen_ai.usage.input_tokens": 0, "gen_ai.usage.output_tokens": "0"})))  # counted: zero
    assert report.accepted == 2
    events = {e.request_id[-1]: e async for e in engine.store.iter_events(0, 2**62)}
    assert (events["1"].cost_nanos, events["1"].cost_source) == (0, "unpriced")
    assert events["1"].tags == {"source": "otlp", "unpriced": "the span has no token counts"}
    assert (events["2"].cost_nanos, events["2"].cost_source) == (0, "computed")
    totals = await engine.totals(0, 2**62)
    assert (totals.requests, totals.unpriced) == (2, 1)


# ---------------------------------------------------------------- budgeteer import of OTLP files

def test_budgeteer_import_reads_protobuf_and_gzip_json_lines(tmp_path: Path, db_path: Path) -> None:
    proto = tmp_path / "traces.binpb"
    proto.write_bytes(encode_spans(recorded_spans()).SerializeToString())
    lines = tmp_path / "collector.jsonl.gz"  # the Collector's file exporter: one request a line
    lines.write_bytes(gzip.compress(b"\n".join(json.dumps(payload(span(n))).encode() for n in (7, 8)) + b"\n"))
    garbage = tmp_path / "broken.pb"
    garbage.write_bytes(b"not protobuf at all {")

    def run(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tui.cli", "--db", str(db_path), "import", str(path), "--json"],
                              capture_output=True, text=True, timeout=60, env=os.environ)

    first, second, bad = run(proto), run(lines), run(garbage)
    assert first.returncode == 0, first.stderr
    assert (json.loads(first.stdout)["accepted"], json.loads(first.stdout)["skipped"]) == (4, 1)
    assert second.returncode == 0 and json.loads(second.stdout)["accepted"] == 2, second.stderr
    assert bad.returncode != 0 and "not an OTLP ExportTraceServiceRequest" in bad.stderr
    assert "Traceback" not in bad.stderr
    events = _all(db_path)
    assert_landed({f"{e.model}/{e.principal}": e for e in events if e.principal != "svc-search"})
    assert len(events) == 6
