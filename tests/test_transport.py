"""The governed httpx transport under the official SDKs, sync and async, streaming and not:
each call settled from its provider's usage (Anthropic's cache fields mapped), and a blocked
call raised by the SDK as a 402."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx2
import openai
import pytest

from engine.budgets import build_policy
from engine.engine import Engine
from engine.models import FieldError
from tests.asgi_servers import FakeAnthropic, FakeOpenAI, serve


@pytest.fixture
def openai_url() -> Iterator[str]:
    with serve(FakeOpenAI().app()) as url:
        yield f"{url}/v1"


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
    assert await _events(db_path) == []  # nothing was sent, nothing charged


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
        "claude-haiku-4-5", "dave", 150, 100, 30, 5, "computed", "127.0.0.1")


async def test_a_governed_client_needs_a_principal(engine: Engine) -> None:
    with pytest.raises(FieldError, match="principal: is empty"):
        engine.httpx_async_client(principal=" ")
