"""The governed httpx transport under the official SDKs, sync and async, streaming and not:
each call settled from its provider's usage (Anthropic's cache fields mapped), and a blocked
call raised by the SDK as a 402; a stream settled exactly once however its caller leaves it;
a model priced by its vendor; a timeout recorded as the gateway records it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import pytest

from engine.budgets import build_policy
from engine.engine import Engine
from engine.integrations.gateway import create_app
from engine.integrations.transport import vendor_of
from engine.models import FieldError
from engine.pricing import bundled_prices
from tests.asgi_servers import FakeAnthropic, FakeOpenAI, serve

ASK: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
ASK_CLAUDE: dict[str, Any] = {"model": "claude-haiku-4-5", "max_tokens": 100,
                              "messages": [{"role": "user", "content": "hi"}]}


def dripping(app: Any, pause: float = 0.5) -> Any:
    """The app, its answers sent a piece at a time: a caller can leave a stream after its first
    chunk with the rest (and the usage) still to come."""
    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        async def slow(message: Any) -> None:
            await send(message)
            if message["type"] == "http.response.body" and message.get("more_body"):
                await asyncio.sleep(pause)

        await app(scope, receive, slow)

    return wrapped


def held(app: Any, gate: threading.Event) -> Any:
    """The app, its model calls held until ``gate`` is set: a provider that hangs."""
    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            while not gate.is_set():
                await asyncio.sleep(0.02)
        await app(scope, receive, send)

    return wrapped


@pytest.fixture
def openai_url() -> Iterator[str]:
    with serve(FakeOpenAI().app()) as url:
        yield f"{url}/v1"


@pytest.fixture
def dripping_openai() -> Iterator[str]:
    with serve(dripping(FakeOpenAI().app())) as url:
        yield f"{url}/v1"


@pytest.fixture
def dripping_anthropic() -> Iterator[str]:
    with serve(dripping(FakeAnthropic().app())) as url:
        yield url


@pytest.fixture
def anthropic_fake() -> Iterator[tuple[FakeAnthropic, str]]:
    fake = FakeAnthropic()
    with serve(fake.app()) as url:
        yield fake, url


async def _events(db: Path) -> list[tuple[str, str, int, int, int, int, str, str]]:
    async with await Engine.open(db) as engine:
        return [(e.model, e.principal, e.input_tokens, e.cached_input_tokens, e.cache_write_tokens, e.output_tokens,
                 e.cost_source, e.provider) async for e in engine.iter_events(0, engine.now_ms() + 60_000)]


async def test_openai_sync_client_is_governed_with_no_other_change(db_path: Path, openai_url: str) -> None:
    async with await Engine.open(db_path) as engine:
        http = engine.httpx_client(principal="alice", team="ml")
    client = openai.OpenAI(base_url=openai_url, api_key="sk-provider", http_client=http, max_retries=0)
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == FakeOpenAI.REPLY
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == FakeOpenAI.REPLY
    assert [m.id for m in client.models.list()] == ["gpt-4o-mini"]  # not a model call: passed through
    http.close()
    events = await _events(db_path)
    assert [(e[0], e[1], e[2], e[5], e[6]) for e in events] == [("gpt-4o-mini", "alice", 10, 7, "computed")] * 2
    async with await Engine.open(db_path) as engine:
        assert await engine.open_holds() == 0


async def test_a_blocked_call_is_a_402_from_the_sdk(db_path: Path, openai_url: str) -> None:
    async with await Engine.open(db_path) as engine:
        await engine.add_policy(build_policy(scope="principal:bob", metric="usd", window="day", hard="0.000001",
                                             name="Bob's cap"))
        http = engine.httpx_async_client(principal="bob")
        client = openai.AsyncOpenAI(base_url=openai_url, api_key="sk-provider", http_client=http, max_retries=0)
        with pytest.raises(openai.APIStatusError) as blocked:
            await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert blocked.value.status_code == 402
        assert "Bob's cap" in blocked.value.message
        assert await engine.open_holds() == 0
        await http.aclose()
    # Nothing was sent, nothing charged: the refusal is recorded as a blocked call of no tokens and no cost.
    assert await _events(db_path) == [("gpt-4o-mini", "bob", 0, 0, 0, 0, "computed", "openai")]


async def test_an_output_cap_beyond_what_the_ledger_stores_is_a_400_from_the_sdk(db_path: Path,
                                                                                  openai_url: str) -> None:
    """max_tokens 2**62 once overflowed the routing decision's write (issue 17): refused first."""
    async with await Engine.open(db_path) as engine:
        http = engine.httpx_async_client(principal="bob")
        client = openai.AsyncOpenAI(base_url=openai_url, api_key="sk-provider", http_client=http, max_retries=0)
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(model="gpt-4o-mini", max_tokens=2**62,
                                                 messages=[{"role": "user", "content": "hi"}])
        assert refused.value.body["param"] == "max_tokens"  # type: ignore[index]
        assert "at most 2,147,483,647" in refused.value.message
        assert await engine.open_holds() == 0
        await http.aclose()
    assert await _events(db_path) == []


async def test_openai_async_client_streams_and_settles(db_path: Path, openai_url: str) -> None:
    async with await Engine.open(db_path) as engine:
        http = engine.httpx_async_client(principal="carol", session="s-1")
        client = openai.AsyncOpenAI(base_url=openai_url, api_key="sk-provider", http_client=http, max_retries=0)
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == FakeOpenAI.REPLY
        cut = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "#cut"}], stream=True)
        with pytest.raises(Exception):  # noqa: B017 (the SDK's or httpx's error for a broken stream)
            async for _ in cut:
                pass
        await http.aclose()
        assert await engine.open_holds() == 0
    events = sorted(await _events(db_path), key=lambda e: e[6])
    assert [e[6] for e in events] == ["computed", "estimated"]
    assert events[1][5] > 0  # the text that arrived is billed


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_anthropic_usage_fields_are_mapped(db_path: Path, anthropic_fake: tuple[FakeAnthropic, str],
                                                 stream: bool) -> None:
    fake, url = anthropic_fake
    async with await Engine.open(db_path) as engine:
        http = engine.httpx_client(principal="dave", module=httpx2)  # what anthropic 2 is built on
    client = anthropic.Anthropic(base_url=url, api_key="sk-ant-provider", http_client=http, max_retries=0)
    ask = {"model": "claude-haiku-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        with client.messages.stream(**ask) as s:  # type: ignore[arg-type]
            assert "".join(s.text_stream) == FakeAnthropic.REPLY
    else:
        message = client.messages.create(**ask)  # type: ignore[call-overload]
        assert message.content[0].text == FakeAnthropic.REPLY
    http.close()
    sent = fake.requests[-1]["headers"]  # x-api-key, or a Bearer header in newer SDKs: passed through as is
    assert "sk-ant-provider" in (sent.get("x-api-key", ""), sent.get("authorization", "").removeprefix("Bearer "))
    [(model, who, inp, cached, written, out, source, provider)] = await _events(db_path)
    # input_tokens 20 + cache reads 100 + cache writes 30; output 5
    assert (model, who, inp, cached, written, out, source, provider) == (
        "claude-haiku-4-5", "dave", 150, 100, 30, 5, "computed", "anthropic")  # the model's vendor


async def test_a_governed_client_needs_a_principal(engine: Engine) -> None:
    with pytest.raises(FieldError, match="principal: is empty"):
        engine.httpx_async_client(principal=" ")


async def _settled(db: Path, count: int = 1) -> None:
    """Until ``count`` events are in the ledger and no hold is open (a settlement scheduled by the
    garbage collector lands a moment later); fails after 20 s."""
    for _ in range(400):
        async with await Engine.open(db) as engine:
            if await engine.open_holds() == 0 and len([e async for e in engine.iter_events(0, 2**62)]) >= count:
                return
        await asyncio.sleep(0.05)
    raise AssertionError("the call was never settled")


def _never_awaited(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "never awaited" in str(w.message)]


@pytest.mark.parametrize("leave", ["break", "exception"])
async def test_a_sync_stream_left_unfinished_is_settled_once(db_path: Path, dripping_openai: str, leave: str) -> None:
    async with await Engine.open(db_path) as engine:
        http = engine.httpx_client(principal="erin")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with contextlib.suppress(KeyError), openai.OpenAI(base_url=dripping_openai, api_key="sk-provider",
                                                          http_client=http, max_retries=0) as client:
            stream = client.chat.completions.create(**ASK, stream=True)
            for _chunk in stream:
                if leave == "break":
                    break
                raise KeyError("the caller's own bug, mid-stream")
        del stream
        gc.collect()  # the stream, collected after its client closed: nothing more happens
    assert _never_awaited(caught) == []
    [(model, who, inp, _, _, out, source, provider)] = await _events(db_path)
    assert (model, who, source, provider) == ("gpt-4o-mini", "erin", "estimated", "openai")
    assert inp > 0 and out > 0  # the prompt, and the text that arrived
    async with await Engine.open(db_path) as engine:
        assert await engine.open_holds() == 0


async def test_a_sync_anthropic_stream_left_by_break_is_settled_once(db_path: Path, dripping_anthropic: str) -> None:
    async with await Engine.open(db_path) as engine:
        http = engine.httpx_client(principal="dave", module=httpx2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with anthropic.Anthropic(base_url=dripping_anthropic, api_key="sk-ant-provider", http_client=http,
                                 max_retries=0) as client:
            stream = client.messages.create(**ASK_CLAUDE, stream=True)
            for _event in stream:
                break
        del stream
        gc.collect()
    assert _never_awaited(caught) == []
    # message_start's usage arrived (20 + 100 cache reads + 30 cache writes; 1 output token so far)
    assert await _events(db_path) == [("claude-haiku-4-5", "dave", 150, 100, 30, 1, "estimated", "anthropic")]
    async with await Engine.open(db_path) as engine:
        assert await engine.open_holds() == 0


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
@pytest.mark.parametrize("closed_by", ["client", "engine"])
async def test_an_async_stream_left_by_break_is_settled_once(db_path: Path, dripping_openai: str,
                                                            dripping_anthropic: str, sdk: str, closed_by: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with await Engine.open(db_path) as engine:
            client: Any
            if sdk == "openai":
                http = engine.httpx_async_client(principal="frank")
                client = openai.AsyncOpenAI(base_url=dripping_openai, api_key="sk", http_client=http, max_retries=0)
                stream = await client.chat.completions.create(**ASK, stream=True)
            else:
                http = engine.httpx_async_client(principal="frank", module=httpx2)
                client = anthropic.AsyncAnthropic(base_url=dripping_anthropic, api_key="sk", http_client=http,
                                                  max_retries=0)
                stream = await client.messages.create(**ASK_CLAUDE, stream=True)
            async for _ in stream:
                break
            if closed_by == "client":
                await client.close()
                assert await engine.open_holds() == 0
                assert len([e async for e in engine.iter_events(0, 2**62)]) == 1
        # closed_by == "engine": the engine closes with the stream still open, never closed by its caller
        del stream
        gc.collect()
        await asyncio.sleep(0.1)  # what the loop does with the collected stream: nothing more
    assert _never_awaited(caught) == []
    [event] = await _events(db_path)
    assert (event[0], event[1], event[6]) == (ASK["model"] if sdk == "openai" else "claude-haiku-4-5", "frank",
                                              "estimated")
    async with await Engine.open(db_path) as engine:
        assert await engine.open_holds() == 0


async def test_an_abandoned_sync_stream_is_settled_when_collected(db_path: Path, dripping_openai: str) -> None:
    async with await Engine.open(db_path) as engine:
        http = engine.httpx_client(principal="gina")
    client = openai.OpenAI(base_url=dripping_openai, api_key="sk-provider", http_client=http, max_retries=0)
    stream = client.chat.completions.create(**ASK, stream=True)
    del stream  # never read, never closed
    gc.collect()
    await _settled(db_path)  # while the client is still open
    [(model, who, inp, _, _, out, source, _)] = await _events(db_path)
    assert (model, who, out, source) == ("gpt-4o-mini", "gina", 0, "estimated") and inp > 0  # the prompt alone
    client.close()
    assert len(await _events(db_path)) == 1


async def test_an_abandoned_async_stream_is_settled_when_collected(db_path: Path, dripping_openai: str) -> None:
    async with await Engine.open(db_path) as engine:
        http = engine.httpx_async_client(principal="gina")
        client = openai.AsyncOpenAI(base_url=dripping_openai, api_key="sk", http_client=http, max_retries=0)
        stream = await client.chat.completions.create(**ASK, stream=True)
        del stream  # never read, never closed
        gc.collect()
        for _ in range(400):  # the settlement runs on this loop
            if await engine.open_holds() == 0:
                break
            await asyncio.sleep(0.05)
        assert await engine.open_holds() == 0
        assert [(e.model, e.output_tokens, e.cost_source) async for e in engine.iter_events(0, 2**62)] == [
            ("gpt-4o-mini", 0, "estimated")]
        await client.close()


@pytest.mark.parametrize(("model", "vendor"), [("gemini-2.5-flash", "gemini"), ("mistral-large-latest", "mistral")])
async def test_a_model_at_an_unknown_host_is_priced_by_its_vendor(db_path: Path, openai_url: str, model: str,
                                                                  vendor: str) -> None:
    async with await Engine.open(db_path) as engine:
        http = engine.httpx_client(principal="hal")
    with openai.OpenAI(base_url=openai_url, api_key="sk-provider", http_client=http, max_retries=0) as client:
        client.chat.completions.create(**{**ASK, "model": model})
    async with await Engine.open(db_path) as engine:
        [event] = [e async for e in engine.iter_events(0, 2**62)]
        price = engine.prices.lookup(model, event.ts_ms, provider=vendor)
    assert price is not None and price.provider == vendor
    assert (event.provider, event.cost_source) == (vendor, "computed")
    assert event.cost_nanos and event.cost_nanos > 0


def test_the_vendor_is_known_from_its_host_else_from_the_model() -> None:
    prices = bundled_prices()
    assert vendor_of("api.mistral.ai", "my-fine-tune", prices) == "mistral"  # the host decides
    assert vendor_of("generativelanguage.googleapis.com", "gemini-2.5-flash", prices) == "gemini"
    assert vendor_of("llm-proxy.internal", "claude-sonnet-4-5-20250929", prices) == "anthropic"  # a dated name
    assert vendor_of("llm-proxy.internal", "mistral/mistral-large-latest", prices) == "mistral"
    assert vendor_of("127.0.0.1", "my-own-model", prices) == "127.0.0.1"  # nobody's: recorded unpriced


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_timeout_is_recorded_alike_by_the_transport_and_the_gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      stream: bool) -> None:
    """The provider has the call and does not answer in time: the caller gets an error, so the call
    is an error; the provider may have billed the prompt, so that is recorded, as an estimate."""
    monkeypatch.setenv("BUDGETEER_VAULT_PASSPHRASE", "pw")
    ask = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "What is the capital of France?"}],
           "stream": stream}
    gate = threading.Event()
    direct, governed = tmp_path / "direct.db", tmp_path / "gateway.db"

    async def prepare(url: str) -> tuple[Any, str]:
        async with await Engine.open(direct) as engine:
            http = engine.httpx_client(principal="ivy")
        async with await Engine.open(governed) as engine:
            await engine.vault_set("fake", "sk-provider")
            await engine.add_provider(name="fake", kind="openai", base_url=url, credential="vault:fake",
                                      models=["gpt-4o-mini"])
            _token, secret = await engine.create_token(name="t", principal="ivy")
        return http, secret

    async def ledger(db: Path) -> list[tuple[str, str, int, int, int | None, str]]:
        async with await Engine.open(db) as engine:
            assert await engine.open_holds() == 0
            return [(e.model, e.status, e.input_tokens, e.output_tokens, e.cost_nanos, e.cost_source)
                    async for e in engine.iter_events(0, 2**62)]

    with serve(held(FakeOpenAI().app(), gate)) as provider:
        http, secret = asyncio.run(prepare(f"{provider}/v1"))
        with openai.OpenAI(base_url=f"{provider}/v1", api_key="sk-provider", http_client=http, max_retries=0,
                           timeout=0.5) as client, pytest.raises(openai.APITimeoutError):
            client.chat.completions.create(**ask)
        with serve(create_app(governed, routing_mode="off", upstream_timeout=30)) as base:
            # the caller's timeout comes first: it hangs up; the provider answers later
            with openai.OpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=0, timeout=0.5) as client, \
                    pytest.raises(openai.APITimeoutError):
                client.chat.completions.create(**ask)
            gate.set()
            asyncio.run(_settled(governed))
        gate.clear()
        with serve(create_app(governed, routing_mode="off", upstream_timeout=0.5)) as base:
            # the gateway's own timeout comes first: the caller gets a 504
            with openai.OpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=0, timeout=30) as client, \
                    pytest.raises(openai.InternalServerError) as answered:
                client.chat.completions.create(**ask)
            assert answered.value.status_code == 504
        gate.set()
    [recorded] = asyncio.run(ledger(direct))
    model, status, inp, out, cost, source = recorded
    assert (model, status, out, source) == ("gpt-4o-mini", "error", 0, "estimated")
    assert inp > 0 and cost and cost > 0  # the prompt, which the provider received
    assert asyncio.run(ledger(governed)) == [recorded, recorded]
