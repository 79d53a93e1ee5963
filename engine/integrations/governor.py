"""One governed model call, the same for the gateway and the in-process transport:

1. rate limits (the token's rpm and tpm, sliding window);
2. routing (the chat request is scored; ``enforced`` rewrites the model);
3. authorize: a hold of the call's worst case on every policy, all or none;
4. (the caller forwards the call to the provider);
5. settle from the usage the provider reported, or an estimate marked as such when a
   stream was cut off; a call that failed releases its hold (recorded as an error for
   the provider's health).

Refusals are ``Refused`` with the HTTP status and OpenAI-shaped error body the gateway
sends, and the transport turns into a response the SDKs raise as theirs; ``refusal_of`` makes
one of any other Budgeteer error (bad input, a refused token, a ledger refusing writes...).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from engine import errors
from engine import providers as prov
from engine.budgets import DEFAULT_MAX_OUTPUT_TOKENS, Authorization, HoldError
from engine.integrations.contract import MAX_TOKENS
from engine.ledger import changes
from engine.models import FieldError, Usage, UsageEvent, unique_hex
from engine.money import format_usd_plain
from engine.pricing import estimate_message_tokens, estimate_tokens, prompt_bound
from engine.ratelimits import Limit, RateLimiter
from engine.services.calls import RETRY_AFTER_S, CallRequest

if TYPE_CHECKING:
    from engine.engine import Engine

log = logging.getLogger("budgeteer")

KINDS = ("chat", "embeddings", "responses")


class Refused(errors.Refused):
    """A call Budgeteer will not make, as its HTTP answer: the status (``http_status``), and
    OpenAI's error shape."""

    def __init__(self, status: int, message: str, type_: str, code: str | None = None, param: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.http_status, self.message, self.type, self.param = status, message, type_, param
        self.code = code  # type: ignore[assignment]  # OpenAI's bodies may have none
        self.headers = dict(headers or {})

    @property
    def status(self) -> int:
        return self.http_status

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict[str, Any]:
        """The same refusal in Anthropic's error shape (its type from the status, as Anthropic's)."""
        kind = ANTHROPIC_ERRORS.get(self.status, "api_error" if self.status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}


ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                    429: "rate_limit_error", 504: "timeout_error"}


#: OpenAI's error type by status, where it is not ``invalid_request_error`` (``api_error`` from 500).
OPENAI_ERRORS = {403: "permission_error", 429: "rate_limit_error"}


def refusal_of(exc: errors.BudgeteerError) -> Refused:
    """Any Budgeteer error as the answer the gateway and the governed transport send: its
    ``http_status``, its sentence as the message, its ``code``, the field it names as the
    ``param``, OpenAI's error type for the status; a ledger that cannot take the call asks for a
    retry (``ledger_unavailable``)."""
    if isinstance(exc, Refused):
        return exc
    if isinstance(exc, errors.LedgerUnavailable):
        return ledger_unavailable(str(exc))
    status = exc.http_status
    kind = "api_error" if status >= 500 else OPENAI_ERRORS.get(status, "invalid_request_error")
    return Refused(status, str(exc), kind, exc.code, getattr(exc, "field", None))


def ledger_unavailable(reason: str) -> Refused:
    """503 while the ledger refuses writes: the call was not made, and may be tried again."""
    return Refused(503, f"the ledger refuses writes for now ({reason}); the call was not made, retry after "
                        f"{RETRY_AFTER_S} s", "api_error", "ledger_unavailable", None,
                   {"retry-after": str(RETRY_AFTER_S)})


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling, as the budgets and rate limits see it."""

    principal: str
    team: str = ""
    workspace: str = "default"
    token_id: str = ""
    session: str = ""
    agent: str = ""
    rpm: int | None = None
    tpm: int | None = None


@dataclass
class Ticket:
    """A call under way: what was authorized, where it goes, what it was estimated at."""

    request_id: str
    caller: Caller
    kind: str
    requested_model: str
    model: str
    provider: str
    hold_id: str | None
    input_estimate: int
    max_output: int
    started: float = field(default_factory=time.perf_counter)
    headers: dict[str, str] = field(default_factory=dict)  # x-budget-* for the response
    settled: bool = False
    relaying: bool = False  # a stream's relay has begun (and will settle it)
    hide_usage: bool = False  # a chat stream whose client did not ask for usage: it is taken out on the way back


def request_tokens(kind: str, body: Mapping[str, Any]) -> tuple[int, int | None]:
    """(estimated input tokens, the output cap the request sets); a FieldError names a bad
    field. The estimate is for routing, rate limits and a settlement the provider gave no usage
    for; the hold bounds the input with ``prompt_bound``, the output with the cap times ``n``."""
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise FieldError("messages", "must be a non-empty list of message objects")
        tokens = estimate_message_tokens(messages)
    elif kind == "embeddings":
        value = body.get("input")
        if isinstance(value, str):
            tokens = estimate_tokens(value)
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            tokens = sum(estimate_tokens(v) for v in value)
        elif isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            tokens = len(value)
        else:
            raise FieldError("input", "must be a string or a non-empty list of strings")
        return tokens, 0
    else:
        value = body.get("input")
        if isinstance(value, str):
            tokens = estimate_tokens(value)
        elif isinstance(value, list):
            tokens = estimate_message_tokens([v for v in value if isinstance(v, dict)]) or 1
        else:
            raise FieldError("input", "must be a string or a list of input items")
    cap = body.get("max_completion_tokens", body.get("max_tokens", body.get("max_output_tokens")))
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or not 0 < cap <= MAX_TOKENS):
        raise FieldError("max_tokens", f"must be a positive integer, at most {MAX_TOKENS:,}")
    return tokens, cap


def usage_of(payload: Mapping[str, Any]) -> Usage | None:
    """The usage a provider reported, in the ledger's shape: OpenAI chat (prompt/completion
    tokens and their details), the Responses API and embeddings (input/output tokens), and
    Anthropic (input, cache read and cache creation input tokens added up, the one-hour part
    of the cache writes from ``cache_creation.ephemeral_1h_input_tokens``, and the thinking
    part of the output from ``output_tokens_details.thinking_tokens`` as reasoning)."""
    raw = payload.get("usage")
    if not isinstance(raw, Mapping):
        return None

    def num(mapping: Any, key: str) -> int:
        value = mapping.get(key) if isinstance(mapping, Mapping) else None
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else 0

    if "prompt_tokens" in raw or "completion_tokens" in raw:
        details = raw.get("prompt_tokens_details")
        out_details = raw.get("completion_tokens_details")
        return Usage(input_tokens=num(raw, "prompt_tokens"), cached_input_tokens=num(details, "cached_tokens"),
                     output_tokens=num(raw, "completion_tokens"),
                     reasoning_tokens=num(out_details, "reasoning_tokens"))
    out_details = raw.get("output_tokens_details")
    output = num(raw, "output_tokens")
    if "cache_read_input_tokens" in raw or "cache_creation_input_tokens" in raw or "cache_creation" in raw:
        ttl = raw.get("cache_creation")  # Anthropic: the writes by cache lifetime
        read, one_hour = num(raw, "cache_read_input_tokens"), num(ttl, "ephemeral_1h_input_tokens")
        write = max(num(raw, "cache_creation_input_tokens"), num(ttl, "ephemeral_5m_input_tokens") + one_hour)
        return Usage(input_tokens=num(raw, "input_tokens") + read + write, cached_input_tokens=read,
                     cache_write_tokens=write, cache_write_1h_tokens=one_hour, output_tokens=output,
                     reasoning_tokens=min(output, num(out_details, "thinking_tokens")))
    details = raw.get("input_tokens_details")
    reasoning = num(out_details, "reasoning_tokens") or num(out_details, "thinking_tokens")
    return Usage(input_tokens=num(raw, "input_tokens"), cached_input_tokens=num(details, "cached_tokens"),
                 output_tokens=output, reasoning_tokens=min(output, reasoning))


def ask_usage(ticket: Ticket, body: Mapping[str, Any]) -> dict[str, Any]:
    """The ``stream_options`` of an OpenAI chat stream as sent upstream: usage always asked for
    (the ledger settles from it); the ticket remembers whether the client asked for it too,
    else the meter takes it out of the stream on the way back (``StreamMeter(hide_usage)``)."""
    options = body.get("stream_options")
    options = dict(options) if isinstance(options, Mapping) else {}
    ticket.hide_usage = options.get("include_usage") is not True
    options["include_usage"] = True
    return options


class Governor:
    """Begin, then finish or fail, each call; tracks the calls under way so a shutdown can
    release what it cannot settle."""

    def __init__(self, engine: Engine, *, routing_mode: str = "suggest", limiter: RateLimiter | None = None,
                 resolve_providers: bool = True) -> None:
        self.engine = engine
        self.routing_mode = routing_mode
        self.limiter = limiter or RateLimiter()
        self.resolve_providers = resolve_providers
        self.open: dict[str, Ticket] = {}
        self._providers: tuple[float, list[prov.Provider]] | None = None
        self._served: tuple[list[prov.Provider], dict[str, list[prov.Provider]]] | None = None
        self.requests = 0
        self.errors = 0
        self._providers_dropped = 0  # how often a change emptied _providers
        engine.spill.reserve()  # room for settlements the ledger may refuse on a full disk
        engine.on_change(self._ledger_changed)

    def _ledger_changed(self, kind: str) -> None:
        """A provider or price changed (PostgreSQL's notifications, ``Engine.on_change``): the
        providers, and the models each serves, are read again at the next call."""
        if kind in (changes.PROVIDER, changes.PRICE, changes.ANY):
            self._providers = None
            self._providers_dropped += 1

    async def registered(self, max_age_s: float = 5.0) -> list[prov.Provider]:
        """The registered providers, read again every few seconds (another process may add one;
        on PostgreSQL its notification drops them at once)."""
        if self._providers is None or time.monotonic() - self._providers[0] > max_age_s:
            dropped = self._providers_dropped
            read = (time.monotonic(), await self.engine.providers())
            if dropped != self._providers_dropped:  # read before a change it may not show: used, not kept
                return read[1]
            self._providers = read
        return self._providers[1]

    async def served(self) -> dict[str, list[prov.Provider]]:
        """Each model served -> its enabled registered providers (``providers.served``), built
        again when the registered providers are read again."""
        registered = await self.registered()
        if self._served is None or self._served[0] is not registered:
            self._served = (registered, prov.served(self.engine.prices.models(self.engine.now_ms()), registered))
        return self._served[1]

    async def provider_for(self, model: str, kind: str | None = None) -> prov.Provider | None:
        """The first enabled registered provider (of ``kind``, if given) serving the model."""
        for provider in (await self.served()).get(model, ()):
            if kind in (None, provider.kind):
                return provider
        return None

    def _rate_limits(self, caller: Caller, tokens: int) -> list[Limit]:
        key = caller.token_id or caller.principal
        limits = []
        if caller.rpm:
            limits.append(Limit(f"token:{key}", "requests", caller.rpm, 1))
        if caller.tpm:
            limits.append(Limit(f"token:{key}", "tokens", caller.tpm, tokens))
        return limits

    async def begin(self, caller: Caller, kind: str, body: Mapping[str, Any], *, provider: str = "",
                    route: bool = True, provider_kind: str | None = None) -> tuple[Ticket, prov.Provider | None]:
        """Rate limits, routing, authorization; the ticket and the provider to forward to
        (None when ``resolve_providers`` is off: the caller knows where the call goes). A call
        not made raises a Budgeteer error: ``refusal_of`` is its answer."""
        self.requests += 1
        started = time.perf_counter()
        model = body.get("model")
        if not isinstance(model, str) or not model.strip():
            raise FieldError("model", "is required and must be a string")
        tokens, cap = request_tokens(kind, body)
        if self.engine.refusing is not None and not self.engine.admits_while_down:
            raise ledger_unavailable(self.engine.refusing)
        choices = body.get("n")
        choices = choices if isinstance(choices, int) and not isinstance(choices, bool) and choices > 1 else 1
        output = choices * (cap if cap is not None else (0 if kind == "embeddings" else DEFAULT_MAX_OUTPUT_TOKENS))
        now = self.engine.now_ms()
        limits = self._rate_limits(caller, tokens + output)
        rate_headers: dict[str, str] = {}
        if limits:
            verdict = self.limiter.take(limits, now)
            rate_headers = verdict.headers
            if not verdict.allowed:
                what = verdict.limit.kind if verdict.limit else "requests"
                raise Refused(429, f"rate limit reached: {what} per minute for this token", "rate_limit_error",
                              "rate_limit_exceeded", None, rate_headers)
        request_id = "bgt-" + unique_hex()
        applied = model
        if route and kind == "chat" and self.routing_mode in ("suggest", "dry_run", "enforced"):
            decision = await self.engine.route(body, principal=caller.principal, model=model,
                                               mode=self.routing_mode, team=caller.team,
                                               workspace=caller.workspace, token_id=caller.token_id,
                                               session=caller.session, agent=caller.agent, max_tokens=cap,
                                               request_id=request_id, input_tokens=tokens)
            applied = decision.applied
        target = await self.provider_for(applied, provider_kind) if self.resolve_providers else None
        if self.resolve_providers and target is None:
            if applied != model and (target := await self.provider_for(model, provider_kind)) is not None:
                applied = model  # routing chose a model no provider serves: the requested one goes
            else:
                raise Refused(404, f"The model `{model}` is not served by any registered provider",
                              "invalid_request_error", "model_not_found", "model")
        auth = await self.engine.authorize(CallRequest(  # a ledger refusing writes: LedgerRefusing, a 503
            principal=caller.principal, model=applied, provider=target.name if target else provider,
            team=caller.team, workspace=caller.workspace, token_id=caller.token_id, session=caller.session,
            agent=caller.agent, input_tokens=prompt_bound(body), max_tokens=cap,  # no cap: the model's most
            choices=choices, request_id=request_id))
        if not auth.allowed:
            refusal = self._budget_refusal(auth)
            await self._record_refusal(caller, request_id, model, applied, target.name if target else provider, auth,
                                       started)
            raise refusal
        try:
            if auth.model and auth.model != applied:  # a downgrade policy moved the call
                applied = auth.model
                if self.resolve_providers:
                    target = await self.provider_for(applied) or target
            ticket = Ticket(request_id, caller, kind, model, applied, target.name if target else provider,
                            auth.hold_id, tokens, output, headers={**rate_headers, **budget_headers(auth)})
        except BaseException:  # held, and no ticket to release it by: released here
            if auth.hold_id:
                await asyncio.shield(self.engine.release(auth.hold_id))
            raise
        self.open[request_id] = ticket
        return ticket, target

    async def _record_refusal(self, caller: Caller, request_id: str, requested: str, model: str, provider: str,
                              auth: Authorization, started: float) -> None:
        """A call a budget refused, in the ledger as a blocked event: no tokens, no cost, and in
        its tags the policy that decided (what the dashboard's Calls screen shows as the reason).
        Written, or spilled like a settlement; a write that fails otherwise is said, and the
        caller is refused all the same."""
        deciding = auth.evaluation.deciding
        tags = {"policy": deciding.policy.id, "policy_name": deciding.policy.name} if deciding else {}
        if auth.override_request_id:
            tags["override_request"] = auth.override_request_id
        if requested != model:
            tags["requested_model"] = requested
        event = UsageEvent(
            ts_ms=self.engine.now_ms(), request_id=request_id, provider=provider, model=model,
            workspace=caller.workspace, team=caller.team, principal=caller.principal, token_id=caller.token_id,
            session=caller.session, agent=caller.agent, cost_nanos=0, cost_source="computed",
            latency_ms=round((time.perf_counter() - started) * 1000), status="blocked", tags=tags)
        try:
            await self.engine.settle_call(None, event)
        except Exception as exc:
            log.warning("the blocked call %s was not recorded: %s", request_id, exc)

    def _budget_refusal(self, auth: Authorization) -> Refused:
        deciding = auth.evaluation.deciding
        name = f"{deciding.policy.name} ({deciding.policy.id})" if deciding else "a budget"
        if auth.override_request_id:
            return Refused(402, f"Budget exceeded: {name}. Approval required: override request "
                                f"{auth.override_request_id} is pending.", "budget_exceeded", "approval_required",
                           None, {"x-budget-policy": deciding.policy.id if deciding else "",
                                  "x-budget-override-request": auth.override_request_id,
                                  "x-budgeteer-request-id": auth.request_id})
        return Refused(402, f"Budget exceeded: {name}. {deciding.message if deciding else ''}".strip(),
                       "budget_exceeded", "budget_exceeded", None,
                       {"x-budget-policy": deciding.policy.id if deciding else "",
                        "x-budgeteer-request-id": auth.request_id})  # the blocked call's id in the ledger

    async def finish(self, ticket: Ticket, usage: Usage | None, *, estimated: bool = False,
                     status: str = "ok") -> None:
        """Settle the call: the provider's usage; None (pass ``estimated``) settles on the
        prompt's estimate."""
        if ticket.settled:
            return
        ticket.settled = True
        self.open.pop(ticket.request_id, None)
        if status != "ok":
            self.errors += 1
        used = usage or Usage(input_tokens=ticket.input_estimate)
        event = UsageEvent(
            ts_ms=self.engine.now_ms(), request_id=ticket.request_id, provider=ticket.provider, model=ticket.model,
            workspace=ticket.caller.workspace, team=ticket.caller.team, principal=ticket.caller.principal,
            token_id=ticket.caller.token_id, session=ticket.caller.session, agent=ticket.caller.agent,
            input_tokens=used.input_tokens, cached_input_tokens=used.cached_input_tokens,
            cache_write_tokens=used.cache_write_tokens, cache_write_1h_tokens=used.cache_write_1h_tokens,
            output_tokens=used.output_tokens,
            reasoning_tokens=used.reasoning_tokens, latency_ms=round((time.perf_counter() - ticket.started) * 1000),
            status=status, cost_source="estimated" if estimated else "computed",
            tags={"requested_model": ticket.requested_model} if ticket.requested_model != ticket.model else {})
        # Written, or spilled if the ledger refuses it: the call was answered, it is never lost.
        await self.engine.settle_call(ticket.hold_id, event)
        limits = self._rate_limits(ticket.caller, 0)
        if any(limit.kind == "tokens" for limit in limits):
            actual = used.input_tokens + used.output_tokens
            self.limiter.adjust(f"token:{ticket.caller.token_id or ticket.caller.principal}", "tokens",
                                actual - ticket.input_estimate - ticket.max_output, self.engine.now_ms())

    async def fail(self, ticket: Ticket) -> None:
        """The provider failed: nothing was used; the hold goes back, the failure counts for health."""
        await self.finish(ticket, Usage(), status="error")

    async def timed_out(self, ticket: Ticket) -> None:
        """The provider had the call and no answer came in time (its own timeout, or the caller
        stopped waiting): an error, since the caller got none; the prompt, which the provider
        received and may have billed, settled as an estimate (what it generated is unknown).
        The gateway and the transport both record a timeout so."""
        await self.finish(ticket, None, estimated=True, status="error")

    async def abort(self, ticket: Ticket) -> None:
        """Something unexpected stopped the call: nothing is recorded, and its hold goes back
        if it is still open (a settlement that failed leaves it so)."""
        self.open.pop(ticket.request_id, None)
        if not ticket.settled:
            self.errors += 1
        ticket.settled = True
        if ticket.hold_id:
            try:
                await self.engine.release(ticket.hold_id)
            except HoldError:  # settled or released before the failure
                pass

    async def release_all(self) -> int:
        """At shutdown: release the holds of calls still under way; how many there were. A hold
        closed already (expired under a call longer than its time to live) has nothing to give back."""
        tickets = list(self.open.values())
        for ticket in tickets:
            ticket.settled = True
            self.open.pop(ticket.request_id, None)
            if ticket.hold_id:
                with contextlib.suppress(HoldError):
                    await self.engine.settle_call(ticket.hold_id, None)
        return len(tickets)


def budget_headers(auth: Authorization) -> dict[str, str]:
    """The remaining budget of the tightest policy the call was held against."""
    tightest = None
    for o in auth.evaluation.outcomes:
        remaining = o.policy.hard - o.consumed - o.held - o.cost
        if tightest is None or remaining < tightest[0]:
            tightest = (remaining, o)
    if tightest is None:
        return {}
    remaining, o = tightest
    value = format_usd_plain(max(0, remaining)) if o.policy.metric == "usd" else str(max(0, remaining))
    return {"x-budget-policy": o.policy.id, "x-budget-remaining": value, "x-budget-metric": o.policy.metric}


class StreamMeter:
    """Reads a provider's server-sent events as they pass: the usage it reports (OpenAI's last
    chunk, the Responses API's ``response.completed``, Anthropic's ``message_start`` and
    ``message_delta``), the text received, and whether the stream ended properly.

    With ``hide_usage`` (a chat stream whose client did not ask for usage) it also says what
    to pass on: an OpenAI chunk carrying usage and no choices is dropped, one carrying usage
    beside its choices goes on without the usage; everything else goes on as it came."""

    def __init__(self, hide_usage: bool = False) -> None:
        self.usage: Usage | None = None
        self.text: list[str] = []
        self.complete = False
        self.hide_usage = hide_usage
        self._pending = b""

    def feed_bytes(self, data: bytes) -> None:
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            self.feed(line.decode("utf-8", errors="replace").rstrip("\r"))

    def pass_bytes(self, data: bytes) -> bytes:
        """Feed ``data``; the bytes to pass on: ``data`` itself, or with ``hide_usage`` its
        complete lines with the usage taken out (a line is held until its end arrives)."""
        if not self.hide_usage:
            self.feed_bytes(data)
            return data
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        return b"".join(self._pass(line) for line in lines)

    def end(self) -> bytes:
        """At the stream's end: read a last line that had no line break; what to pass on of it."""
        rest, self._pending = self._pending, b""
        if not rest:
            return b""
        passed = self._pass(rest)
        return passed[:-1] if self.hide_usage else b""  # without the hidden case, it went on already

    def _pass(self, raw: bytes) -> bytes:
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        kept = self.feed(line)
        if kept is None:
            return b""
        return raw + b"\n" if kept == line else kept.encode() + b"\n"

    def feed(self, line: str) -> str | None:
        """Read one line of the stream (without its line break); the line to pass on: as it
        came, rewritten without its usage, or None to drop it (only with ``hide_usage``)."""
        if not line.startswith("data:"):
            return line
        payload = line[5:].strip()
        if payload == "[DONE]":
            self.complete = True
            return line
        try:
            chunk = json.loads(payload)
        except ValueError:
            return line
        if not isinstance(chunk, dict):
            return line
        kind = chunk.get("type")
        if kind == "message_start" and isinstance(chunk.get("message"), dict):  # Anthropic
            self.usage = usage_of(chunk["message"])
        elif (kind == "message_delta" and isinstance(chunk.get("usage"), dict)
              and isinstance(chunk["usage"].get("output_tokens"), int)):
            # Cumulative counts: the output and its thinking part, the input ones when sent again;
            # the one-hour part of the cache writes comes only in message_start.
            base = self.usage or Usage()
            raw = {"input_tokens": base.input_tokens - base.cached_input_tokens - base.cache_write_tokens,
                   "cache_read_input_tokens": base.cached_input_tokens,
                   "cache_creation_input_tokens": base.cache_write_tokens,
                   **{k: v for k, v in chunk["usage"].items() if v is not None}}
            if (now := usage_of({"usage": raw})) is not None:
                self.usage = replace(
                    now, cache_write_1h_tokens=min(base.cache_write_1h_tokens, now.cache_write_tokens),
                    reasoning_tokens=now.reasoning_tokens or min(base.reasoning_tokens, now.output_tokens))
        elif kind == "message_stop":
            self.complete = True
        elif kind == "response.completed" and isinstance(chunk.get("response"), dict):
            self.usage = usage_of(chunk["response"]) or self.usage
            self.complete = True
        elif kind is None and (found := usage_of(chunk)) is not None:
            self.usage = found
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():  # a provider's garbage passes unread
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                self.text.append(delta["content"])
        delta = chunk.get("delta")
        if isinstance(delta, str):
            self.text.append(delta)
        elif isinstance(delta, dict) and isinstance(delta.get("text"), str):
            self.text.append(delta["text"])
        elif isinstance(delta, dict) and isinstance(delta.get("thinking"), str):  # output all the same
            self.text.append(delta["thinking"])
        if self.hide_usage and "choices" in chunk and chunk.get("usage") is not None:
            if not chunk["choices"]:
                return None
            return "data: " + json.dumps({k: v for k, v in chunk.items() if k != "usage"})
        return line

    def settlement(self, ticket: Ticket) -> tuple[Usage, bool]:
        """(usage, estimated): the reported usage of a complete stream, else an estimate from
        the prompt and the text received (never nothing)."""
        if self.complete and self.usage is not None:
            return self.usage, False
        received = estimate_tokens("".join(self.text)) if self.text else 0
        base = self.usage or Usage(input_tokens=ticket.input_estimate)
        return replace(base, input_tokens=base.input_tokens or ticket.input_estimate,
                       output_tokens=max(base.output_tokens, received)), True
