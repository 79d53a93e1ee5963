"""The gateway's calls to providers, on aiohttp's client behind the small interface the
gateway uses: ``handle_async_request`` (an httpx transport: a streamed answer as an
``httpx.Response``), ``exchange`` (a whole answer as status, headers and bytes, without
httpx's objects) and ``aclose``.

- keep-alive connections per origin, at most ``max_connections`` each; an idle one is
  dropped after ``keepalive_expiry`` seconds (before a server's usual 5 s keep-alive ends);
- TLS with httpx's default context (certifi);
- the request goes as given: no User-Agent, Accept or Accept-Encoding of aiohttp's, no
  cookies kept from one caller's answer for the next, no proxy from the environment; the
  answer's bytes come back as the provider sent them (never decompressed);
- httpx's timeouts (connect; read; pool: the wait for a pooled connection and the connecting,
  a ``ConnectTimeout`` when it passes, as aiohttp tells the two apart no more than the gateway
  needs to; write: the request is written while its answer is awaited, under the read timeout)
  and errors, so the gateway handles them as any httpx transport's: ``ConnectError``,
  ``ConnectTimeout``, ``ReadTimeout``, ``WriteError``, ``ReadError``, ``RemoteProtocolError``
  (an answer cut short or not HTTP) and ``UnsupportedProtocol``. A request is never sent twice.
"""

from __future__ import annotations

import asyncio
import errno
import io
import ssl
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import aiohttp
import httpx
from yarl import URL

Headers = list[tuple[bytes, bytes]]
LARGE = 1024 * 1024  # a body larger than this goes as a file (aiohttp warns that bytes would block the loop)


@contextmanager
def _as_httpx(head: bool) -> Iterator[None]:
    """aiohttp's errors as httpx's (``head``: the request is being sent or its answer's head
    awaited; else its body is being read)."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:  # connecting, or waiting for a pooled connection
        raise httpx.ConnectTimeout(f"could not connect in time ({exc})") from None
    except aiohttp.ServerTimeoutError:  # sock_read: nothing from the server in time
        raise httpx.ReadTimeout(f"no {'answer' if head else 'data'} from the server in time") from None
    except aiohttp.ClientSSLError as exc:
        raise httpx.ConnectError(f"TLS with {exc.host}:{exc.port} failed ({exc.strerror or exc})") from None
    except aiohttp.ClientConnectorError as exc:  # refused, no such host
        raise httpx.ConnectError(f"could not connect to {exc.host}:{exc.port} ({exc.strerror or exc})") from None
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionResetError):
        raise httpx.RemoteProtocolError("the server closed the connection " + (
            "without sending an answer" if head else "before the answer's end")) from None
    except aiohttp.ClientOSError as exc:
        if exc.errno in (errno.ECONNRESET, errno.EPIPE):  # the server hung up: as a close, not as a fault
            raise httpx.RemoteProtocolError("the server closed the connection " + (
                "without sending an answer" if head else "before the answer's end")) from None
        error = httpx.WriteError if head else httpx.ReadError
        raise error(f"the connection failed ({exc.strerror or exc.__class__.__name__})") from None
    except aiohttp.ClientResponseError as exc:
        raise httpx.RemoteProtocolError(f"the server's answer is not valid HTTP/1.1 ({exc.message})") from None
    except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:
        raise httpx.UnsupportedProtocol(f"the URL {exc} is not an http or https one") from None
    except (aiohttp.ClientError, OSError) as exc:  # a reset or a broken pipe
        error = httpx.WriteError if head else httpx.ReadError
        raise error(f"the connection failed ({exc.__class__.__name__})") from None
    except TimeoutError:
        raise httpx.ReadTimeout("no answer from the server in time") from None


class _Body(httpx.AsyncByteStream):
    def __init__(self, answer: aiohttp.ClientResponse) -> None:
        self.answer = answer

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _as_httpx(head=False):
            async for data in self.answer.content.iter_any():
                yield data

    async def aclose(self) -> None:
        self.answer.release()  # back to the pool if read to its end, else closed


class AiohttpUpstream(httpx.AsyncBaseTransport):
    """Keep-alive HTTP/1.1 connections per origin on one ``aiohttp.ClientSession``. Made (and
    used) inside a running event loop."""

    def __init__(self, *, max_connections: int = 1000, keepalive_expiry: float = 4.0,
                 verify: ssl.SSLContext | bool = True) -> None:
        tls = verify if isinstance(verify, ssl.SSLContext) else httpx.create_ssl_context(verify=verify)
        self.connector = aiohttp.TCPConnector(limit=0, limit_per_host=max_connections,
                                              keepalive_timeout=keepalive_expiry, ssl=tls)
        self.session = aiohttp.ClientSession(
            connector=self.connector,
            cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False, trust_env=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"))
        self._urls: dict[str, URL] = {}
        self._timeouts: dict[tuple[float | None, ...], aiohttp.ClientTimeout] = {}

    def _request(self, method: str, url: httpx.URL, headers: Headers, body: Any,
                 timeouts: Mapping[str, float | None]) -> Any:
        if self.session.closed:
            raise httpx.ConnectError("the connection pool is closed")
        text = str(url)
        if (target := self._urls.get(text)) is None:
            if len(self._urls) > 1000:
                self._urls.clear()
            target = self._urls[text] = URL(text, encoded=True)
        key = (timeouts.get("connect"), timeouts.get("read"), timeouts.get("pool"))
        if (timeout := self._timeouts.get(key)) is None:
            connect, read, pool = key
            # aiohttp's ``connect`` covers both the wait for a pooled connection and the connecting
            timeout = self._timeouts[key] = aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=read,
                                                                  connect=pool)
        if isinstance(body, bytes) and len(body) > LARGE:
            body = io.BytesIO(body)
        return self.session.request(method, target, data=body, timeout=timeout, allow_redirects=False,
                                    headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers])

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body: Any = request.content if isinstance(request.stream, httpx.ByteStream) else request.stream
        headers = [(k, v) for k, v in request.headers.raw if k.lower() not in (b"host", b"transfer-encoding")]
        with _as_httpx(head=True):
            answer = await self._request(request.method, request.url, headers, body or None,
                                         request.extensions.get("timeout", {}))
        return httpx.Response(answer.status, headers=list(answer.raw_headers), stream=_Body(answer),
                              extensions={"http_version": b"HTTP/1.1"})

    async def exchange(self, method: str, url: httpx.URL, headers: Headers, body: bytes,
                       timeouts: Mapping[str, float | None]) -> tuple[int, Headers, bytes]:
        """One whole exchange without httpx's Request and Response objects: (status, headers,
        body). Same errors as a request through httpx."""
        with _as_httpx(head=True):
            answer = await self._request(method, url, headers, body, timeouts)
        try:
            with _as_httpx(head=False):
                content = await answer.read()
        finally:
            answer.release()
        return answer.status, list(answer.raw_headers), content

    async def aclose(self) -> None:
        await self.session.close()
        await asyncio.sleep(0)  # aiohttp closes its transports a loop turn later
