"""Governed httpx transports: pass ``engine.httpx_client(principal=...)`` (or the async one)
to ``openai.OpenAI(http_client=...)`` or ``anthropic.Anthropic(http_client=...)`` and every
model call it makes is governed like the gateway's: rate limits, authorize (holds), the
call, then settlement from the usage the provider reports (streams included; a stream cut
off is settled from what arrived, marked estimated). A refused call gets an OpenAI-shaped
error response, which the SDKs raise as theirs: a blocked call is a 402.

Calls to other paths (``/models``...) pass through untouched. The async transport runs on
the engine it was made from; the sync one keeps its own engine on a private event loop
thread, so it works from any thread, inside or outside an async program.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from functools import cache
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from engine.integrations.governor import Caller, Governor, Refused, StreamMeter, Ticket, ask_usage, usage_of
from engine.models import Usage

if TYPE_CHECKING:
    from engine.engine import Engine

T = TypeVar("T")

_KINDS = (("/chat/completions", "chat"), ("/embeddings", "embeddings"), ("/responses", "responses"),
          ("/messages", "chat"))
_VENDORS = {"api.openai.com": "openai", "api.anthropic.com": "anthropic", "api.mistral.ai": "mistral",
            "generativelanguage.googleapis.com": "gemini"}


def _kind(request: Any) -> str | None:
    if request.method != "POST":
        return None
    path = request.url.path.rstrip("/")
    return next((kind for suffix, kind in _KINDS if path.endswith(suffix)), None)


def _usage(content: bytes) -> Usage | None:
    try:
        data = json.loads(content)
    except ValueError:
        return None
    return usage_of(data) if isinstance(data, dict) else None


def _build(h: Any) -> tuple[type[Any], type[Any]]:
    """The sync and async transports for one httpx-like module (httpx, or httpx2 which newer
    SDKs are built on): the same code, that module's base classes."""

    class _Call:
        """What both transports share: read the request, ask the governor, rewrite, settle."""

        def __init__(self, caller: Caller, provider: str | None) -> None:
            self.caller, self.provider = caller, provider

        def prepare(self, request: Any) -> tuple[str, dict[str, Any]] | None:
            kind = _kind(request)
            if kind is None:
                return None
            try:
                body = json.loads(request.content or b"{}")
            except ValueError:
                return None  # not ours to judge: the provider answers it
            return (kind, body) if isinstance(body, dict) else None

        def provider_of(self, request: Any) -> str:
            return self.provider or _VENDORS.get(request.url.host, request.url.host)

        @staticmethod
        def rewritten(request: Any, kind: str, body: dict[str, Any], ticket: Ticket) -> Any:
            """The request as sent: the model the governor settled on, usage asked for in streams."""
            changed = dict(body)
            changed["model"] = ticket.model
            if body.get("stream") and kind == "chat" and not request.url.path.rstrip("/").endswith("/messages"):
                changed["stream_options"] = ask_usage(ticket, body)
            # Uncompressed answers, so the usage can be read as the bytes pass.
            dropped = ("content-length", "accept-encoding")
            headers = {k: v for k, v in request.headers.items() if k.lower() not in dropped}
            headers["accept-encoding"] = "identity"
            return h.Request(request.method, request.url, headers=headers, content=json.dumps(changed).encode(),
                                 extensions=request.extensions)


    class AsyncGovernedTransport(h.AsyncBaseTransport):  # type: ignore[misc]
        def __init__(self, engine: Engine, caller: Caller, *, provider: str | None = None, routing_mode: str = "off",
                     inner: Any = None) -> None:
            self.governor = Governor(engine, routing_mode=routing_mode, resolve_providers=False)
            self.call = _Call(caller, provider)
            self.inner = inner or h.AsyncHTTPTransport()

        async def handle_async_request(self, request: Any) -> Any:
            prepared = self.call.prepare(request)
            if prepared is None:
                return await self.inner.handle_async_request(request)
            kind, body = prepared
            try:
                ticket, _ = await self.governor.begin(self.call.caller, kind, body,
                                                      provider=self.call.provider_of(request))
            except Refused as refusal:
                return h.Response(refusal.status, json=refusal.body(), headers=refusal.headers, request=request)
            try:
                response = await self.inner.handle_async_request(self.call.rewritten(request, kind, body, ticket))
            except BaseException:
                await self.governor.fail(ticket)
                raise
            if response.status_code >= 400:
                await self.governor.fail(ticket)
                return response
            if body.get("stream"):
                return h.Response(response.status_code, headers=response.headers,
                                      stream=_AsyncMeteredStream(response, ticket, self.governor),
                                      extensions=response.extensions, request=request)
            content = await response.aread()
            await response.aclose()
            usage = _usage(content)
            await self.governor.finish(ticket, usage,
                                       estimated=usage is None)
            return h.Response(response.status_code, headers=response.headers, content=content,
                                  extensions=response.extensions, request=request)

        async def aclose(self) -> None:
            await self.inner.aclose()


    class _AsyncMeteredStream(h.AsyncByteStream):  # type: ignore[misc]
        def __init__(self, response: Any, ticket: Ticket, governor: Governor) -> None:
            self.response, self.ticket, self.governor = response, ticket, governor
            self.meter = StreamMeter(hide_usage=ticket.hide_usage)
            self.done = False

        async def __aiter__(self) -> AsyncIterator[bytes]:
            try:
                async for chunk in self.response.aiter_raw():
                    if passed := self.meter.pass_bytes(chunk):
                        yield passed
                if rest := self.meter.end():
                    yield rest
            finally:
                await self._settle()

        async def _settle(self) -> None:
            if self.done:
                return
            self.done = True
            await self.response.aclose()
            usage, estimated = self.meter.settlement(self.ticket)
            await asyncio.shield(self.governor.finish(self.ticket, usage, estimated=estimated))

        async def aclose(self) -> None:
            await self._settle()


    class _LoopThread:
        """An event loop in a daemon thread, for running the engine under a sync client."""

        def __init__(self) -> None:
            self.loop = asyncio.new_event_loop()
            self.thread = threading.Thread(target=self.loop.run_forever, name="budgeteer-transport", daemon=True)
            self.thread.start()

        def run(self, coro: Coroutine[Any, Any, T]) -> T:
            return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

        def stop(self) -> None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()


    class GovernedTransport(h.BaseTransport):  # type: ignore[misc]
        """The sync transport: its own engine on the same ledger, on a private loop thread."""

        def __init__(self, db: Any, clock: Any, caller: Caller, *, provider: str | None = None,
                     routing_mode: str = "off", inner: Any = None) -> None:
            from engine.engine import Engine

            self.loop = _LoopThread()
            self.engine = self.loop.run(Engine.open(db, clock=clock))
            self.governor = Governor(self.engine, routing_mode=routing_mode, resolve_providers=False)
            self.call = _Call(caller, provider)
            self.inner = inner or h.HTTPTransport()

        def handle_request(self, request: Any) -> Any:
            prepared = self.call.prepare(request)
            if prepared is None:
                return self.inner.handle_request(request)
            kind, body = prepared
            try:
                ticket, _ = self.loop.run(self.governor.begin(self.call.caller, kind, body,
                                                              provider=self.call.provider_of(request)))
            except Refused as refusal:
                return h.Response(refusal.status, json=refusal.body(), headers=refusal.headers, request=request)
            try:
                response = self.inner.handle_request(self.call.rewritten(request, kind, body, ticket))
            except BaseException:
                self.loop.run(self.governor.fail(ticket))
                raise
            if response.status_code >= 400:
                self.loop.run(self.governor.fail(ticket))
                return response
            if body.get("stream"):
                return h.Response(response.status_code, headers=response.headers,
                                      stream=_MeteredStream(response, ticket, self), extensions=response.extensions,
                                      request=request)
            content = response.read()
            response.close()
            usage = _usage(content)
            self.loop.run(self.governor.finish(ticket, usage,
                                               estimated=usage is None))
            return h.Response(response.status_code, headers=response.headers, content=content,
                                  extensions=response.extensions, request=request)

        def close(self) -> None:
            self.inner.close()
            self.loop.run(self.governor.release_all())
            self.loop.run(self.engine.close())
            self.loop.stop()


    class _MeteredStream(h.SyncByteStream):  # type: ignore[misc]
        def __init__(self, response: Any, ticket: Ticket, transport: GovernedTransport) -> None:
            self.response, self.ticket, self.transport = response, ticket, transport
            self.meter = StreamMeter(hide_usage=ticket.hide_usage)
            self.done = False

        def __iter__(self) -> Iterator[bytes]:
            try:
                for chunk in self.response.iter_raw():
                    if passed := self.meter.pass_bytes(chunk):
                        yield passed
                if rest := self.meter.end():
                    yield rest
            finally:
                self.close()

        def close(self) -> None:
            if self.done:
                return
            self.done = True
            self.response.close()
            usage, estimated = self.meter.settlement(self.ticket)
            self.transport.loop.run(self.transport.governor.finish(self.ticket, usage, estimated=estimated))

    return GovernedTransport, AsyncGovernedTransport


@cache
def transports(module: Any = httpx) -> tuple[type[Any], type[Any]]:
    """(GovernedTransport, AsyncGovernedTransport) built on ``module`` (httpx by default)."""
    return _build(module)
