"""The gateway: the OpenAI HTTP API in front of the registered providers, every call governed.

``POST /v1/chat/completions`` (streaming included), ``POST /v1/embeddings``,
``POST /v1/responses``, ``GET /v1/models``, ``GET /healthz``, and ``POST /v1/traces`` (OTLP/HTTP
JSON GenAI spans into the ledger); ``POST /v1/messages`` speaks Anthropic's Messages API to
an anthropic provider, so the anthropic SDK works through the gateway too. Per request: the Budgeteer API
token (Bearer) and its scope, rate limits, routing, authorize (holds), forward with the
provider's key from the vault (and the few provider-specific headers of ``FORWARDED``),
settle from the usage the provider reports. Streams ask the provider for usage in the last
chunk, which reaches the client only if it asked too; a stream cut off by either side is
settled from what was received, marked estimated, and one the provider cut ends with an
error event the client's SDK raises. Errors take OpenAI's shape (Anthropic's on its Messages
API). A body is checked against the route's contract (``contract``, served as ``GET
/openapi.json``) before anything is held; whatever fails after a hold releases it and answers
500. Responses carry the remaining budget of the tightest policy. Bodies are limited in size,
a request's head in size, headers and time (``HttpLimits``); a graceful shutdown releases the
hold of every call still under way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import httptools
import httpx
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from engine.clock import Clock
from engine.engine import Engine
from engine.errors import BadInput, BudgeteerError, LedgerUnavailable
from engine.integrations import contract
from engine.integrations.governor import (
    Caller,
    Governor,
    Refused,
    StreamMeter,
    Ticket,
    ask_usage,
    refusal_of,
    usage_of,
)
from engine.integrations.http11 import Http11Transport
from engine.ledger import changes
from engine.models import GatewayStatus, Usage
from engine.providers import Provider
from engine.tokens import Token, admit, digest
from engine.vault import VaultError

if TYPE_CHECKING:
    from engine.integrations.upstream import AiohttpUpstream

DEFAULT_MAX_BODY = 4 * 1024 * 1024
HEARTBEAT_S = 2.0
KEY_CACHE_S = 60.0  # a provider key is decrypted again after this long (a rotated key is picked up)
SYNC_INTERVAL_S = 0.1  # settlements reach the disk within this long (they survive a crash at once)
TOKEN_CACHE_S = 1.0  # a token is read again after this long: a revocation reaches a running gateway within it
# (on PostgreSQL at once: the revocation's notification empties the cache, Gateway._ledger_changed)
SCOPES = {"chat": "chat", "embeddings": "embeddings", "responses": "responses", "messages": "chat"}
CALLS = {"/v1/chat/completions": "chat", "/v1/embeddings": "embeddings", "/v1/responses": "responses",
         "/v1/messages": "messages"}
T = TypeVar("T")
UPSTREAM = "http11"  # the client to providers: http11 or aiohttp (``upstream_client``)
log = logging.getLogger("budgeteer.gateway")
PATHS = {"chat": "/chat/completions", "embeddings": "/embeddings", "responses": "/responses", "messages": "/messages"}
# The provider-specific request headers of a client's that go on with its call, to a provider
# of the kind they are for (README: "Headers"). Nothing else of the client's does: not its
# credentials (Authorization, x-api-key, api-key, cookies), nor the SDKs' x-stainless-*
# telemetry, nor anthropic-version: the gateway pins the version whose answers it reads usage from.
FORWARDED: dict[bytes, str] = {
    b"openai-organization": "openai-compatible", b"openai-project": "openai-compatible",
    b"openai-beta": "openai-compatible", b"anthropic-beta": "anthropic"}


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    """A header's value from a raw header list (``name`` in lower case)."""
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def upstream_client(name: str) -> Http11Transport | AiohttpUpstream:
    """The gateway's client to providers, by name: ``http11``, the home-made pool (the default:
    in alternating runs it cost the gateway a fifth less CPU a call than aiohttp's client and
    served half as many calls again, README "Performance"), or ``aiohttp``
    (engine.integrations.upstream, the same interface), which ``bench.gateway --upstream
    aiohttp`` measures it against and the tests run beside it."""
    if name == "aiohttp":  # imported only when asked for: aiohttp is a test and bench dependency
        from engine.integrations.upstream import AiohttpUpstream

        return AiohttpUpstream(max_connections=1000)
    return Http11Transport(max_connections=1000)


class CallerLeft(BudgeteerError):
    """The caller hung up before the provider answered (answered 499, to no one)."""

    http_status, code = 499, "caller_left"


def error(exc: BudgeteerError, kind: str = "") -> JSONResponse:
    """An error as ``refusal_of`` answers it, in OpenAI's error shape; in Anthropic's on its
    Messages API (``kind`` messages)."""
    refusal = refusal_of(exc)
    body = refusal.anthropic_body() if kind == "messages" else refusal.body()
    return JSONResponse(body, status_code=refusal.status, headers=refusal.headers)


INTERNAL = "the gateway failed on this request; it was not billed"


def internal_error(kind: str = "") -> JSONResponse:
    return error(Refused(500, INTERNAL, "api_error", "internal_error"), kind)


async def _failed(_request: Request, _exc: Exception) -> Response:
    """Starlette's answer to an exception of a route's (it raises it on, to ``Gateway.__call__``, which logs it)."""
    return internal_error()


def log_failure(where: str, exc: BaseException) -> None:
    """One line for something unexpected: where, the exception's type and message (no traceback)."""
    message = " ".join(str(exc).split())[:300]
    log.error("budgeteer gateway: %s failed: %s%s", where, type(exc).__name__, f": {message}" if message else "")


class Gateway:
    def __init__(self, db: Path | str, *, clock: Clock | None = None, routing_mode: str = "suggest",
                 max_body: int = DEFAULT_MAX_BODY, upstream_timeout: float = 120.0, address: str = "",
                 vault_passphrase: Callable[[], str] | None = None, sync_interval_s: float = SYNC_INTERVAL_S,
                 limits: HttpLimits | None = None, down_allowance: int | None = None) -> None:
        self.db, self.clock, self.routing_mode = db, clock, routing_mode
        self.down_allowance = down_allowance  # --when-ledger-down allow: nano-dollars (None: refuse)
        self.sync_interval_s = sync_interval_s
        self.max_body, self.upstream_timeout, self.address = max_body, upstream_timeout, address
        self.vault_passphrase = vault_passphrase
        self.engine: Engine | None = None
        self.governor: Governor | None = None
        self.id = "gw_" + secrets.token_hex(6)
        self.started_ms = 0
        self.recent: deque[tuple[float, bool]] = deque()  # (when, failed) of the last minute's requests
        self.streams: set[asyncio.Task[None]] = set()
        self.last_used: dict[str, int] = {}  # token id -> last use, flushed with each heartbeat
        self.keys: dict[str, tuple[float, str]] = {}  # credential reference -> (read at, key), for a minute
        self.fetching: dict[str, asyncio.Future[str]] = {}  # credential reference -> its decryption under way
        self.tokens: dict[bytes, tuple[float, Token]] = {}  # secret digest -> (read at, token), for a second
        self.tokens_dropped = 0  # how often a change of tokens emptied the cache (a read begun before is not kept)
        self.anchoring: asyncio.Task[None] | None = None  # posting the audit anchor (once a day)
        self.transport: Http11Transport | AiohttpUpstream | None = None
        self.timeouts = {"connect": 10.0, "read": upstream_timeout, "write": upstream_timeout,
                         "pool": upstream_timeout}
        self.urls: dict[str, httpx.URL] = {}
        self._openapi: bytes | None = None
        # The model endpoints are listed too, although __call__ takes their POSTs: Starlette
        # then answers any other method on them with 405.
        self.app = Starlette(routes=[
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/traces", self.traces, methods=["POST"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
        ] + [Route(path, self.endpoint(kind), methods=["POST"]) for path, kind in CALLS.items()],
            lifespan=self.lifespan, exception_handlers={Exception: _failed})
        self.app.state.gateway = self
        self.limits = limits or HttpLimits()
        # What to serve it with (uvicorn's ``http``): the protocol with this gateway's limits.
        self.http_protocol = GatewayHttpProtocol.with_limits(self.limits)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """The ASGI application. Model calls go straight to ``call``: Starlette's routing and
        middleware cost a tenth of the gateway's time under load; the rest goes through it.
        Whatever fails unexpectedly is answered 500 in OpenAI's shape if no answer has begun,
        and logged in one line; no traceback reaches the caller or the log."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        kind = CALLS.get(scope.get("path", "")) if scope["method"] == "POST" else None
        started = False

        async def watched(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            if kind is not None:
                await (await self.call(Request(scope, receive), kind))(scope, receive, watched)
            else:
                await self.app(scope, receive, watched)
        except Exception as exc:  # a relayed stream that failed lands here too, settled by its relay
            log_failure(f"{scope['method']} {scope.get('path', '')}", exc)
            if not started:
                await internal_error(kind or "")(scope, receive, send)

    # ---- lifecycle

    @asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        # A settlement is committed before the caller gets its answer, so a killed gateway never
        # loses a call it answered; the fsync that makes it survive a power cut too comes
        # within sync_interval_s, shared by every call of that interval (0: before each answer).
        self.engine = await Engine.open(self.db, clock=self.clock, actor="gateway",
                                        sync_interval_s=self.sync_interval_s)
        self.engine.vault_passphrase = self.vault_passphrase
        self.engine.allow_while_down(self.down_allowance)
        self.governor = Governor(self.engine, routing_mode=self.routing_mode)
        self.engine.on_change(self._ledger_changed)
        # A pool as wide as the load a gateway takes (httpx's default of 100 makes callers queue),
        # on the lean HTTP/1.1 transport, called without an httpx.AsyncClient around it: httpx's
        # own transport cost more than half the gateway's CPU, its client (URL merging, cookies,
        # auth and redirect handling the gateway never uses) a fifth of the rest.
        self.transport = upstream_client(UPSTREAM)
        self.started_ms = self.engine.now_ms()
        await self._warm()
        beat = asyncio.create_task(self._heartbeat())
        try:
            yield
        finally:
            beat.cancel()
            if self.anchoring is not None:
                self.anchoring.cancel()
            if self.streams:  # streams still relaying settle from what they received
                await asyncio.wait(self.streams, timeout=10)
            released = await self.governor.release_all()  # spilled if the ledger refuses them
            try:
                await self._beat(stopped=True)
            except Exception:  # a ledger refusing writes: the engine still closes (and keeps what it spilled)
                pass
            await self.transport.aclose()
            await self.engine.close()
            if released:
                print(f"budgeteer gateway: released the holds of {released} calls still under way")

    async def _beat(self, stopped: bool = False) -> None:
        assert self.engine is not None and self.governor is not None
        now = time.monotonic()
        while self.recent and self.recent[0][0] < now - 60:
            self.recent.popleft()
        seen = self.engine.now_ms()
        used, self.last_used = self.last_used, {}
        await self.engine.touch_tokens(used)
        await self.engine.gateway_heartbeat(GatewayStatus(
            self.id, self.address, os.getpid(), self.started_ms, seen, seen if stopped else None,
            self.governor.requests, self.governor.errors, len(self.recent), sum(1 for _, f in self.recent if f)))

    async def _heartbeat(self) -> None:
        while True:
            try:
                await self._beat()
            except Exception:  # a busy ledger skips a beat; the next one says it again
                pass
            if self.anchoring is None or self.anchoring.done():  # once a day; in its own task (retries)
                self.anchoring = asyncio.create_task(self._post_anchor())
            await asyncio.sleep(HEARTBEAT_S)

    async def _post_anchor(self) -> None:
        assert self.engine is not None
        try:
            await self.engine.post_audit_anchor()
        except Exception as exc:  # tried again at the next beat
            print(f"budgeteer gateway: the audit anchor was not posted: {exc.__class__.__name__}: {exc}",
                  file=sys.stderr)

    def _ledger_changed(self, kind: str) -> None:
        """Another process (or this one) committed a change (PostgreSQL's notifications,
        ``Engine.on_change``): tokens are read again at their next use, provider keys too."""
        if kind in (changes.TOKEN, changes.ANY):
            self.tokens.clear()
            self.tokens_dropped += 1
        if kind in (changes.PROVIDER, changes.ANY):
            self.keys.clear()

    def _count(self, failed: bool) -> None:
        self.recent.append((time.monotonic(), failed))

    # ---- request helpers

    async def _caller(self, request: Request, scope: str) -> Caller:
        assert self.engine is not None
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            presented = header[7:].strip()
        elif request.headers.get("x-api-key"):  # Anthropic's SDK sends the key so
            presented = request.headers["x-api-key"].strip()
        else:
            raise Refused(401, "Missing API token: send Authorization: Bearer bgt_...", "invalid_request_error",
                          "invalid_api_key")
        key = digest(presented)  # a token refused (TokenRefused) is answered by its http_status
        cached = self.tokens.get(key)
        if cached is None or time.monotonic() - cached[0] > TOKEN_CACHE_S:
            if len(self.tokens) > 10_000:
                self.tokens.clear()
            dropped = self.tokens_dropped
            try:
                cached = (time.monotonic(), await self.engine.authenticate(presented, touch=False))
            except LedgerUnavailable:
                # The ledger cannot be read: a token this gateway knew stays known while it admits
                # calls against its allowance (it could not learn of a revocation meanwhile either).
                if cached is None or not self.engine.admits_while_down:
                    raise
            if dropped == self.tokens_dropped:  # else read before a change it may not show: not kept
                self.tokens[key] = cached
        token = admit(cached[1], self.engine.now_ms(), scope)
        self.last_used[token.id] = self.engine.now_ms()  # written with the next heartbeat
        return Caller(principal=token.principal, team=token.team, workspace=token.workspace, token_id=token.id,
                      session=request.headers.get("x-budgeteer-session", "")[:200],
                      agent=request.headers.get("x-budgeteer-agent", "")[:200], rpm=token.rpm, tpm=token.tpm)

    async def _body(self, request: Request) -> tuple[dict[str, Any], bytes]:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise Refused(413, f"body: larger than the gateway's limit of {self.max_body:,} bytes",
                          "invalid_request_error", "body_too_large", "body")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise Refused(413, f"body: larger than the gateway's limit of {self.max_body:,} bytes",
                              "invalid_request_error", "body_too_large", "body")
            chunks.append(chunk)
        raw = b"".join(chunks)
        body = contract.loads(raw)  # bad JSON: a BadInput, answered 400 naming the field
        if not isinstance(body, dict):
            raise BadInput("body", "must be a JSON object")
        return body, raw

    async def _upstream_headers(self, provider: Provider) -> list[tuple[bytes, bytes]]:
        """The headers of a call to the provider, as bytes (both upstream paths take them so)."""
        headers = {"content-type": "application/json"}
        if provider.credential:
            try:
                key = await self._key(provider.credential)
            except VaultError as exc:
                raise Refused(502, f"provider {provider.name}: its credential cannot be read ({exc})",
                              "api_error", "credential_unavailable") from None
            if provider.kind == "anthropic":
                headers.update({"x-api-key": key, "anthropic-version": "2023-06-01"})
            else:
                headers["authorization"] = f"Bearer {key}"
        return [(name.encode(), value.encode()) for name, value in headers.items()]

    async def _key(self, ref: str) -> str:
        """A provider's key, decrypted at most once a minute; callers that find it missing at
        the same moment share one decryption (a file vault's first one derives its key by
        scrypt, a fifth of a second of CPU: fifty first calls must not each do it)."""
        cached = self.keys.get(ref)
        if cached is not None and time.monotonic() - cached[0] <= KEY_CACHE_S:
            return cached[1]
        fetch = self.fetching.get(ref)
        if fetch is None:
            assert self.engine is not None
            fetch = self.fetching[ref] = asyncio.ensure_future(self.engine.credential(ref))
            fetch.add_done_callback(lambda _: self.fetching.pop(ref, None))
        key = await asyncio.shield(fetch)
        self.keys[ref] = (time.monotonic(), key)
        return key

    async def _warm(self) -> None:
        """Before serving: decrypt the registered providers' keys (and so derive a file vault's
        key) once, so the first callers do not wait for it. A key that cannot be read now is
        reported by the calls that need it, as before."""
        assert self.governor is not None
        for provider in await self.governor.registered():
            if provider.enabled and provider.credential:
                try:
                    await self._key(provider.credential)
                except VaultError:
                    pass

    # ---- endpoints

    async def healthz(self, _request: Request) -> Response:
        assert self.engine is not None
        return JSONResponse({"status": "ok", "gateway": self.id, "open_calls": len(self.governor.open)
                             if self.governor else 0, "ledger": str(self.engine.path)})

    async def openapi(self, _request: Request) -> Response:
        """The gateway's contract: OpenAPI 3.1, from the models its calls are checked against."""
        if self._openapi is None:
            self._openapi = json.dumps(contract.openapi()).encode()
        return Response(self._openapi, media_type="application/json")

    async def models(self, request: Request) -> Response:
        assert self.engine is not None
        try:
            await self._caller(request, "models")
        except BudgeteerError as exc:
            return error(exc)
        assert self.governor is not None
        served = await self.governor.served()
        return JSONResponse({"object": "list", "data": [
            {"id": model, "object": "model", "created": providers[0].created_ms // 1000, "owned_by": providers[0].name}
            for model, providers in sorted(served.items())]})

    async def traces(self, request: Request) -> Response:
        """OTLP/HTTP traces, protobuf or JSON, either gzip- or deflate-compressed: GenAI spans
        become usage events (deduplicated by trace and span id). The answer is an
        ExportTraceServiceResponse in the request's media type."""
        from engine.integrations import otlp

        assert self.engine is not None
        try:
            await self._caller(request, "traces")
            media = otlp.media_type(request.headers.get("content-type"))
            body = await otlp.read_body(request.stream(), request.headers.get("content-encoding"), self.max_body,
                                        request.headers.get("content-length"))
            report = await self.engine.ingest_otlp(otlp.decode(body, media))
        except BudgeteerError as exc:  # OtlpError's statuses: 400, 413 too large, 415 not OTLP's media type
            return error(exc)
        except ClientDisconnect:
            return Response(status_code=499)
        return Response(otlp.export_response(report, media), media_type=media)

    def endpoint(self, kind: str) -> Callable[[Request], Any]:
        async def handle(request: Request) -> Response:
            return await self.call(request, kind)

        return handle

    async def call(self, request: Request, kind: str) -> Response:
        """One model call: the token, the body checked against the route's contract, the hold
        (``Governor.begin``), then ``_forward``. Whatever fails unexpectedly answers 500 in
        the route's error shape, and a call already held has its hold released."""
        assert self.governor is not None and self.transport is not None
        ticket = None
        try:
            caller = await self._caller(request, SCOPES[kind])
            body, raw = await self._body(request)
            contract.check(kind, body)
            if kind == "messages":  # Anthropic's Messages API, to an anthropic provider, never rerouted
                ticket, provider = await self.governor.begin(caller, "chat", body, route=False,
                                                             provider_kind="anthropic")
            else:
                ticket, provider = await self.governor.begin(caller, kind, body)
            return await self._forward(request, kind, body, raw, ticket, provider)
        except BudgeteerError as exc:  # a refusal, bad input, a token refused, the ledger unavailable...
            refusal = refusal_of(exc)
            failed = refusal.status >= 500
            if ticket is not None and refusal is not exc:  # not the governor's: after the hold, given back
                failed = True
                log_failure(f"POST {request.url.path}", exc)
                await self._abort(ticket)
            self._count(failed)
            return error(refusal, kind)
        except ClientDisconnect:  # the caller left before its request arrived whole
            return Response(status_code=499)
        except Exception as exc:
            log_failure(f"POST {request.url.path}", exc)
            self._count(True)
            if ticket is not None:
                await self._abort(ticket)
            return internal_error(kind)

    async def _abort(self, ticket: Ticket) -> None:
        """After something unexpected: release the call's hold (``Governor.abort``)."""
        assert self.governor is not None
        try:
            await asyncio.shield(self.governor.abort(ticket))
        except Exception as exc:
            log_failure(f"releasing the hold of {ticket.request_id}", exc)

    async def _forward(self, request: Request, kind: str, body: dict[str, Any], raw: bytes, ticket: Ticket,
                       provider: Provider | None) -> Response:
        """The held call to its provider, and its answer settled."""
        assert self.governor is not None and self.transport is not None
        assert provider is not None
        try:
            headers = await self._upstream_headers(provider)
        except Refused as refusal:
            await self.governor.fail(ticket)
            self._count(True)
            return error(refusal, kind)
        if forwarded := [(name, value) for name, value in request.scope["headers"]
                         if FORWARDED.get(name) == provider.kind]:  # the rare call that sets one
            headers = headers + forwarded
        stream = bool(body.get("stream"))
        if ticket.model != body["model"] or (stream and kind == "chat"):
            upstream = {**body, "model": ticket.model}
            if stream and kind == "chat":
                upstream["stream_options"] = ask_usage(ticket, body)
            raw = json.dumps(upstream).encode()
        # else the caller's own bytes go on as they came
        reply = {**ticket.headers, "x-budgeteer-request-id": ticket.request_id}
        if ticket.model != ticket.requested_model:
            reply["x-budgeteer-model"] = ticket.model
        url = provider.base_url + PATHS[kind]
        if (target := self.urls.get(url)) is None:
            target = self.urls[url] = httpx.URL(url)
        try:
            if stream:
                sent = await self._unless_caller_leaves(request, self.transport.handle_async_request(httpx.Request(
                    "POST", target, content=raw, headers=headers, extensions={"timeout": self.timeouts})))
                status, content = sent.status_code, b""
                if status >= 400:
                    content = await sent.aread()
                    await sent.aclose()
            else:
                status, answer_headers, content = await self._unless_caller_leaves(request, self.transport.exchange(
                    "POST", target, headers, raw, self.timeouts))
        except CallerLeft:  # before the provider answered (its own timeout, say): a timeout to the ledger
            await self.governor.timed_out(ticket)
            self._count(True)
            return Response(status_code=499)
        except asyncio.CancelledError:  # the gateway is stopping and its grace period is over
            await asyncio.shield(self.governor.fail(ticket))
            return error(Refused(503, "the gateway is shutting down; the call was not made", "api_error",
                                 "shutting_down"), kind)
        except httpx.ReadTimeout:  # sent, and no answer in time (Governor.timed_out says how it is recorded)
            await self.governor.timed_out(ticket)
            self._count(True)
            return error(Refused(504, f"provider {provider.name} did not answer in time", "api_error",
                                 "upstream_timeout"), kind)
        except httpx.TimeoutException:  # not sent: no connection, or the request not written in time
            return await self._provider_failed(ticket, kind, 504, f"provider {provider.name} did not answer in time")
        except httpx.RemoteProtocolError:
            return await self._provider_failed(ticket, kind, 502, f"provider {provider.name} broke off its answer")
        except httpx.TransportError as exc:
            return await self._provider_failed(ticket, kind, 502, f"provider {provider.name} cannot be reached "
                                                            f"({exc.__class__.__name__})")
        if status >= 400:
            if status >= 500:
                return await self._provider_failed(ticket, kind, 502, f"provider {provider.name} failed with HTTP "
                                                                f"{status}")
            await self.governor.fail(ticket)  # refused by the provider (a bad model, its own limits)
            self._count(True)
            kind_of = (sent.headers.get("content-type") if stream else _header(answer_headers, b"content-type"))
            return Response(content, status_code=status, headers=reply, media_type=kind_of or "application/json")
        if stream:
            return RelayResponse(self._relay(sent, ticket, kind), ticket, lambda: self._abandoned(sent, ticket),
                                 headers=reply, media_type="text/event-stream")
        try:
            data = json.loads(content)
        except ValueError:
            return await self._provider_failed(ticket, kind, 502,
                                               f"provider {provider.name} answered something not JSON")
        usage = usage_of(data) if isinstance(data, dict) else None
        await self.governor.finish(ticket, usage, estimated=usage is None)
        self._count(False)
        return Response(content, headers=reply, media_type="application/json")  # the provider's bytes, as sent

    @staticmethod
    async def _unless_caller_leaves(request: Request, upstream: Awaitable[T]) -> T:
        """The provider's answer, unless the caller hangs up first: then ``CallerLeft``, the
        call to the provider cancelled where it stood (a client's timeout must not find its call
        recorded as answered, nor its hold kept until the provider is done). One watching task:
        the call is awaited in place, so a cancelled one closes its connection as any other."""
        call = asyncio.current_task()
        assert call is not None
        left = False

        async def hang_up() -> None:
            nonlocal left
            try:
                while (await request.receive())["type"] != "http.disconnect":
                    pass
            except Exception:  # a server that cannot say: the answer is waited for
                return
            left = True
            call.cancel()

        watch = asyncio.ensure_future(hang_up())
        try:
            return await upstream
        except asyncio.CancelledError:
            if not left:
                raise
            call.uncancel()
            raise CallerLeft from None
        finally:
            watch.cancel()

    async def _provider_failed(self, ticket: Ticket, kind: str, status: int, message: str) -> Response:
        assert self.governor is not None
        await self.governor.fail(ticket)
        self._count(True)
        return error(Refused(status, message, "api_error", "upstream_timeout" if status == 504 else "upstream_error"),
                     kind)

    async def _relay(self, sent: httpx.Response, ticket: Ticket, kind: str = "chat") -> AsyncIterator[bytes]:
        """Pass the provider's SSE through line by line, reading usage and text on the way (and
        taking the usage out where the client did not ask for it); settle in any case: from the
        usage, or from what was received (estimated). A stream the provider broke off (or, for
        chat and messages, ended without its final event) ends with an error the SDKs raise."""
        assert self.governor is not None
        ticket.relaying = True  # from here the relay's own finally settles
        meter = StreamMeter(hide_usage=ticket.hide_usage)
        try:
            cut = False
            try:
                async for line in sent.aiter_lines():
                    if (passed := meter.feed(line)) is not None:
                        yield (passed + "\n").encode()
            except httpx.HTTPError:
                cut = True
            if cut or (not meter.complete and kind in ("chat", "messages")):
                yield stream_error(kind, f"provider {ticket.provider} broke off the stream; what arrived was "
                                         "billed as an estimate")
        finally:
            settled, estimated = meter.settlement(ticket)
            finish = asyncio.ensure_future(self._settle_stream(sent, ticket, settled, estimated))
            self.streams.add(finish)
            finish.add_done_callback(self.streams.discard)
            await asyncio.shield(finish)  # if the client left, the settlement goes on regardless

    async def _abandoned(self, sent: httpx.Response, ticket: Ticket) -> None:
        """A stream whose relay never began (the caller left at once): close the provider's
        answer and settle on the prompt alone, estimated, rather than leave the hold to its TTL."""
        await self._settle_stream(sent, ticket, Usage(input_tokens=ticket.input_estimate), True)

    async def _settle_stream(self, sent: httpx.Response, ticket: Ticket, usage: Usage, estimated: bool) -> None:
        """Settle a relayed stream; if that fails (the answer is sent, there is no one to tell),
        the failure is logged in one line and the hold released."""
        assert self.governor is not None
        try:
            await sent.aclose()
            await self.governor.finish(ticket, usage, estimated=estimated)
            self._count(False)
        except Exception as exc:
            log_failure(f"settling the stream {ticket.request_id}", exc)
            self._count(True)
            await self._abort(ticket)


def stream_error(kind: str, message: str) -> bytes:
    """An error event that ends a relayed stream, in the shape the client's SDK raises: Anthropic's
    ``event: error`` for the Messages API, OpenAI's ``error`` object otherwise. It begins with a
    blank line, which ends an event the provider left half sent."""
    if kind == "messages":
        body: dict[str, Any] = {"type": "error", "error": {"type": "api_error", "message": message}}
        return f"\nevent: error\ndata: {json.dumps(body)}\n\n".encode()
    failure = Refused(502, message, "api_error", "upstream_stream_cut")
    return f"\ndata: {json.dumps(failure.body())}\n\n".encode()


class RelayResponse(StreamingResponse):
    """A relayed stream that is settled even if its relay never starts: Starlette does not run
    a generator's ``finally`` when the response is cut before the first chunk."""

    def __init__(self, content: AsyncIterator[bytes], ticket: Ticket, abandoned: Callable[[], Any],
                 **options: Any) -> None:
        super().__init__(content, **options)
        self.ticket, self.abandoned = ticket, abandoned

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.ticket.settled and not self.ticket.relaying:
                await asyncio.shield(self.abandoned())


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """What a connection may send and how long it may take before the gateway reads a request
    (``budgeteer gateway`` flags; README: "Limits"). Checked before any token is."""

    header_bytes: int = 64 * 1024  # the request line and headers (--max-header-bytes): 431 beyond
    headers: int = 100  # header fields (--max-headers): 431 beyond
    header_timeout_s: float = 10.0  # from a request's first byte (a new connection: its opening) to its
    # last header (--header-timeout): 408, or a silent close when nothing was sent
    keep_alive_s: float = 75.0  # an idle connection between requests (--keep-alive): closed


LINGER_S = 2.0  # a refused connection's close waits this long for the client to read the answer


class _TooManyHeaders(Exception):
    pass


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with a request's head bounded by ``limits`` (its size, its
    number of headers, the time it takes to arrive): httptools, uvicorn's fast parser, bounds
    none of them. Its data_received is uvicorn's own with the limits
    added (uvicorn's version is pinned in pyproject: this reads its protocol's internals)."""

    limits: ClassVar[HttpLimits] = HttpLimits()

    @classmethod
    def with_limits(cls, limits: HttpLimits) -> type[GatewayHttpProtocol]:
        return type(cls.__name__, (cls,), {"limits": limits})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.limits.keep_alive_s  # type: ignore[assignment]
        self._in_head = True  # reading a request's head (or waiting for one)
        self._head_bytes = 0
        self._header_count = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused or self.transport.is_closing():
            return
        if not self._in_head:
            self._feed(data)
            return
        if self._head_timer is None:  # the first byte of a request on a kept-alive connection
            self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)
        room = self.limits.header_bytes - self._head_bytes
        self._head_bytes += min(len(data), room)
        if len(data) <= room:
            self._feed(data)
            return
        self._feed(data[:room])  # the head may end within the limit, the body following in the same read
        if self._refused or self.transport.is_closing():
            return
        if self._in_head:
            self._refuse(431, "request_header_fields_too_large",
                         f"the request's headers are larger than the gateway's limit of {self.limits.header_bytes:,} "
                         "bytes")
        else:
            self._feed(data[room:])

    def _feed(self, data: bytes) -> None:
        """uvicorn's data_received, with 431 for too many headers and 400 in OpenAI's shape."""
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            if self._header_count > self.limits.headers:
                self._refuse(431, "request_header_fields_too_large",
                             f"the request has more than the gateway's limit of {self.limits.headers} headers")
            else:
                self._refuse(400, "invalid_http", "the request is not valid HTTP/1.1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.headers:
            raise _TooManyHeaders  # stops the parser (HttpParserError), answered in _feed
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._stop_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes, self._header_count = True, 0, 0

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._refused or self.transport.is_closing() or not self._in_head:
            return
        if self.cycle is not None and not self.cycle.response_complete:  # a pipelined head: its turn comes
            self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)
        elif self._head_bytes:
            self._refuse(408, "request_timeout", "the request's headers did not arrive within "
                                                 f"{self.limits.header_timeout_s:g} s")
        else:  # a connection that never sent a request: closed, as an idle one is
            self.transport.close()

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer in OpenAI's error shape and close the connection: our side at once, the whole
        of it after LINGER_S, what the client still sends read and dropped meanwhile (closed
        with unread data, a socket is reset, and the client may lose the answer)."""
        body = json.dumps(Refused(status, message, "invalid_request_error", code).body()).encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, HTTPStatus(status).phrase.encode(),
                                                                  len(body), body))
        self._refused = True
        self._stop_head_timer()
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()


def create_app(db: Path | str, **options: Any) -> Gateway:
    """The gateway as an ASGI application (``app.app`` is its Starlette part)."""
    return Gateway(db, **options)
