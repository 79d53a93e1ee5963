"""Anthropic's cache writes by lifetime and its thinking tokens, from the provider's usage to the
ledger: the one-hour writes (``cache_creation.ephemeral_1h_input_tokens``) are their own event
field charged at the table's one-hour rate, long-context cache writes at the tier's rate, and
``output_tokens_details.thinking_tokens`` recorded as reasoning. Through the gateway and the
governed transport with the anthropic SDK, OTLP, import and export, ``pricing import``, and the
upgrade of a schema-7 ledger."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from engine.clock import DAY_MS, FrozenClock
from engine.engine import Engine
from engine.integrations.files import export_events, import_events
from engine.integrations.gateway import create_app
from engine.models import FieldError, validate_event
from engine.pricing import parse_litellm
from tests.asgi_servers import serve
from tests.conftest import NOW_MS, event

MODEL = "claude-haiku-4-5-20251001"  # $1 input, $0.10 cache read, $1.25 5-minute and $2 one-hour write, $5 output
#: What Anthropic reports for a call that read 10,000 cached tokens, wrote 1,000 to the
#: 5-minute cache and 2,000 to the one-hour cache, and thought for 450 of its 600 output tokens.
USAGE: dict[str, Any] = {
    "input_tokens": 2000, "cache_read_input_tokens": 10_000, "cache_creation_input_tokens": 3000,
    "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
    "output_tokens": 600, "output_tokens_details": {"thinking_tokens": 450}, "service_tier": "standard",
}
#: By hand, in dollars: 2,000 x 1e-6 + 10,000 x 1e-7 + 1,000 x 1.25e-6 + 2,000 x 2e-6 + 600 x 5e-6
#: = 0.002 + 0.001 + 0.00125 + 0.004 + 0.003 = $0.01125 (the 5-minute rate for all writes: $0.00975).
COST_NANOS = 11_250_000
THOUGHT = "The user greets me; a short greeting back will do."
REPLY = "Hello! How can I help?"


class ThinkingClaude:
    """Anthropic's Messages API answering with a thinking block and a text block, whole or as
    Anthropic's server-sent events (``message_delta`` carries the cumulative usage)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/messages", self.messages, methods=["POST"])])

    async def messages(self, request: Request) -> Response:
        body: dict[str, Any] = await request.json()
        self.requests.append({"headers": dict(request.headers), "body": body})
        message = {"id": "msg_think", "type": "message", "role": "assistant", "model": body["model"],
                   "content": [{"type": "thinking", "thinking": THOUGHT, "signature": "c2ln"},
                               {"type": "text", "text": REPLY}],
                   "stop_reason": "end_turn", "stop_sequence": None, "usage": USAGE}
        if not body.get("stream"):
            return JSONResponse(message)

        def sse(name: str, data: dict[str, Any]) -> bytes:
            return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode()

        async def events() -> AsyncIterator[bytes]:
            start_usage = {k: v for k, v in USAGE.items() if k != "output_tokens_details"} | {"output_tokens": 1}
            yield sse("message_start", {"message": {**message, "content": [], "stop_reason": None,
                                                    "usage": start_usage}})
            yield sse("content_block_start", {"index": 0, "content_block": {"type": "thinking", "thinking": "",
                                                                            "signature": ""}})
            yield sse("content_block_delta", {"index": 0, "delta": {"type": "thinking_delta", "thinking": THOUGHT}})
            yield sse("content_block_delta", {"index": 0, "delta": {"type": "signature_delta", "signature": "c2ln"}})
            yield sse("content_block_stop", {"index": 0})
            yield sse("content_block_start", {"index": 1, "content_block": {"type": "text", "text": ""}})
            yield sse("content_block_delta", {"index": 1, "delta": {"type": "text_delta", "text": REPLY}})
            yield sse("content_block_stop", {"index": 1})
            final = {k: USAGE[k] for k in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens",
                                           "output_tokens", "output_tokens_details")}
            yield sse("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": final})
            yield sse("message_stop", {})

        return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture
def claude() -> Iterator[tuple[ThinkingClaude, str]]:
    fake = ThinkingClaude()
    with serve(fake.app()) as url:
        yield fake, url


Row = tuple[str, int, int, int, int, int, int, int, str]


async def _rows(db: Path) -> list[Row]:
    async with await Engine.open(db) as engine:
        return [(e.model, e.input_tokens, e.cached_input_tokens, e.cache_write_tokens, e.cache_write_1h_tokens,
                 e.output_tokens, e.reasoning_tokens, e.cost_nanos or 0, e.cost_source)
                async for e in engine.iter_events(0, engine.now_ms() + 60_000)]


EXPECTED: Row = (MODEL, 15_000, 10_000, 3000, 2000, 600, 450, COST_NANOS, "computed")


def _ask(client: anthropic.Anthropic, stream: bool) -> None:
    ask = {"model": MODEL, "max_tokens": 1000, "thinking": {"type": "enabled", "budget_tokens": 500},
           "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        with client.messages.stream(**ask) as s:  # type: ignore[arg-type]
            assert "".join(s.text_stream) == REPLY
            final = s.get_final_message()
    else:
        final = client.messages.create(**ask)  # type: ignore[call-overload]
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.usage.output_tokens_details is not None and final.usage.output_tokens_details.thinking_tokens == 450


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_the_anthropic_sdk_through_the_gateway_records_one_hour_writes_and_thinking(
        db_path: Path, claude: tuple[ThinkingClaude, str], monkeypatch: pytest.MonkeyPatch, stream: bool) -> None:
    monkeypatch.setenv("BUDGETEER_VAULT_PASSPHRASE", "pw")
    fake, upstream = claude

    async def prepare() -> str:
        async with await Engine.open(db_path) as engine:
            await engine.vault_set("claude", "sk-ant-PROVIDER-KEY")
            await engine.add_provider(name="claude", kind="anthropic", base_url=f"{upstream}/v1",
                                      credential="vault:claude", models=[MODEL])
            _token, secret = await engine.create_token(name="t", principal="alice", team="ml")
            return secret

    secret = asyncio.run(prepare())
    with (serve(create_app(db_path, routing_mode="off")) as base,
          anthropic.Anthropic(base_url=base, api_key=secret, max_retries=0) as client):
        _ask(client, stream)
    assert fake.requests[-1]["body"]["thinking"] == {"type": "enabled", "budget_tokens": 500}
    assert asyncio.run(_rows(db_path)) == [EXPECTED]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_the_governed_transport_records_one_hour_writes_and_thinking(
        db_path: Path, claude: tuple[ThinkingClaude, str], stream: bool) -> None:
    _fake, url = claude
    async with await Engine.open(db_path) as engine:
        http = engine.httpx_client(principal="dave", module=httpx2)
    await asyncio.to_thread(_ask, anthropic.Anthropic(base_url=url, api_key="sk-ant", http_client=http,
                                                      max_retries=0), stream)
    http.close()
    assert await _rows(db_path) == [EXPECTED]


def test_the_rates_of_one_hour_and_long_context_cache_writes() -> None:
    """The price table's one-hour and above-100k cache-write rates, on each side of the boundary
    (the whole prompt, cache included, above 100,000 tokens: strictly more, as LiteLLM bills)."""
    from engine.pricing import bundled_prices

    book = bundled_prices()

    def cost(model: str, **tokens: int) -> int:
        ev = validate_event({"ts_ms": NOW_MS, "request_id": "r", "provider": "anthropic", "model": model,
                             **tokens})
        return book.price_event(ev)[0]

    # claude-haiku-4-5: $1 input, $1.25 5-minute write, $2 one-hour write per million
    assert cost("claude-haiku-4-5", input_tokens=1_000_000, cache_write_tokens=1_000_000,
                cache_write_1h_tokens=1_000_000) == 2_000_000_000
    assert cost("claude-haiku-4-5", input_tokens=1_000_000, cache_write_tokens=1_000_000) == 1_250_000_000
    # claude-haiku-5-5 at 100,000 prompt tokens: base rates ($0.125 and $0.20 per million writes, $0.10 input)
    assert cost("claude-haiku-5-5", input_tokens=100_000, cache_write_tokens=100_000,
                cache_write_1h_tokens=40_000) == 60_000 * 125 + 40_000 * 200
    # one more token: the tier's rates for every token ($0.625 and $1.00 writes, $0.50 input)
    assert cost("claude-haiku-5-5", input_tokens=100_001, cache_write_tokens=100_000,
                cache_write_1h_tokens=40_000) == 60_000 * 625 + 40_000 * 1000 + 1 * 500


async def test_otlp_spans_carry_one_hour_writes(engine: Engine) -> None:
    attrs = {"gen_ai.provider.name": "anthropic", "gen_ai.request.model": MODEL,
             "gen_ai.usage.input_tokens": 15_000, "gen_ai.usage.output_tokens": 600,
             "gen_ai.usage.cache_read.input_tokens": 10_000, "gen_ai.usage.cache_creation.input_tokens": 3000,
             "budgeteer.usage.cache_creation_1h.input_tokens": 2000}
    span = {"traceId": "5b8efff798038103d269b633813fc60c", "spanId": "00000000000000a1", "name": "chat",
            "startTimeUnixNano": str((NOW_MS - 2000) * 1_000_000), "endTimeUnixNano": str(NOW_MS * 1_000_000),
            "attributes": [{"key": k, "value": {"stringValue": v} if isinstance(v, str) else {"intValue": v}}
                           for k, v in attrs.items()]}
    await engine.ingest_otlp({"resourceSpans": [{"resource": {"attributes": []},
                                                 "scopeSpans": [{"spans": [span]}]}]})
    [e] = [e async for e in engine.iter_events(0, NOW_MS + DAY_MS)]
    assert (e.cache_write_tokens, e.cache_write_1h_tokens) == (3000, 2000)
    # as above, less the thinking (priced at the output rate all the same)
    assert e.cost_nanos == COST_NANOS


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
async def test_one_hour_writes_survive_export_and_import(engine: Engine, tmp_path: Path, fmt: str) -> None:
    original = event(1, provider="anthropic", model=MODEL, input_tokens=15_000, cached_input_tokens=10_000,
                     cache_write_tokens=3000, cache_write_1h_tokens=2000, output_tokens=600, reasoning_tokens=450,
                     cost_nanos=None, cost_source="computed")
    await engine.record_many([engine.priced(original)])
    out = tmp_path / f"export.{fmt}"
    with out.open("w", newline="") as handle:
        assert await export_events(engine, handle, fmt, 0, NOW_MS + DAY_MS) == 1  # type: ignore[arg-type]
    assert "cache_write_1h_tokens" in out.read_text().splitlines()[0]
    async with await Engine.open(tmp_path / "other.db", clock=engine.clock) as other:
        report = await import_events(other, out, strict=True)
        assert report.errors == [] and report.recorded == 1
        [back] = [e async for e in other.iter_events(0, NOW_MS + DAY_MS)]
        assert (back.cache_write_1h_tokens, back.cost_nanos) == (2000, COST_NANOS)
        assert (await other.totals(0, NOW_MS + DAY_MS)).cache_write_1h_tokens == 2000


def test_one_hour_writes_cannot_exceed_the_cache_writes() -> None:
    with pytest.raises(FieldError, match="cannot exceed cache_write_tokens") as caught:
        validate_event({"ts_ms": NOW_MS, "request_id": "r", "provider": "anthropic", "model": MODEL,
                        "input_tokens": 100, "cache_write_tokens": 10, "cache_write_1h_tokens": 11})
    assert caught.value.field == "cache_write_1h_tokens"


def test_a_litellm_table_gives_its_one_hour_and_long_context_cache_write_rates() -> None:
    table = {"claude-x": {"litellm_provider": "anthropic", "input_cost_per_token": 1e-07,
                          "output_cost_per_token": 5e-07, "cache_creation_input_token_cost": 1.25e-07,
                          "cache_creation_input_token_cost_above_1hr": 2e-07,
                          "input_cost_per_token_above_100k_tokens": 5e-07,
                          "cache_creation_input_token_cost_above_100k_tokens": 6.25e-07,
                          "cache_creation_input_token_cost_above_1hr_above_100k_tokens": 1e-06,
                          "cache_creation_input_token_cost_above_1hr_batches": 1e-07}}
    [price], skipped = parse_litellm(table)
    assert skipped == []
    assert (price.cache_write, price.cache_write_1h) == (125_000_000, 200_000_000)  # femto-dollars per token
    [tier] = price.tiers
    assert (tier.threshold_tokens, tier.input, tier.cache_write, tier.cache_write_1h) == (
        100_000, 500_000_000, 625_000_000, 1_000_000_000)


def test_pricing_import_reads_the_one_hour_rate(tmp_path: Path) -> None:
    import subprocess
    import sys

    table = tmp_path / "prices.json"
    table.write_text(json.dumps({MODEL: {"litellm_provider": "anthropic", "input_cost_per_token": 3e-06,
                                         "output_cost_per_token": 1.5e-05,
                                         "cache_creation_input_token_cost": 3.75e-06,
                                         "cache_creation_input_token_cost_above_1hr": 7e-06}}))
    db = tmp_path / "ledger.db"

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "tui.cli", "--db", str(db), *args], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    cli("pricing", "import", str(table), "--effective-from", "2026-01-01")
    shown = json.loads(cli("pricing", "show", MODEL, "--json"))
    assert shown["cache_write_1h"] == 7_000_000_000
    assert "cache write, 1 hour" in cli("pricing", "show", MODEL)


def _schema_7_ledger(db_path: Path) -> None:
    """A ledger as schema 7 left it, with one Anthropic call in its events and rollups."""
    from engine.ledger.schema import MIGRATIONS, _statements

    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    for script in MIGRATIONS[:7]:
        for statement in _statements(script):
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 7")
    conn.execute("INSERT INTO series (id, workspace, team, principal, token_id, provider, model) "
                 "VALUES (1, 'default', 'ml', 'alice', '', 'anthropic', ?)", (MODEL,))
    conn.execute("INSERT INTO usage_events (ts_ms, request_id, series_id, session, agent, input_tokens, "
                 "cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, cost_nanos, cost_source, "
                 "latency_ms, status) VALUES (?, 'old', 1, '', '', 5000, 1000, 3000, 100, 0, 25000000, 'computed', "
                 "900, 'ok')", (NOW_MS - 3_600_000,))
    for table, size in (("minute", 60_000), ("hour", 3_600_000), ("day", DAY_MS)):
        bucket = (NOW_MS - 3_600_000) // size * size
        conn.execute(f"INSERT INTO rollup_{table} (bucket_ms, series_id, requests, errors, blocked, input_tokens, "
                     "cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, cost_nanos, unpriced, "
                     "estimated, latency_ms) VALUES (?, 1, 1, 0, 0, 5000, 1000, 3000, 100, 0, 25000000, 0, 0, 900)",
                     (bucket,))
    conn.close()


async def test_a_schema_7_ledger_upgrades_to_keep_one_hour_writes(db_path: Path, clock: FrozenClock) -> None:
    from engine.ledger import SCHEMA_VERSION

    _schema_7_ledger(db_path)
    async with await Engine.open(db_path, clock=clock) as engine:
        assert await engine.store.schema_version() == SCHEMA_VERSION >= 8
        [old] = [e async for e in engine.iter_events(0, NOW_MS + DAY_MS)]
        assert (old.request_id, old.cache_write_tokens, old.cache_write_1h_tokens, old.cost_nanos) == (
            "old", 3000, 0, 25_000_000)
        before = await engine.totals(0, NOW_MS + DAY_MS)
        assert (before.requests, before.cache_write_tokens, before.cache_write_1h_tokens) == (1, 3000, 0)
        await engine.record(engine.priced(validate_event(
            {"ts_ms": NOW_MS - 1000, "request_id": "new", "provider": "anthropic", "model": MODEL, "team": "ml",
             "principal": "alice", "input_tokens": 15_000, "cached_input_tokens": 10_000, "cache_write_tokens": 3000,
             "cache_write_1h_tokens": 2000, "output_tokens": 600, "reasoning_tokens": 450})))
        after = await engine.totals(0, NOW_MS + DAY_MS)
        assert (after.requests, after.cache_write_tokens, after.cache_write_1h_tokens) == (2, 6000, 2000)
        assert after.cost_nanos == 25_000_000 + COST_NANOS
        day = await engine.store.timeline(0, NOW_MS + DAY_MS, DAY_MS, fields=("cache_write_1h_tokens",))
        assert [p.totals.cache_write_1h_tokens for p in day] == [2000]
    # A process of the previous version, still running, writes events as schema 7 knew them: the
    # new column's default takes them.
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("INSERT INTO usage_events (ts_ms, request_id, series_id, session, agent, input_tokens, "
                 "cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, cost_nanos, cost_source, "
                 "latency_ms, status) VALUES (?, 'older-writer', 1, '', '', 10, 0, 0, 1, 0, 45, 'computed', 1, 'ok')",
                 (NOW_MS - 500,))
    assert conn.execute("SELECT cache_write_1h_tokens FROM usage_events WHERE request_id = 'older-writer'"
                        ).fetchone() == (0,)
    conn.close()
