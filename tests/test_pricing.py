"""Prices: exact costs in nano-dollars, versions by date, overrides, name resolution,
the LiteLLM format, and token estimates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.models import Usage, UsageEvent
from engine.pricing import (
    ModelPrice,
    PriceBook,
    PricingError,
    bundled_metadata,
    bundled_prices,
    cost_nanos,
    estimate_message_tokens,
    estimate_tokens,
    parse_litellm,
)

#: An excerpt of LiteLLM's model_prices_and_context_window.json (litellm 1.109.1), entries copied
#: unchanged: its sample_spec, dict and list values, provider-prefixed keys, long-context tiers with
#: their batch/priority/flex variants, entries without a mode, and models priced per image or character.
LITELLM_EXCERPT = Path(__file__).resolve().parent / "data" / "litellm_excerpt.json"
DAY = 86_400_000
NOW = 1_795_003_200_000


def _price(model: str) -> ModelPrice:
    price = bundled_prices().lookup(model, NOW)
    assert price is not None, model
    return price


# Each expectation is worked by hand in femto-dollars per token (1 USD = 1e15), then
# rounded once to nano-dollars (1e6 femto-dollars).
@pytest.mark.parametrize(
    ("model", "usage", "expected"),
    [
        # gpt-4o: in 2.5e-6, cached 1.25e-6, out 1e-5.
        # 6,000 x 2.5e9 + 4,000 x 1.25e9 + 500 x 1e10 = 15e12 + 5e12 + 5e12 = 25e12 fd
        ("gpt-4o", Usage(input_tokens=10_000, cached_input_tokens=4_000, output_tokens=500), 25_000_000),
        # claude-sonnet-4-5: in 3e-6, cache read 3e-7, cache write 3.75e-6, out 1.5e-5.
        # 3,000 x 3e9 + 12,000 x 3e8 + 5,000 x 3.75e9 + 1,000 x 1.5e10 = 9e12 + 3.6e12 + 18.75e12 + 15e12
        ("claude-sonnet-4-5-20250929",
         Usage(input_tokens=20_000, cached_input_tokens=12_000, cache_write_tokens=5_000, output_tokens=1_000),
         46_350_000),
        # o3: no reasoning rate, so reasoning tokens are output: 1,500 x 2e9 + 3,000 x 8e9 = 27e12
        ("o3", Usage(input_tokens=1_500, output_tokens=3_000, reasoning_tokens=2_200), 27_000_000),
        # gemini-2.5-flash: in 3e-7, cached 3e-8, out 2.5e-6, reasoning 2.5e-6.
        # 8,000 x 3e8 + 2,000 x 3e7 + 1,200 x 2.5e9 + 1,800 x 2.5e9 = 2.4e12 + 0.06e12 + 3e12 + 4.5e12
        ("gemini-2.5-flash",
         Usage(input_tokens=10_000, cached_input_tokens=2_000, output_tokens=3_000, reasoning_tokens=1_800),
         9_960_000),
        # gemini-2.5-pro below its 200k threshold: 100,000 x 1.25e9 + 1,000 x 1e10 = 135e12
        ("gemini-2.5-pro", Usage(input_tokens=100_000, output_tokens=1_000), 135_000_000),
        # above it every rate switches: in 2.5e-6, cached 2.5e-7, out 1.5e-5.
        # 200,000 x 2.5e9 + 50,000 x 2.5e8 + 2,000 x 1.5e10 = 500e12 + 12.5e12 + 30e12
        ("gemini-2.5-pro", Usage(input_tokens=250_000, cached_input_tokens=50_000, output_tokens=2_000),
         542_500_000),
        # text-embedding-3-small: 12,345 x 2e7 = 246.9e9 fd
        ("text-embedding-3-small", Usage(input_tokens=12_345), 246_900),
        # mistral-large-latest: 1,001 x 5e8 + 333 x 1.5e9 = 500.5e9 + 499.5e9 = 1e12
        ("mistral-large-latest", Usage(input_tokens=1_001, output_tokens=333), 1_000_000),
    ],
)
def test_costs_are_exact_against_hand_computed_cases(model: str, usage: Usage, expected: int) -> None:
    price = bundled_prices().lookup(model, NOW, provider={"gemini-2.5-flash": "gemini", "gemini-2.5-pro": "gemini",
                                                          "mistral-large-latest": "mistral"}.get(model))
    assert price is not None
    got = cost_nanos(price, usage)
    assert type(got) is int
    assert got == expected


def test_a_reasoning_rate_of_its_own_is_used_and_rounding_is_half_up() -> None:
    price = ModelPrice(model="thinker", provider="x", input=1_000_000, output=2_000_000, reasoning=3_500_000)
    # 1 x 1e6 + 1 x 2e6 + 1 x 3.5e6 = 6.5e6 fd = 6.5 nano-dollars, rounded half up to 7
    assert cost_nanos(price, Usage(input_tokens=1, output_tokens=2, reasoning_tokens=1)) == 7
    # 1 x 1e6 + 1 x 3.5e6 = 4.5e6 -> 5 (half up); 1e6 alone is 1
    assert cost_nanos(price, Usage(input_tokens=1, output_tokens=1, reasoning_tokens=1)) == 5
    assert cost_nanos(price, Usage(input_tokens=1)) == 1


def _versioned_book() -> PriceBook:
    book = PriceBook()
    book.add(ModelPrice(model="m", provider="p", input=1_000_000_000, output=0, effective_from_ms=0))
    book.add(ModelPrice(model="m", provider="p", input=2_000_000_000, output=0, effective_from_ms=NOW))
    book.add(ModelPrice(model="m", provider="p", input=500_000_000, output=0, effective_from_ms=NOW, workspace="vip"))
    return book


def test_an_event_is_costed_at_the_price_of_its_own_day() -> None:
    book = _versioned_book()

    def cost(ts: int, workspace: str = "default") -> tuple[int, str]:
        return book.price_event(UsageEvent(ts_ms=ts, request_id="r", provider="p", model="m", workspace=workspace,
                                           input_tokens=1_000))

    assert cost(NOW - DAY) == (1_000_000, "computed")  # old price: 1,000 x 1e9 fd = 1e12 fd
    assert cost(NOW - 1) == (1_000_000, "computed")
    assert cost(NOW) == (2_000_000, "computed")  # the new price from its first millisecond
    assert cost(NOW + DAY) == (2_000_000, "computed")
    assert cost(NOW + DAY, "vip") == (500_000, "computed")  # the workspace override wins
    assert cost(NOW - DAY, "vip") == (1_000_000, "computed")  # but not before it starts


def test_names_resolve_through_prefixes_and_dated_snapshots() -> None:
    book = bundled_prices()
    assert book.resolve("gemini-2.5-pro", "gemini") == "gemini/gemini-2.5-pro"
    assert book.resolve("openai/gpt-4o") == "gpt-4o"
    assert book.resolve("gpt-4o-2024-08-06") == "gpt-4o-2024-08-06"  # its own entry first
    assert book.resolve("gpt-4o-mini-2099-01-01") == "gpt-4o-mini"
    assert book.resolve("claude-sonnet-4-5-20991231") == "claude-sonnet-4-5"
    assert book.resolve("no-such-model") is None


def test_an_unpriced_model_is_never_a_silent_zero() -> None:
    book = bundled_prices()
    ev = UsageEvent(ts_ms=NOW, request_id="r", provider="acme", model="acme-llm-9000", input_tokens=10)
    assert book.price_event(ev) == (0, "unpriced")
    given_cost = UsageEvent(ts_ms=NOW, request_id="r", provider="acme", model="acme-llm-9000",
                            cost_nanos=42, cost_source="provider")
    assert book.price_event(given_cost) == (42, "provider")
    estimated = UsageEvent(ts_ms=NOW, request_id="r", provider="openai", model="gpt-4o", input_tokens=1000,
                           cost_source="estimated")
    assert book.price_event(estimated) == (2_500_000, "estimated")  # 1,000 x 2.5e9 fd


def test_an_excerpt_of_the_litellm_table_parses_with_its_awkward_parts() -> None:
    data = json.loads(LITELLM_EXCERPT.read_text())
    prices, skipped = parse_litellm(data)
    by_model = {p.model: p for p in prices}
    # sample_spec (a description of the format, not a model) is left out; prefixed keys are kept as they are.
    assert set(by_model) == {
        "gpt-4o", "azure/gpt-4o", "text-embedding-3-small", "claude-sonnet-4-5-20250929", "claude-haiku-5-5",
        "gemini/gemini-2.5-pro", "gpt-6-astra", "mistral/mistral-large-latest", "fireworks-ai-default"}
    assert sorted(skipped) == ["aiml/dall-e-3: no per-token input or output price",
                               "deepgram/aura: no per-token input or output price"]
    assert all(type(p.input) is int and p.input >= 0 and type(p.output) is int for p in prices)
    gpt4o = by_model["gpt-4o"]
    assert (gpt4o.provider, gpt4o.mode) == ("openai", "chat")
    assert (gpt4o.input, gpt4o.output, gpt4o.cache_read) == (2_500_000_000, 10_000_000_000, 1_250_000_000)
    assert gpt4o.tiers == ()  # its _priority and _batches rates are other service tiers, not context tiers
    assert {"vision", "function_calling"} <= gpt4o.capabilities
    assert (gpt4o.max_input_tokens, gpt4o.max_output_tokens) == (128_000, 16_384)
    assert by_model["azure/gpt-4o"].provider == "azure"
    assert by_model["text-embedding-3-small"].mode == "embedding"
    # No mode in the entry: a chat model.
    assert by_model["fireworks-ai-default"].mode == "chat"
    assert (by_model["fireworks-ai-default"].input, by_model["fireworks-ai-default"].output) == (0, 0)
    # Long-context tiers: only the plain `..._above_Nk_tokens` keys, never their batch/priority/flex variants.
    gemini = by_model["gemini/gemini-2.5-pro"]
    assert [(t.threshold_tokens, t.input, t.output, t.cache_read) for t in gemini.tiers] == [
        (200_000, 2_500_000_000, 15_000_000_000, 250_000_000)]
    astra = by_model["gpt-6-astra"]
    assert [(t.threshold_tokens, t.input, t.output, t.cache_read) for t in astra.tiers] == [
        (272_000, 20_000_000_000, 75_000_000_000, 2_000_000_000)]
    haiku = by_model["claude-haiku-5-5"]
    assert (haiku.input, haiku.output, haiku.cache_read, haiku.cache_write) == (
        100_000_000, 500_000_000, 10_000_000, 125_000_000)
    assert [(t.threshold_tokens, t.input, t.output, t.cache_read) for t in haiku.tiers] == [
        (100_000, 500_000_000, 2_500_000_000, 50_000_000)]
    sonnet = by_model["claude-sonnet-4-5-20250929"]
    assert (sonnet.cache_read, sonnet.cache_write) == (300_000_000, 3_750_000_000)
    # Wrapped in our bundled file's shape, the same entries give the same prices.
    assert parse_litellm({"models": data}) == (prices, skipped)


def test_bad_entries_are_skipped_with_a_reason_and_a_bad_file_is_refused() -> None:
    prices, skipped = parse_litellm({
        "good": {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6, "litellm_provider": "x"},
        "negative": {"input_cost_per_token": -1e-6, "output_cost_per_token": 2e-6},
        "text": {"input_cost_per_token": "cheap", "output_cost_per_token": 2e-6},
        "list": [1, 2],
        "image": {"output_cost_per_image": 0.04},
        "ctx": {"input_cost_per_token": 1e-6, "max_input_tokens": "lots"},
        "future_field": {"input_cost_per_token": 1e-6, "some_new_key": {"x": 1}},
    })
    assert sorted(p.model for p in prices) == ["future_field", "good"]
    assert any(s.startswith("negative: input_cost_per_token: must not be negative") for s in skipped)
    assert any(s.startswith("text: input_cost_per_token") for s in skipped)
    assert any(s.startswith("ctx: max_input_tokens") for s in skipped)
    assert any(s.startswith("list: not an object") for s in skipped)
    with pytest.raises(PricingError, match="must be a JSON object"):
        parse_litellm([1, 2, 3])


def test_price_records_round_trip_through_json() -> None:
    for price in bundled_prices().all_versions():
        assert ModelPrice.from_json(json.loads(json.dumps(price.to_json()))) == price


def test_the_bundled_table_covers_the_major_providers_and_says_where_it_came_from() -> None:
    book = bundled_prices()
    providers = {p.provider for p in book.models()}
    assert {"openai", "anthropic", "gemini", "mistral"} <= providers
    assert {"embedding", "chat"} <= {p.mode for p in book.models()}
    meta = bundled_metadata()
    assert "litellm 1.109.1" in meta["source"] and meta["retrieved"] == "2026-11"


def test_token_estimates_follow_the_text() -> None:
    assert estimate_tokens("") == 0
    prose = ("The quarterly report shows that spending on language models grew steadily, "
             "driven mostly by the support team's new assistant and a handful of batch jobs. ") * 4
    words = len(prose.split())
    assert 1.0 * words <= estimate_tokens(prose) <= 1.6 * words  # English runs ~1.3 tokens a word
    assert estimate_tokens("你好世界，今天天气很好") >= 10  # about a token per ideograph
    assert estimate_tokens("1234567890") == 4  # digits go in threes
    assert estimate_tokens("hello") < estimate_tokens("hello world, hello again")
    code = "def f(x):\n    return {'a': [x, x + 1]}\n"
    assert estimate_tokens(code) > len(code.split())
    assert estimate_message_tokens([{"role": "user", "content": "hi"}]) == 3 + 4 + 1
    assert estimate_message_tokens([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]) == 92


@given(st.text())
def test_token_estimates_never_fail_and_are_never_negative(text: str) -> None:
    assert estimate_tokens(text) >= 0
