"""A lean HTTP/1.1 connection pool for httpx, for the gateway's calls to providers.

httpx's own transport (httpcore over anyio) cost the gateway more than half of its CPU
under load: a sniffio lookup and a lock per step, and a poll of every idle connection's
socket on each request. This one is an asyncio ``Protocol`` per connection with the
``httptools`` parser (the C parser uvicorn uses), so it is driven by the event loop's own
callbacks:

- keep-alive connections per origin, the most recently used first; one closed by the
  server is known at once (end of stream) and never handed out, and an idle one is
  dropped after ``keepalive_expiry`` seconds (before a server's usual 5 s keep-alive ends);
- at most ``max_connections`` per origin; a caller waits for one up to the pool timeout;
- TLS with httpx's default context (certifi); bodies of known length or chunked, both ways;
  a streamed answer is read as it arrives, with the socket paused when the reader lags;
- httpx's timeouts (connect, read, write, pool) and errors: ``ConnectError``,
  ``ConnectTimeout``, ``ReadTimeout``, ``WriteTimeout``, ``PoolTimeout``, ``ReadError``
  and ``RemoteProtocolError`` (an answer cut short), so callers handle it as any httpx
  transport. A request is never sent twice.

Not supported (the gateway needs none of them): proxies, HTTP/2, ``Expect: 100-continue``,
upgrades. Use it as ``httpx.AsyncClient(transport=Http11Transport())``.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httptools
import httpx

PAUSE_AT = 256 * 1024  # bytes of an answer buffered unread before the socket is paused


def _time_out(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; one exchange at a time."""

    def __init__(self, origin: tuple[bytes, bytes, int]) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._reset()
        self._writable: asyncio.Future[None] | None = None

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.head_done = False
        self.complete = False
        self.keep_alive = True
        self.error: Exception | None = None
        self.waiter: asyncio.Future[bool] | None = None
        self.paused = False
        self.until_close = False  # an answer with neither length nor chunks ends when the server closes

    # ---- asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"the server's answer is not valid HTTP/1.1 ({exc})"))
            self.close()

    def eof_received(self) -> bool:
        self.closed = True  # at once: connection_lost comes a loop turn later, and the pool must not hand it out
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.head_done and self.until_close and not self.complete and exc is None:
            self.complete = True
            self._wake()
        elif not self.complete:
            if not self.head_done:
                self._fail(httpx.RemoteProtocolError("the server closed the connection without sending an answer"))
            else:
                self._fail(httpx.RemoteProtocolError("the server closed the connection before the answer's end"))
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # ---- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        names = {name.lower() for name, _ in self.headers}
        self.until_close = b"content-length" not in names and b"transfer-encoding" not in names
        if 100 <= self.status < 200:  # an interim answer: the real one follows
            self.headers = []
            return
        self.head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > PAUSE_AT and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status and not 100 <= self.status < 200:
            self.complete = True
            self._wake()

    # ---- the exchange

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(True)

    def _fail(self, exc: Exception) -> None:
        if self.error is None:
            self.error = exc
        self._wake()

    async def _wait(self, timeout: float | None, what: str) -> None:
        """Until the server sends something (True) or ``timeout`` passes (False: ReadTimeout).
        A timer of its own, not asyncio.wait_for: that is two more futures and their callbacks
        for every answer."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self.waiter = waiter
        timer = None if timeout is None else loop.call_later(timeout, _time_out, waiter)
        try:
            woken = await waiter
        finally:
            if timer is not None:
                timer.cancel()
        if not woken:
            self.close()
            raise httpx.ReadTimeout(f"no {what} from the server within {timeout} s")

    async def send(self, head: bytes, body: bytes | AsyncIterator[bytes], chunked: bool,
                   timeouts: Mapping[str, float | None]) -> None:
        assert self.transport is not None
        if self.closed:  # the server closed it before the request (just after the connect): that error is gone
            raise httpx.RemoteProtocolError("the server closed the connection before the request was sent")
        if self.paused:  # the last answer was closed unread while the socket was paused: this one must be read
            self.transport.resume_reading()
        self._reset()
        try:
            if isinstance(body, bytes):
                self.transport.write(head + body if len(body) < 65536 else head)
                if len(body) >= 65536:
                    self.transport.write(body)
            else:
                self.transport.write(head)
                async for chunk in body:
                    if chunk:
                        self.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                        await self._drain(timeouts.get("write"))
                if chunked:
                    self.transport.write(b"0\r\n\r\n")
            await self._drain(timeouts.get("write"))
        except (ConnectionError, RuntimeError) as exc:
            self.close()
            raise httpx.WriteError(f"the request could not be sent ({exc.__class__.__name__})") from None

    async def _drain(self, timeout: float | None) -> None:
        if self.closed and self.error is not None and not self.head_done:
            raise httpx.WriteError("the server closed the connection while the request was being sent")
        if self._writable is not None and not self._writable.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._writable), timeout)
            except TimeoutError:
                self.close()
                raise httpx.WriteTimeout(f"the request could not be sent within {timeout} s") from None

    async def head(self, timeout: float | None) -> None:
        while not self.head_done:
            if self.error is not None:
                raise self.error
            await self._wait(timeout, "answer")

    async def chunk(self, timeout: float | None) -> bytes | None:
        """The next piece of the body; None at its end."""
        while True:
            if self.chunks:
                data = self.chunks.popleft()
                self.buffered -= len(data)
                if self.paused and self.buffered < PAUSE_AT // 2 and self.transport is not None:
                    self.paused = False
                    self.transport.resume_reading()
                return data
            if self.complete:
                return None
            if self.error is not None:
                raise self.error
            await self._wait(timeout, "data")

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and self.error is None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _Body(httpx.AsyncByteStream):
    def __init__(self, pool: Http11Transport, conn: _Connection, read_timeout: float | None) -> None:
        self.pool, self.conn, self.read_timeout = pool, conn, read_timeout
        self.done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            while (data := await self.conn.chunk(self.read_timeout)) is not None:
                yield data
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self.done:
            return
        self.done = True
        self.pool._give_back(self.conn)


class Http11Transport(httpx.AsyncBaseTransport):
    """Keep-alive HTTP/1.1 connections per origin, for an ``httpx.AsyncClient``."""

    def __init__(self, *, max_connections: int = 1000, keepalive_expiry: float = 4.0,
                 verify: ssl.SSLContext | bool = True) -> None:
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        if isinstance(verify, ssl.SSLContext):
            self._ssl: ssl.SSLContext | None = verify
        else:
            self._ssl = None
            self._verify = verify
        self._idle: dict[tuple[bytes, bytes, int], list[_Connection]] = {}
        self._count: dict[tuple[bytes, bytes, int], int] = {}
        self._waiting: dict[tuple[bytes, bytes, int], deque[asyncio.Future[None]]] = {}
        self._all: set[_Connection] = set()
        self._closed = False

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = httpx.create_ssl_context(verify=self._verify)
        return self._ssl

    # ---- the pool

    async def _acquire(self, origin: tuple[bytes, bytes, int], timeouts: Mapping[str, float | None]) -> _Connection:
        now = time.monotonic()
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.keepalive_expiry:
                return conn
            self._discard(conn)
        while self._count.get(origin, 0) >= self.max_connections:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(origin, deque()).append(waiter)
            try:
                await asyncio.wait_for(waiter, timeouts.get("pool"))
            except BaseException as exc:
                # Woken, but leaving all the same (cancelled or timed out just then): the turn goes to
                # the next caller rather than being lost, which would leave it waiting by a free connection.
                if waiter.done() and not waiter.cancelled():
                    self._signal(origin)
                if isinstance(exc, TimeoutError):
                    raise httpx.PoolTimeout("no connection to the server came free in time") from None
                raise
            finally:
                queue = self._waiting.get(origin)
                if queue and waiter in queue:
                    queue.remove(waiter)
            if self._closed:
                raise httpx.ConnectError("the connection pool is closed")
            idle = self._idle.get(origin)
            while idle:
                conn = idle.pop()
                if not conn.closed and time.monotonic() - conn.idle_since < self.keepalive_expiry:
                    return conn
                self._discard(conn)
        self._count[origin] = self._count.get(origin, 0) + 1
        try:
            return await self._connect(origin, timeouts.get("connect"))
        except BaseException:
            self._count[origin] -= 1
            self._signal(origin)
            raise

    async def _connect(self, origin: tuple[bytes, bytes, int], timeout: float | None) -> _Connection:
        scheme, host, port = origin
        name = host.decode("ascii")
        loop = asyncio.get_running_loop()
        tls = self._ssl_context() if scheme == b"https" else None
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(
                lambda: _Connection(origin), name, port, ssl=tls, server_hostname=name if tls else None), timeout)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"could not connect to {name}:{port} within {timeout} s") from None
        except ssl.SSLError as exc:
            raise httpx.ConnectError(f"TLS with {name}:{port} failed ({exc.reason or exc})") from None
        except OSError as exc:
            raise httpx.ConnectError(f"could not connect to {name}:{port} ({exc.strerror or exc})") from None
        self._all.add(conn)
        return conn

    def _give_back(self, conn: _Connection) -> None:
        if conn.reusable and not self._closed:
            conn.idle_since = time.monotonic()
            self._idle.setdefault(conn.origin, []).append(conn)
            self._signal(conn.origin)
        else:
            conn.close()
            self._discard(conn)

    def _discard(self, conn: _Connection) -> None:
        if conn in self._all:
            self._all.discard(conn)
            conn.close()
            self._count[conn.origin] -= 1
            self._signal(conn.origin)

    def _signal(self, origin: tuple[bytes, bytes, int]) -> None:
        queue = self._waiting.get(origin)
        while queue:
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    # ---- httpx

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body: bytes | AsyncIterator[bytes]
        chunked = False
        if isinstance(request.stream, httpx.ByteStream):
            body = request.content
        else:
            body = request.stream  # type: ignore[assignment]
            chunked = "content-length" not in request.headers
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        conn = await self._start(request.method, request.url, request.headers.raw, body, chunked, timeouts)
        return httpx.Response(conn.status, headers=conn.headers, stream=_Body(self, conn, timeouts.get("read")),
                              extensions={"http_version": b"HTTP/1.1"})

    async def exchange(self, method: str, url: httpx.URL, headers: list[tuple[bytes, bytes]], body: bytes,
                       timeouts: Mapping[str, float | None]) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """One whole exchange without httpx's Request and Response objects (a fifth of the
        gateway's time per call): (status, headers, body). Same errors as a request through httpx."""
        if not any(name.lower() == b"content-length" for name, _ in headers):
            headers = [*headers, (b"content-length", str(len(body)).encode())]
        conn = await self._start(method, url, headers, body, False, timeouts)
        chunks = []
        try:
            while (data := await conn.chunk(timeouts.get("read"))) is not None:
                chunks.append(data)
        except BaseException:
            conn.close()
            self._discard(conn)
            raise
        self._give_back(conn)
        return conn.status, conn.headers, b"".join(chunks)

    async def _start(self, method: str, url: httpx.URL, headers: list[tuple[bytes, bytes]],
                     body: bytes | AsyncIterator[bytes], chunked: bool,
                     timeouts: Mapping[str, float | None]) -> _Connection:
        """Send the request on a pooled connection and read the answer's head."""
        if self._closed:
            raise httpx.ConnectError("the connection pool is closed")
        scheme = url.raw_scheme
        if scheme not in (b"http", b"https"):
            raise httpx.UnsupportedProtocol(f"the URL scheme {scheme.decode()!r} is not http or https")
        port = url.port or (443 if scheme == b"https" else 80)
        origin = (scheme, url.raw_host, port)
        names = {name.lower() for name, _ in headers}
        lines = [method.encode("ascii"), b" ", url.raw_path, b" HTTP/1.1\r\n"]
        if b"host" not in names:
            lines += [b"host: ", url.netloc, b"\r\n"]
        for name, value in headers:
            lines += [name, b": ", value, b"\r\n"]
        if chunked and b"transfer-encoding" not in names:
            lines.append(b"transfer-encoding: chunked\r\n")
        lines.append(b"\r\n")
        head = b"".join(lines)
        conn = await self._acquire(origin, timeouts)
        try:
            await conn.send(head, body, chunked, timeouts)
            await conn.head(timeouts.get("read"))
            if method == "HEAD":  # no body follows whatever the headers say (httptools cannot be told)
                conn.complete = True
        except BaseException:
            conn.close()
            self._discard(conn)
            raise
        return conn

    async def aclose(self) -> None:
        self._closed = True
        for conn in list(self._all):
            self._discard(conn)  # closed and uncounted: stats() shows none open
        self._idle.clear()
        for queue in self._waiting.values():  # callers waiting for a connection: there will be none
            for waiter in queue:
                if not waiter.done():
                    waiter.set_result(None)

    def stats(self) -> dict[str, Any]:
        """Connections open and idle per origin (for tests and the curious)."""
        return {f"{s.decode()}://{h.decode()}:{p}": {"open": n, "idle": len(self._idle.get((s, h, p), []))}
                for (s, h, p), n in self._count.items()}
