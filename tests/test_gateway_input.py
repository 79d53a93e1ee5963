"""Hostile input at the gateway (issue 17, findings 2, 4 and 5), on real sockets: a body the
gateway cannot take is refused 400 naming the field before any hold; whatever fails after a
hold releases it and answers 500 in OpenAI's shape, logged in one line; a request's head is
bounded in size, in headers and in time."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from engine.budgets import build_policy
from engine.engine import Engine
from engine.integrations.gateway import HttpLimits, create_app
from tests.asgi_servers import FakeAnthropic, FakeOpenAI, serve
from tests.test_gateway import _ledger, _open_holds, _with_provider

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(autouse=True)
def _vault(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUDGETEER_VAULT_PASSPHRASE", "pw")


@pytest.fixture
def gateway(db_path: Path, provider: tuple[FakeOpenAI, str]) -> Iterator[tuple[str, str]]:
    _fake, url = provider
    secret = _with_provider(db_path, f"{url}/v1", ["gpt-4o-mini"])
    with serve(create_app(db_path, routing_mode="suggest", upstream_timeout=5.0)) as base:
        yield base, secret


@pytest.fixture
def provider() -> Iterator[tuple[FakeOpenAI, str]]:
    fake = FakeOpenAI()
    with serve(fake.app()) as url:
        yield fake, url


def test_stream_options_not_an_object_is_refused_before_a_hold(gateway: tuple[str, str], db_path: Path) -> None:
    """Nine calls with ``stream_options: "x"`` leave nothing held, so the tenth, a real one,
    fits under a budget that holds one call's worst case (about $0.00006) and not two."""
    base, secret = gateway

    async def policy() -> None:
        async with await Engine.open(db_path) as engine:
            await engine.add_policy(build_policy(scope="principal:alice", metric="usd", window="day",
                                                 hard="0.0001", name="one call", policy_id="one"))

    asyncio.run(policy())
    with openai.OpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=0) as client:
        for _ in range(9):
            with pytest.raises(openai.BadRequestError) as bad:
                client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=100, stream=True,
                                               stream_options="x")  # type: ignore[arg-type]
            assert bad.value.body == {"message": "stream_options: must be an object", "type": "invalid_request_error",
                                      "param": "stream_options", "code": "invalid_value"}
        assert _open_holds(db_path) == 0 and _ledger(db_path) == []
        answer = client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=100)
        assert answer.choices[0].message.content
        assert _open_holds(db_path) == 0 and len(_ledger(db_path)) == 1


def test_a_body_nested_100000_deep_is_400_on_chat_and_on_traces(gateway: tuple[str, str], db_path: Path) -> None:
    base, secret = gateway

    async def traces_token() -> str:
        async with await Engine.open(db_path) as engine:
            _t, token = await engine.create_token(name="otel", principal="collector", scopes=["traces"])
            return token

    tracer = asyncio.run(traces_token())
    nested = b"[" * 100_000 + b"]" * 100_000
    with httpx.Client(timeout=30) as http:
        chat = http.post(f"{base}/v1/chat/completions", content=nested,
                         headers={"authorization": f"Bearer {secret}", "content-type": "application/json"})
        traces = http.post(f"{base}/v1/traces", content=nested,
                           headers={"authorization": f"Bearer {tracer}", "content-type": "application/json"})
    for answer in (chat, traces):
        assert answer.status_code == 400
        assert answer.json()["error"] == {"message": "body: is nested deeper than 64 levels",
                                          "type": "invalid_request_error", "param": "body", "code": "invalid_value"}
    assert _open_holds(db_path) == 0


def test_max_tokens_beyond_what_the_ledger_stores_is_400_naming_it(gateway: tuple[str, str], db_path: Path) -> None:
    base, secret = gateway
    with openai.OpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=0) as client:
        for cap in ({"max_tokens": 4611686018427387904}, {"max_completion_tokens": 2**31}):
            with pytest.raises(openai.BadRequestError) as bad:
                client.chat.completions.create(model="gpt-4o-mini", messages=HI, **cap)  # type: ignore[call-overload]
            [field] = cap
            assert bad.value.body == {"message": f"{field}: must be less than or equal to 2147483647",
                                      "type": "invalid_request_error", "param": field, "code": "invalid_value"}
        with pytest.raises(openai.BadRequestError) as bad:  # a field the gateway reads, of the wrong type
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": 5}])  # type: ignore[list-item]
        assert bad.value.body["param"] == "messages[0].content"  # type: ignore[index]
        assert _open_holds(db_path) == 0 and _ledger(db_path) == []


async def _absurd_usage(request: Request) -> Response:
    """A provider reporting more tokens than any ledger holds: settling it fails after the hold."""
    return Response(b'{"id": "x", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini", "choices": [], '
                    b'"usage": {"prompt_tokens": 1e300, "completion_tokens": 1}}', media_type="application/json")


def test_a_failure_after_the_hold_releases_it_and_answers_500_in_openai_shape(
        db_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    garbage = Starlette(routes=[Route("/v1/chat/completions", _absurd_usage, methods=["POST"])])
    with serve(garbage) as url:
        secret = _with_provider(db_path, f"{url}/v1", ["gpt-4o-mini"])
        with (serve(create_app(db_path, routing_mode="off")) as base, caplog.at_level(logging.ERROR),
              openai.OpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=0) as client,
              pytest.raises(openai.InternalServerError) as failed):
            client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=10)
    assert failed.value.status_code == 500
    assert failed.value.body == {"message": "the gateway failed on this request; it was not billed",
                                 "type": "api_error", "param": None, "code": "internal_error"}
    assert _open_holds(db_path) == 0
    [line] = [r for r in caplog.records if r.name == "budgeteer.gateway"]
    assert "POST /v1/chat/completions failed: OverflowError" in line.getMessage() and line.exc_info is None
    assert "\n" not in line.getMessage() and "Traceback" not in capfd.readouterr().err


def test_the_messages_api_refuses_in_anthropics_shape(db_path: Path) -> None:
    fake = FakeAnthropic()
    with serve(fake.app()) as upstream:
        async def prepare() -> str:
            async with await Engine.open(db_path) as engine:
                await engine.vault_set("claude", "sk-ant-fake")
                await engine.add_provider(name="claude", kind="anthropic", base_url=f"{upstream}/v1",
                                          credential="vault:claude", models=["claude-haiku-4-5"])
                _t, secret = await engine.create_token(name="t", principal="alice")
                return secret

        secret = asyncio.run(prepare())
        with (serve(create_app(db_path)) as base,
              anthropic.Anthropic(base_url=base, api_key=secret, max_retries=0) as claude):
            with pytest.raises(anthropic.BadRequestError) as bad:
                claude.messages.create(model="claude-haiku-4-5", max_tokens=0, messages=HI)  # type: ignore[arg-type]
            answer = claude.messages.create(model="claude-haiku-4-5", max_tokens=100, messages=HI)  # type: ignore[arg-type]
    assert bad.value.body == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "max_tokens: must be greater than or equal to 1"}}
    assert answer.content[0].text == FakeAnthropic.REPLY  # type: ignore[union-attr]
    assert _open_holds(db_path) == 0


# ---- the request's head: raw sockets


def _exchange(base: str, head: bytes) -> bytes:
    """Send ``head`` (as much of it as the gateway takes) and read until the gateway closes."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        try:
            sock.sendall(head)
        except OSError:  # the gateway stopped reading: its answer is waiting
            pass
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


@pytest.fixture
def bare(db_path: Path) -> Iterator[str]:
    """A gateway with a short header timeout (nothing needs a token before its head is read)."""
    with serve(create_app(db_path, limits=HttpLimits(header_timeout_s=0.5))) as base:
        yield base


def test_a_header_of_1_mb_is_431(bare: str) -> None:
    answer = _exchange(bare, b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 1_000_000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert b'"code": "request_header_fields_too_large"' in answer and b"65,536 bytes" in answer


def test_ten_thousand_headers_are_431_and_as_many_as_allowed_are_served(bare: str) -> None:
    many = b"".join(b"x%d: 1\r\n" % i for i in range(10_000))
    assert _exchange(bare, b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + many + b"\r\n").startswith(b"HTTP/1.1 431 ")
    over = b"".join(b"x%d: 1\r\n" % i for i in range(100))  # with host, 101
    answer = _exchange(bare, b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + over + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ") and b"limit of 100 headers" in answer
    fits = b"".join(b"x%d: 1\r\n" % i for i in range(98))  # with host and connection, 100
    answer = _exchange(bare, b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n" + fits + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_a_request_that_is_not_http_is_400_in_openai_shape(bare: str) -> None:
    answer = _exchange(bare, b"HELLO THERE\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and b'"code": "invalid_http"' in answer


def test_headers_unfinished_after_the_timeout_get_408_and_the_connection_closed(bare: str) -> None:
    answer = _exchange(bare, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer bgt_")
    assert answer.startswith(b"HTTP/1.1 408 ") and b'"code": "request_timeout"' in answer
    assert _exchange(bare, b"") == b""  # a connection that never sends a request: closed without a word


async def _garbage_stream(request: Request) -> Response:
    """A stream of chunks in no shape OpenAI sends: ``choices`` a number, a delta a number."""
    return Response(b'data: {"choices": 5}\n\ndata: {"choices": [{"delta": 5}]}\n\ndata: [DONE]\n\n',
                    media_type="text/event-stream")


def test_a_stream_of_garbage_is_relayed_whole_and_settled(db_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    garbage = Starlette(routes=[Route("/v1/chat/completions", _garbage_stream, methods=["POST"])])
    with serve(garbage) as url:
        secret = _with_provider(db_path, f"{url}/v1", ["gpt-4o-mini"])
        with serve(create_app(db_path, routing_mode="off")) as base, httpx.Client(timeout=30) as http:
            answer = http.post(f"{base}/v1/chat/completions", headers={"authorization": f"Bearer {secret}"},
                               json={"model": "gpt-4o-mini", "messages": HI, "stream": True})
    assert answer.status_code == 200 and answer.text.endswith("data: [DONE]\n\n")
    assert _open_holds(db_path) == 0 and [r[6] for r in _ledger(db_path)] == ["ok"]
    assert not [r for r in caplog.records if r.name == "budgeteer.gateway"]
