"""What the official SDKs send, through the gateway, to fake providers on 127.0.0.1 that record
what they receive: stream usage only when asked for, a vendor's whole catalog (dated names,
embeddings, ``/v1/models``), the provider-specific headers a client sets, and a provider's
cut stream raised by the anthropic SDK."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from engine.engine import Engine
from engine.integrations.gateway import create_app
from tests.asgi_servers import FakeAnthropic, FakeOpenAI, serve
from tests.test_gateway import KEY, _ledger, _open_holds, _settled, _setup


@pytest.fixture(autouse=True)
def _vault(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUDGETEER_VAULT_PASSPHRASE", "pw")


def _register(db: Path, **provider: object) -> str:
    """A token's secret, on a ledger with the vault key and one provider registered as given."""
    async def prepare() -> str:
        secret = await _setup(db)
        async with await Engine.open(db) as engine:
            await engine.add_provider(credential="vault:fake", **provider)
        return secret

    return asyncio.run(prepare())


@pytest.fixture
def fake_openai() -> Iterator[tuple[FakeOpenAI, str]]:
    fake = FakeOpenAI()
    with serve(fake.app()) as url:
        yield fake, url


@pytest.fixture
def fake_claude() -> Iterator[tuple[FakeAnthropic, str]]:
    fake = FakeAnthropic()
    with serve(fake.app()) as url:
        yield fake, url


@pytest.fixture
def openai_vendor(db_path: Path, fake_openai: tuple[FakeOpenAI, str], upstream: str) -> Iterator[openai.OpenAI]:
    """The openai SDK on a gateway whose one provider was added with ``--vendor openai`` (no --models)."""
    _fake, url = fake_openai
    secret = _register(db_path, name="oa", kind="openai", base_url=f"{url}/v1", vendor="openai")
    with serve(create_app(db_path, upstream_timeout=5.0)) as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=0)


@pytest.fixture
def claude_vendor(db_path: Path, fake_claude: tuple[FakeAnthropic, str],
                  upstream: str) -> Iterator[anthropic.Anthropic]:
    _fake, url = fake_claude
    secret = _register(db_path, name="claude", kind="anthropic", base_url=f"{url}/v1", vendor="anthropic")
    with serve(create_app(db_path, upstream_timeout=5.0)) as base:
        yield anthropic.Anthropic(base_url=base, api_key=secret, max_retries=0)


# ---- finding 2: stream usage only when the client asked for it


@pytest.mark.parametrize("options", [None, {"include_usage": False}])
def test_a_stream_without_include_usage_has_a_choice_in_every_chunk_and_is_billed_exactly(
        openai_vendor: openai.OpenAI, fake_openai: tuple[FakeOpenAI, str], db_path: Path,
        options: dict[str, bool] | None) -> None:
    fake, _ = fake_openai
    extra = {} if options is None else {"stream_options": options}
    stream = openai_vendor.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True, **extra)  # type: ignore[call-overload]
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)  # the everyday loop: no IndexError
    assert text == FakeOpenAI.REPLY and all(chunk.usage is None for chunk in chunks)
    assert fake.requests[-1]["body"]["stream_options"] == {"include_usage": True}  # the ledger still gets it
    [(_m, _p, inp, out, cost, source, _s)] = _settled(db_path)
    assert (inp, out, source, cost) == (10, 7, "computed", 10 * 150 + 7 * 600)
    assert _open_holds(db_path) == 0


def test_a_stream_with_include_usage_gets_its_usage_chunk(openai_vendor: openai.OpenAI, db_path: Path) -> None:
    chunks = list(openai_vendor.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == FakeOpenAI.REPLY
    [(_m, _p, inp, out, cost, source, _s)] = _settled(db_path)
    assert (inp, out, source, cost) == (10, 7, "computed", 10 * 150 + 7 * 600)


def test_usage_on_a_chunk_with_choices_is_taken_off_it_when_not_asked_for(
        openai_vendor: openai.OpenAI, db_path: Path) -> None:
    content = "hi #inline"
    chunks = list(openai_vendor.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": content}], stream=True))
    assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"
    assert all(chunk.usage is None for chunk in chunks)
    [(_m, _p, inp, out, _c, source, _s)] = _settled(db_path)
    assert (inp, out, source) == (10 + len(content) // 4, 7, "computed")


# ---- finding 3: a vendor's whole catalog


def test_a_vendor_provider_serves_embeddings_and_dated_names_and_lists_them(
        openai_vendor: openai.OpenAI, fake_openai: tuple[FakeOpenAI, str], db_path: Path) -> None:
    fake, _ = fake_openai
    emb = openai_vendor.embeddings.create(model="text-embedding-3-small", input=["one", "two"])
    assert len(emb.data) == 2 and fake.requests[-1]["path"] == "/v1/embeddings"
    dated = openai_vendor.chat.completions.create(model="gpt-4o-2024-08-06",
                                                  messages=[{"role": "user", "content": "hi"}])
    assert dated.choices[0].message.content == FakeOpenAI.REPLY
    assert fake.requests[-1]["body"]["model"] == "gpt-4o-2024-08-06"
    models = list(openai_vendor.models.list())
    ids = {m.id for m in models}
    assert {"gpt-4o", "gpt-4o-2024-08-06", "gpt-4o-mini", "text-embedding-3-small"} <= ids
    assert not any(i.startswith("claude") for i in ids)  # only the vendor's own
    assert all(m.object == "model" and m.owned_by == "oa" and isinstance(m.created, int) for m in models)
    assert len(ids) == len(models)
    with pytest.raises(openai.NotFoundError) as unknown:
        openai_vendor.chat.completions.create(model="gpt-nope-7", messages=[{"role": "user", "content": "hi"}])
    assert "gpt-nope-7" in unknown.value.message
    assert sorted((r[0], r[5]) for r in _ledger(db_path)) == [("gpt-4o-2024-08-06", "computed"),
                                                              ("text-embedding-3-small", "computed")]
    assert all(r[4] > 0 for r in _ledger(db_path))


@pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")  # the SDK's own notice
def test_an_anthropic_vendor_provider_serves_dated_claude_names(
        claude_vendor: anthropic.Anthropic, fake_claude: tuple[FakeAnthropic, str], db_path: Path) -> None:
    fake, _ = fake_claude
    message = claude_vendor.messages.create(model="claude-sonnet-4-5-20250929", max_tokens=100,
                                            messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].text == FakeAnthropic.REPLY  # type: ignore[union-attr]
    assert fake.requests[-1]["body"]["model"] == "claude-sonnet-4-5-20250929"
    [(model, _p, _i, _o, cost, source, _s)] = _ledger(db_path)
    assert (model, source) == ("claude-sonnet-4-5-20250929", "computed") and cost > 0


def test_models_named_by_models_stay_an_explicit_list(db_path: Path, fake_openai: tuple[FakeOpenAI, str]) -> None:
    _fake, url = fake_openai
    secret = _register(db_path, name="oa", kind="openai", base_url=f"{url}/v1", vendor="openai",
                       models=["gpt-4o-mini"])
    with (serve(create_app(db_path)) as base,
          openai.OpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=0) as client):
        assert [m.id for m in client.models.list()] == ["gpt-4o-mini"]
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="text-embedding-3-small", input="one")


# ---- finding 4: provider-specific headers pass, the client's credentials never do


def test_openai_organization_project_and_beta_headers_reach_the_provider(
        db_path: Path, fake_openai: tuple[FakeOpenAI, str]) -> None:
    fake, url = fake_openai
    secret = _register(db_path, name="oa", kind="openai", base_url=f"{url}/v1", vendor="openai")
    with (serve(create_app(db_path)) as base,
          openai.OpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=0, organization="org-team",
              project="proj_42", default_headers={"OpenAI-Beta": "assistants=v2",
              "Cookie": "session=client",
              "api-key": "client-azure-key"}) as client):
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        client.embeddings.create(model="text-embedding-3-small", input="one")
        with openai.OpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=0) as plain:
            plain.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    chat, emb, bare = (r["headers"] for r in fake.requests)
    for seen in (chat, emb):
        assert (seen["openai-organization"], seen["openai-project"], seen["openai-beta"]) == (
            "org-team", "proj_42", "assistants=v2")
    for seen in (chat, emb, bare):
        assert seen["authorization"] == f"Bearer {KEY}"  # the vault's key, never the client's token
        assert secret not in str(seen) and "cookie" not in seen and "api-key" not in seen
        assert not any(name.startswith("x-stainless") for name in seen)
    assert "openai-organization" not in bare


def test_anthropic_beta_reaches_an_anthropic_provider_and_the_version_stays_the_gateways(
        db_path: Path, fake_claude: tuple[FakeAnthropic, str]) -> None:
    fake, url = fake_claude
    secret = _register(db_path, name="claude", kind="anthropic", base_url=f"{url}/v1")
    with (serve(create_app(db_path)) as base,
          anthropic.Anthropic(base_url=base, api_key=secret, max_retries=0,
              default_headers={"anthropic-beta": "context-1m-2025-08-07"}) as client):
        client.messages.create(model="claude-haiku-4-5", max_tokens=100, messages=[{"role": "user", "content": "hi"}])
    seen = fake.requests[-1]["headers"]
    # anthropic-version: the one the gateway reads answers in, not the SDK's (2.14 sends 2026-10-21).
    assert seen["anthropic-beta"] == "context-1m-2025-08-07" and seen["anthropic-version"] == "2023-06-01"
    assert seen["x-api-key"] == KEY and "authorization" not in seen and secret not in str(seen)


# ---- finding 5: a provider's cut stream is an error the SDKs raise


def test_the_anthropic_sdk_raises_on_a_stream_the_provider_cuts_and_the_call_is_settled(
        claude_vendor: anthropic.Anthropic, db_path: Path) -> None:
    received: list[str] = []
    with pytest.raises(anthropic.APIError) as cut, claude_vendor.messages.stream(
            model="claude-haiku-4-5", max_tokens=100, messages=[{"role": "user", "content": "hi #cut"}]) as stream:
        received.extend(stream.text_stream)
    assert received == ["Hi from"] and "broke off" in str(cut.value)
    [(_m, _p, inp, out, cost, source, status)] = _settled(db_path)
    assert (source, status) == ("estimated", "ok") and inp > 0 and out > 0 and cost > 0
    assert _open_holds(db_path) == 0


def test_an_anthropic_stream_that_ends_without_message_stop_is_an_error_too(db_path: Path) -> None:
    """A provider that closes cleanly but early (no chunked encoding to tell it was cut)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)

    def serve_once() -> None:
        conn, _ = listener.accept()
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        while len(body) < length:
            body += conn.recv(65536)
        start = (b'{"type":"message_start","message":{"id":"m","type":"message","role":"assistant",'
                 b'"model":"claude-haiku-4-5","content":[],"stop_reason":null,"stop_sequence":null,'
                 b'"usage":{"input_tokens":20,"output_tokens":1}}}')
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
                     b"event: message_start\ndata: " + start + b"\n\n"
                     b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
                     b'"content_block":{"type":"text","text":""}}\n\n'
                     b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                     b'"delta":{"type":"text_delta","text":"Hi from"}}\n\n')
        conn.close()

    threading.Thread(target=serve_once, daemon=True).start()
    try:
        port = listener.getsockname()[1]
        secret = _register(db_path, name="claude", kind="anthropic", base_url=f"http://127.0.0.1:{port}/v1")
        with (serve(create_app(db_path)) as base,
              anthropic.Anthropic(base_url=base, api_key=secret, max_retries=0) as client,
              pytest.raises(anthropic.APIError),
              client.messages.stream(model="claude-haiku-4-5", max_tokens=100,
                                     messages=[{"role": "user", "content": "hi"}]) as stream):
            assert "".join(stream.text_stream) == "Hi from"
    finally:
        listener.close()
    [(_m, _p, _i, _o, _c, source, _s)] = _settled(db_path)
    assert source == "estimated" and _open_holds(db_path) == 0


def test_the_openai_sdk_raises_on_a_stream_the_provider_cuts(openai_vendor: openai.OpenAI, db_path: Path) -> None:
    received: list[str] = []
    with pytest.raises(openai.APIError) as cut:
        for chunk in openai_vendor.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "#cut"}], stream=True):
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "Hello from" and "broke off" in cut.value.message
    assert not isinstance(cut.value, openai.APIStatusError) or cut.value.status_code != 200
    assert [r[5] for r in _settled(db_path)] == ["estimated"]


def test_a_raw_client_sees_the_anthropic_error_event(claude_vendor: anthropic.Anthropic) -> None:
    base = str(claude_vendor.base_url).rstrip("/")
    with httpx.Client(timeout=10) as http:
        text = http.post(f"{base}/v1/messages", headers={"x-api-key": claude_vendor.api_key or ""},
                         json={"model": "claude-haiku-4-5", "max_tokens": 10, "stream": True,
                               "messages": [{"role": "user", "content": "#cut"}]}).text
    last = text.strip().split("\n\n")[-1].strip()
    assert last.startswith("event: error\ndata: ")
    assert json.loads(last.split("data: ", 1)[1]) == {"type": "error", "error": {
        "type": "api_error", "message": "provider claude broke off the stream; what arrived was billed as an estimate"}}


# ---- finding 2 in the governed transport: the same meter, sync and async


async def test_the_governed_transport_hides_the_usage_chunk_unless_asked(
        db_path: Path, fake_openai: tuple[FakeOpenAI, str]) -> None:
    fake, url = fake_openai
    async with await Engine.open(db_path) as engine:
        http = engine.httpx_client(principal="alice")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-provider", http_client=http, max_retries=0)
        ask = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        plain = list(client.chat.completions.create(**ask))  # type: ignore[call-overload]
        asked = list(client.chat.completions.create(**ask, stream_options={"include_usage": True}))  # type: ignore[call-overload]
        http.close()
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-provider", max_retries=0,
                                      http_client=engine.httpx_async_client(principal="alice")) as aclient:
            streamed = await aclient.chat.completions.create(**ask)  # type: ignore[call-overload]
            async_chunks = [chunk async for chunk in streamed]
        events = [(e.input_tokens, e.output_tokens, e.cost_source, e.cost_nanos)
                  async for e in engine.iter_events(0, engine.now_ms() + 60_000)]
    for chunks in (plain, async_chunks):
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == FakeOpenAI.REPLY  # no IndexError
        assert all(c.usage is None for c in chunks)
    assert asked[-1].choices == [] and asked[-1].usage is not None and asked[-1].usage.completion_tokens == 7
    assert all(r["body"]["stream_options"] == {"include_usage": True} for r in fake.requests)
    assert events == [(10, 7, "computed", 10 * 150 + 7 * 600)] * 3
