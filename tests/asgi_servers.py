"""Real HTTP servers on 127.0.0.1 for ASGI apps (the gateway, fake providers): uvicorn in a
thread with its own event loop, started before the test goes on and stopped gracefully."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(app: Any, port: int | None = None, grace_s: float = 5) -> Iterator[str]:
    """Serve an ASGI app; yields its base URL; stops it (lifespan shutdown included) afterwards."""
    # The listening socket is bound here and handed to uvicorn: no window in which another test
    # (another xdist worker) could take the port between choosing it and binding it.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port or 0))
    port = int(sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                           timeout_graceful_shutdown=grace_s, lifespan="on",
                                           timeout_keep_alive=60, http=getattr(app, "http_protocol", "auto")))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


async def post_all(url: str, body: dict[str, Any], headers: dict[str, str], count: int, *, connections: int,
                   timeout: float = 120) -> list[int]:
    """POST the same JSON ``count`` times at once over up to ``connections`` connections; the
    status codes."""
    import httpx

    # No more requests in flight than connections: the server sees the same concurrency, and
    # httpcore's pool, which scans its whole queue for every request it assigns, stays cheap
    # (1,000 queued requests over 200 connections took 24 s of the client's own CPU).
    gate = asyncio.Semaphore(connections)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=connections)) as client:
        async def one() -> int:
            async with gate:
                return (await client.post(url, json=body, headers=headers)).status_code

        return list(await asyncio.gather(*(one() for _ in range(count))))


class FakeOpenAI:
    """An OpenAI-compatible provider: chat (streaming too), embeddings, responses, models.

    The last user message steers it: ``#fail`` answers 500, ``#slow`` never answers in time,
    ``#cut`` breaks a stream off after two chunks, ``#drip`` streams slowly (0.3 s a chunk),
    ``#nousage`` leaves usage out, ``#inline`` puts a stream's usage on its finishing chunk (as
    some OpenAI-compatible servers do) rather than on a chunk of its own.
    """

    REPLY = "Hello from the fake provider."

    def __init__(self, count: Callable[[dict[str, Any]], tuple[int, int]] | None = None) -> None:
        """``count``: (prompt tokens, completion tokens) a chat is reported at, from its body;
        by default 10 plus a quarter of the last message's length, and 7."""
        self.requests: list[dict[str, Any]] = []
        self.count = count

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            Route("/v1/responses", self.responses, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
        ])

    async def _record(self, request: Request) -> dict[str, Any]:
        body: dict[str, Any] = await request.json()
        self.requests.append({"path": request.url.path, "headers": dict(request.headers), "body": body})
        return body

    @staticmethod
    def _last_text(body: dict[str, Any]) -> str:
        content = body.get("messages", [{}])[-1].get("content", "")
        return content if isinstance(content, str) else json.dumps(content)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]})

    async def chat(self, request: Request) -> Response:
        body = await self._record(request)
        text = self._last_text(body)
        prompt_tokens, completion_tokens = self.count(body) if self.count else (10 + len(text) // 4, 7)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens,
                 "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}
        if "#fail" in text:
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        if "#slow" in text:  # 30 s, or until the caller hangs up (a server stopping then need not wait)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not await request.is_disconnected():
                await asyncio.sleep(0.05)
        base = {"id": "chatcmpl-fake", "created": 1, "model": body["model"]}
        if not body.get("stream"):
            return JSONResponse({**base, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": self.REPLY}, "finish_reason": "stop"}],
                **({} if "#nousage" in text else {"usage": usage})})

        async def events() -> AsyncIterator[bytes]:
            words = ["Hello", " from", " the", " fake", " provider."]
            for i, word in enumerate(words):
                chunk = {**base, "object": "chat.completion.chunk", "choices": [
                    {"index": 0, "delta": {"content": word}, "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
                if "#cut" in text and i == 1:
                    raise RuntimeError("connection dropped mid-stream")
                await asyncio.sleep(0.3 if "#drip" in text else 0)
            done = {**base, "object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": {}, "finish_reason": "stop"}]}
            asked = (body.get("stream_options") or {}).get("include_usage") and "#nousage" not in text
            if asked and "#inline" in text:
                done["usage"] = usage
            yield f"data: {json.dumps(done)}\n\n".encode()
            if asked and "#inline" not in text:
                last = {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
                yield f"data: {json.dumps(last)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def embeddings(self, request: Request) -> Response:
        body = await self._record(request)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        tokens = sum(2 + len(str(i)) // 4 for i in inputs)
        return JSONResponse({"object": "list", "model": body["model"], "data": [
            {"object": "embedding", "index": n, "embedding": [0.1, 0.2, 0.3]} for n in range(len(inputs))],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def responses(self, request: Request) -> Response:
        body = await self._record(request)
        return JSONResponse({"id": "resp_fake", "object": "response", "created_at": 1, "model": body["model"],
                             "status": "completed", "output": [
                                 {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                                  "content": [{"type": "output_text", "text": self.REPLY, "annotations": []}]}],
                             "usage": {"input_tokens": 12, "output_tokens": 6, "total_tokens": 18,
                                       "input_tokens_details": {"cached_tokens": 0},
                                       "output_tokens_details": {"reasoning_tokens": 0}}})


class FakeAnthropic:
    """Anthropic's Messages API: usage with cache reads and writes, streaming as Anthropic's SSE events;
    ``#cut`` in the last user message breaks a stream off after its first text."""

    REPLY = "Hi from the fake Claude."
    USAGE: ClassVar[dict[str, int]] = {"input_tokens": 20, "output_tokens": 5, "cache_read_input_tokens": 100,
                                       "cache_creation_input_tokens": 30}

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/messages", self.messages, methods=["POST"])])

    async def messages(self, request: Request) -> Response:
        body: dict[str, Any] = await request.json()
        self.requests.append({"headers": dict(request.headers), "body": body})
        message = {"id": "msg_fake", "type": "message", "role": "assistant", "model": body["model"],
                   "content": [{"type": "text", "text": self.REPLY}], "stop_reason": "end_turn",
                   "stop_sequence": None, "usage": self.USAGE}
        if not body.get("stream"):
            return JSONResponse(message)

        def event(name: str, data: dict[str, Any]) -> bytes:
            return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode()

        async def events() -> AsyncIterator[bytes]:
            start = {**message, "content": [], "stop_reason": None, "usage": {**self.USAGE, "output_tokens": 1}}
            yield event("message_start", {"message": start})
            yield event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
            for word in ("Hi from", " the fake Claude."):
                yield event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": word}})
                if "#cut" in json.dumps(body["messages"][-1]):
                    raise RuntimeError("connection dropped mid-stream")
            yield event("content_block_stop", {"index": 0})
            yield event("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                          "usage": {"output_tokens": 5}})
            yield event("message_stop", {})

        return StreamingResponse(events(), media_type="text/event-stream")
