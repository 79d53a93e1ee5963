"""A deterministic, realistic history of model calls for ``budgeteer demo`` and benchmarks.

Four workspaces, eight teams, about fifty principals (people, services and agents), fifteen
models across OpenAI, Anthropic, Google and Mistral. Traffic follows working hours in two
time zones, is quieter at weekends and grows through the month; it has provider outages
(error bursts), a runaway agent (a spike) and the odd blocked call. The same seed, days
and end time always give the same events.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Final

from engine import approvals
from engine.budgets import Policy, build_policy
from engine.clock import DAY_MS, HOUR_MS
from engine.models import UsageEvent
from engine.money import parse_usd

if TYPE_CHECKING:
    from engine.engine import Engine
    from engine.ledger import LedgerTx


@dataclass(frozen=True, slots=True)
class DemoModel:
    name: str
    provider: str
    kind: str  # chat, reasoning or embedding
    input_median: int
    output_median: int
    latency_base_ms: int
    ms_per_output_token: float


DEMO_MODELS: Final = (
    DemoModel("gpt-4o-mini", "openai", "chat", 900, 220, 250, 8.0),
    DemoModel("gpt-4o", "openai", "chat", 2200, 380, 400, 14.0),
    DemoModel("gpt-4.1", "openai", "chat", 3500, 450, 450, 15.0),
    DemoModel("gpt-4.1-mini", "openai", "chat", 1500, 300, 280, 9.0),
    DemoModel("gpt-5-mini", "openai", "reasoning", 2000, 700, 600, 10.0),
    DemoModel("o3", "openai", "reasoning", 3000, 1400, 1500, 18.0),
    DemoModel("o4-mini", "openai", "reasoning", 1800, 900, 900, 11.0),
    DemoModel("text-embedding-3-small", "openai", "embedding", 600, 0, 90, 0.0),
    DemoModel("claude-sonnet-4-5-20250929", "anthropic", "chat", 4000, 600, 700, 16.0),
    DemoModel("claude-haiku-4-5-20251001", "anthropic", "chat", 1200, 250, 300, 7.0),
    DemoModel("claude-opus-4-5-20251101", "anthropic", "chat", 6000, 900, 1200, 25.0),
    DemoModel("gemini-2.5-pro", "gemini", "reasoning", 5000, 800, 900, 14.0),
    DemoModel("gemini-2.5-flash", "gemini", "chat", 1500, 300, 250, 5.0),
    DemoModel("mistral-large-latest", "mistral", "chat", 2000, 350, 450, 12.0),
    DemoModel("mistral-small-latest", "mistral", "chat", 800, 200, 200, 6.0),
)
_BY_NAME: Final = {m.name: i for i, m in enumerate(DEMO_MODELS)}

# team -> (workspace, the models it favours, with weights)
_TEAMS: Final = {
    "search": ("acme-prod", {"gpt-4o-mini": 5, "text-embedding-3-small": 6, "gpt-4.1-mini": 2, "gemini-2.5-flash": 2}),
    "support": ("acme-prod", {"claude-haiku-4-5-20251001": 6, "claude-sonnet-4-5-20250929": 2, "gpt-4o-mini": 2}),
    "growth": ("acme-prod", {"gpt-4o": 3, "gpt-4o-mini": 4, "mistral-small-latest": 2}),
    "ml": ("acme-research", {"o3": 2, "gpt-5-mini": 3, "gemini-2.5-pro": 2, "claude-opus-4-5-20251101": 1,
                             "gpt-4.1": 2}),
    "data": ("acme-internal", {"gpt-4.1-mini": 3, "gemini-2.5-flash": 3, "text-embedding-3-small": 2,
                               "mistral-large-latest": 1}),
    "platform": ("acme-internal", {"claude-sonnet-4-5-20250929": 4, "o4-mini": 2, "gpt-4o": 1}),
    "security": ("acme-internal", {"claude-sonnet-4-5-20250929": 2, "mistral-large-latest": 2, "gpt-4o-mini": 1}),
    "labs": ("acme-sandbox", {"gemini-2.5-pro": 2, "mistral-small-latest": 2, "o4-mini": 2, "gpt-5-mini": 2}),
}
_PEOPLE: Final = (
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "ken", "laura", "mallory",
    "nina", "oscar", "peggy", "quinn", "rupert", "sybil", "trent", "uma", "victor", "wendy", "xavier", "yara",
    "zoe", "amir", "bea", "chen", "dara", "emeka", "fatima",
)
_SERVICES: Final = (
    ("svc-search-ranker", "search", 14.0), ("svc-search-embedder", "search", 18.0),
    ("svc-support-bot", "support", 16.0), ("svc-support-triage", "support", 8.0),
    ("svc-growth-copy", "growth", 6.0), ("svc-etl-enricher", "data", 10.0), ("svc-doc-indexer", "data", 7.0),
    ("svc-code-review", "platform", 6.0), ("svc-log-summary", "security", 4.0),
)
_AGENTS: Final = (
    ("agent-research", "ml", 5.0), ("agent-oncall", "platform", 3.0), ("agent-analyst", "data", 4.0),
    ("agent-prototype", "labs", 3.0), ("agent-planner", "ml", 4.0),
)


@dataclass(frozen=True, slots=True)
class _Principal:
    name: str
    team: str
    workspace: str
    token_id: str
    weight: float
    model_ids: tuple[int, ...]
    model_cum: tuple[float, ...]
    agent: str
    utc_offset_h: int


def _principals(rnd: random.Random) -> list[_Principal]:
    out: list[_Principal] = []
    teams = list(_TEAMS)

    def make(name: str, team: str, weight: float, agent: str) -> _Principal:
        workspace, favoured = _TEAMS[team]
        names = list(favoured)
        weights = [favoured[n] * rnd.uniform(0.6, 1.6) for n in names]
        cum, acc = [], 0.0
        for w in weights:
            acc += w
            cum.append(acc)
        token = f"tok_{rnd.getrandbits(40):010x}"
        return _Principal(name, team, workspace, token, weight, tuple(_BY_NAME[n] for n in names), tuple(cum),
                          agent, rnd.choice((-5, -5, 1, 1, 0, -8)))

    for i, person in enumerate(_PEOPLE):
        team = teams[i % len(teams)]
        out.append(make(f"{person}@acme.dev", team, rnd.uniform(0.3, 1.8), ""))
    for name, team, weight in _SERVICES:
        out.append(make(name, team, weight, ""))
    for name, team, weight in _AGENTS:
        out.append(make(name, team, weight, name.removeprefix("agent-")))
    return out


def _hour_shape(hour_utc: int, offset_h: int) -> float:
    """Working hours in the principal's zone: low at night, two humps by day."""
    local = (hour_utc + offset_h) % 24
    return 0.08 + math.exp(-((local - 11) ** 2) / 8) + 0.8 * math.exp(-((local - 15.5) ** 2) / 6)


def generate_demo(*, days: int = 30, seed: int = 7, end_ms: int, events_per_day: int | None = None,
                  token_ids: Mapping[str, str] | None = None) -> Iterator[list[UsageEvent]]:
    """Yield the history in time order, in batches of about 10,000 events. ``token_ids``
    (principal -> token id) makes those principals call with real tokens of the ledger."""
    rnd = random.Random(seed)
    per_day = events_per_day or 7_500
    people = [replace(p, token_id=token_ids.get(p.name, p.token_id)) for p in _principals(rnd)] \
        if token_ids else _principals(rnd)
    start_ms = end_ms - days * DAY_MS
    first_hour = start_ms - start_ms % HOUR_MS + HOUR_MS
    hours = -(-(end_ms - first_hour) // HOUR_MS)  # the last, partial hour runs up to end_ms
    # Incidents: provider outages (error bursts) and one runaway agent per ten days.
    providers = sorted({m.provider for m in DEMO_MODELS})
    outages = [(rnd.randrange(hours), rnd.choice(providers), rnd.uniform(0.3, 1.0)) for _ in range(max(1, days // 8))]
    runaway_hours = {rnd.randrange(hours) for _ in range(max(1, days // 10))}
    runaway = next(p for p in people if p.agent == "research")
    zones = sorted({p.utc_offset_h for p in people})
    base_weights = [p.weight for p in people]
    mean_shape = sum(_hour_shape(h, z) for h in range(24) for z in zones) / (24 * len(zones))
    scale = per_day / 24 / mean_shape / (5 / 7 + 2 / 7 * 0.3)
    n = 0
    batch: list[UsageEvent] = []
    for h in range(hours):
        hour_ms = first_hour + h * HOUR_MS
        hour_utc = (hour_ms // HOUR_MS) % 24
        weekday = (hour_ms // DAY_MS + 3) % 7  # 1970-01-01 was a Thursday; 0 = Monday
        growth = 0.85 + 0.3 * h / max(1, hours)
        weekly = 0.3 if weekday >= 5 else 1.0
        shapes = {z: _hour_shape(hour_utc, z) for z in zones}
        weights = [w * shapes[p.utc_offset_h] for w, p in zip(base_weights, people, strict=True)]
        cum, acc = [], 0.0
        for w in weights:
            acc += w
            cum.append(acc)
        expected = scale * growth * weekly * acc / sum(base_weights)
        count = max(0, round(rnd.gauss(expected, math.sqrt(expected) + 1)))
        chosen = rnd.choices(people, cum_weights=cum, k=count)
        if h in runaway_hours:
            chosen += [runaway] * (count * 3 + 200)
        span = min(HOUR_MS, end_ms - hour_ms + 1)
        offsets = sorted(rnd.randrange(span) for _ in chosen)
        rnd.shuffle(chosen)
        outage = next(((p, sev) for oh, p, sev in outages if oh <= h < oh + 1), None)
        for who, offset in zip(chosen, offsets, strict=True):
            model = DEMO_MODELS[who.model_ids[_pick(rnd, who.model_cum)]]
            n += 1
            batch.append(_event(rnd, seed, n, hour_ms + offset, who, model, outage))
        if len(batch) >= 10_000:
            yield batch
            batch = []
    if batch:
        yield batch


def _pick(rnd: random.Random, cum: tuple[float, ...]) -> int:
    x = rnd.random() * cum[-1]
    for i, c in enumerate(cum):
        if x < c:
            return i
    return len(cum) - 1


def _event(rnd: random.Random, seed: int, n: int, ts_ms: int, who: _Principal, model: DemoModel,
           outage: tuple[str, float] | None) -> UsageEvent:
    inp = max(8, int(model.input_median * rnd.lognormvariate(0, 0.8)))
    out = 0 if model.kind == "embedding" else max(1, int(model.output_median * rnd.lognormvariate(0, 0.7)))
    cached = cache_write = reasoning = 0
    if model.kind != "embedding" and inp > 1024 and rnd.random() < 0.45:
        cached = int(inp * rnd.uniform(0.3, 0.9))
        if model.provider == "anthropic" and rnd.random() < 0.3:
            cache_write = int((inp - cached) * rnd.uniform(0.2, 0.8))
    if model.kind == "reasoning":
        reasoning = int(out * rnd.uniform(0.3, 0.8))
    status = "ok"
    latency = int(model.latency_base_ms * rnd.lognormvariate(0, 0.35) + out * model.ms_per_output_token)
    if outage is not None and outage[0] == model.provider and rnd.random() < outage[1]:
        status, out, reasoning = "error", 0, 0
        latency = rnd.choice((30_000, 60_000, rnd.randrange(200, 2_000)))
    elif rnd.random() < 0.004:
        status, out, reasoning, latency = "error", 0, 0, rnd.randrange(100, 3_000)
    elif rnd.random() < 0.002:
        status, inp, cached, cache_write, out, reasoning, latency = "blocked", 0, 0, 0, 0, 0, 1
    session = f"sess-{who.agent}-{ts_ms // 1_800_000 % 100_000:05d}" if who.agent else ""
    return UsageEvent(
        ts_ms=ts_ms, request_id=f"demo-{seed}-{n:08d}", provider=model.provider, model=model.name,
        workspace=who.workspace, team=who.team, principal=who.name, token_id=who.token_id, session=session,
        agent=who.agent, input_tokens=inp, cached_input_tokens=cached, cache_write_tokens=cache_write,
        output_tokens=out, reasoning_tokens=reasoning, latency_ms=latency, status=status,
    )


def demo_policies(now_ms: int) -> list[Policy]:
    """A handful of budgets that make the demo's gauges, alerts and forecasts interesting."""
    specs = [
        ("demo-ml-month", "ML monthly", "team:ml", "usd", "month", "450", "350", "enforced", "block"),
        ("demo-support-day", "Support daily", "team:support", "usd", "day", "6", "4", "enforced", "approval_required"),
        ("demo-opus", "Opus spend", "model:claude-opus-4-5-20251101", "usd", "week", "60", "40", "enforced",
         "downgrade"),
        ("demo-research-agent", "Research agent, 6 hours", "agent:research", "usd", "rolling:6h", "5", None,
         "dry_run", "block"),
        ("demo-org-month", "Organisation monthly", "global", "usd", "month", "1500", "1200", "enforced", "block"),
        ("demo-search-tokens", "Search tokens, daily", "team:search", "tokens", "day", "12000000", None,
         "suggest", "block"),
    ]
    return [build_policy(scope=scope, metric=metric, window=window, hard=hard, soft=soft, mode=mode, action=action,
                         name=name, policy_id=pid, actor="demo", now_ms=now_ms)
            for pid, name, scope, metric, window, hard, soft, mode, action in specs]


# (name, principal, team, scopes, rpm, tpm, expires in days, fate)
_DEMO_TOKENS: Final = (
    ("search-ranker prod", "svc-search-ranker", "search", ("chat", "models"), 1200, 400_000, None, ""),
    ("search-embedder prod", "svc-search-embedder", "search", ("embeddings",), 3000, 2_000_000, None, ""),
    ("support-bot prod", "svc-support-bot", "support", ("chat", "responses"), 600, 300_000, None, "rotated"),
    ("research agent", "agent-research", "ml", ("chat", "responses", "models"), 120, 200_000, 30, ""),
    ("alice's notebook", "alice@acme.dev", "search", ("chat", "embeddings"), 60, 100_000, 90, ""),
    ("growth copy test", "svc-growth-copy", "growth", ("chat",), None, None, None, "revoked"),
)

# (requester, policy, amount in dollars, minutes ago, reason, decision, decided by, decision note)
_DEMO_REQUESTS: Final = (
    ("svc-support-bot", "demo-support-day", "2", 200, "launch-day traffic spike on the help centre",
     "approved", "maria@acme.dev", "Launch day traffic"),
    ("agent-research", "demo-support-day", "5", 150, "eval sweep on support transcripts", "denied",
     "maria@acme.dev", "Run it on the sample set first"),
    ("svc-support-triage", "demo-support-day", "1.50", 90, "backlog from the weekend", "expired", "", ""),
    ("dara@acme.dev", "demo-support-day", "3", 14, "customer escalation #4821 needs the long-context model", "",
     "", ""),
    ("svc-support-bot", "demo-support-day", "1.25", 3, "re-run of the failed nightly ticket summaries", "", "", ""),
)


_DEMO_PROVIDERS: Final = (
    ("openai", "openai", "https://api.openai.com/v1"), ("anthropic", "anthropic", "https://api.anthropic.com/v1"),
    ("gemini", "openai", "https://generativelanguage.googleapis.com/v1beta/openai"),
    ("mistral", "openai", "https://api.mistral.ai/v1"),
)

# (principal, requested model, prompt): what a dry run of routing would have changed
_DEMO_ROUTES: Final = (
    ("svc-support-bot", "claude-sonnet-4-5", "Summarise this ticket in one sentence: printer offline again."),
    ("svc-search-ranker", "gpt-4o", "Rewrite the query 'cheap flights paris' as three search keywords."),
    ("agent-research", "gpt-4o-mini", "Prove step by step that the merge step is O(n), compare the trade-offs "
     "with a heap-based design and analyse the worst case."),
    ("alice@acme.dev", "gpt-4.1", "Translate 'good morning' into French."),
    ("svc-code-review", "claude-opus-4-5", "Review this diff:\n```python\ndef add(a, b):\n    return a - b\n```"),
)


async def populate(engine: Engine, *, days: int = 30, seed: int = 7, end_ms: int,
                   progress: Callable[[int, int], None] | None = None) -> int:
    """Write the whole demo into an empty ledger through the engine: its history, policies,
    API tokens (one rotated, one revoked), override requests in every state and the audit
    trail all of that leaves. The engine's clock must read ``end_ms``. ``progress(done, total)``
    is told how much of the history (in milliseconds) is generated. Returns the events written."""
    me = engine.actor
    engine.actor = "maria@acme.dev"  # the demo's owner makes the changes; the operator has none
    ids: dict[str, str] = {}
    try:
        for name, principal, team, scopes, rpm, tpm, expires_days, fate in _DEMO_TOKENS:
            token, _secret = await engine.create_token(
                name=name, principal=principal, team=team, scopes=scopes, rpm=rpm, tpm=tpm,
                expires_ms=end_ms + expires_days * DAY_MS if expires_days else None)
            if fate == "revoked":  # retired before the history began: its principal calls without it
                await engine.revoke_token(token.id)
                continue
            if fate == "rotated":
                token = (await engine.rotate_token(token.id))[1]
            ids[principal] = token.id
        last_use: dict[str, int] = {}
        tokens = set(ids.values())

        def history() -> Iterator[UsageEvent]:
            for batch in generate_demo(days=days, seed=seed, end_ms=end_ms, token_ids=ids):
                last_use.update((e.token_id, e.ts_ms) for e in batch if e.token_id in tokens)
                if progress is not None:
                    progress(batch[-1].ts_ms - (end_ms - days * DAY_MS), days * DAY_MS)
                yield from batch

        # One stream: the store writes a chunk on its thread while the next one is generated here.
        total = (await engine.bulk_record(history()))[0]
        await _set_last_use(engine, last_use)
        for policy in demo_policies(end_ms):
            await engine.add_policy(policy)
        for requester, policy_id, amount, minutes, reason, decision, by, note in _DEMO_REQUESTS:
            engine.actor = requester
            request, _ = await engine.request_override(policy_id, parse_usd(amount), HOUR_MS, reason)
            # Opened minutes ago, as if the demo had been running; the expired one outlived its hour.
            await _set_times(engine, request.id, minutes * 60_000, expired=decision == "expired")
            engine.actor = by or engine.actor
            if decision == "approved":
                await engine.approve(request.id, reason=note)
            elif decision == "denied":
                await engine.deny(request.id, note)
        engine.actor = "maria@acme.dev"
        for name, kind, url in _DEMO_PROVIDERS:  # references only: the demo stores no key
            await engine.add_provider(name=name, kind=kind, base_url=url, credential=f"vault:{name}-prod")
        for principal, model, prompt in _DEMO_ROUTES:
            await engine.route({"messages": [{"role": "user", "content": prompt}]}, principal=principal,
                               model=model, mode="dry_run")
    finally:
        engine.actor = me
    return total


async def _set_times(engine: Engine, request_id: str, ago_ms: int, *, expired: bool) -> None:
    def op(tx: LedgerTx) -> None:
        request = approvals.get(tx, request_id)
        created = request.created_ms - ago_ms
        expires = created + HOUR_MS if expired else None if request.expires_ms is None else request.expires_ms - ago_ms
        tx.approvals.set_times(request_id, created, expires)

    await engine.store.transact(op)


async def _set_last_use(engine: Engine, last_use: Mapping[str, int]) -> None:
    """What a gateway would have written as each token's last use: its last call in the history."""
    def op(tx: LedgerTx) -> None:
        tx.tokens.used_last(last_use, keep_later=False)

    await engine.store.transact(op)
