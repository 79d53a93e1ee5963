"""Providers: the registry of where calls go, the model catalog they serve, connection
tests, and health read from the ledger with a circuit breaker.

A provider is a name, a kind (``openai-compatible`` or ``anthropic``), a base URL and a
credential *reference* (``vault:openai-prod``); the key stays in the vault. Its models are
the price table's models of its vendor (``openai``, ``anthropic``, ``gemini``, ``mistral``)
or an explicit list. Each model carries its price, capabilities and two tiers derived from
the price table:

- cost tier 1-4 from the blended price of a typical call (3 input tokens to 1 output):
  under $0.50 per million tokens is 1, under $2 is 2, under $6 is 3, else 4;
- latency tier: ``fast`` for tiers 1-2 without reasoning, ``slow`` for reasoning models of
  tier 3-4, else ``medium``.

Health comes from the ledger's own calls: error rate, mean latency and p95 per provider and
model over the last N minutes, kept in memory by a ``HealthBook`` (loaded once, then only the
new events are added). The breaker opens when, over that span, at least
``BREAKER_MIN_CALLS`` calls were made and ``BREAKER_ERROR_RATE`` or more failed; after
``BREAKER_COOL_DOWN_MS`` it is half-open, and one successful probe closes it again.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

import httpx

from engine.models import FieldError
from engine.pricing import ModelPrice

if TYPE_CHECKING:
    from engine.ledger import LedgerView

KINDS: Final = ("openai-compatible", "anthropic")
VENDORS: Final = ("openai", "anthropic", "gemini", "mistral")
CAPABILITIES: Final = ("tools", "json", "vision", "reasoning")
_CAPABILITY_FLAGS: Final = {"tools": "function_calling", "json": "response_schema", "vision": "vision",
                            "reasoning": "reasoning"}
TIER_LIMITS_NANOS_PER_M: Final = (500_000_000, 2_000_000_000, 6_000_000_000)  # $0.50, $2, $6 per 1M tokens
HEALTH_WINDOW_MS: Final = 15 * 60_000
BREAKER_MIN_CALLS: Final = 5
BREAKER_ERROR_RATE: Final = 0.5
BREAKER_COOL_DOWN_MS: Final = 60_000
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_DATED = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")

ConnectionState = Literal["ok", "auth_failed", "rate_limited", "unreachable", "timeout", "unexpected_response"]
BreakerState = Literal["closed", "open", "half_open"]


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    kind: str
    base_url: str
    credential: str  # a vault reference, "" for none (a local server)
    vendor: str
    models: tuple[str, ...]
    enabled: bool
    created_ms: int
    created_by: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "base_url": self.base_url, "credential": self.credential,
                "vendor": self.vendor, "models": list(self.models), "enabled": self.enabled,
                "created_ms": self.created_ms, "created_by": self.created_by}


@dataclass(frozen=True, slots=True)
class CatalogModel:
    model: str
    provider: str  # the registered provider serving it, or the price table's vendor
    price: ModelPrice
    capabilities: frozenset[str]
    context: int
    cost_tier: int
    latency_tier: str

    @property
    def blended_nanos_per_m(self) -> int:
        return blended(self.price)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "provider": self.provider, "capabilities": sorted(self.capabilities),
                "context": self.context, "cost_tier": self.cost_tier, "latency_tier": self.latency_tier,
                "input_per_m_nanos": self.price.input, "output_per_m_nanos": self.price.output}


@dataclass(frozen=True, slots=True)
class Health:
    provider: str
    model: str  # "" for the provider as a whole
    calls: int
    errors: int
    mean_latency_ms: int
    p95_latency_ms: int

    @property
    def error_rate(self) -> float:
        return self.errors / self.calls if self.calls else 0.0


@dataclass(frozen=True, slots=True)
class Breaker:
    provider: str
    state: BreakerState
    since_ms: int
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionResult:
    provider: str
    state: ConnectionState
    latency_ms: int
    detail: str
    models: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"provider": self.provider, "state": self.state, "latency_ms": self.latency_ms,
                "detail": self.detail, "models": self.models}


# ----------------------------------------------------------------------------- registry

def build_provider(*, name: str, kind: str, base_url: str, credential: str = "", vendor: str = "",
                   models: list[str] | tuple[str, ...] = (), enabled: bool = True, now_ms: int,
                   actor: str) -> Provider:
    """A provider from what a person typed; a FieldError names what is wrong."""
    name = name.strip().lower()
    if not NAME.match(name):
        raise FieldError("name", f"must be 1-64 lower-case letters, digits, '.', '_' or '-' (got {name!r})")
    kind = {"openai": "openai-compatible"}.get(kind.strip().lower(), kind.strip().lower())
    if kind not in KINDS:
        raise FieldError("kind", f"must be openai-compatible (or openai) or anthropic, not {kind!r}")
    url = base_url.strip().rstrip("/")
    try:
        parsed = httpx.URL(url)
    except Exception as exc:
        raise FieldError("base-url", f"is not a URL ({exc})") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise FieldError("base-url", f"must be an http:// or https:// URL with a host, not {base_url!r}")
    if parsed.userinfo:
        raise FieldError("base-url", "must not carry a user or password; keep the key in the vault (--credential)")
    ref = credential.strip()
    if ref:
        if not ref.startswith("vault:"):
            raise FieldError("credential", f"must be a vault reference like vault:{name}, never a key itself")
        from engine.vault import parse_ref

        ref = "vault:" + parse_ref(ref)
    vendor = vendor.strip().lower() or ("anthropic" if kind == "anthropic" else name if name in VENDORS else "")
    if vendor and vendor not in VENDORS:
        raise FieldError("vendor", f"must be one of {', '.join(VENDORS)} (or empty with --models), not {vendor!r}")
    chosen = tuple(dict.fromkeys(m.strip() for m in models if m.strip()))
    return Provider(name, kind, url, ref, vendor, chosen, enabled, now_ms, actor)


def add(ledger: LedgerView, provider: Provider) -> None:
    if ledger.providers.exists(provider.name):
        raise FieldError("name", f"a provider named {provider.name} exists; remove it first")
    ledger.providers.insert(provider)


def get(ledger: LedgerView, name: str) -> Provider:
    provider = ledger.providers.get(name.strip().lower())
    if provider is None:
        raise FieldError("provider", f"no provider named {name!r}")
    return provider


def remove(ledger: LedgerView, name: str) -> Provider:
    provider = get(ledger, name)
    ledger.providers.remove(provider.name)
    return provider


def listing(ledger: LedgerView) -> list[Provider]:
    return ledger.providers.listing()


# ----------------------------------------------------------------------------- catalog

def blended(price: ModelPrice) -> int:
    """Nano-dollars per million tokens of a typical call: three input tokens to one output."""
    return (3 * price.input + price.output) // 4


def cost_tier(price: ModelPrice) -> int:
    value = blended(price)
    return 1 + sum(value >= limit for limit in TIER_LIMITS_NANOS_PER_M)


def capabilities(price: ModelPrice) -> frozenset[str]:
    return frozenset(c for c, flag in _CAPABILITY_FLAGS.items() if flag in price.capabilities)


def latency_tier(price: ModelPrice) -> str:
    tier, caps = cost_tier(price), capabilities(price)
    if tier <= 2 and "reasoning" not in caps:
        return "fast"
    if tier >= 3 and "reasoning" in caps:
        return "slow"
    return "medium"


def catalog(prices: list[ModelPrice], registered: list[Provider]) -> list[CatalogModel]:
    """The chat models calls can go to: those of the enabled registered providers, or, with
    none registered, every chat model of the price table. Dated snapshots are left out
    where their undated name is listed."""
    chat = [p for p in prices if p.mode == "chat"]
    names = {p.model for p in chat}
    chat = [p for p in chat if not (_DATED.search(p.model) and _DATED.sub("", p.model) in names)]
    by_name = {p.model: p for p in chat}
    out: list[CatalogModel] = []

    def entry(price: ModelPrice, provider: str) -> CatalogModel:
        return CatalogModel(price.model, provider, price, capabilities(price), price.max_input_tokens or 0,
                            cost_tier(price), latency_tier(price))

    if not registered:
        return sorted((entry(p, p.provider) for p in chat), key=lambda m: (blended(m.price), m.model))
    for provider in registered:
        if not provider.enabled:
            continue
        served = [by_name[m] for m in provider.models if m in by_name] if provider.models else \
            [p for p in chat if p.provider == provider.vendor]
        out.extend(entry(p, provider.name) for p in served)
    return sorted(out, key=lambda m: (blended(m.price), m.model, m.provider))


def served(prices: list[ModelPrice], registered: list[Provider]) -> dict[str, list[Provider]]:
    """What the gateway serves: each model name -> the enabled registered providers serving it,
    in name order. A provider serves its explicit list (``--models``, priced or not), else every
    model of its vendor in the price table under the table's name: chat and embeddings alike,
    dated snapshots included (``gpt-4o-2024-08-06``). Unlike ``catalog`` (what routing chooses
    among), nothing is left out."""
    by_vendor: dict[str, list[str]] = {}
    for price in prices:
        by_vendor.setdefault(price.provider, []).append(price.model)
    out: dict[str, list[Provider]] = {}
    for provider in sorted(registered, key=lambda p: p.name):
        if not provider.enabled:
            continue
        for model in provider.models or by_vendor.get(provider.vendor, []):
            out.setdefault(model, []).append(provider)
    return out


# ----------------------------------------------------------------------------- connection tests

def _redact(text: str, secret: str | None) -> str:
    if secret:
        text = text.replace(secret, "[redacted]")
    return text


async def test_connection(provider: Provider, secret: str | None, *, timeout_s: float = 5.0) -> ConnectionResult:
    """GET the provider's models endpoint with its credential; the state, the latency, and a
    detail that never holds the key (it is redacted even from an error's text)."""
    headers = {"accept": "application/json"}
    if provider.kind == "anthropic":
        headers["anthropic-version"] = "2023-06-01"
        if secret:
            headers["x-api-key"] = secret
    elif secret:
        headers["authorization"] = f"Bearer {secret}"
    url = provider.base_url + "/models"
    started = time.perf_counter()

    def done(state: ConnectionState, detail: str, models: int = 0) -> ConnectionResult:
        elapsed = round((time.perf_counter() - started) * 1000)
        return ConnectionResult(provider.name, state, elapsed, _redact(detail, secret), models)

    try:
        async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
            response = await client.get(url, headers=headers)
    except httpx.TimeoutException:
        return done("timeout", f"no answer from {url} within {timeout_s:g} s")
    except httpx.TransportError as exc:
        return done("unreachable", f"{url} cannot be reached ({exc.__class__.__name__})")
    code = response.status_code
    if code in (401, 403):
        return done("auth_failed", f"{code}: the credential was refused")
    if code == 429:
        retry = response.headers.get("retry-after")
        return done("rate_limited", "429: rate limited" + (f", retry after {retry} s" if retry else ""))
    if code != 200:
        return done("unexpected_response", f"HTTP {code} from {url}")
    try:
        body = response.json()
        models = body["data"]
        if not isinstance(models, list):
            raise TypeError("data is not a list")
    except (ValueError, KeyError, TypeError) as exc:
        return done("unexpected_response", f"200 but not a model list ({exc.__class__.__name__})")
    return done("ok", f"{len(models)} models", len(models))


# ----------------------------------------------------------------------------- health and breakers

#: (provider, model, second, failed, latency_ms, calls): the window's calls grouped so that a
#: busy minute is a few hundred rows, not one per call.
HealthRow = tuple[str, str, int, int, int, int]


def health_rows(ledger: LedgerView, after_id: int | None, since_ms: int) -> tuple[list[HealthRow], int]:
    """The calls since ``since_ms`` and the last event's id (``Providers.health_rows``)."""
    return ledger.providers.health_rows(after_id, since_ms)


class HealthBook:
    """Calls, failures and latencies per provider and model, per second, over the health
    window, kept in memory. A process loads the window once (``health_rows`` with no id) and
    then adds only the events appended since its last look, whoever wrote them, so neither the
    request path nor a refresh ever reads the window's raw events again. Seconds that leave the
    window are dropped."""

    def __init__(self, window_ms: int = HEALTH_WINDOW_MS) -> None:
        self.window_ms = window_ms
        # (provider, model) -> second -> [calls, errors, latency sum, {latency: calls}]
        self._seconds: dict[tuple[str, str], dict[int, list[Any]]] = {}

    def add(self, rows: list[HealthRow]) -> None:
        for provider, model, second, failed, latency, calls in rows:
            per = self._seconds.setdefault((provider, model), {})
            slot = per.get(second)
            if slot is None:
                slot = per[second] = [0, 0, 0, {}]
            slot[0] += calls
            slot[1] += calls if failed else 0
            slot[2] += latency * calls
            slot[3][latency] = slot[3].get(latency, 0) + calls

    def evict(self, now_ms: int) -> None:
        oldest = (now_ms - self.window_ms) // 1000
        for key in list(self._seconds):
            per = self._seconds[key]
            for second in [s for s in per if s < oldest]:
                del per[second]
            if not per:
                del self._seconds[key]

    def counts(self, provider: str, since_ms: int) -> tuple[int, int]:
        """(calls, failures) of the provider, all its models, from ``since_ms`` on."""
        first = since_ms // 1000
        calls = errors = 0
        for (name, _model), per in self._seconds.items():
            if name == provider:
                for second, slot in per.items():
                    if second >= first:
                        calls += slot[0]
                        errors += slot[1]
        return calls, errors

    def providers(self) -> set[str]:
        return {provider for provider, _ in self._seconds}

    def health(self, now_ms: int, window_ms: int | None = None,
               name: Callable[[str, str], str] | None = None) -> list[Health]:
        """Per provider ("" model: all its models) and per provider and model, over the window:
        calls, failures, mean and p95 latency (nearest rank). ``name(model, provider)``: the
        name a model's calls are counted under (``PriceBook.catalog_name``: a dated or prefixed
        id under its catalog entry), else the name it was called by."""
        first = (now_ms - (window_ms or self.window_ms)) // 1000
        groups: dict[tuple[str, str], list[Any]] = {}
        for (provider, model), per in self._seconds.items():
            for key in ((provider, ""), (provider, name(model, provider) if name else model)):
                group = groups.setdefault(key, [0, 0, 0, {}])
                for second, (calls, errors, total, latencies) in per.items():
                    if second >= first:
                        group[0] += calls
                        group[1] += errors
                        group[2] += total
                        for latency, n in latencies.items():
                            group[3][latency] = group[3].get(latency, 0) + n
        out = []
        for (provider, model), (calls, errors, total, latencies) in sorted(groups.items()):
            if not calls:
                continue
            rank, p95 = (95 * calls + 99) // 100, 0
            for latency in sorted(latencies):
                rank -= latencies[latency]
                p95 = latency
                if rank <= 0:
                    break
            out.append(Health(provider, model, calls, errors, total // calls, p95))
        return out


def breakers(ledger: LedgerView) -> dict[str, Breaker]:
    return ledger.providers.breakers()


def _set_breaker(ledger: LedgerView, provider: str, state: BreakerState, now_ms: int, reason: str) -> Breaker:
    breaker = Breaker(provider, state, now_ms, reason)
    ledger.providers.set_breaker(breaker)
    return breaker


def judge_breakers(current: dict[str, Breaker], book: HealthBook, now_ms: int,
                   cool_down_ms: int = BREAKER_COOL_DOWN_MS) -> list[Breaker]:
    """The breakers that change now (pure): a failing provider's opens; an open one turns
    half-open after its cool-down (the next probe decides)."""
    window_ms = book.window_ms
    changes = []
    for provider in sorted(book.providers()):
        known = current.get(provider)
        if known is not None and known.state != "closed":
            continue
        # Closed by a probe within the window: only the calls since then count.
        since = known.since_ms if known is not None and now_ms - known.since_ms < window_ms else now_ms - window_ms
        calls, errors = book.counts(provider, since)
        if calls >= BREAKER_MIN_CALLS and errors >= BREAKER_ERROR_RATE * calls:
            changes.append(Breaker(provider, "open", now_ms,
                                   f"{errors} of {calls} calls failed in {window_ms // 60_000} min"))
    for name, b in sorted(current.items()):
        if b.state == "open" and now_ms - b.since_ms >= cool_down_ms:
            changes.append(Breaker(name, "half_open", now_ms, "cool-down over; waiting for a probe"))
    return changes


def save_breakers(ledger: LedgerView, changes: list[Breaker]) -> None:
    for b in changes:
        ledger.providers.set_breaker(b)


def record_probe(ledger: LedgerView, provider: str, ok: bool, now_ms: int, detail: str) -> Breaker:
    """A probe's outcome: success closes the breaker, failure (re)opens it for another cool-down."""
    if ok:
        return _set_breaker(ledger, provider, "closed", now_ms, f"probe succeeded: {detail}")
    return _set_breaker(ledger, provider, "open", now_ms, f"probe failed: {detail}")
