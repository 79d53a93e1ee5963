"""The provider registry, connection tests against fake servers on 127.0.0.1, health and the
circuit breaker from the ledger, and the routing scorer: features, candidates, modes."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from engine.budgets import build_policy
from engine.clock import FrozenClock
from engine.engine import Engine
from engine.models import FieldError, Usage
from engine.pricing import ModelPrice, PriceTier, bundled_prices, cost_nanos, uncached_costs
from engine.providers import BREAKER_COOL_DOWN_MS, CatalogModel, build_provider, cost_tier, latency_tier
from engine.routing import WEIGHTS, cause, cheapest, score, shortlist
from tests.conftest import NOW_MS, event
from tests.fake_servers import closed_port_url, http_server, silent_server

KEY = "sk-test-CONNECTION-KEY-0123456789abcdef"
MODELS_BODY = json.dumps({"object": "list", "data": [{"id": "gpt-4o-mini"}, {"id": "gpt-4o"}]}).encode()
CHEAP, MID, DEAR = "gpt-4o-mini", "gpt-4.1", "claude-opus-4-5"


@pytest.fixture(autouse=True)
def _passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUDGETEER_VAULT_PASSPHRASE", "pw")


def _ask(text: str, **extra: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": text}], **extra}


# ----------------------------------------------------------------------------- registry


def test_a_provider_is_validated_field_by_field() -> None:
    good = build_provider(name="OpenAI", kind="openai", base_url="https://api.openai.com/v1/",
                          credential="vault:openai-prod", now_ms=1, actor="me")
    assert (good.name, good.kind, good.base_url, good.vendor) == (
        "openai", "openai-compatible", "https://api.openai.com/v1", "openai")
    for spec, field in (({"kind": "grpc"}, "kind"), ({"base_url": "ftp://x"}, "base-url"),
                        ({"base_url": "https://user:pw@host/v1"}, "base-url"), ({"credential": KEY}, "credential"),
                        ({"name": "Bad Name"}, "name"), ({"vendor": "acme"}, "vendor")):
        values = {"name": "p", "kind": "openai", "base_url": "https://h/v1", **spec}
        with pytest.raises(FieldError) as refused:
            build_provider(**values, now_ms=1, actor="me")  # type: ignore[arg-type]
        assert refused.value.field == field and KEY not in str(refused.value)


async def test_tiers_and_capabilities_come_from_the_price_table(engine: Engine) -> None:
    catalog = {m.model: m for m in await engine.catalog()}
    assert catalog[CHEAP].cost_tier == 1 and catalog[CHEAP].latency_tier == "fast"
    assert catalog["gpt-4o"].cost_tier == 3 and catalog[DEAR].cost_tier == 4
    assert catalog[DEAR].latency_tier == latency_tier(catalog[DEAR].price) == "slow"
    assert {"tools", "json", "vision"} <= catalog[CHEAP].capabilities
    assert "vision" not in catalog["mistral/codestral-latest"].capabilities
    assert catalog["gpt-4o"].context == 128_000
    assert "gpt-4o-2024-08-06" not in catalog  # a dated snapshot of a listed model
    assert all(cost_tier(m.price) == m.cost_tier for m in catalog.values())


async def test_registered_providers_narrow_the_catalog_and_are_journaled(engine: Engine) -> None:
    await engine.add_provider(name="local", kind="openai", base_url="http://127.0.0.1:1/v1", models=[CHEAP, MID])
    await engine.add_provider(name="anthropic", kind="anthropic", base_url="https://api.anthropic.com/v1")
    catalog = await engine.catalog()
    assert {m.model for m in catalog if m.provider == "local"} == {CHEAP, MID}
    assert all(m.price.provider == "anthropic" for m in catalog if m.provider == "anthropic")
    with pytest.raises(FieldError, match="exists"):
        await engine.add_provider(name="local", kind="openai", base_url="http://127.0.0.1:1/v1")
    await engine.remove_provider("local")
    assert [p.name for p in await engine.providers()] == ["anthropic"]
    assert [e.action for e in await engine.audit_entries()][:3] == ["provider.remove", "provider.add",
                                                                      "provider.add"]


# ----------------------------------------------------------------------------- test-connection


async def test_test_connection_names_each_state_and_never_the_key(engine: Engine) -> None:
    await engine.vault_set("key", KEY)
    routes = {
        "/ok/v1/models": (200, {"content-type": "application/json"}, MODELS_BODY),
        "/denied/v1/models": (401, {}, json.dumps({"error": {"message": f"bad key {KEY}"}}).encode()),
        "/busy/v1/models": (429, {"retry-after": "7"}, b"{}"),
        "/garbage/v1/models": (200, {"content-type": "application/json"}, b"<html>not json"),
    }
    with http_server(routes) as (base, seen), silent_server() as hanging:
        for name, url in (("ok", f"{base}/ok/v1"), ("denied", f"{base}/denied/v1"), ("busy", f"{base}/busy/v1"),
                          ("garbage", f"{base}/garbage/v1"), ("hangs", f"{hanging}/v1"),
                          ("gone", f"{closed_port_url()}/v1")):
            await engine.add_provider(name=name, kind="openai", base_url=url, credential="vault:key")
        await engine.add_provider(name="claude", kind="anthropic", base_url=f"{base}/ok/v1", credential="vault:key")
        results = {n: await engine.test_connection(n, timeout_s=0.5)
                   for n in ("ok", "denied", "busy", "garbage", "hangs", "gone", "claude")}
    assert {n: r.state for n, r in results.items()} == {
        "ok": "ok", "denied": "auth_failed", "busy": "rate_limited", "garbage": "unexpected_response",
        "hangs": "timeout", "gone": "unreachable", "claude": "ok"}
    assert results["ok"].models == 2 and results["busy"].detail == "429: rate limited, retry after 7 s"
    assert all(r.latency_ms >= 0 for r in results.values())
    assert all(KEY not in json.dumps(r.as_dict()) for r in results.values())
    openai_style = next(h for h in seen if h["path"] == "/ok/v1/models" and "authorization" in h)
    assert openai_style["authorization"] == f"Bearer {KEY}"
    anthropic_style = next(h for h in seen if "x-api-key" in h)
    assert anthropic_style["x-api-key"] == KEY and anthropic_style["anthropic-version"]


# ----------------------------------------------------------------------------- health and breaker


async def test_the_breaker_opens_on_errors_and_recovers_after_cool_down_and_a_probe(
        db_path: Path, clock: FrozenClock) -> None:
    with http_server({"/v1/models": (200, {}, MODELS_BODY)}) as (base, _):
        async with await Engine.open(db_path, clock=clock) as engine:
            await engine.add_provider(name="flaky", kind="openai", base_url=f"{base}/v1", models=[CHEAP])
            await engine.add_provider(name="steady", kind="openai", base_url=f"{base}/v1", models=[MID])
            await engine.record_many([event(i, provider="flaky", model=CHEAP, ts_ms=NOW_MS - 60_000 + i,
                                            status="error" if i % 4 else "ok", latency_ms=100 * (i + 1))
                                      for i in range(8)])
            health, breakers = await engine.provider_health()
            flaky = next(h for h in health if h.provider == "flaky" and not h.model)
            assert (flaky.calls, flaky.errors, flaky.p95_latency_ms, flaky.mean_latency_ms) == (8, 6, 800, 450)
            assert breakers["flaky"].state == "open" and "6 of 8 calls failed" in breakers["flaky"].reason
            decision = await engine.route(_ask("hi"), principal="alice", model=CHEAP, record=False)
            dropped = next(c for c in decision.candidates if c.model.provider == "flaky")
            assert not dropped.kept and "provider flaky is degraded" in dropped.why
            assert decision.chosen == MID

            clock.advance(BREAKER_COOL_DOWN_MS)
            _, breakers = await engine.provider_health()
            assert breakers["flaky"].state == "half_open"
            assert (await engine.test_connection("flaky")).state == "ok"  # the probe
            _, breakers = await engine.provider_health()
            assert breakers["flaky"].state == "closed"  # the old errors do not reopen it
            assert (await engine.route(_ask("hi"), principal="alice", model=CHEAP, record=False)).chosen == CHEAP


# ----------------------------------------------------------------------------- scorer


def test_feature_contributions_on_fixed_prompts() -> None:
    assert sum(WEIGHTS.values()) == pytest.approx(1.0)
    plain = score(_ask("What is the capital of France?"))  # 30 characters, about 14 tokens
    assert {f.name: f.value for f in plain.features} == {
        "length": 0.007, "tokens": 0.002, "code": 0.0, "structured": 0.0, "tools": 0.0, "images": 0.0,
        "reasoning": 0.0, "depth": 0.0}
    assert plain.tier_needed == 1 and plain.needs == frozenset()

    hard = score({
        "messages": [{"role": "system", "content": "You are careful."},
                     {"role": "user", "content": "Here is my code:\n```python\ndef f(x):\n    return x\n```"},
                     {"role": "assistant", "content": "OK."},
                     {"role": "user", "content": [
                         {"type": "text", "text": "Prove step by step why this algorithm is correct."},
                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}],
        "tools": [{"type": "function", "function": {"name": n}} for n in ("a", "b", "c")],
        "response_format": {"type": "json_object"}})
    contributions = {f.name: round(f.contribution, 3) for f in hard.features}
    assert contributions["code"] == 0.15 and contributions["tools"] == 0.10 and contributions["structured"] == 0.10
    assert contributions["images"] == 0.06 and contributions["depth"] == 0.03
    assert contributions["reasoning"] == 0.2  # prove, step by step, why, algorithm: three or more cues
    assert hard.needs == {"tools", "json", "vision"}
    assert hard.value == pytest.approx(sum(f.contribution for f in hard.features))
    assert hard.tier_needed == 4


def test_a_malformed_request_names_the_field() -> None:
    with pytest.raises(FieldError, match="messages: must be a non-empty list"):
        score({"messages": []})
    with pytest.raises(FieldError, match="messages: each message must be an object"):
        score({"messages": ["hi"]})


# ----------------------------------------------------------------------------- candidates and choice


async def _three_models(engine: Engine) -> None:
    await engine.add_provider(name="openai", kind="openai", base_url="http://127.0.0.1:1/v1", models=[CHEAP, MID])
    await engine.add_provider(name="anthropic", kind="anthropic", base_url="http://127.0.0.1:1/v1", models=[DEAR])


async def test_candidates_are_filtered_by_capability(engine: Engine) -> None:
    await engine.add_provider(name="mistral", kind="openai", base_url="http://127.0.0.1:1/v1",
                              models=["mistral/codestral-latest", CHEAP])
    image = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "x"}}]}]}
    decision = await engine.route(image, principal="a", model="mistral/codestral-latest", record=False)
    codestral = next(c for c in decision.candidates if c.model.model == "mistral/codestral-latest")
    assert not codestral.kept and codestral.why == "lacks vision"
    assert decision.chosen == CHEAP


async def test_candidates_are_filtered_by_context_length(engine: Engine) -> None:
    await engine.add_provider(name="openai", kind="openai", base_url="http://127.0.0.1:1/v1",
                              models=["gpt-4o", "gpt-4.1-mini"])
    long = _ask("word " * 150_000)
    decision = await engine.route(long, principal="a", model="gpt-4o", record=False)
    gpt4o = next(c for c in decision.candidates if c.model.model == "gpt-4o")
    assert not gpt4o.kept and gpt4o.why.startswith("context 128,000 <")
    assert decision.chosen == "gpt-4.1-mini"  # a million tokens of context


async def test_candidates_are_filtered_by_budget(engine: Engine) -> None:
    await _three_models(engine)
    await engine.add_policy(build_policy(scope=f"model:{CHEAP}", metric="usd", window="day", hard="0.000001",
                                         name="No mini today"))
    decision = await engine.route(_ask("hi"), principal="alice", model=DEAR, record=False)
    mini = next(c for c in decision.candidates if c.model.model == CHEAP)
    assert not mini.kept and mini.why == ("budget No mini today ($0.00 of $0.000001 this day spent or held) would "
                                          "block it")
    assert decision.chosen == MID


async def test_the_cheapest_capable_enough_model_is_chosen(engine: Engine) -> None:
    await _three_models(engine)
    easy = await engine.route(_ask("hi"), principal="a", model=DEAR, record=False)
    assert easy.chosen == CHEAP and easy.saving == easy.requested_cost - easy.chosen_cost > 0  # type: ignore[operator]
    hard = await engine.route(_ask("Prove step by step why the algorithm's complexity is optimal; compare the "
                                   "trade-offs.\n```\ncode\n```", response_format={"type": "json_object"}),
                              principal="a", model=CHEAP, record=False)
    assert hard.score.tier_needed == 3 and hard.chosen == MID  # an upgrade: the cheap model is not enough
    assert "tier 1 is below the tier 3" in next(c.why for c in hard.candidates if c.model.model == CHEAP)


async def test_the_three_modes(engine: Engine) -> None:
    await _three_models(engine)
    results = {mode: await engine.route(_ask("hi"), principal="a", model=DEAR, mode=mode)
               for mode in ("suggest", "dry_run", "enforced")}
    assert all(d.chosen == CHEAP for d in results.values())
    assert results["suggest"].applied == DEAR and results["dry_run"].applied == DEAR
    assert results["enforced"].applied == CHEAP
    recorded = await engine.routing_decisions()
    assert [(r.mode, r.applied) for r in recorded] == [("enforced", CHEAP), ("dry_run", DEAR), ("suggest", DEAR)]
    summary = await engine.routing_summary(0)
    saving = results["enforced"].saving
    assert (summary.decisions, summary.changed, summary.saved, summary.would_save) == (3, 3, saving, 2 * saving)
    with pytest.raises(FieldError, match="mode: must be suggest, dry_run or enforced"):
        await engine.route(_ask("hi"), principal="a", model=DEAR, mode="yolo")


# ----------------------------------------------------------------------------- health without scans (issue 16)


async def _trace(engine: Engine) -> list[str]:
    """Every statement the engine's ledger connections run from now on (on any thread)."""
    seen: list[str] = []
    for connection in (engine.store._writer, engine.store._reader):
        await connection.run(connection.conn.set_trace_callback, seen.append)
    return seen


async def test_routed_calls_never_read_raw_events_and_share_one_health_refresh(
        db_path: Path, clock: FrozenClock) -> None:
    """Before: every call that found the breaker cache stale read the window's events in Python
    inside a write transaction (50 callers, 50 scans). Now a call never waits for health but a
    process's first, a stale one starts one refresh in the background, and a refresh reads only
    the events appended since the last one."""
    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.add_provider(name="openai", kind="openai", base_url="http://127.0.0.1:1/v1", models=[CHEAP, MID])
        await engine.record_many([event(i, provider="openai", model=CHEAP, ts_ms=NOW_MS - 60_000 + i)
                                  for i in range(200)])
        await engine.route(_ask("hi"), principal="alice", model=CHEAP)  # the process's first: loads the window
        # Health as a call finds it a while later: due for a refresh (``_breaker_cache`` was the
        # 5-second cache of the code before, which each stale caller refilled by a scan).
        engine.services.gateways._health_at = -1e9
        engine._breaker_cache = None  # type: ignore[attr-defined]
        await engine.record_many([event(1000 + i, provider="openai", model=CHEAP, ts_ms=NOW_MS - 1000 + i)
                                  for i in range(3)])
        seen = await _trace(engine)
        await asyncio.gather(*(engine.route(_ask(f"hi {i}"), principal="alice", model=CHEAP) for i in range(50)))
        await engine.provider_health()  # waits for the refresh under way, if any
        reads = [sql for sql in seen if "FROM usage_events" in sql and "max(id)" not in sql]
        assert len(reads) <= 2, reads  # the refresh started by the calls, and at most the health report's own
        assert all("e.id >" in sql for sql in reads)  # only what was appended since the last look
        health, _ = await engine.provider_health()
        openai = next(h for h in health if h.provider == "openai" and not h.model)
        assert openai.calls == 203  # every call, counted once


async def test_health_counts_the_calls_other_processes_settle_and_opens_their_breaker(
        db_path: Path, clock: FrozenClock) -> None:
    async with await Engine.open(db_path, clock=clock) as gateway:
        await gateway.add_provider(name="flaky", kind="openai", base_url="http://127.0.0.1:1/v1", models=[CHEAP])
        await gateway.add_provider(name="steady", kind="openai", base_url="http://127.0.0.1:1/v1", models=[MID])
        assert (await gateway.route(_ask("hi"), principal="a", model=CHEAP, record=False)).chosen == CHEAP
        async with await Engine.open(db_path, clock=clock) as other:  # another gateway on the same ledger
            await other.record_many([event(i, provider="flaky", model=CHEAP, ts_ms=NOW_MS - 30_000 + i,
                                           status="error", latency_ms=10 * (i + 1)) for i in range(6)])
        health, breakers = await gateway.provider_health()
        flaky = next(h for h in health if h.provider == "flaky" and not h.model)
        assert (flaky.calls, flaky.errors, flaky.p95_latency_ms) == (6, 6, 60)
        assert breakers["flaky"].state == "open"
        decision = await gateway.route(_ask("hi"), principal="a", model=CHEAP, record=False)
        assert decision.chosen == MID  # the breaker keeps routing away from it at once


async def test_a_routed_calls_decision_is_recorded_with_the_next_write_or_on_its_own(
        db_path: Path, clock: FrozenClock) -> None:
    async with await Engine.open(db_path, clock=clock) as engine:
        await engine.add_provider(name="openai", kind="openai", base_url="http://127.0.0.1:1/v1", models=[CHEAP, MID])
        await engine.route(_ask("hi"), principal="alice", model=MID, request_id="rides")
        await engine.record(event(1))  # the next write carries it
        await engine.route(_ask("hi"), principal="alice", model=MID, request_id="alone")
        await asyncio.sleep(0.3)  # no write follows: it goes on its own
        with sqlite3.connect(db_path) as conn:  # the file itself, as another reader sees it
            rows = conn.execute("SELECT request_id, chosen FROM routing_decisions ORDER BY id").fetchall()
        conn.close()
        assert rows == [("rides", CHEAP), ("alone", CHEAP)]
        await engine.route(_ask("hi"), principal="alice", model=MID, request_id="at-close")
    async with await Engine.open(db_path, clock=clock) as engine:
        assert [d.request_id for d in await engine.routing_decisions()] == ["at-close", "alone", "rides"]


@pytest.mark.parametrize("prompt", ["hi", "Prove step by step that the algorithm is optimal; analyze trade-offs. " * 20,
                                    "```python\ndef f():\n    return 1\n```\nrefactor this function"])
@pytest.mark.parametrize("requested", [CHEAP, MID, DEAR, "gpt-4o"])
async def test_a_gateways_decision_is_the_one_an_explain_gives(engine: Engine, prompt: str, requested: str) -> None:
    """A routed call's decision skips the candidates' explanations and asks the budgets only
    where they can change the choice; it must choose as the full explanation does."""
    await _three_models(engine)
    await engine.add_provider(name="more", kind="openai", base_url="http://127.0.0.1:1/v1",
                              models=["gpt-4o", "gpt-4.1-mini", "gpt-4.1-nano"])
    await engine.add_policy(build_policy(scope="model:gpt-4.1-nano", metric="usd", window="day", hard="0.000001",
                                         name="No nano"))
    for mode in ("suggest", "enforced"):
        explained = await engine.route(_ask(prompt), principal="alice", model=requested, mode=mode, record=False)
        routed = await engine.route(_ask(prompt), principal="alice", model=requested, mode=mode)
        assert (routed.chosen, routed.chosen_provider, routed.chosen_cost, routed.applied, routed.requested_cost,
                routed.reason) == (explained.chosen, explained.chosen_provider, explained.chosen_cost,
                                   explained.applied, explained.requested_cost, explained.reason)
        assert routed.chosen != "gpt-4.1-nano"  # the model a budget refuses is never chosen


async def test_without_a_budget_naming_a_model_a_routed_call_chooses_as_the_explain(engine: Engine) -> None:
    """With no policy naming a model, a gateway's call is chosen from a shortlist worked out once
    per need and tier (models another one undercuts on both rates left out) and only the models
    left are priced; over the whole price table (long-context tiers, small contexts, every need)
    and any token counts, it must choose what the full explanation chooses."""
    import random

    await engine.add_policy(build_policy(scope="workspace:default", metric="usd", window="day", hard="1000"))
    catalog = await engine.catalog()
    assert len(catalog) > 40 and any(m.price.tiers for m in catalog) and any(m.context for m in catalog)
    rng = random.Random(7)
    asks = [_ask("hi"), _ask("Prove step by step; analyze the trade-offs. " * 40),
            _ask("hi", tools=[{"type": "function", "function": {"name": "f"}}]),
            _ask("hi", response_format={"type": "json_object"}),
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}]
    models = [m.model for m in catalog] + ["no-such-model"]
    compared = 0
    for _ in range(400):
        ask, requested = rng.choice(asks), rng.choice(models)
        tokens = rng.choice([1, 10, 5_000, 100_000, 128_001, 200_001, 1_000_001, rng.randint(1, 2_500_000)])
        cap = rng.choice([None, 1, 300, 4096, 100_000])
        explained = await engine.route(ask, principal="p", model=requested, record=False, input_tokens=tokens,
                                       max_tokens=cap)
        routed = await engine.route(ask, principal="p", model=requested, input_tokens=tokens, max_tokens=cap)
        assert (routed.chosen, routed.chosen_provider, routed.chosen_cost, routed.applied, routed.requested_cost,
                routed.reason) == (explained.chosen, explained.chosen_provider, explained.chosen_cost,
                                   explained.applied, explained.requested_cost, explained.reason), (requested, tokens,
                                                                                                   cap)
        compared += routed.chosen != requested
    assert compared > 50  # the choices moved away from the requested model often enough to mean something


_RATE = st.sampled_from([0, 1_000_000, 2_000_000, 3_000_000, 7_777_777])  # femto-dollars per token
_MODEL = st.builds(
    lambda name, provider, rin, rout, tier, context, caps, cost_tier: CatalogModel(
        name, provider, ModelPrice(name, provider, input=rin, output=rout, tiers=tier), caps, context, cost_tier,
        "fast"),
    st.sampled_from(["a", "b", "c", "d"]), st.sampled_from(["p", "q"]), _RATE, _RATE,
    st.one_of(st.just(()), st.builds(lambda t, i, o: (PriceTier(t, i, o),), st.sampled_from([50, 500]), _RATE,
                                     st.one_of(st.none(), _RATE))),
    st.sampled_from([0, 100, 1_000]), st.frozensets(st.sampled_from(["tools", "json", "vision"])),
    st.integers(1, 4))


@settings(max_examples=600, deadline=None)
@given(catalog=st.lists(_MODEL, max_size=9), needs=st.frozensets(st.sampled_from(["tools", "vision"]), max_size=1),
       tier=st.integers(1, 4), unhealthy=st.sampled_from([{}, {"q": "open"}]), input_tokens=st.integers(0, 1_200),
       output_tokens=st.integers(0, 300), requested=st.integers(-1, 8))
@example(  # undercut at its base rates, cheapest past its long-context threshold
    catalog=[CatalogModel("a", "p", ModelPrice("a", "p", input=1_000_000, output=1_000_000), frozenset(), 0, 1, "fast"),
             CatalogModel("b", "p", ModelPrice("b", "p", input=2_000_000, output=2_000_000,
                                               tiers=(PriceTier(50, 0, 0),)), frozenset(), 0, 1, "fast")],
    needs=frozenset(), tier=1, unhealthy={}, input_tokens=100, output_tokens=0, requested=-1)
def test_the_shortlist_keeps_the_cheapest_whatever_the_prices(
        catalog: list[CatalogModel], needs: frozenset[str], tier: int, unhealthy: dict[str, str],
        input_tokens: int, output_tokens: int, requested: int) -> None:
    """A gateway's call prices only the shortlist's frontier: models undercut on both rates by
    one that sorts first by name and has no long-context tier are left out. Against every
    usable model priced (ties in cost and name, tiers on either side, contexts too small), the
    model chosen and its estimate must be the same."""
    needed = input_tokens + output_tokens
    usable = [i for i, m in enumerate(catalog) if needs <= m.capabilities and m.provider not in unhealthy
              and m.cost_tier >= tier and not (m.context and needed > m.context)]
    costs = uncached_costs([m.price for m in catalog], input_tokens, output_tokens)
    expected = min(usable, key=lambda i: (costs[i], catalog[i].model), default=None)
    also = requested if 0 <= requested < len(catalog) else None
    found, cost_of = cheapest(catalog, shortlist(catalog, needs, tier, unhealthy), input_tokens, output_tokens, also)
    assert found == expected
    assert all(cost_of[i] == costs[i] for i in cost_of) and (also is None or also in cost_of)


@settings(max_examples=300, deadline=None)
@given(input_tokens=st.integers(0, 2_500_000), output_tokens=st.integers(0, 200_000))
def test_the_routing_estimate_is_cost_nanos_to_the_nano_dollar(input_tokens: int, output_tokens: int) -> None:
    """Every catalog model's estimate is made in one pass with the base rates inlined; it must be
    the very integer cost_nanos gives, on both sides of every long-context threshold."""
    prices = bundled_prices().models()
    thresholds = sorted({t.threshold_tokens for p in prices for t in p.tiers})
    for tokens in (input_tokens, *(t + d for t in thresholds for d in (0, 1))):
        assert uncached_costs(prices, tokens, output_tokens) == [
            cost_nanos(p, Usage(input_tokens=tokens, output_tokens=output_tokens)) for p in prices]


async def test_dated_and_prefixed_ids_count_against_their_catalog_entry(engine: Engine) -> None:
    """Calls name models as providers answer them (dated snapshots, vendor prefixes or none);
    the health of a catalog entry counts them all, as pricing matches them to their price."""
    calls = [("anthropic", "claude-haiku-4-5-20251001"), ("anthropic", "claude-haiku-4-5"),
             ("anthropic", "anthropic/claude-haiku-4-5"), ("gemini", "gemini-2.5-flash"),
             ("gemini", "gemini/gemini-2.5-flash"), ("mistral", "mistral-small-latest"),
             ("openai", "gpt-4o-2024-08-06"), ("openai", "my-fine-tune")]
    await engine.record_many([event(i, provider=provider, model=model, ts_ms=NOW_MS - 60_000 + i)
                              for i, (provider, model) in enumerate(calls)])
    health, _ = await engine.provider_health()
    counted = {(h.provider, h.model): h.calls for h in health if h.model}
    assert counted == {("anthropic", "claude-haiku-4-5"): 3, ("gemini", "gemini/gemini-2.5-flash"): 2,
                       ("mistral", "mistral/mistral-small-latest"): 1, ("openai", "gpt-4o"): 1,
                       ("openai", "my-fine-tune"): 1}
    catalog = {(m.provider, m.model) for m in await engine.catalog()}
    assert set(counted) - {("openai", "my-fine-tune")} <= catalog
    assert {(h.provider, h.calls) for h in health if not h.model} == {("anthropic", 3), ("gemini", 2),
                                                                      ("mistral", 1), ("openai", 2)}


async def test_explain_names_the_budget_that_blocks_with_its_numbers(engine: Engine) -> None:
    """Every candidate blocked by one budget (an approval_required one: refused until approved):
    explain says which budget and how far it is spent, on the dashboard and the command line."""
    await _three_models(engine)
    await engine.add_policy(build_policy(scope="team:support", metric="usd", window="day", hard="6",
                                         action="approval_required", name="Support daily"))
    await engine.record(event(1, team="support", cost_nanos=6_100_000_000, ts_ms=NOW_MS - 60_000))
    decision = await engine.route(_ask("hi"), principal="dara", team="support", model=DEAR, record=False)
    why = "budget Support daily ($6.10 of $6.00 this day spent or held) would block it"
    assert [c.why for c in decision.candidates] == [why] * 3
    assert cause(decision) == (f"0 of 3 candidates kept (dropped: 3 {why}); no candidate meets the need; the "
                               "requested model stays.")
    assert decision.as_dict()["cause"] == cause(decision)
