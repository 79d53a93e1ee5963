"""The gateway's clients to providers as httpx transports: the lean HTTP/1.1 pool
(engine.integrations.http11) and, through the same tests wherever they say what a client
must do rather than how this pool does it, aiohttp's (engine.integrations.upstream: the
alternative ``bench.gateway --upstream aiohttp`` measures it against). Against real
servers on 127.0.0.1: uvicorn for well-behaved answers, and small raw asyncio servers in the
test's own loop for those uvicorn will not give (no length, garbage, a close mid-body,
silence, 100 Continue, TLS with a self-signed certificate). The raw servers count their
connections, so keep-alive and the pool's limit are checked from the server's side.

Every test ends with no connection leaked: each open connection is idle in the pool, and
after ``aclose()`` none is open at all (the ``pools`` fixture checks both)."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import json
import random
import socket
import ssl
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from engine.integrations import http11
from engine.integrations.http11 import Http11Transport
from engine.integrations.upstream import AiohttpUpstream
from tests.asgi_servers import free_port, serve

# ---- uvicorn: the well-behaved server

GATES: dict[str, threading.Event] = {}  # /gated waits on GATES[name] between its first event and the rest
BIG = random.Random(11).randbytes(5 * 1024 * 1024)


async def echo(request: Request) -> Response:
    """What the server saw: method, target, every header as it came (raw, in order), the body."""
    body = await request.body()
    query = request.scope["query_string"].decode()
    return JSONResponse({"method": request.method,
                         "target": request.scope["raw_path"].decode() + (f"?{query}" if query else ""),
                         "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.scope["headers"]],
                         "body": body.decode("latin-1")},
                        status_code=201 if request.method == "POST" else 200, headers={"x-reply": "yes"})


async def upload(request: Request) -> Response:
    body = await request.body()
    return JSONResponse({"transfer-encoding": request.headers.get("transfer-encoding"),
                         "content-length": request.headers.get("content-length"),
                         "length": len(body), "sha256": hashlib.sha256(body).hexdigest()})


async def gated(request: Request) -> Response:
    gate = GATES[request.query_params["gate"]]

    async def events() -> AsyncIterator[bytes]:
        yield b"data: one\n\n"
        deadline = time.monotonic() + 5
        while not gate.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        yield b"data: two\n\n"
        yield b"event: done\ndata: three\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def sse_lines() -> list[str]:
    return [line for n in range(20) for line in (f'data: {{"n": {n}, "text": "word {n}"}}', "")] + ["data: [DONE]", ""]


async def sse(request: Request) -> Response:
    async def events() -> AsyncIterator[bytes]:
        lines = sse_lines()
        for n in range(0, len(lines), 2):
            yield f"{lines[n]}\n\n".encode()
            await asyncio.sleep(0)

    return StreamingResponse(events(), media_type="text/event-stream")


async def big(request: Request) -> Response:
    return Response(BIG, media_type="application/octet-stream")


@pytest.fixture(scope="module")
def web() -> Iterator[str]:
    app = Starlette(routes=[Route("/echo", echo, methods=["GET", "POST"]), Route("/upload", upload, methods=["POST"]),
                            Route("/gated", gated), Route("/sse", sse), Route("/big", big)])
    with serve(app) as url:
        yield url


# ---- raw servers: the answers uvicorn will not give

@dataclass
class Req:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


async def read_request(reader: asyncio.StreamReader) -> Req:
    """One request with a body of known length (or none); IncompleteReadError when the client left."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    method, target, _ = head[0].split(" ", 2)
    headers = {}
    for line in head[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return Req(method, target, headers, await reader.readexactly(int(headers.get("content-length", "0"))))


def answer(body: bytes = b"ok", *headers: str, status: str = "200 OK") -> bytes:
    lines = [f"HTTP/1.1 {status}", f"content-length: {len(body)}", *headers, "", ""]
    return "\r\n".join(lines).encode() + body


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


def keep_alive(reply: bytes = b"", delay: float = 0.0) -> Handler:
    """Answer every request on the connection with ``reply`` (``answer()`` by default), after ``delay``."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_request(reader)
            if delay:
                await asyncio.sleep(delay)
            writer.write(reply or answer())
            await writer.drain()
    return handle


@dataclass
class RawServer:
    """An asyncio server on 127.0.0.1 in the test's loop; counts connections accepted and open
    (a connection is open until its handler ends, which the keep-alive handlers do at the client's EOF)."""

    handler: Handler
    tls: ssl.SSLContext | None = None
    accepts: int = 0
    open: int = 0
    max_open: int = 0
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"
        self.origin = self.url

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepts += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handler(reader, writer, self.accepts)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client left, or the test is over
        finally:
            writer.close()
            self.open -= 1
            self._tasks.discard(task)

    async def stop(self) -> None:
        self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.wait_closed()


@asynccontextmanager
async def raw_server(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[RawServer]:
    server = RawServer(handler, tls)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    """Wait for something the event loop brings about (a close seen on the other side)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition was not met in time"
        await asyncio.sleep(0.005)


# ---- the pool under test

@dataclass
class Pool:
    transport: Http11Transport | AiohttpUpstream
    client: httpx.AsyncClient
    origins: set[str] = field(default_factory=set)  # aiohttp's: every one it has held a connection to


@pytest.fixture(params=["http11", "aiohttp"])
async def pools(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Pool]]:
    """Pools made by the test, of either client; afterwards none has a connection in use (each
    open one is idle), and after aclose() none is open."""
    made: list[Pool] = []

    def make(**options: Any) -> Pool:
        transport = Http11Transport(**options) if request.param == "http11" else AiohttpUpstream(**options)
        made.append(Pool(transport, httpx.AsyncClient(transport=transport, timeout=5)))
        return made[-1]

    yield make
    for pool in made:
        stats = _stats(pool)
        await pool.client.aclose()
        assert all(s["open"] == s["idle"] for s in stats.values()), f"connections left in use: {stats}"
        assert all(s == {"open": 0, "idle": 0} for s in _stats(pool).values()), _stats(pool)


def _stats(pool: Pool) -> dict[str, dict[str, int]]:
    """Connections open and idle per origin: the pool's own count, or what aiohttp's connector
    holds (idle ones still connected; those in use)."""
    if isinstance(pool.transport, Http11Transport):
        return pool.transport.stats()
    connector: Any = pool.transport.connector
    out: dict[str, dict[str, int]] = {origin: {"open": 0, "idle": 0} for origin in pool.origins}
    for key, idle in connector._conns.items():  # aiohttp's internals: for this test's eyes only
        counts = out.setdefault(f"{'https' if key.is_ssl else 'http'}://{key.host}:{key.port}", {"open": 0, "idle": 0})
        alive = sum(1 for protocol, _ in idle if protocol.is_connected())
        counts["open"] += alive
        counts["idle"] += alive
    for key, busy in connector._acquired_per_host.items():
        counts = out.setdefault(f"{'https' if key.is_ssl else 'http'}://{key.host}:{key.port}", {"open": 0, "idle": 0})
        counts["open"] += len(busy)
    pool.origins.update(out)
    return out


def opened(pool: Pool, origin: str) -> dict[str, int]:
    return _stats(pool).get(origin, {"open": 0, "idle": 0})


# ---- well-behaved exchanges

async def test_a_post_with_a_json_body_arrives_exactly_and_its_answer_comes_back_whole(
        web: str, pools: Callable[..., Pool]) -> None:
    pool = pools()
    payload = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "héllo ✓"}], "n": 1}
    r = await pool.client.post(f"{web}/echo?trace=1", json=payload, headers={"X-Custom": "Mixed Case value"})
    assert r.status_code == 201 and r.http_version == "HTTP/1.1"
    assert r.headers["x-reply"] == "yes" and r.headers["content-type"] == "application/json"
    assert int(r.headers["content-length"]) == len(r.content)
    seen = r.json()
    assert (seen["method"], seen["target"]) == ("POST", "/echo?trace=1")
    assert seen["body"].encode("latin-1") == r.request.content and json.loads(r.request.content) == payload
    # every header the request had, in its order, each once: nothing added (no second Host, no
    # Transfer-Encoding), nothing lost
    assert seen["headers"] == [[k.decode().lower(), v.decode()] for k, v in r.request.headers.raw]
    assert ["host", web.removeprefix("http://")] in seen["headers"]
    assert ["x-custom", "Mixed Case value"] in seen["headers"]
    assert ["content-length", str(len(r.request.content))] in seen["headers"]


async def test_a_get_arrives_exactly_with_its_host_and_no_body(web: str, pools: Callable[..., Pool]) -> None:
    pool = pools()
    r = await pool.client.get(f"{web}/echo", params={"q": "a b", "n": "2"}, headers={"Accept": "application/json"})
    assert r.status_code == 200 and r.headers["x-reply"] == "yes"
    seen = r.json()
    assert (seen["method"], seen["target"], seen["body"]) == ("GET", "/echo?q=a+b&n=2", "")
    assert seen["headers"] == [[k.decode().lower(), v.decode()] for k, v in r.request.headers.raw]
    assert [name for name, _ in seen["headers"]].count("host") == 1
    assert ["host", web.removeprefix("http://")] in seen["headers"]
    assert not {"content-length", "transfer-encoding"} & {name for name, _ in seen["headers"]}


async def test_a_head_request_ends_with_the_head_and_the_connection_goes_on(
        web: str, pools: Callable[..., Pool]) -> None:
    """The answer to a HEAD carries the Content-Length of the GET's body but no body: waiting
    for that body would hang until the read timeout."""
    pool = pools()
    r = await pool.client.head(f"{web}/echo", timeout=1)
    assert r.status_code == 200 and r.content == b"" and int(r.headers["content-length"]) > 0
    r = await pool.client.get(f"{web}/echo", timeout=1)
    assert r.json()["method"] == "GET"
    assert opened(pool, web) == {"open": 1, "idle": 1}


async def test_sequential_requests_reuse_one_connection(pools: Callable[..., Pool]) -> None:
    pool = pools()
    async with raw_server(keep_alive()) as server:
        for _ in range(5):
            r = await pool.client.get(f"{server.url}/")
            assert (r.status_code, r.content) == (200, b"ok")
        assert server.accepts == 1 and server.open == 1
        assert opened(pool, server.origin) == {"open": 1, "idle": 1}


async def test_200_concurrent_requests_never_use_more_than_max_connections(pools: Callable[..., Pool]) -> None:
    pool = pools(max_connections=10)
    async with raw_server(keep_alive(delay=0.002)) as server:
        replies = await asyncio.gather(*(pool.client.get(f"{server.url}/{n}") for n in range(200)))
        assert [(r.status_code, r.content) for r in replies] == [(200, b"ok")] * 200
        assert server.max_open <= 10 and server.accepts == 10  # all ten used, none closed and reopened
        assert opened(pool, server.origin) == {"open": 10, "idle": 10}


@pytest.mark.http11_only
async def test_a_caller_waits_for_a_busy_pool_only_up_to_the_pool_timeout(pools: Callable[..., Pool]) -> None:
    pool = pools(max_connections=1)
    gate, arrived = asyncio.Event(), asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_request(reader)
            arrived.set()
            await gate.wait()
            writer.write(answer())
            await writer.drain()

    async with raw_server(slow) as server:
        first = asyncio.ensure_future(pool.client.get(f"{server.url}/"))
        await arrived.wait()
        with pytest.raises(httpx.PoolTimeout):
            await pool.client.get(f"{server.url}/", timeout=httpx.Timeout(5, pool=0.2))
        gate.set()
        assert (await first).status_code == 200
        assert (await pool.client.get(f"{server.url}/")).status_code == 200
        assert server.accepts == 1


@pytest.mark.http11_only
async def test_a_caller_cancelled_just_as_it_was_woken_passes_the_free_connection_on(
        pools: Callable[..., Pool]) -> None:
    """The next caller in line gets the connection rather than waiting beside it until its pool
    timeout. (Python 3.11's wait_for lets the woken caller go on regardless; 3.12's does not.)"""
    pool = pools(max_connections=1)
    async with raw_server(keep_alive()) as server:
        async with pool.client.stream("GET", f"{server.url}/") as held:
            woken = asyncio.ensure_future(pool.client.get(f"{server.url}/", timeout=httpx.Timeout(5, pool=0.5)))
            after = asyncio.ensure_future(pool.client.get(f"{server.url}/", timeout=httpx.Timeout(5, pool=0.5)))
            await asyncio.sleep(0.05)  # both wait for the one connection
            await held.aread()  # gives it back and wakes the first...
            woken.cancel()  # ...which is cancelled before it runs
        assert (await after).status_code == 200
        await asyncio.gather(woken, return_exceptions=True)
        assert server.accepts == 1


# ---- bodies: streamed, large, unknown length

@pytest.mark.http11_only
async def test_a_streamed_answer_arrives_in_pieces_as_they_are_sent(web: str, pools: Callable[..., Pool]) -> None:
    pool = pools()
    GATES["pieces"] = gate = threading.Event()
    async with pool.client.stream("GET", f"{web}/gated", params={"gate": "pieces"}) as r:
        assert r.headers["transfer-encoding"] == "chunked"
        pieces = r.aiter_bytes()
        # the server holds the rest back until the first event is here: it was not buffered
        assert await anext(pieces) == b"data: one\n\n"
        gate.set()
        assert [piece async for piece in pieces] == [b"data: two\n\n", b"event: done\ndata: three\n\n"]
    assert opened(pool, web) == {"open": 1, "idle": 1}


async def test_an_sse_stream_read_by_lines_arrives_whole(web: str, pools: Callable[..., Pool]) -> None:
    pool = pools()
    for _ in range(2):  # the second on the same connection, after the first stream's end
        async with pool.client.stream("GET", f"{web}/sse") as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            assert [line async for line in r.aiter_lines()] == sse_lines()
    assert opened(pool, web) == {"open": 1, "idle": 1}


@pytest.mark.http11_only
async def test_a_5_mb_answer_read_slowly_arrives_byte_identical(web: str, pools: Callable[..., Pool]) -> None:
    """The reader lags: the socket is paused with the answer half read, resumed as it catches up."""
    pool = pools()
    async with pool.client.stream("GET", f"{web}/big") as r:
        assert int(r.headers["content-length"]) == len(BIG)
        (conn,) = pool.transport._all
        wire = conn.transport
        assert wire is not None
        await until(lambda: not wire.is_reading())
        body = b"".join([piece async for piece in r.aiter_raw()])
    assert len(body) == len(BIG) and hashlib.sha256(body).digest() == hashlib.sha256(BIG).digest()
    assert wire.is_reading()
    r = await pool.client.get(f"{web}/big")
    assert r.content == BIG
    assert opened(pool, web) == {"open": 1, "idle": 1}


@pytest.mark.http11_only
async def test_an_answer_closed_unread_while_the_socket_was_paused_leaves_the_connection_readable(
        pools: Callable[..., Pool], monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole answer arrived, the socket paused at its end, the caller closed it unread: the
    connection is reused, so the next answer on it must be read, not left paused."""
    monkeypatch.setattr(http11, "PAUSE_AT", 1000)
    pool = pools()
    async with raw_server(keep_alive(answer(b"x" * 5000))) as server:
        for _ in range(2):
            async with pool.client.stream("GET", f"{server.url}/") as r:
                assert r.status_code == 200
                await asyncio.sleep(0.05)  # all of it arrives; not a byte read
            r = await pool.client.get(f"{server.url}/", timeout=1)
            assert r.content == b"x" * 5000
        assert server.accepts == 1


async def test_a_request_body_from_an_async_iterator_is_sent_chunked(web: str, pools: Callable[..., Pool]) -> None:
    pool = pools()
    parts = [b"A" * 1000, b"", b"B" * 70_000, b"C", b"D" * 5]  # an empty part is not the chunked end

    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part
            await asyncio.sleep(0)

    r = await pool.client.post(f"{web}/upload", content=body())
    whole = b"".join(parts)
    assert r.json() == {"transfer-encoding": "chunked", "content-length": None, "length": len(whole),
                        "sha256": hashlib.sha256(whole).hexdigest()}
    assert opened(pool, web) == {"open": 1, "idle": 1}


async def test_an_async_iterator_body_with_a_content_length_is_sent_as_is(
        web: str, pools: Callable[..., Pool]) -> None:
    pool = pools()
    parts = [b"x" * 300, b"y" * 700]

    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    r = await pool.client.post(f"{web}/upload", content=body(), headers={"content-length": "1000"})
    assert r.json() == {"transfer-encoding": None, "content-length": "1000", "length": 1000,
                        "sha256": hashlib.sha256(b"".join(parts)).hexdigest()}


async def test_a_large_request_body_arrives_whole(web: str, pools: Callable[..., Pool]) -> None:
    pool = pools()
    for size in (100, 3 * 1024 * 1024):  # sent with the head, and on its own with the socket's flow control
        r = await pool.client.post(f"{web}/upload", content=BIG[:size])
        assert r.json() == {"transfer-encoding": None, "content-length": str(size), "length": size,
                            "sha256": hashlib.sha256(BIG[:size]).hexdigest()}
    assert opened(pool, web) == {"open": 1, "idle": 1}


@pytest.mark.http11_only
async def test_a_server_that_reads_no_body_is_a_write_timeout(pools: Callable[..., Pool]) -> None:
    pool = pools()
    stop = asyncio.Event()

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await stop.wait()

    async with raw_server(deaf) as server:
        with pytest.raises(httpx.WriteTimeout):
            await pool.client.post(f"{server.url}/", content=b"x" * 64 * 1024 * 1024,
                                   timeout=httpx.Timeout(5, write=0.2))
        stop.set()
        assert opened(pool, server.origin) == {"open": 0, "idle": 0}


@pytest.mark.http11_only
async def test_a_server_hanging_up_during_the_upload_is_a_write_error(pools: Callable[..., Pool]) -> None:
    pool = pools()

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await reader.readuntil(b"\r\n\r\n")

    async def body() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"part"
            await asyncio.sleep(0.01)

    async with raw_server(hang_up) as server:
        with pytest.raises(httpx.WriteError):
            await pool.client.post(f"{server.url}/", content=body(), timeout=2)
        assert opened(pool, server.origin) == {"open": 0, "idle": 0}


async def test_an_answer_with_neither_length_nor_chunks_ends_when_the_server_closes(
        pools: Callable[..., Pool]) -> None:
    pool = pools()
    pieces = [b"first piece, ", b"second piece, ", b"last piece"]

    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n")
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)

    async with raw_server(until_close) as server:
        for _ in range(2):
            r = await pool.client.get(f"{server.url}/")
            assert (r.status_code, r.content) == (200, b"".join(pieces))
        assert server.accepts == 2  # such a connection ends with its answer
        assert opened(pool, server.origin) == {"open": 0, "idle": 0}


# ---- connections that end

async def test_connection_close_from_the_server_means_a_new_connection_next_time(
        pools: Callable[..., Pool]) -> None:
    pool = pools()
    after: list[bytes] = []

    async def one_each(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(answer(f"conn {n}".encode(), "connection: close"))
        await writer.drain()
        after.append(await reader.read())  # the client closes it, and sends nothing more on it

    async with raw_server(one_each) as server:
        assert (await pool.client.get(f"{server.url}/", timeout=1)).text == "conn 1"
        assert (await pool.client.get(f"{server.url}/", timeout=1)).text == "conn 2"
        assert server.accepts == 2
        assert opened(pool, server.origin) == {"open": 0, "idle": 0}
        await until(lambda: len(after) == 2)
        assert after == [b"", b""]


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_an_idle_connection_the_server_closed_is_not_reused(how: str, pools: Callable[..., Pool]) -> None:
    pool = pools()

    async def then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(answer(f"conn {n}".encode()))  # keep-alive, as far as the client can tell
        await writer.drain()
        await asyncio.sleep(0.02)
        if how == "reset":  # an RST rather than a FIN: the client sees no end of stream, only the loss
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

    async with raw_server(then_close) as server:
        assert (await pool.client.get(f"{server.url}/")).text == "conn 1"
        await until(lambda: server.open == 0)
        await asyncio.sleep(0.02)  # its FIN reaches the client
        assert (await pool.client.get(f"{server.url}/")).text == "conn 2"
        assert server.accepts == 2
        assert opened(pool, server.origin) == {"open": 1, "idle": 1}


async def test_an_idle_connection_older_than_keepalive_expiry_is_not_reused(pools: Callable[..., Pool]) -> None:
    pool = pools(keepalive_expiry=0.2)
    async with raw_server(keep_alive()) as server:
        await pool.client.get(f"{server.url}/")
        await pool.client.get(f"{server.url}/")
        assert server.accepts == 1  # within the expiry: reused
        await asyncio.sleep(0.3)
        assert (await pool.client.get(f"{server.url}/")).status_code == 200
        assert server.accepts == 2
        await until(lambda: server.open == 1)  # the expired one was closed, not just left aside
        assert opened(pool, server.origin) == {"open": 1, "idle": 1}


# ---- errors

async def test_connection_refused_is_a_connect_error_naming_host_and_port(pools: Callable[..., Pool]) -> None:
    pool = pools()
    port = free_port()  # nothing listens there
    with pytest.raises(httpx.ConnectError) as err:
        await pool.client.get(f"http://127.0.0.1:{port}/")
    assert f"127.0.0.1:{port}" in str(err.value)
    assert opened(pool, f"http://127.0.0.1:{port}") == {"open": 0, "idle": 0}


async def test_a_server_that_never_answers_is_a_read_timeout_and_the_pool_goes_on(
        pools: Callable[..., Pool]) -> None:
    pool = pools(max_connections=1)

    async def silent_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n == 1:
            await read_request(reader)
            await reader.read()  # until the client gives up and closes
            return
        await keep_alive()(reader, writer, n)

    async with raw_server(silent_first) as server:
        silent = asyncio.ensure_future(pool.client.get(f"{server.url}/", timeout=httpx.Timeout(5, read=0.2)))
        await until(lambda: server.accepts == 1)
        waiting = asyncio.ensure_future(pool.client.get(f"{server.url}/", timeout=httpx.Timeout(1, pool=2)))
        with pytest.raises(httpx.ReadTimeout):
            await silent
        assert (await waiting).status_code == 200  # the one slot came free for the caller waiting for it
        await until(lambda: server.open == 1)  # and the timed-out connection was closed
        assert (await pool.client.get(f"{server.url}/", timeout=1)).status_code == 200
        assert server.accepts == 2


async def cut_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    """Answer with a head that promises 1,000 bytes, send ten, and hang up."""
    await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789")
    await writer.drain()


async def test_a_server_closing_mid_body_is_a_remote_protocol_error(pools: Callable[..., Pool]) -> None:
    pool = pools()

    async with raw_server(cut_mid_body) as server:
        with pytest.raises(httpx.RemoteProtocolError) as err:
            await pool.client.get(f"{server.url}/")
        assert isinstance(err.value, httpx.TransportError)
        got = b""
        async with pool.client.stream("GET", f"{server.url}/") as r:
            assert r.status_code == 200  # the head arrived whole: the error comes with the body
            with pytest.raises(httpx.RemoteProtocolError):
                async for piece in r.aiter_raw():
                    got += piece
        assert got == b"0123456789"  # what did arrive was handed over first
        assert opened(pool, server.origin) == {"open": 0, "idle": 0}


async def test_a_server_closing_without_an_answer_is_a_remote_protocol_error(pools: Callable[..., Pool]) -> None:
    pool = pools()

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)

    async with raw_server(hang_up) as server:
        with pytest.raises(httpx.RemoteProtocolError) as err:
            await pool.client.get(f"{server.url}/", timeout=2)
        assert isinstance(err.value, httpx.TransportError) and "without sending an answer" in str(err.value)
        assert opened(pool, server.origin) == {"open": 0, "idle": 0}


async def test_a_server_closing_right_after_the_accept_is_a_remote_protocol_error_not_a_hang(
        pools: Callable[..., Pool]) -> None:
    """A close that arrives between the connect and the request: the error it raised must not
    be forgotten when the request is sent (else the caller waits for an answer until its read
    timeout, or for ever without one). The server is a thread so that its close comes at once."""
    pool = pools()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stop = threading.Event()

    def accept_and_close() -> None:
        while not stop.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            sock.close()

    thread = threading.Thread(target=accept_and_close, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
        for _ in range(10):
            with pytest.raises(httpx.RemoteProtocolError):
                await pool.client.get(url, timeout=httpx.Timeout(5, read=1))
        assert opened(pool, url.rstrip("/")) == {"open": 0, "idle": 0}
    finally:
        stop.set()
        thread.join(2)
        listener.close()


async def test_garbage_instead_of_http_is_a_remote_protocol_error(pools: Callable[..., Pool]) -> None:
    pool = pools()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\x00\xff\xfe not http at all\r\n\r\n")
        await writer.drain()
        await reader.read()  # stays open: the client must close it

    async with raw_server(garbage) as server:
        with pytest.raises(httpx.RemoteProtocolError, match="not valid HTTP"):
            await pool.client.get(f"{server.url}/", timeout=2)
        await until(lambda: server.open == 0)
        assert opened(pool, server.origin) == {"open": 0, "idle": 0}


async def test_a_100_continue_before_the_answer_is_skipped(pools: Callable[..., Pool]) -> None:
    pool = pools()

    async def interim(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)  # the interim answer alone, then the real one
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(answer(b"hello", "x-final: yes"))
        await writer.drain()
        await read_request(reader)  # both in one piece
        writer.write(b"HTTP/1.1 100 Continue\r\nx-interim: yes\r\n\r\n" + answer(b"again", "x-final: yes"))
        await writer.drain()
        await reader.read()

    async with raw_server(interim) as server:
        r = await pool.client.post(f"{server.url}/", content=b"data", timeout=2)
        assert (r.status_code, r.content, r.headers.get("x-final")) == (200, b"hello", "yes")
        r = await pool.client.post(f"{server.url}/", content=b"data", timeout=2)
        assert (r.status_code, r.content) == (200, b"again")
        assert "x-interim" not in r.headers and r.headers["x-final"] == "yes"
        assert server.accepts == 1


# ---- TLS

@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A self-signed certificate for the IP address 127.0.0.1: (certificate file, key file, PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (folder / "cert.pem").write_bytes(pem)
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return folder / "cert.pem", folder / "key.pem", pem.decode()


@pytest.fixture
async def tls_server(certificate: tuple[Path, Path, str]) -> AsyncIterator[RawServer]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate[0], certificate[1])
    async with raw_server(keep_alive(answer(b"secret")), tls=context) as server:
        yield server


async def test_https_to_a_trusted_self_signed_certificate(
        tls_server: RawServer, certificate: tuple[Path, Path, str], pools: Callable[..., Pool]) -> None:
    pool = pools(verify=ssl.create_default_context(cadata=certificate[2]))
    for _ in range(2):
        r = await pool.client.get(f"{tls_server.url}/")
        assert (r.status_code, r.content) == (200, b"secret")
    assert tls_server.url.startswith("https://") and tls_server.accepts == 1
    assert opened(pool, tls_server.origin) == {"open": 1, "idle": 1}


async def test_https_with_default_verification_refuses_a_self_signed_certificate(
        tls_server: RawServer, pools: Callable[..., Pool]) -> None:
    pool = pools()
    with pytest.raises(httpx.ConnectError) as err:
        await pool.client.get(f"{tls_server.url}/")
    assert f"127.0.0.1:{tls_server.port}" in str(err.value) and "TLS" in str(err.value)
    assert opened(pool, tls_server.origin) == {"open": 0, "idle": 0}
    unverified = pools(verify=False)  # told not to check: it connects
    assert (await unverified.client.get(f"{tls_server.url}/")).content == b"secret"


# ---- closing the pool

async def test_aclose_closes_the_connections_and_refuses_later_requests(pools: Callable[..., Pool]) -> None:
    pool = pools()
    async with raw_server(keep_alive(delay=0.02)) as server:
        await asyncio.gather(pool.client.get(f"{server.url}/"), pool.client.get(f"{server.url}/"))
        assert opened(pool, server.origin) == {"open": 2, "idle": 2} and server.open == 2
        await pool.transport.aclose()
        assert _stats(pool) == {server.origin: {"open": 0, "idle": 0}}
        await until(lambda: server.open == 0)  # the server saw both closed
        with pytest.raises(httpx.ConnectError, match="closed"):
            await pool.client.get(f"{server.url}/")
        with pytest.raises(httpx.ConnectError, match="closed"):
            await pool.transport.handle_async_request(httpx.Request("GET", f"{server.url}/"))
        assert server.accepts == 2


@pytest.mark.http11_only
async def test_aclose_ends_the_wait_of_a_caller_waiting_for_a_connection(pools: Callable[..., Pool]) -> None:
    pool = pools(max_connections=1)
    async with raw_server(keep_alive()) as server:
        async with pool.client.stream("GET", f"{server.url}/"):
            waiting = [asyncio.ensure_future(pool.client.get(f"{server.url}/", timeout=httpx.Timeout(5, pool=None)))
                       for _ in range(2)]  # more callers than connections
            await asyncio.sleep(0.05)
            await pool.transport.aclose()
            for caller in waiting:
                with pytest.raises(httpx.ConnectError, match="closed"):
                    await asyncio.wait_for(caller, 2)
        assert _stats(pool) == {server.origin: {"open": 0, "idle": 0}}
        assert server.accepts == 1


# ---- exchange: one whole call without httpx's Request and Response (the gateway's fast path)

async def test_exchange_sends_the_body_with_its_length_and_returns_status_headers_and_body(
        web: str, pools: Callable[..., Pool]) -> None:
    pool = pools()
    payload = json.dumps({"model": "gpt-4o-mini", "messages": []}).encode()
    url = httpx.URL(f"{web}/echo?x=1")
    for _ in range(2):  # the second exchange goes on the first one's connection
        status, headers, body = await pool.transport.exchange(
            "POST", url, [(b"content-type", b"application/json"), (b"authorization", b"Bearer k")], payload,
            {"read": 5.0, "pool": 5.0, "connect": 5.0, "write": 5.0})
        assert status == 201 and (b"x-reply", b"yes") in headers
        seen = json.loads(body)
        assert (seen["method"], seen["target"], seen["body"].encode("latin-1")) == ("POST", "/echo?x=1", payload)
        assert ["content-length", str(len(payload))] in seen["headers"]
        assert ["authorization", "Bearer k"] in seen["headers"]
        assert [name for name, _ in seen["headers"]].count("host") == 1
    assert opened(pool, web) == {"open": 1, "idle": 1}


async def test_exchange_with_an_answer_cut_mid_body_raises_and_keeps_no_connection(
        pools: Callable[..., Pool]) -> None:
    pool = pools()

    async with raw_server(cut_mid_body) as server:
        with pytest.raises(httpx.RemoteProtocolError):
            await pool.transport.exchange("POST", httpx.URL(f"{server.url}/"), [], b"{}", {"read": 2.0})
        assert opened(pool, server.origin) == {"open": 0, "idle": 0}
