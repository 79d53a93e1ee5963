"""Plain HTTP/1.1 over asyncio for the benchmarks: a load generator and an OpenAI-compatible
provider, both far cheaper per request than an httpx client or an ASGI app.

On two cores the load generator, the provider and the gateway share the CPU: with an httpx
client and a Starlette provider, those two alone used most of it and the gateway's own rate
could not be seen. Both here speak keep-alive HTTP/1.1 with Content-Length bodies only (what
the gateway and the provider answer with for non-streaming calls).

    python -m bench.wire provider --port 9000 [--delay-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
import time
from dataclasses import dataclass
from typing import Any

CHAT_REPLY = {
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "Hello from the benchmark provider."}}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 8, "total_tokens": 17},
}
DELAY = re.compile(rb'"delay_ms": ?"([0-9.]+)"')  # a request's own answer time, in its metadata
MODELS = {"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "bench"}]}


def _response(status: int, payload: Any) -> bytes:
    body = json.dumps(payload).encode()
    return (f"HTTP/1.1 {status} OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: keep-alive\r\n\r\n").encode() + body


def _content_length(head: str) -> int | None:
    """The Content-Length of a message head (request or status line and headers), if it has one."""
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            return int(value)
    return None


class _ProviderProtocol(asyncio.Protocol):
    """Answers every POST with a chat completion (usage included), GET with the model list;
    after the delay a request names in ``metadata.delay_ms`` (else the server's own)."""

    CHAT = _response(200, CHAT_REPLY)
    LIST = _response(200, MODELS)

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1")
            length = _content_length(head) or 0
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4:end + 4 + length]
            self.buffer = self.buffer[end + 4 + length:]
            answer = self.LIST if head.startswith("GET") else self.CHAT
            delay = self.delay_s
            if (found := DELAY.search(body)) is not None:
                delay = float(found.group(1)) / 1000
            if delay:
                asyncio.get_running_loop().call_later(delay, self._send, answer)
            else:
                self._send(answer)

    def _send(self, answer: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(answer)


async def serve_provider(port: int, delay_ms: float = 0.0) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _ProviderProtocol(delay_ms / 1000), "127.0.0.1", port, backlog=2048)
    async with server:
        await server.serve_forever()


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.waiter: asyncio.Future[int] | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None or self.waiter.done():
            return
        head = self.buffer[:end].decode("latin-1")
        length = _content_length(head)
        if length is None:
            self.waiter.set_exception(ValueError("the benchmark client reads Content-Length answers only"))
            return
        if len(self.buffer) < end + 4 + length:
            return
        self.buffer = self.buffer[end + 4 + length:]
        self.waiter.set_result(int(head[9:12]))

    async def request(self, raw: bytes) -> int:
        assert self.transport is not None
        if self.lost:
            raise ConnectionError("connection closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter


def post(path: str, payload: Any, headers: dict[str, str], host: str) -> bytes:
    """One keep-alive POST with a JSON body, as bytes to send again and again."""
    body = json.dumps(payload).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{extra}\r\n").encode() + body


async def load(host: str, port: int, requests: list[bytes], connections: int) -> tuple[list[float], float, int]:
    """Send each request once over ``connections`` keep-alive connections, each waiting for
    its answer before taking the next (closed loop). (latency of each request in ms, in the
    order given (NaN for a failure), wall seconds, failures: non-2xx answers and broken
    connections)."""
    loop = asyncio.get_running_loop()
    latencies = [float("nan")] * len(requests)
    failures = 0
    queue = iter(range(len(requests)))

    async def worker() -> None:
        nonlocal failures
        conn: _Connection | None = None
        for i in queue:
            if conn is None or conn.lost:
                _, conn = await loop.create_connection(_Connection, host, port)
            started = time.perf_counter()
            try:
                status = await conn.request(requests[i])
            except (ConnectionError, ValueError):
                failures += 1
                conn = None
                continue
            if 200 <= status < 300:
                latencies[i] = (time.perf_counter() - started) * 1000
            else:
                failures += 1
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return latencies, time.perf_counter() - started, failures


@dataclass(frozen=True, slots=True)
class Sustained:
    latencies: list[float]  # ms, each answered call
    wall: float  # seconds
    failures: int
    longest_gap_ms: float  # the longest stretch with no answer at all (the run's start and end count)


async def load_for(host: str, port: int, request: bytes, connections: int, seconds: float) -> Sustained:
    """Send ``request`` again and again over ``connections`` keep-alive connections (closed
    loop) for ``seconds``."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    answered_at: list[float] = []
    failures = 0
    started = time.perf_counter()
    deadline = started + seconds

    async def worker() -> None:
        nonlocal failures
        conn: _Connection | None = None
        while time.perf_counter() < deadline:
            if conn is None or conn.lost:
                _, conn = await loop.create_connection(_Connection, host, port)
            sent = time.perf_counter()
            try:
                status = await conn.request(request)
            except (ConnectionError, ValueError):
                failures += 1
                conn = None
                continue
            now = time.perf_counter()
            if 200 <= status < 300:
                latencies.append((now - sent) * 1000)
                answered_at.append(now)
            else:
                failures += 1
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    ended = time.perf_counter()
    marks = [started, *sorted(answered_at), ended]
    gap = max(b - a for a, b in itertools.pairwise(marks)) * 1000
    return Sustained(latencies, ended - started, failures, gap)


def main() -> None:
    parser = argparse.ArgumentParser(description="bench HTTP helpers")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("provider", help="serve the benchmark provider on 127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay-ms", type=float, default=0.0, help="how long each answer takes")
    args = parser.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve_provider(args.port, args.delay_ms))


if __name__ == "__main__":
    main()
