"""A golden set of calls across OpenAI, Anthropic, Gemini and Mistral, each as its provider
reports its usage: cached reads, reasoning and thinking, 5-minute and one-hour cache writes,
every long-context tier of the bundled table on both sides of its boundary, embeddings and
dated aliases. Each expected cost is worked out here, by hand, from the rates written in the
bundled price file (``engine/data/prices.json``, read as ``Decimal``), in dollars, then rounded
half up to nano-dollars, the engine's documented rule; it must equal, to the nano-dollar, the
integer cost the ledger records for the call after the gateway's usage parsing and pricing.
"""

from __future__ import annotations

import json
import re
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from engine.clock import DAY_MS
from engine.engine import Engine
from engine.integrations.governor import usage_of
from engine.models import UsageEvent
from tests.conftest import NOW_MS

RATES: dict[str, dict[str, Any]] = json.loads(
    (Path(__file__).resolve().parents[1] / "engine" / "data" / "prices.json").read_text(encoding="utf-8"),
    parse_float=Decimal)["models"]


def chat(prompt: int, completion: int, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
    """OpenAI's Chat Completions usage (also Gemini's and Mistral's OpenAI-compatible APIs):
    ``prompt_tokens`` includes the cached ones, ``completion_tokens`` the reasoning ones."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning}}


def responses(inp: int, out: int, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
    """The Responses API's usage: the same meaning under other names."""
    return {"input_tokens": inp, "output_tokens": out, "total_tokens": inp + out,
            "input_tokens_details": {"cached_tokens": cached}, "output_tokens_details": {"reasoning_tokens": reasoning}}


def embedding(prompt: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "total_tokens": prompt}


def claude(inp: int, out: int, read: int = 0, w5m: int = 0, w1h: int = 0, thinking: int = 0) -> dict[str, Any]:
    """Anthropic's usage: ``input_tokens`` excludes cache reads and writes, which come apart,
    the writes also by cache lifetime; ``output_tokens`` includes the thinking ones."""
    return {"input_tokens": inp, "output_tokens": out, "cache_read_input_tokens": read,
            "cache_creation_input_tokens": w5m + w1h,
            "cache_creation": {"ephemeral_5m_input_tokens": w5m, "ephemeral_1h_input_tokens": w1h},
            "output_tokens_details": {"thinking_tokens": thinking}}


# (provider, model as called, the price file's entry, usage as the provider reports it,
#  the side of a long-context boundary the call is on: "" for a model without one)
CASES: list[tuple[str, str, str, dict[str, Any], str]] = [
    # OpenAI
    ("openai", "gpt-4o", "gpt-4o", chat(1200, 300), ""),
    ("openai", "gpt-4o", "gpt-4o", chat(5000, 250, cached=3840), ""),
    ("openai", "gpt-4o-2024-08-06", "gpt-4o-2024-08-06", chat(2048, 100, cached=1024), ""),
    ("openai", "gpt-4o-2024-05-13", "gpt-4o-2024-05-13", chat(900, 77), ""),
    ("openai", "gpt-4o-2024-11-20", "gpt-4o-2024-11-20", responses(3000, 120, cached=2048), ""),
    ("openai", "gpt-4o-mini", "gpt-4o-mini", chat(12_345, 678, cached=8192), ""),
    ("openai", "gpt-4o-mini-2024-07-18", "gpt-4o-mini-2024-07-18", chat(17, 3), ""),
    ("openai", "gpt-4.1", "gpt-4.1", chat(40_000, 1500, cached=32_768), ""),
    ("openai", "gpt-4.1-2025-04-14", "gpt-4.1-2025-04-14", chat(1, 1), ""),
    ("openai", "gpt-4.1-mini", "gpt-4.1-mini", chat(6000, 800, cached=4096), ""),
    ("openai", "gpt-4.1-nano", "gpt-4.1-nano", chat(333, 111), ""),
    ("openai", "o3", "o3", chat(800, 3000, reasoning=2500), ""),
    ("openai", "o3-2025-04-16", "o3-2025-04-16", chat(9000, 4100, cached=6144, reasoning=3900), ""),
    ("openai", "o3-mini", "o3-mini", chat(1500, 2200, reasoning=1984), ""),
    ("openai", "o4-mini", "o4-mini", chat(2600, 900, cached=1280, reasoning=640), ""),
    ("openai", "o4-mini-2025-04-16", "o4-mini-2025-04-16", responses(700, 1800, reasoning=1600), ""),
    ("openai", "gpt-5", "gpt-5", chat(25_000, 5000, cached=20_480, reasoning=4096), ""),
    ("openai", "gpt-5-mini", "gpt-5-mini", chat(3100, 1200, reasoning=1024), ""),
    ("openai", "gpt-5-nano", "gpt-5-nano", chat(50_000, 300, cached=49_152, reasoning=192), ""),
    ("openai", "gpt-5.1-2025-11-13", "gpt-5.1-2025-11-13", chat(4000, 2000, reasoning=1500), ""),
    ("openai", "gpt-5.2", "gpt-5.2", chat(11_000, 700, cached=10_240, reasoning=128), ""),
    ("openai", "gpt-5.4-mini", "gpt-5.4-mini", responses(8000, 500, cached=6400), ""),
    ("openai", "gpt-5.4-nano-2026-03-17", "gpt-5.4-nano-2026-03-17", responses(1000, 900, reasoning=700), ""),
    # GPT-5.4 and 5.5: above 272k prompt tokens (cached included) every rate changes
    ("openai", "gpt-5.4", "gpt-5.4", chat(272_000, 1000, cached=200_000, reasoning=400), "base"),
    ("openai", "gpt-5.4", "gpt-5.4", chat(272_001, 1000, cached=200_000, reasoning=400), "above"),
    ("openai", "gpt-5.4-2026-03-05", "gpt-5.4-2026-03-05", chat(272_000, 50), "base"),
    ("openai", "gpt-5.4-2026-03-05", "gpt-5.4-2026-03-05", chat(272_001, 50), "above"),
    ("openai", "gpt-5.5", "gpt-5.5", chat(272_000, 2000, cached=100_000), "base"),
    ("openai", "gpt-5.5", "gpt-5.5", chat(300_000, 2000, cached=100_000, reasoning=1000), "above"),
    ("openai", "gpt-5.5-2026-04-23", "gpt-5.5-2026-04-23", responses(272_000, 10, cached=1), "base"),
    ("openai", "gpt-5.5-2026-04-23", "gpt-5.5-2026-04-23", responses(272_001, 10, cached=1), "above"),
    ("openai", "text-embedding-3-small", "text-embedding-3-small", embedding(8191), ""),
    ("openai", "text-embedding-3-large", "text-embedding-3-large", embedding(123_457), ""),
    # Anthropic
    ("anthropic", "claude-haiku-4-5", "claude-haiku-4-5", claude(1200, 300), ""),
    ("anthropic", "claude-haiku-4-5", "claude-haiku-4-5", claude(50, 400, read=30_000), ""),
    ("anthropic", "claude-haiku-4-5-20251001", "claude-haiku-4-5-20251001", claude(20, 100, w5m=4096), ""),
    ("anthropic", "claude-haiku-4-5-20251001", "claude-haiku-4-5-20251001", claude(20, 100, w1h=4096), ""),
    ("anthropic", "claude-sonnet-4-5", "claude-sonnet-4-5",
     claude(300, 900, read=12_000, w5m=2000, w1h=5000), ""),
    ("anthropic", "claude-sonnet-4-5-20250929", "claude-sonnet-4-5-20250929",
     claude(1000, 2500, w1h=20_000, thinking=1800), ""),
    ("anthropic", "claude-sonnet-4-6", "claude-sonnet-4-6", claude(4000, 3000, w5m=8000, thinking=2048), ""),
    ("anthropic", "claude-opus-4-5-20251101", "claude-opus-4-5-20251101", claude(10, 20, w1h=100_000), ""),
    ("anthropic", "claude-opus-4-6", "claude-opus-4-6",
     claude(700, 1100, read=40_000, w5m=3000, w1h=9000, thinking=600), ""),
    ("anthropic", "claude-opus-4-7-20260416", "claude-opus-4-7-20260416", claude(5, 64, read=9000, w5m=1500), ""),
    ("anthropic", "claude-opus-4-8", "claude-opus-4-8", claude(2000, 8000, thinking=7000), ""),
    ("anthropic", "claude-opus-5", "claude-opus-5", claude(3, 500, w1h=64_000, thinking=300), ""),
    ("anthropic", "claude-opus-5-5", "claude-opus-5-5", claude(800, 1200, read=70_000, w5m=500, w1h=2500), ""),
    ("anthropic", "claude-sonnet-5", "claude-sonnet-5", claude(1500, 600, read=5000, w5m=5000, w1h=5000), ""),
    ("anthropic", "claude-sonnet-5-5", "claude-sonnet-5-5", claude(100, 200, w1h=7777), ""),
    # Claude Haiku 5.5: above 100k prompt tokens (reads and writes included), the tier's rates
    # for input, output, reads and both kinds of writes
    ("anthropic", "claude-haiku-5-5", "claude-haiku-5-5", claude(99_999, 1000), "base"),
    ("anthropic", "claude-haiku-5-5", "claude-haiku-5-5", claude(150_000, 1000, thinking=500), "above"),
    ("anthropic", "claude-haiku-5-5", "claude-haiku-5-5",
     claude(10_000, 2000, read=50_000, w5m=15_000, w1h=25_000), "base"),
    ("anthropic", "claude-haiku-5-5", "claude-haiku-5-5",
     claude(10_001, 2000, read=50_000, w5m=15_000, w1h=25_000), "above"),
    ("anthropic", "claude-haiku-5-5", "claude-haiku-5-5", claude(1, 10, w1h=99_999), "base"),
    ("anthropic", "claude-haiku-5-5", "claude-haiku-5-5", claude(1, 10, w1h=100_000), "above"),
    ("anthropic", "claude-haiku-5-5", "claude-haiku-5-5", claude(0, 10, w5m=100_001), "above"),
    # Gemini (its OpenAI-compatible API; the table's names carry the gemini/ prefix)
    ("gemini", "gemini-2.5-flash", "gemini/gemini-2.5-flash", chat(6000, 2400, cached=4000, reasoning=2000), ""),
    ("gemini", "gemini-2.5-flash-lite", "gemini/gemini-2.5-flash-lite", chat(900, 120), ""),
    ("gemini", "gemini-2.5-pro", "gemini/gemini-2.5-pro", chat(200_000, 3000, cached=150_000, reasoning=2500),
     "base"),
    ("gemini", "gemini-2.5-pro", "gemini/gemini-2.5-pro", chat(200_001, 3000, cached=150_000, reasoning=2500),
     "above"),
    ("gemini", "gemini-3.1-pro-preview", "gemini/gemini-3.1-pro-preview", chat(200_000, 400), "base"),
    ("gemini", "gemini-3.1-pro-preview", "gemini/gemini-3.1-pro-preview", chat(250_000, 400, cached=90_000),
     "above"),
    ("gemini", "gemini-3.5-flash", "gemini/gemini-3.5-flash", chat(3000, 5000, reasoning=4200), ""),
    ("gemini", "gemini-3.5-flash-lite", "gemini/gemini-3.5-flash-lite", chat(20_000, 300, cached=16_000), ""),
    ("gemini", "gemini-embedding-001", "gemini/gemini-embedding-001", embedding(2048), ""),
    # Mistral (the table's names carry the mistral/ prefix)
    ("mistral", "mistral-large-latest", "mistral/mistral-large-latest", chat(7000, 900, cached=5000), ""),
    ("mistral", "mistral-medium-latest", "mistral/mistral-medium-latest", chat(1234, 567), ""),
    ("mistral", "mistral-small-latest", "mistral/mistral-small-latest", chat(3000, 100, cached=2000), ""),
    ("mistral", "magistral-medium-latest", "mistral/magistral-medium-latest", chat(500, 4000, reasoning=3500), ""),
    ("mistral", "codestral-latest", "mistral/codestral-latest", chat(15_000, 2500), ""),
    ("mistral", "devstral-latest", "mistral/devstral-latest", chat(60_000, 1500, cached=48_000), ""),
    ("mistral", "ministral-8b-latest", "mistral/ministral-8b-latest", chat(800, 200), ""),
    ("mistral", "mistral-embed", "mistral/mistral-embed", embedding(4096), ""),
]


def expected_nanos(entry: str, usage: dict[str, Any], side: str) -> int:
    """The cost of a call by hand, from the price file's rates, in the provider's own terms."""
    spec = RATES[entry]
    if "cache_creation" in usage:  # Anthropic: the parts of the prompt are reported apart
        read = usage["cache_read_input_tokens"]
        w5m = usage["cache_creation"]["ephemeral_5m_input_tokens"]
        w1h = usage["cache_creation"]["ephemeral_1h_input_tokens"]
        fresh = usage["input_tokens"]
        out, reasoning = usage["output_tokens"], usage["output_tokens_details"]["thinking_tokens"]
    else:
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        read = (usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}).get("cached_tokens", 0)
        w5m = w1h = 0
        fresh = prompt - read
        out = usage.get("completion_tokens", usage.get("output_tokens", 0))
        reasoning = (usage.get("completion_tokens_details") or usage.get("output_tokens_details") or {}).get(
            "reasoning_tokens", 0)
    prompt_total = fresh + read + w5m + w1h

    # Long context: the table's input_cost_per_token_above_<N>k_tokens says where a tier begins;
    # a prompt of more than N thousand tokens (all of them, cached too) is billed at the tier's
    # rates, each rate the tier does not give staying the model's own.
    tier = ""
    for key in spec:
        m = re.fullmatch(r"input_cost_per_token(_above_(\d+)k_tokens)", key)
        if m and prompt_total > int(m.group(2)) * 1000:
            tier = m.group(1)
    assert (tier != "") == (side == "above"), f"{entry}: {prompt_total} prompt tokens are not on the {side} side"

    def rate(key: str, otherwise: Decimal | None = None) -> Decimal:
        if key + tier in spec:
            return Decimal(spec[key + tier])
        if key in spec:
            return Decimal(spec[key])
        assert otherwise is not None, f"{entry} has no {key}"
        return otherwise

    input_rate = rate("input_cost_per_token")
    output_rate = rate("output_cost_per_token", Decimal(0))  # mistral-embed has none (and no output)
    read_rate = rate("cache_read_input_token_cost", input_rate)  # no read rate: the input rate
    write_rate = rate("cache_creation_input_token_cost", input_rate)
    write_1h_rate = rate("cache_creation_input_token_cost_above_1hr", write_rate)
    reasoning_rate = Decimal(spec.get("output_cost_per_reasoning_token", output_rate))
    dollars = (fresh * input_rate + read * read_rate + w5m * write_rate + w1h * write_1h_rate
               + (out - reasoning) * output_rate + reasoning * reasoning_rate)
    return int((dollars * 1_000_000_000).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def test_the_golden_set_is_wide_enough() -> None:
    providers = {c[0] for c in CASES}
    assert len(CASES) >= 50 and providers == {"openai", "anthropic", "gemini", "mistral"}
    sides = {(c[2], c[4]) for c in CASES if c[4]}
    tiered = {key for key, spec in RATES.items() if any(k.startswith("input_cost_per_token_above_") for k in spec)}
    assert len(tiered) == 7  # every long-context tier of the bundled table, on both sides of its boundary
    assert sides == {(entry, side) for entry in tiered for side in ("base", "above")}
    kinds = [json.dumps(c[3]) for c in CASES]
    assert any('"ephemeral_1h_input_tokens": 0' not in k and "ephemeral" in k for k in kinds)
    assert any('"thinking_tokens": 0' not in k and "thinking" in k for k in kinds)


async def test_every_golden_call_costs_to_the_nano_dollar_what_the_price_file_says(engine: Engine) -> None:
    events = []
    for n, (provider, model, _entry, usage, _side) in enumerate(CASES):
        used = usage_of({"usage": usage})
        assert used is not None
        events.append(engine.priced(UsageEvent(
            ts_ms=NOW_MS - 60_000 + n, request_id=f"golden-{n:02d}", provider=provider, model=model,
            principal="golden", input_tokens=used.input_tokens, cached_input_tokens=used.cached_input_tokens,
            cache_write_tokens=used.cache_write_tokens, cache_write_1h_tokens=used.cache_write_1h_tokens,
            output_tokens=used.output_tokens, reasoning_tokens=used.reasoning_tokens)))
    await engine.record_many(events)
    recorded = {e.request_id: (e.cost_nanos, e.cost_source) async for e in engine.iter_events(0, NOW_MS + DAY_MS)}
    wrong = []
    for n, (_provider, model, entry, usage, side) in enumerate(CASES):
        want = expected_nanos(entry, usage, side)
        got, source = recorded[f"golden-{n:02d}"]
        if (got, source) != (want, "computed"):
            wrong.append(f"{model} {usage}: recorded {got} ({source}), by hand {want}")
    assert not wrong, f"{len(wrong)} of {len(CASES)} golden calls differ:\n" + "\n".join(wrong)
