"""Governed httpx transports: pass ``engine.httpx_client(principal=...)`` (or the async one)
to ``openai.OpenAI(http_client=...)`` or ``anthropic.Anthropic(http_client=...)`` and every
model call it makes is governed like the gateway's: rate limits, authorize (holds), the
call, then settlement from the usage the provider reports (streams included). A refused
call gets an OpenAI-shaped error response, which the SDKs raise as theirs: a blocked call
is a 402.

Every answer is settled exactly once, however its caller leaves it: read to the end, closed,
left by a ``break`` or an exception, abandoned and garbage-collected, or still open when its
client (or, for the async one, its engine) closes; from the usage it reported, else
estimated from what arrived. A call the provider does not answer in time is recorded as
the gateway records it (``Governor.timed_out``). The vendor is known from its API host
(``api.openai.com``...), else from the model through the price table, so the call is priced.

Calls to other paths (``/models``...) pass through untouched. The async transport runs on
the engine it was made from; the sync one keeps its own engine on a private event loop
thread, so it works from any thread, inside or outside an async program.
"""

from __future__ import annotations

import asyncio
import json
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from functools import cache
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from engine.errors import BudgeteerError
from engine.integrations.governor import Caller, Governor, StreamMeter, Ticket, ask_usage, refusal_of, usage_of
from engine.models import Usage

if TYPE_CHECKING:
    from engine.engine import Engine
    from engine.pricing import PriceBook

T = TypeVar("T")

_KINDS = (("/chat/completions", "chat"), ("/embeddings", "embeddings"), ("/responses", "responses"),
          ("/messages", "chat"))
#: The vendors' own API hosts, named as the price table names the vendor (LiteLLM's providers).
VENDOR_HOSTS = {"api.openai.com": "openai", "api.anthropic.com": "anthropic", "api.mistral.ai": "mistral",
                "codestral.mistral.ai": "mistral", "generativelanguage.googleapis.com": "gemini",
                "api.deepseek.com": "deepseek", "api.x.ai": "xai", "api.groq.com": "groq",
                "api.together.xyz": "together_ai", "api.fireworks.ai": "fireworks_ai",
                "api.perplexity.ai": "perplexity", "api.cohere.com": "cohere"}


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


def vendor_of(host: str, model: Any, prices: PriceBook) -> str:
    """Whose model is called: the vendor of a known API host, else the price table's vendor of
    the model, else the host itself (a call the table cannot price is recorded ``unpriced``)."""
    return VENDOR_HOSTS.get(host) or (prices.vendor(model) if isinstance(model, str) else None) or host


class _Settlement:
    """A streamed answer under way, settled exactly once: whoever claims it first (its reader,
    its closer, the garbage collector, the transport or engine closing) settles it from what
    the meter read."""

    def __init__(self, ticket: Ticket, response: Any, under_way: dict[str, _Settlement]) -> None:
        self.ticket, self.response, self.under_way = ticket, response, under_way
        self.meter = StreamMeter(hide_usage=ticket.hide_usage)
        self._lock = threading.Lock()
        self._claimed = False
        under_way[ticket.request_id] = self

    def claim(self) -> tuple[Usage, bool] | None:
        """(usage, estimated) for the one caller that settles; None for every other."""
        with self._lock:
            if self._claimed:
                return None
            self._claimed = True
        self.under_way.pop(self.ticket.request_id, None)
        return self.meter.settlement(self.ticket)

    def finish(self, governor: Governor, claimed: tuple[Usage, bool]) -> Coroutine[Any, Any, None]:
        usage, estimated = claimed
        return governor.finish(self.ticket, usage, estimated=estimated)


class _LoopThread:
    """An event loop in a daemon thread, for running the engine under a sync client. Work is
    handed to it from any thread; once it is stopping, nothing more is (no coroutine is left
    never awaited)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.lock = threading.RLock()  # re-entered when the garbage collector runs a finalizer under it
        self.running = True
        self.tasks: set[asyncio.Task[Any]] = set()
        self.thread = threading.Thread(target=self._main, name="budgeteer-transport", daemon=True)
        self.thread.start()

    def _main(self) -> None:
        self.loop.run_forever()
        self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result (from a thread of the caller's)."""
        with self.lock:
            future = asyncio.run_coroutine_threadsafe(coro, self.loop) if self.running else None
        if future is None:
            coro.close()
            raise RuntimeError("the governed transport is closed")
        return future.result()

    def soon(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the loop without waiting: safe from any thread and from a
        finalizer (the garbage collector runs them on any thread, this loop's own included);
        nothing happens once the loop is stopping."""
        with self.lock:
            if self.running:
                self.loop.call_soon_threadsafe(callback)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """On the loop thread: run ``coro`` as a task that stopping waits for."""
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def stop(self, last: Coroutine[Any, Any, None]) -> None:
        """Run ``last`` after everything handed over before it, then stop and close the loop;
        waits for that unless called on the loop thread itself."""
        with self.lock:
            if not self.running:
                last.close()
                return
            self.running = False
            done = asyncio.run_coroutine_threadsafe(self._last(last), self.loop)
            done.add_done_callback(lambda _: self.loop.call_soon_threadsafe(self.loop.stop))
        if threading.get_ident() != self.thread.ident:
            try:
                done.result(timeout=60)
            finally:
                self.thread.join(timeout=10)

    async def _last(self, last: Coroutine[Any, Any, None]) -> None:
        while self.tasks:
            await asyncio.wait(list(self.tasks))
        await last


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

        async def begin(self, governor: Governor, request: Any, kind: str, body: dict[str, Any]) -> Ticket:
            provider = self.provider or vendor_of(request.url.host, body.get("model"), governor.engine.prices)
            ticket, _ = await governor.begin(self.caller, kind, body, provider=provider)
            return ticket

        @staticmethod
        def refused(exc: BudgeteerError, request: Any) -> Any:
            """A call not made, answered as the gateway answers it (``refusal_of``)."""
            refusal = refusal_of(exc)
            return h.Response(refusal.status, json=refusal.body(), headers=refusal.headers, request=request)

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
            self.streams: dict[str, _Settlement] = {}
            self.tasks: set[asyncio.Task[None]] = set()
            engine.transports.add(self)  # its closing settles the streams still open here

        async def handle_async_request(self, request: Any) -> Any:
            prepared = self.call.prepare(request)
            if prepared is None:
                return await self.inner.handle_async_request(request)
            kind, body = prepared
            try:
                ticket = await self.call.begin(self.governor, request, kind, body)
            except BudgeteerError as exc:
                return self.call.refused(exc, request)
            try:
                response = await self.inner.handle_async_request(self.call.rewritten(request, kind, body, ticket))
            except (h.ReadTimeout, asyncio.CancelledError):  # sent; no answer in time, or the caller stopped waiting
                await asyncio.shield(self.governor.timed_out(ticket))
                raise
            except BaseException:
                await asyncio.shield(self.governor.fail(ticket))
                raise
            if response.status_code >= 400:
                await self.governor.fail(ticket)
                return response
            if body.get("stream"):
                return h.Response(response.status_code, headers=response.headers,
                                      stream=_AsyncMeteredStream(_Settlement(ticket, response, self.streams), self),
                                      extensions=response.extensions, request=request)
            try:
                content = await response.aread()
            except h.ReadTimeout:
                await asyncio.shield(self.governor.timed_out(ticket))
                raise
            except BaseException:
                await asyncio.shield(self.governor.fail(ticket))
                raise
            finally:
                await response.aclose()
            usage = _usage(content)
            try:
                await self.governor.finish(ticket, usage, estimated=usage is None)
            except BudgeteerError as exc:  # its hold closed under it (HoldError): answered as the gateway does
                await self.governor.abort(ticket)
                return self.call.refused(exc, request)
            return h.Response(response.status_code, headers=response.headers, content=content,
                                  extensions=response.extensions, request=request)

        async def settle(self, settlement: _Settlement) -> None:
            """Settle a stream from what its meter read (once: later calls do nothing)."""
            claimed = settlement.claim()
            if claimed is None:
                return
            task = asyncio.ensure_future(settlement.finish(self.governor, claimed))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            try:
                await settlement.response.aclose()
            finally:
                await asyncio.shield(task)  # a cancelled caller does not stop the settlement

        def abandoned(self, settlement: _Settlement) -> None:
            """On the loop: a stream collected unread or unclosed is settled (from a finalizer)."""
            task = asyncio.ensure_future(self.settle(settlement))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

        async def settle_open(self) -> None:
            """Settle every stream still open here, and wait for settlements under way."""
            for settlement in list(self.streams.values()):
                await self.settle(settlement)
            while self.tasks:
                await asyncio.wait(list(self.tasks))

        async def aclose(self) -> None:
            await self.settle_open()
            await self.inner.aclose()


    def _collected(loop: asyncio.AbstractEventLoop, transport: AsyncGovernedTransport,
                   settlement: _Settlement) -> None:
        """A finalizer (any thread, any time): hand the settlement to the stream's loop."""
        try:
            loop.call_soon_threadsafe(transport.abandoned, settlement)
        except RuntimeError:  # the loop is closed; so was the engine, which settled what was open
            pass


    class _AsyncMeteredStream(h.AsyncByteStream):  # type: ignore[misc]
        def __init__(self, settlement: _Settlement, transport: AsyncGovernedTransport) -> None:
            self.settlement, self.transport = settlement, transport
            self.collected = weakref.finalize(self, _collected, asyncio.get_running_loop(), transport, settlement)

        async def __aiter__(self) -> AsyncIterator[bytes]:
            settlement = self.settlement
            try:
                async for chunk in settlement.response.aiter_raw():
                    if passed := settlement.meter.pass_bytes(chunk):
                        yield passed
                if rest := settlement.meter.end():
                    yield rest
            finally:
                await self.aclose()

        async def aclose(self) -> None:
            self.collected.detach()
            await self.transport.settle(self.settlement)


    class GovernedTransport(h.BaseTransport):  # type: ignore[misc]
        """The sync transport: its own engine on the same ledger, on a private loop thread."""

        def __init__(self, db: Any, clock: Any, caller: Caller, *, provider: str | None = None,
                     routing_mode: str = "off", inner: Any = None,
                     open_engine: Callable[..., Coroutine[Any, Any, Engine]]) -> None:
            """``open_engine``: ``Engine.open``, passed in (the engine imports this module)."""
            self.loop = _LoopThread()
            self.engine = self.loop.run(open_engine(db, clock=clock))
            self.governor = Governor(self.engine, routing_mode=routing_mode, resolve_providers=False)
            self.call = _Call(caller, provider)
            self.inner = inner or h.HTTPTransport()
            self.streams: dict[str, _Settlement] = {}
            # Closing it (or collecting it, or the interpreter exiting) settles what is still open.
            self.closer = weakref.finalize(self, _close, self.loop, self.governor, self.streams, self.inner)

        def handle_request(self, request: Any) -> Any:
            prepared = self.call.prepare(request)
            if prepared is None:
                return self.inner.handle_request(request)
            kind, body = prepared
            try:
                ticket = self.loop.run(self.call.begin(self.governor, request, kind, body))
            except BudgeteerError as exc:
                return self.call.refused(exc, request)
            try:
                response = self.inner.handle_request(self.call.rewritten(request, kind, body, ticket))
            except h.ReadTimeout:  # sent, and no answer in time
                self.loop.run(self.governor.timed_out(ticket))
                raise
            except BaseException:
                self.loop.run(self.governor.fail(ticket))
                raise
            if response.status_code >= 400:
                self.loop.run(self.governor.fail(ticket))
                return response
            if body.get("stream"):
                return h.Response(response.status_code, headers=response.headers,
                                      stream=_MeteredStream(_Settlement(ticket, response, self.streams), self),
                                      extensions=response.extensions, request=request)
            try:
                content = response.read()
            except h.ReadTimeout:
                self.loop.run(self.governor.timed_out(ticket))
                raise
            except BaseException:
                self.loop.run(self.governor.fail(ticket))
                raise
            finally:
                response.close()
            usage = _usage(content)
            try:
                self.loop.run(self.governor.finish(ticket, usage, estimated=usage is None))
            except BudgeteerError as exc:  # its hold closed under it (HoldError): answered as the gateway does
                self.loop.run(self.governor.abort(ticket))
                return self.call.refused(exc, request)
            return h.Response(response.status_code, headers=response.headers, content=content,
                                  extensions=response.extensions, request=request)

        def close(self) -> None:
            self.closer()


    def _settle_on_loop(loop: _LoopThread, governor: Governor, settlement: _Settlement) -> None:
        """On the loop thread: settle a stream, without waiting for it (stopping does)."""
        claimed = settlement.claim()
        if claimed is not None:
            try:
                settlement.response.close()
            finally:
                loop.spawn(settlement.finish(governor, claimed))


    def _close(loop: _LoopThread, governor: Governor, streams: dict[str, _Settlement], inner: Any) -> None:
        """Close a sync transport: its open streams settled, its engine closed, its loop stopped."""
        async def last() -> None:
            for settlement in list(streams.values()):
                _settle_on_loop(loop, governor, settlement)
            while loop.tasks:
                await asyncio.wait(list(loop.tasks))
            await governor.release_all()  # calls still being begun on other threads
            await governor.engine.close()

        try:
            loop.stop(last())
        finally:
            inner.close()


    class _MeteredStream(h.SyncByteStream):  # type: ignore[misc]
        def __init__(self, settlement: _Settlement, transport: GovernedTransport) -> None:
            self.settlement, self.transport = settlement, transport
            self.collected = weakref.finalize(self, transport.loop.soon,
                                              lambda: _settle_on_loop(transport.loop, transport.governor, settlement))

        def __iter__(self) -> Iterator[bytes]:
            settlement = self.settlement
            collected = False
            try:
                for chunk in settlement.response.iter_raw():
                    if passed := settlement.meter.pass_bytes(chunk):
                        yield passed
                if rest := settlement.meter.end():
                    yield rest
            except GeneratorExit:  # closed unfinished, as the garbage collector does: never wait here
                collected = True
                raise
            finally:
                if collected:
                    self.collected()
                else:
                    self.close()

        def close(self) -> None:
            """Closed by its reader: settled before this returns (on the loop thread, later)."""
            self.collected.detach()
            claimed = self.settlement.claim()
            if claimed is None:
                return
            loop = self.transport.loop
            try:
                self.settlement.response.close()
            finally:
                settled = self.settlement.finish(self.transport.governor, claimed)
                if threading.get_ident() == loop.thread.ident:
                    loop.spawn(settled)
                else:
                    loop.run(settled)

    return GovernedTransport, AsyncGovernedTransport


@cache
def transports(module: Any = httpx) -> tuple[type[Any], type[Any]]:
    """(GovernedTransport, AsyncGovernedTransport) built on ``module`` (httpx by default)."""
    return _build(module)
