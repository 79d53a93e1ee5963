"""Model prices: LiteLLM's price-table format, versioned prices, exact costs, token estimates.

Rates are integer femto-dollars per token (1e-15 USD, the same number as nano-dollars
per million tokens), so a cost is summed exactly in femto-dollars and rounded once, half
up, to nano-dollars. Price versions carry ``effective_from_ms``: an event is costed at
the price in force on its own day, and a workspace may have its own override.
"""

from __future__ import annotations

import json
import re
import unicodedata
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any, Final

from engine.errors import EXIT_USAGE, BudgeteerError
from engine.models import Usage, UsageEvent
from engine.money import FEMTOS_PER_NANO, MoneyError, cost_from_femtos, rate_to_femtos


class PricingError(BudgeteerError, ValueError):
    """A price file that cannot be read as a whole: bad input, with no one field to name."""

    exit_status, http_status, code = EXIT_USAGE, 400, "invalid_value"


@dataclass(frozen=True, slots=True)
class PriceTier:
    """Rates that apply once a request's input passes ``threshold_tokens`` (long context).

    A tier applies only when it has an input rate (LiteLLM keys its thresholds on
    ``input_cost_per_token_above_*``); a rate it lacks is the model's base rate."""

    threshold_tokens: int
    input: int | None = None
    output: int | None = None
    cache_read: int | None = None
    cache_write: int | None = None
    cache_write_1h: int | None = None


@dataclass(frozen=True, slots=True)
class ModelPrice:
    model: str
    provider: str
    mode: str = "chat"
    input: int = 0
    output: int = 0
    cache_read: int | None = None  # None: cached reads are charged at the input rate
    cache_write: int | None = None  # None: cache writes are charged at the input rate
    cache_write_1h: int | None = None  # None: one-hour cache writes are charged as other cache writes
    reasoning: int | None = None  # None: reasoning tokens are charged at the output rate
    tiers: tuple[PriceTier, ...] = ()
    max_input_tokens: int | None = None
    max_output_tokens: int | None = None
    capabilities: frozenset[str] = field(default_factory=frozenset)
    effective_from_ms: int = 0
    workspace: str = ""
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "provider": self.provider, "mode": self.mode, "input": self.input,
            "output": self.output, "cache_read": self.cache_read, "cache_write": self.cache_write,
            "cache_write_1h": self.cache_write_1h, "reasoning": self.reasoning,
            "tiers": [[t.threshold_tokens, t.input, t.output, t.cache_read, t.cache_write, t.cache_write_1h]
                      for t in self.tiers],
            "max_input_tokens": self.max_input_tokens, "max_output_tokens": self.max_output_tokens,
            "capabilities": sorted(self.capabilities), "effective_from_ms": self.effective_from_ms,
            "workspace": self.workspace, "source": self.source,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelPrice:
        values = dict(data)
        values["tiers"] = tuple(PriceTier(*t) for t in values.get("tiers", ()))
        values["capabilities"] = frozenset(values.get("capabilities", ()))
        return cls(**values)


# ----------------------------------------------------------------------------- cost


def cost_femtos(price: ModelPrice, usage: Usage) -> int:
    """The exact cost in femto-dollars (see ``cost_nanos``)."""
    return _femtos(price, usage.input_tokens, usage.cached_input_tokens, usage.cache_write_tokens,
                   usage.cache_write_1h_tokens, usage.output_tokens, usage.reasoning_tokens)


def uncached_cost_nanos(price: ModelPrice, input_tokens: int, output_tokens: int) -> int:
    """``cost_nanos`` of a usage with no cache and no reasoning part: a worst case or a routing
    estimate (a gateway works one out for every catalog model on every call)."""
    if not price.tiers or input_tokens <= price.tiers[0].threshold_tokens:  # no long-context tier: base rates
        return cost_from_femtos(input_tokens * price.input + output_tokens * price.output)
    return cost_from_femtos(_femtos(price, input_tokens, 0, 0, 0, output_tokens, 0))


def worst_cost_nanos(price: ModelPrice, input_tokens: int, output_tokens: int) -> int:
    """The most a call of at most ``input_tokens`` in and ``output_tokens`` out can cost at
    ``price``, however the provider splits them: every input token at the dearest input-side
    rate (uncached, cache read, cache write, one-hour write) and every output token at the
    dearer of output and reasoning, in the dearest long-context tier the input can reach.
    A hold of this is an upper bound of ``cost_nanos`` for any such usage."""
    input_rate = output_rate = 0
    for tier in (None, *price.tiers):
        if tier is not None and (tier.input is None or input_tokens <= tier.threshold_tokens):
            continue
        rate = tier.input if tier is not None and tier.input is not None else price.input
        read = tier.cache_read if tier is not None and tier.cache_read is not None else price.cache_read
        write = tier.cache_write if tier is not None and tier.cache_write is not None else price.cache_write
        write_1h = tier.cache_write_1h if tier is not None and tier.cache_write_1h is not None else price.cache_write_1h
        input_rate = max(input_rate, rate, read or 0, write or 0, write_1h or 0)
        out = tier.output if tier is not None and tier.output is not None else price.output
        output_rate = max(output_rate, out, price.reasoning or 0)
    return cost_from_femtos(input_tokens * input_rate + output_tokens * output_rate)


def uncached_costs(prices: Sequence[ModelPrice], input_tokens: int, output_tokens: int) -> list[int]:
    """``uncached_cost_nanos`` of each price, in one pass (a routed call's estimate on every
    catalog model)."""
    half = FEMTOS_PER_NANO // 2
    return [(input_tokens * p.input + output_tokens * p.output + half) // FEMTOS_PER_NANO
            if not p.tiers or input_tokens <= p.tiers[0].threshold_tokens
            else cost_from_femtos(_femtos(p, input_tokens, 0, 0, 0, output_tokens, 0)) for p in prices]


def _femtos(price: ModelPrice, inp: int, cached: int, cache_write: int, cache_write_1h: int, out: int,
            reasoning: int) -> int:
    input_rate, output_rate, read_rate = price.input, price.output, price.cache_read
    write_rate, write_1h_rate = price.cache_write, price.cache_write_1h
    for tier in reversed(price.tiers):  # sorted by threshold: the highest one passed, alone, applies
        if tier.input is not None and inp > tier.threshold_tokens:
            input_rate = tier.input
            output_rate = tier.output if tier.output is not None else output_rate
            read_rate = tier.cache_read if tier.cache_read is not None else read_rate
            write_rate = tier.cache_write if tier.cache_write is not None else write_rate
            write_1h_rate = tier.cache_write_1h if tier.cache_write_1h is not None else write_1h_rate
            break
    if write_rate is None:
        write_rate = input_rate
    return (
        (inp - cached - cache_write) * input_rate
        + cached * (read_rate if read_rate is not None else input_rate)
        + (cache_write - cache_write_1h) * write_rate
        + cache_write_1h * (write_1h_rate if write_1h_rate is not None else write_rate)
        + (out - reasoning) * output_rate
        + reasoning * (price.reasoning if price.reasoning is not None else output_rate)
    )


def cost_nanos(price: ModelPrice, usage: Usage) -> int:
    """The exact cost of a call in nano-dollars.

    ``usage.input_tokens`` includes cached reads and cache writes (``cache_write_tokens``,
    which include the one-hour writes) and ``usage.output_tokens`` includes reasoning
    tokens (the OpenAI convention), so each part is charged once, at its own rate where
    the table gives one. Past a long-context threshold (the whole prompt, cache included,
    above it: ``>``, as LiteLLM and the providers bill) the highest such tier's rates
    replace the base rates for the whole call; a rate the tier lacks stays the base one.
    """
    return cost_from_femtos(cost_femtos(price, usage))


# ----------------------------------------------------------------------------- LiteLLM format

_TIER_KEY = re.compile(r"^(input_cost_per_token|output_cost_per_token|cache_read_input_token_cost"
                       r"|cache_creation_input_token_cost_above_1hr|cache_creation_input_token_cost)"
                       r"_above_(\d+)(k?)_tokens$")
_TIER_FIELDS: Final = {
    "input_cost_per_token": "input",
    "output_cost_per_token": "output",
    "cache_read_input_token_cost": "cache_read",
    "cache_creation_input_token_cost": "cache_write",
    "cache_creation_input_token_cost_above_1hr": "cache_write_1h",
}
_RATE_FIELDS: Final = {
    "input": "input_cost_per_token",
    "output": "output_cost_per_token",
    "cache_read": "cache_read_input_token_cost",
    "cache_write": "cache_creation_input_token_cost",
    "cache_write_1h": "cache_creation_input_token_cost_above_1hr",
    "reasoning": "output_cost_per_reasoning_token",
}


def _optional_int(value: Any, key: str, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise PricingError(f"{key}: {name} must be a non-negative number (got {value!r})")
    return int(value)


def _entry(key: str, spec: dict[str, Any], effective_from_ms: int, source: str) -> ModelPrice | str:
    """One price, or the reason the entry is skipped."""
    if "input_cost_per_token" not in spec and "output_cost_per_token" not in spec:
        return f"{key}: no per-token input or output price"
    rates: dict[str, int | None] = {}
    try:
        for name, litellm_key in _RATE_FIELDS.items():
            value = spec.get(litellm_key)
            rates[name] = None if value is None else rate_to_femtos(value, litellm_key)
        tiers: dict[int, dict[str, int]] = {}
        for spec_key, value in spec.items():
            m = _TIER_KEY.match(spec_key)
            if m and value is not None:
                threshold = int(m.group(2)) * (1000 if m.group(3) else 1)
                tiers.setdefault(threshold, {})[_TIER_FIELDS[m.group(1)]] = rate_to_femtos(value, spec_key)
        max_in = _optional_int(spec.get("max_input_tokens"), key, "max_input_tokens")
        max_out = _optional_int(spec.get("max_output_tokens"), key, "max_output_tokens")
    except MoneyError as exc:
        return f"{key}: {exc.field}: {exc.reason}"
    except PricingError as exc:
        return str(exc)
    provider = spec.get("litellm_provider")
    mode = spec.get("mode")
    return ModelPrice(
        model=key,
        provider=provider if isinstance(provider, str) else "",
        mode=mode if isinstance(mode, str) else "chat",
        input=rates["input"] or 0,
        output=rates["output"] or 0,
        cache_read=rates["cache_read"],
        cache_write=rates["cache_write"],
        cache_write_1h=rates["cache_write_1h"],
        reasoning=rates["reasoning"],
        tiers=tuple(PriceTier(t, **v) for t, v in sorted(tiers.items())),
        max_input_tokens=max_in,
        max_output_tokens=max_out,
        capabilities=frozenset(k.removeprefix("supports_") for k, v in spec.items()
                               if k.startswith("supports_") and v is True),
        effective_from_ms=effective_from_ms,
        source=source,
    )


def parse_litellm(data: Any, *, effective_from_ms: int = 0, source: str = "") -> tuple[list[ModelPrice], list[str]]:
    """Read LiteLLM's ``model_prices_and_context_window.json`` (or our bundled wrapper of it).

    Returns the prices and, for every entry skipped, a line naming the key and the
    reason (no per-token price, a bad value). Unknown keys are ignored.
    """
    if isinstance(data, dict) and isinstance(data.get("models"), dict):
        data = data["models"]
    if not isinstance(data, dict):
        raise PricingError("a price file must be a JSON object of model names to prices")
    prices: list[ModelPrice] = []
    skipped: list[str] = []
    for key, spec in data.items():
        if key == "sample_spec":
            continue
        if not isinstance(spec, dict):
            skipped.append(f"{key}: not an object")
            continue
        result = _entry(key, spec, effective_from_ms, source)
        if isinstance(result, str):
            skipped.append(result)
        else:
            prices.append(result)
    return prices, skipped


# ----------------------------------------------------------------------------- the price book

_DATED = re.compile(r"^(.*?)-(\d{4}-\d{2}-\d{2}|\d{8})$")


class PriceBook:
    """Every version of every price, looked up by model, time and workspace."""

    def __init__(self) -> None:
        # (model, workspace) -> versions sorted by effective_from_ms, and their start times
        self._versions: dict[tuple[str, str], list[ModelPrice]] = {}
        self._starts: dict[tuple[str, str], list[int]] = {}
        self._names: dict[tuple[str, str], str | None] = {}
        self._vendors: dict[str, set[str]] | None = None  # a name, with and without its prefix -> vendors

    def __len__(self) -> int:
        return len({model for model, _ in self._versions})

    def add(self, price: ModelPrice) -> None:
        key = (price.model, price.workspace)
        versions = [v for v in self._versions.get(key, []) if v.effective_from_ms != price.effective_from_ms]
        versions.append(price)
        versions.sort(key=lambda v: v.effective_from_ms)
        self._versions[key] = versions
        self._starts[key] = [v.effective_from_ms for v in versions]
        self._names.clear()
        self._vendors = None

    def extend(self, prices: Iterable[ModelPrice]) -> None:
        for price in prices:
            self.add(price)

    def all_versions(self) -> list[ModelPrice]:
        return [v for versions in self._versions.values() for v in versions]

    def versions(self, model: str, provider: str | None = None) -> list[ModelPrice]:
        name = self.resolve(model, provider)
        if name is None:
            return []
        return sorted((v for (m, _), vs in self._versions.items() if m == name for v in vs),
                      key=lambda v: (v.workspace, v.effective_from_ms))

    def resolve(self, model: str, provider: str | None = None) -> str | None:
        """The table's name for ``model``: exact, then with or without a provider prefix,
        then a dated snapshot's undated base (``gpt-4o-2024-08-06`` -> ``gpt-4o``)."""
        cache_key = (model, provider or "")
        if cache_key in self._names:
            return self._names[cache_key]
        known = {m for m, _ in self._versions}
        candidates = [model]
        if "/" in model:
            candidates.append(model.split("/", 1)[1])
        elif provider:
            candidates.append(f"{provider}/{model}")
        dated = _DATED.match(model.split("/", 1)[-1])
        if dated:
            base = dated.group(1)
            candidates += [base] + ([f"{provider}/{base}"] if provider else [])
        found = next((c for c in candidates if c in known), None)
        self._names[cache_key] = found
        return found

    def catalog_name(self, model: str, provider: str | None = None) -> str:
        """The name a call's model is listed under in the catalog (``providers.catalog``), so its
        calls count against that entry: the table's name as ``resolve`` finds it (with or without
        the vendor prefix: ``gemini-2.5-flash`` from ``gemini`` is ``gemini/gemini-2.5-flash``),
        and a dated snapshot under its undated name when the table has one, as the catalog lists
        it (``claude-haiku-4-5-20251001`` is ``claude-haiku-4-5``). A model the table does not
        know keeps the name it was called by."""
        vendor = self.vendor(model)
        name = self.resolve(model, provider) or (self.resolve(model, vendor) if vendor else None)
        if name is None:
            return model
        dated = _DATED.match(name)
        return dated.group(1) if dated and self.resolve(dated.group(1)) == dated.group(1) else name

    def vendor(self, model: str) -> str | None:
        """The vendor of ``model`` as the table names it (LiteLLM's ``litellm_provider``), the
        model named with or without its vendor prefix or date (``gemini-2.5-flash`` -> ``gemini``);
        None when the table does not know it, or when more than one vendor has a model of that name."""
        if self._vendors is None:
            self._vendors = {}
            for (name, _), versions in self._versions.items():
                if versions[-1].provider:
                    for key in {name, name.split("/", 1)[-1]}:
                        self._vendors.setdefault(key, set()).add(versions[-1].provider)
        bare = model.split("/", 1)[-1]
        dated = _DATED.match(bare)
        for candidate in (model, bare, dated.group(1) if dated else ""):
            vendors = self._vendors.get(candidate)
            if vendors:
                return next(iter(vendors)) if len(vendors) == 1 else None
        return None

    def lookup(self, model: str, ts_ms: int, workspace: str = "", provider: str | None = None) -> ModelPrice | None:
        """The price in force at ``ts_ms``: a workspace override first, else the global one."""
        name = self.resolve(model, provider)
        if name is None:
            return None
        for scope in ((workspace, "") if workspace else ("",)):
            key = (name, scope)
            starts = self._starts.get(key)
            if starts:
                i = bisect_right(starts, ts_ms)
                if i:
                    return self._versions[key][i - 1]
        return None

    def price_event(self, event: UsageEvent) -> tuple[int, str]:
        """(cost_nanos, cost_source) for an event: its own cost if it has one, else computed from
        the price of its day, else (0, ``unpriced``): never a silent $0."""
        if event.cost_nanos is not None:
            return event.cost_nanos, event.cost_source
        price = self.lookup(event.model, event.ts_ms, event.workspace, event.provider)
        if price is None:
            return 0, "unpriced"
        source = "estimated" if event.cost_source == "estimated" else "computed"
        femtos = _femtos(price, event.input_tokens, event.cached_input_tokens, event.cache_write_tokens,
                         event.cache_write_1h_tokens, event.output_tokens, event.reasoning_tokens)
        return cost_from_femtos(femtos), source

    def models(self, ts_ms: int | None = None, workspace: str = "") -> list[ModelPrice]:
        """The price in force for each model (the newest, or the one at ``ts_ms``)."""
        out = []
        for model in sorted({m for m, _ in self._versions}):
            price = self.lookup(model, ts_ms if ts_ms is not None else 2**62, workspace)
            if price is not None:
                out.append(price)
        return out


@cache
def _bundled_data() -> dict[str, Any]:
    text = resources.files("engine").joinpath("data/prices.json").read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def bundled_metadata() -> dict[str, str]:
    """Where the bundled table comes from, and when."""
    data = _bundled_data()
    return {k: str(data.get(k, "")) for k in ("source", "retrieved", "selection")}


def bundled_prices() -> PriceBook:
    """A fresh book of the bundled prices (effective since forever, for every workspace)."""
    book = PriceBook()
    prices, _ = parse_litellm(_bundled_data(), source="bundled: " + bundled_metadata()["source"])
    book.extend(prices)
    return book


# ----------------------------------------------------------------------------- token estimates

# One pass of re.findall over runs of one script class; each class has its own
# characters-per-token ratio, fitted to how BPE tokenizers (cl100k, o200k) split text.
_RUNS = re.compile(
    r"(?P<latin>[A-Za-z]+)"
    r"|(?P<digits>[0-9]+)"
    r"|(?P<space>\s+)"
    r"|(?P<cjk>[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]+)"
    r"|(?P<accented>[\u00c0-\u024f]+)"
    r"|(?P<other_letters>[\u0370-\u03ff\u0400-\u052f\u0590-\u06ff\u0900-\u0dff\u0e00-\u0e7f]+)"
    r"|(?P<emoji>[\U0001F000-\U0001FAFF\u2600-\u27BF]+)"
    r"|(?P<symbol>[^\sA-Za-z0-9])"
)


def estimate_tokens(text: str) -> int:
    """A pre-flight estimate of the tokens ``text`` will cost, without a tokenizer.

    Each run of one kind of character is counted at its own rate: a Latin word of up to
    eight letters is one token and longer ones one more per seven letters, digits in groups of three
    (as cl100k and o200k split numbers), each punctuation mark or symbol as one token,
    white space as free except long runs (indentation), CJK at about one token a
    character, Cyrillic, Greek, Arabic, Hebrew and Indic scripts at about 2.5
    characters a token, and emoji at two tokens each.

    Expected error, from the published tokenizer behaviour it is modelled on (no
    tokenizer can be run here to calibrate against): within about 15% of cl100k/o200k
    on English prose, within about 25% on source code, JSON and other scripts. It is a
    budget estimate, never a bill: settled costs always use the provider's counts.
    """
    if not text:
        return 0
    tokens = 0
    for m in _RUNS.finditer(text):
        kind = m.lastgroup
        n = m.end() - m.start()
        if kind == "latin":
            tokens += 1 + (n - 2) // 7  # common words up to 8 letters are one token
        elif kind == "digits":
            tokens += (n + 2) // 3
        elif kind == "space":
            tokens += n // 8  # long indentation runs cost tokens; single spaces ride with words
        elif kind == "cjk":
            tokens += n
        elif kind in ("accented", "other_letters"):
            tokens += max(1, (n * 2 + 4) // 5)
        elif kind == "emoji":
            tokens += 2 * n
        else:
            tokens += 1
    return tokens


#: Tokens each chat message adds for its role and framing (OpenAI's documented overhead).
MESSAGE_OVERHEAD_TOKENS: Final = 4
#: A flat estimate for an image part (OpenAI's low-detail cost); high detail costs more.
IMAGE_TOKENS: Final = 85


def estimate_message_tokens(messages: list[dict[str, Any]]) -> int:
    """Estimate the prompt tokens of OpenAI-style chat messages (text parts and images)."""
    total = 3  # every reply is primed with a few tokens
    for message in messages:
        total += MESSAGE_OVERHEAD_TOKENS
        content = message.get("content")
        if isinstance(content, str):
            total += estimate_tokens(content)
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    continue
                if part.get("type") in ("image_url", "image", "input_image"):
                    total += IMAGE_TOKENS
                elif isinstance(part.get("text"), str):
                    total += estimate_tokens(part["text"])
        for key in ("name", "tool_call_id"):
            if isinstance(message.get(key), str):
                total += estimate_tokens(message[key])
        if message.get("tool_calls"):
            total += estimate_tokens(json.dumps(message["tool_calls"]))
    return total


# ----------------------------------------------------------------------------- token bounds
#
# A hold must bound what the provider can count, and no tokenizer ships at run time, so the
# input part of a hold is a proven bound rather than an estimate (README: "The worst case").
# Every tokenizer in use is byte-level BPE (OpenAI's tiktoken encodings, Llama 3's, Mistral's
# Tekken, the one Anthropic published for its earlier models) or SentencePiece with byte
# fallback (Gemini/Gemma, older Mistral and Llama): each token stands for at least one byte
# of the text, or of its NFKC form where a tokenizer normalizes first, so a text never costs
# more tokens than those bytes. What a provider adds around the text (roles, message
# separators, the reply's priming) is bounded by the constants below, from the vendors'
# documented chat formats.

#: Tokens a request's framing can add: OpenAI primes every reply with 3; Llama 3 and Gemma
#: open with a begin-of-text token and the assistant's header (up to 5).
REQUEST_FRAMING_TOKENS: Final = 16
#: Tokens each message (or embedding input) adds around its role and text: OpenAI documents
#: 3 (4 with a name); Llama 3 4 plus a line break, Gemma 3 plus a line break, SentencePiece's
#: dummy prefix one more. The role and name themselves are counted as text.
MESSAGE_FRAMING_TOKENS: Final = 8
#: Tokens an image part is held at: the most a vendor documents for one image (Anthropic
#: about 1,600; OpenAI gpt-4o high detail 1,445; gpt-4.1-mini, -nano and o4-mini 1,536 patches
#: at their multipliers, up to 3,779; Gemini 258 a tile or 1,120 at high resolution). Not a
#: bound for gpt-4o-mini, which counts an image at up to 48,169 tokens to charge gpt-4o's price.
IMAGE_BOUND_TOKENS: Final = 4_000
#: Tokens a request with tools adds once for the instructions the provider puts around them:
#: Anthropic documents a tool-use system prompt of up to 530 tokens, computer use 499.
TOOLS_PROMPT_TOKENS: Final = 1_024
#: Tokens each tool adds besides its JSON (OpenAI renders tools as TypeScript declarations),
#: and a vendor-defined tool with no schema of its own (Anthropic's computer use 735 tokens,
#: text editor 700, bash 245) is held at.
TOOL_FRAMING_TOKENS: Final = 32
VENDOR_TOOL_TOKENS: Final = 1_024

IMAGE_PART_TYPES: Final = frozenset({"image_url", "image", "input_image"})
#: Request fields that carry no text the model reads (sampling, limits, routing, metadata).
NOT_PROMPT_FIELDS: Final = frozenset({
    "model", "stream", "stream_options", "max_tokens", "max_completion_tokens", "max_output_tokens", "n",
    "temperature", "top_p", "top_k", "seed", "user", "metadata", "store", "logprobs", "top_logprobs",
    "presence_penalty", "frequency_penalty", "logit_bias", "stop", "stop_sequences", "service_tier",
    "parallel_tool_calls", "reasoning_effort", "reasoning", "thinking", "encoding_format", "dimensions",
    "truncation", "include", "background", "safety_identifier", "prompt_cache_key", "modalities", "verbosity"})
_TOOL_FIELDS: Final = ("tools", "functions")


def text_bound(text: str) -> int:
    """The most tokens ``text`` can be: its UTF-8 bytes, or those of its NFKC form if more
    (one character, U+FDFA, grows from 3 bytes to 33)."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if not text.isascii():
        size = max(size, len(unicodedata.normalize("NFKC", text).encode("utf-8", "surrogatepass")))
    return size


def json_bound(value: Any) -> int:
    """The most tokens a JSON value can be as a provider renders it (tool schemas, tool calls,
    unknown content parts): its compact JSON's bytes, strings unescaped, with each image part
    at ``IMAGE_BOUND_TOKENS``. Walked without recursion, whatever the nesting."""
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += text_bound(item) + 2
        elif isinstance(item, dict):
            if item.get("type") in IMAGE_PART_TYPES:
                total += IMAGE_BOUND_TOKENS
                continue
            total += 2 + 2 * len(item) + sum(text_bound(str(key)) + 2 for key in item)
            stack.extend(item.values())
        elif isinstance(item, list):
            total += 2 + len(item)
            stack.extend(item)
        else:
            total += len(json.dumps(item))
    return total


def _message_bound(message: Any) -> int:
    """One message (or input item) at most: framing, its text parts as text, the rest as JSON."""
    if isinstance(message, str):
        return MESSAGE_FRAMING_TOKENS + text_bound(message)
    if isinstance(message, int) and not isinstance(message, bool):
        return 1  # a token id
    if not isinstance(message, dict):
        return json_bound(message)
    if message.get("type") in IMAGE_PART_TYPES:
        return IMAGE_BOUND_TOKENS
    total = MESSAGE_FRAMING_TOKENS
    for key, value in message.items():
        if key in ("content", "text") and isinstance(value, str):
            total += text_bound(value)
        elif key == "content" and isinstance(value, list):
            total += sum(text_bound(part["text"]) if isinstance(part, dict) and part.get("type") in (
                "text", "input_text", "output_text") and isinstance(part.get("text"), str)
                and len(part) == 2 else json_bound(part) for part in value)
        elif key == "role" and isinstance(value, str):
            total += text_bound(value)
        else:
            total += text_bound(str(key)) + json_bound(value)
    return total


def prompt_bound(body: Mapping[str, Any]) -> int:
    """The most input tokens a provider can count for a chat, messages, responses or embeddings
    request: each message at its text's bytes and framing, every other field that carries text
    (system, instructions, tools, response formats, unknown fields) as JSON, images at
    ``IMAGE_BOUND_TOKENS``, and the request's framing. Content the request only refers to
    (``previous_response_id``, a stored prompt, files by id, server tools' results) cannot be
    bounded from the body."""
    total = REQUEST_FRAMING_TOKENS
    for key, value in body.items():
        if key in NOT_PROMPT_FIELDS:
            continue
        if key in ("messages", "input") and isinstance(value, list):
            total += sum(_message_bound(item) for item in value)
        elif key in ("input", "instructions", "system", "prompt") and isinstance(value, str):
            total += MESSAGE_FRAMING_TOKENS + text_bound(value)
        else:
            total += text_bound(key) + json_bound(value)
        if key in _TOOL_FIELDS and isinstance(value, list) and value:
            total += TOOLS_PROMPT_TOKENS + TOOL_FRAMING_TOKENS * len(value) + VENDOR_TOOL_TOKENS * sum(
                1 for tool in value if isinstance(tool, dict) and tool.get("type") not in (None, "function", "custom")
                and "input_schema" not in tool)
    return total
