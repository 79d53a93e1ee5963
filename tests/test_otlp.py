"""OTLP/HTTP JSON ingest: GenAI spans to usage events, through the gateway's /v1/traces and
``budgeteer import``; integers as strings or numbers, deduplication, rejects named."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.engine import Engine
from engine.integrations.gateway import create_app
from engine.integrations.otlp import OtlpError, read
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


def test_traces_through_the_gateway_dedupe_and_refuse_garbage(db_path: Path) -> None:
    async def token() -> tuple[str, str]:
        async with await Engine.open(db_path) as engine:
            _t, traces = await engine.create_token(name="otel", principal="collector", scopes=["traces"])
            _t, chat = await engine.create_token(name="chat", principal="x")
            return traces, chat

    traces, chat = asyncio.run(token())
    body = payload(span(1), span(2), span(3, **{"gen_ai.usage.output_tokens": "lots"}))
    with serve(create_app(db_path)) as base, httpx.Client(timeout=10) as http:
        auth = {"authorization": f"Bearer {traces}"}
        first = http.post(f"{base}/v1/traces", headers=auth, json=body)
        again = http.post(f"{base}/v1/traces", headers=auth, json=body)
        garbage = http.post(f"{base}/v1/traces", headers=auth, json={"spans": []})
        proto = http.post(f"{base}/v1/traces", headers={**auth, "content-type": "application/x-protobuf"},
                          content=b"\x0a\x00")
        scope = http.post(f"{base}/v1/traces", headers={"authorization": f"Bearer {chat}"}, json=body)
    assert first.status_code == 200 and (first.json()["accepted"], first.json()["rejected"]) == (2, 1)
    assert first.json()["partialSuccess"]["rejectedSpans"] == 1
    assert (again.json()["accepted"], again.json()["duplicates"]) == (0, 2)
    assert garbage.status_code == 400 and "resourceSpans" in garbage.json()["error"]["message"]
    assert proto.status_code == 415 and scope.status_code == 403

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
