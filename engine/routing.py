"""Routing: how hard a prompt is, which models could take it, and the cheapest one that is
capable enough, with every step explained.

**Complexity score.** Eight features of the request, each measured in [0, 1], times its
weight; the weights add up to 1, so the score is in [0, 1]:

=====================  ======  ====================================================
feature                weight  measure (1.0 at or past)
=====================  ======  ====================================================
length                 0.10    4,000 characters of text
estimated tokens       0.15    8,000 estimated prompt tokens
code                   0.15    a fenced block, or 6+ lines that look like code (0.5: code named)
structured output      0.10    a JSON schema / json_object response format, or "JSON" asked for
tools                  0.10    tools offered (1 tool 0.5, 3 or more 1.0)
images                 0.10    an image part (1 image 0.6, 2 or more 1.0)
reasoning cues         0.20    3 words such as prove, derive, step by step, trade-off
conversation depth     0.10    10 earlier messages
=====================  ======  ====================================================

**Tier needed.** Under 0.2 any tier (1) does; under 0.4 tier 2; under 0.6 tier 3; else 4.
Cost tiers come from the price table (``engine.providers.cost_tier``).

**Candidates.** Every model of the catalog, dropped when it lacks a capability the call
needs (tools, json, vision), when the prompt and its output do not fit its context, when
its provider's breaker is open, or when a budget would block the call on it.

**Choice.** The cheapest candidate (by estimated cost of this call) whose tier meets the
need; when no candidate meets it, the requested model stays.

**Modes.** ``suggest`` recommends only; ``dry_run`` records what would have changed;
``enforced`` rewrites the model. Every decision is recorded for the dashboard.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple

from engine.models import FieldError
from engine.pricing import estimate_message_tokens, uncached_costs
from engine.providers import CatalogModel

Mode = Literal["suggest", "dry_run", "enforced"]
MODES: Final = ("suggest", "dry_run", "enforced")

WEIGHTS: Final[Mapping[str, float]] = {
    "length": 0.10, "tokens": 0.15, "code": 0.15, "structured": 0.10, "tools": 0.10, "images": 0.10,
    "reasoning": 0.20, "depth": 0.10,
}
TIER_THRESHOLDS: Final = (0.20, 0.40, 0.60)
DEFAULT_OUTPUT_TOKENS: Final = 1024
_CODE_LINE = re.compile(r"^\s*(def |class |import |from \S+ import|function |const |let |var |public |"
                        r"#include|SELECT |for \(|if \(|return |\}|\{|</?\w+>)|;\s*$|=>")
# Words are matched against the set of the prompt's words, in one pass over the text (a regex
# alternation of them all, tried at every position, took 0.15 ms for 1 KB); the few phrases of
# more than one word are looked for only when their first word is there.
_WORD = re.compile(r"\w+")
_REASONING_WORDS: Final = frozenset({
    "prove", "proof", "derive", "derivation", "reason", "reasoning", "analyze", "analyse", "analysis", "tradeoff",
    "tradeoffs", "compare", "contrast", "why", "optimize", "optimise", "theorem", "algorithm", "complexity",
    "evaluate", "critique", "plan", "design", "debug", "architecture", "strategy"})
_REASONING_PHRASES = re.compile(r"\b(step[- ]by[- ]step|trade-offs?|root cause)\b")
_REASONING_FIRST: Final = frozenset({"step", "trade", "root"})
_CODE_WORDS: Final = frozenset({"python", "javascript", "typescript", "java", "golang", "rust", "sql", "regex", "bash",
                                "function", "method", "class", "api", "compile", "refactor"})
_CODE_PHRASES = re.compile(r"\b(stack trace|unit tests?)\b")
_CODE_FIRST: Final = frozenset({"stack", "unit"})
_JSON_WORDS: Final = frozenset({"json", "yaml", "schema"})


def _found(words: frozenset[str], text: str, singles: frozenset[str], phrases: re.Pattern[str],
           first: frozenset[str]) -> tuple[str, ...]:
    """The keywords (``singles``, and ``phrases`` of several words) the lower-cased ``text``
    holds, each once, sorted; ``words`` is the set of its words."""
    hits = words & singles
    if words & first:
        hits = hits | set(phrases.findall(text))
    return tuple(sorted(hits)) if hits else ()


class Feature(NamedTuple):  # a tuple: eight are made for every routed call, at a fifth of a dataclass's cost
    name: str
    value: float  # the measure, in [0, 1]
    weight: float
    note: str

    @property
    def contribution(self) -> float:
        return self.value * self.weight


class _Seen(NamedTuple):
    """What the scorer saw in a request, from which its features are told."""

    characters: int
    tokens: int
    fenced: bool
    code_lines: int
    code_words: tuple[str, ...]
    structured: float
    response_format: str | None
    tools: int
    images: int
    cues: tuple[str, ...]
    depth: int

    def measures(self) -> tuple[float, ...]:
        """Each feature's measure in [0, 1], in WEIGHTS' order."""
        return (_measure(self.characters / 4000), _measure(self.tokens / 8000),
                _measure(1.0 if self.fenced else max(self.code_lines / 6, 0.5 if self.code_words else 0.0)),
                self.structured, 0.0 if not self.tools else 0.5 if self.tools < 3 else 1.0,
                0.0 if not self.images else 0.6 if self.images == 1 else 1.0,
                _measure(len(self.cues) / 3), _measure(self.depth / 10))

    def notes(self) -> tuple[str, ...]:
        return (f"{self.characters:,} characters", f"about {self.tokens:,} prompt tokens",
                "a fenced code block" if self.fenced else f"{self.code_lines} lines that look like code"
                + (f"; mentions {', '.join(self.code_words)}" if self.code_words else ""),
                f"response_format {self.response_format}" if self.response_format else
                ("asks for JSON/YAML/a schema" if self.structured else "free text"),
                f"{self.tools} tools", f"{self.images} images",
                ", ".join(self.cues) if self.cues else "no reasoning cues", f"{self.depth} earlier messages")


def _measure(value: float) -> float:
    return round(1.0 if value > 1.0 else value if value > 0.0 else 0.0, 3)


_WEIGHTS: Final = tuple(WEIGHTS.items())
_W: Final = tuple(WEIGHTS.values())
_NO_NEEDS: Final[frozenset[str]] = frozenset()


class Score(NamedTuple):  # a tuple, as Decision: made for every routed call, at a fraction of a dataclass's cost
    seen: _Seen
    needs: frozenset[str]  # capabilities the call needs: tools, json, vision
    value: float  # the weighted sum of the features, in [0, 1]
    tier_needed: int  # the lowest cost tier fit for it

    @property
    def input_tokens(self) -> int:
        return self.seen.tokens

    @property
    def features(self) -> tuple[Feature, ...]:
        """Each feature's measure, weight and a note of what was seen (told when asked: a
        gateway's call needs only the value)."""
        return tuple(Feature(name, measure, weight, note) for (name, weight), measure, note
                     in zip(_WEIGHTS, self.seen.measures(), self.seen.notes(), strict=True))


def _text_of(messages: list[dict[str, Any]]) -> tuple[str, int]:
    """All the text of the messages, and how many images they carry."""
    parts, images = [], 0
    for message in messages:
        if not isinstance(message, dict):
            raise FieldError("messages", "each message must be an object with a role and content")
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    continue
                if part.get("type") in ("image_url", "image", "input_image"):
                    images += 1
                elif isinstance(part.get("text"), str):
                    parts.append(part["text"])
    return "\n".join(parts), images


def score(request: Mapping[str, Any], input_tokens: int | None = None) -> Score:
    """The complexity of an OpenAI-style chat request (``messages``, ``tools``,
    ``response_format``); each feature's measure, weight and a note saying what was seen.
    ``input_tokens``: the prompt's estimate, when the caller has made it already."""
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise FieldError("messages", "must be a non-empty list of chat messages")
    text, images = _text_of(messages)
    fmt = request.get("response_format")
    fmt_type = fmt.get("type") if isinstance(fmt, dict) else None
    tools = request.get("tools") or request.get("functions") or []
    lower = text.lower()
    words = frozenset(_WORD.findall(lower))
    seen = _Seen(
        characters=len(text),
        tokens=estimate_message_tokens(messages) if input_tokens is None else input_tokens,
        fenced=text.count("```") >= 2,
        code_lines=sum(1 for line in text.splitlines() if _CODE_LINE.search(line)),
        code_words=_found(words, lower, _CODE_WORDS, _CODE_PHRASES, _CODE_FIRST),
        structured=1.0 if fmt_type in ("json_schema", "json_object") else 0.5 if words & _JSON_WORDS else 0.0,
        response_format=fmt_type,
        tools=len(tools) if isinstance(tools, list) else 0,
        images=images,
        cues=_found(words, lower, _REASONING_WORDS, _REASONING_PHRASES, _REASONING_FIRST),
        depth=len(messages) - 1)
    m = seen.measures()
    value = min(1.0, max(0.0, m[0] * _W[0] + m[1] * _W[1] + m[2] * _W[2] + m[3] * _W[3] + m[4] * _W[4]
                         + m[5] * _W[5] + m[6] * _W[6] + m[7] * _W[7]))
    needs: frozenset[str] = _NO_NEEDS
    if seen.tools or fmt_type in ("json_schema", "json_object") or images:
        needs = frozenset(name for name, wanted in (("tools", seen.tools), ("json", fmt_type in (
            "json_schema", "json_object")), ("vision", images)) if wanted)
    tier = 1 if value < TIER_THRESHOLDS[0] else 2 if value < TIER_THRESHOLDS[1] else 3 if value < TIER_THRESHOLDS[2] \
        else 4
    return Score(seen, needs, value, tier)


class Candidate(NamedTuple):
    model: CatalogModel
    estimated_cost: int  # nano-dollars for this call (prompt estimate plus max output)
    kept: bool
    why: str


class Decision(NamedTuple):
    score: Score
    requested: str
    requested_cost: int | None
    chosen: str
    chosen_provider: str
    chosen_cost: int | None
    mode: Mode
    applied: str  # the model the call goes to: chosen under enforced, else requested
    reason: str
    candidates: tuple[Candidate, ...] = ()

    @property
    def changed(self) -> bool:
        return self.chosen != self.requested

    @property
    def saving(self) -> int:
        """Estimated nano-dollars the choice saves on this call (0 when unknown or dearer)."""
        if self.requested_cost is None or self.chosen_cost is None:
            return 0
        return max(0, self.requested_cost - self.chosen_cost)

    def as_dict(self) -> dict[str, Any]:
        s = self.score
        return {
            "score": round(s.value, 3), "tier_needed": s.tier_needed, "input_tokens": s.input_tokens,
            "needs": sorted(s.needs),
            "features": [{"name": f.name, "value": f.value, "weight": f.weight,
                          "contribution": round(f.contribution, 4), "note": f.note} for f in s.features],
            "candidates": [{"model": c.model.model, "provider": c.model.provider, "cost_tier": c.model.cost_tier,
                            "estimated_cost_nanos": c.estimated_cost, "kept": c.kept, "why": c.why}
                           for c in self.candidates],
            "requested": self.requested, "requested_cost_nanos": self.requested_cost, "chosen": self.chosen,
            "chosen_provider": self.chosen_provider, "chosen_cost_nanos": self.chosen_cost, "mode": self.mode,
            "applied": self.applied, "changed": self.changed, "saving_nanos": self.saving, "reason": self.reason,
            "cause": cause(self),
        }


def cause(d: Decision) -> str:
    """What decided, in one sentence, for explain (dashboard and command line alike): how many
    candidates were kept and why the others were dropped, most common cause first (the budget
    that would block, with its numbers; the degraded provider; the capability or context
    missing; the tier too low), then the choice's reason: ``0 of 42 candidates kept (dropped:
    40 budget Support daily ($6.10 of $6.00 this day spent or held) would block it, 2 lacks
    tools); no candidate meets the need; the requested model stays.``"""
    if not d.candidates:
        return f"{d.reason}."
    groups: dict[str, int] = {}
    for c in d.candidates:
        if not c.kept:
            key = "context too small" if c.why.startswith("context ") else \
                "tier below the one needed" if c.why.startswith("tier ") else c.why
            groups[key] = groups.get(key, 0) + 1
    dropped = ", ".join(f"{n} {why}" for why, n in sorted(groups.items(), key=lambda g: -g[1]))
    kept = sum(c.kept for c in d.candidates)
    return (f"{kept} of {len(d.candidates)} candidates kept" + (f" (dropped: {dropped})" if dropped else "")
            + f"; {d.reason}.")


def choose(s: Score, catalog: list[CatalogModel], *, requested: str, mode: Mode, max_tokens: int | None,
           unhealthy: Mapping[str, str], blocked: Mapping[str, str], costs: Sequence[int] | None = None) -> Decision:
    """Filter the catalog for this call and pick the cheapest capable-enough candidate, with
    every candidate and why it was kept or not. ``unhealthy`` maps a provider to why it is out;
    ``blocked`` maps a model to the budget that would refuse the call on it; ``costs``, each
    catalog model's estimate for this call if already worked out."""
    output = max_tokens or DEFAULT_OUTPUT_TOKENS
    if costs is None:
        costs = uncached_costs([m.price for m in catalog], s.input_tokens, output)
    needed, tier = s.input_tokens + output, s.tier_needed
    candidates: list[Candidate] = []
    for m, cost in zip(catalog, costs, strict=True):
        missing = sorted(s.needs - m.capabilities)
        if missing:
            why, ok = f"lacks {', '.join(missing)}", False
        elif m.context and needed > m.context:
            why, ok = f"context {m.context:,} < {needed:,} tokens needed", False
        elif m.provider in unhealthy:
            why, ok = f"provider {m.provider} is degraded: {unhealthy[m.provider]}", False
        elif m.model in blocked:
            why, ok = f"budget {blocked[m.model]} would block it", False
        elif m.cost_tier < tier:
            why, ok = f"tier {m.cost_tier} is below the tier {tier} this prompt needs", False
        else:
            why, ok = f"tier {m.cost_tier} meets tier {tier}", True
        candidates.append(Candidate(m, cost, ok, why))
    best = min((c for c in candidates if c.kept), key=lambda c: (c.estimated_cost, c.model.model), default=None)
    asked = next((c for c in candidates if c.model.model == requested), None)
    ordered = tuple(sorted(candidates, key=lambda c: (not c.kept, c.estimated_cost, c.model.model)))
    return decision(s, requested, mode, best, asked, ordered)


class Shortlist(NamedTuple):
    """The catalog models a kind of call can go to, worked out once per catalog, need, tier
    and set of unhealthy providers (a gateway routes every call; these repeat)."""

    usable: tuple[int, ...]  # capable, healthy, of the tier or above (context not checked), in catalog order
    frontier: tuple[int, ...]  # those of them that can be the cheapest when the call fits every one
    min_context: int  # the smallest context among them (0: none has a limit)


def shortlist(catalog: Sequence[CatalogModel], needs: frozenset[str], tier: int,
              unhealthy: Mapping[str, str]) -> Shortlist:
    """``usable``, and its ``frontier``: a model is left out of the frontier when another one
    costs no more per input token and per output token, sorts before it by name and has no
    long-context tiers (its cost is then never above, so it always ranks first), which keeps
    the cheapest by (cost, name) whatever the call's token counts."""
    usable = tuple(i for i, m in enumerate(catalog)
                   if needs <= m.capabilities and m.provider not in unhealthy and m.cost_tier >= tier)
    flat = [i for i in usable if not catalog[i].price.tiers]
    frontier = tuple(j for j in usable if catalog[j].price.tiers or not any(
        catalog[i].price.input <= catalog[j].price.input and catalog[i].price.output <= catalog[j].price.output
        and catalog[i].model < catalog[j].model for i in flat))
    return Shortlist(usable, frontier, min((catalog[i].context for i in usable if catalog[i].context), default=0))


def cheapest(catalog: Sequence[CatalogModel], short: Shortlist, input_tokens: int, output_tokens: int,
             also: int | None = None) -> tuple[int | None, dict[int, int]]:
    """The usable model cheapest for this call, by (estimated cost, name; the first in catalog
    order on a tie), and the estimate of each model priced (``also``: one more to price, the
    requested model). Only the frontier is priced when the call fits every usable model."""
    needed = input_tokens + output_tokens
    pool = short.frontier if not short.min_context or needed <= short.min_context else tuple(
        i for i in short.usable if not (catalog[i].context and needed > catalog[i].context))
    priced = pool if also is None or also in pool else (*pool, also)
    cost_of = dict(zip(priced, uncached_costs([catalog[i].price for i in priced], input_tokens, output_tokens),
                       strict=True))
    return min(pool, key=lambda i: (cost_of[i], catalog[i].model), default=None), cost_of


def decision(s: Score, requested: str, mode: Mode, best: Candidate | None, asked: Candidate | None,
              candidates: tuple[Candidate, ...]) -> Decision:
    """The choice: the requested model when it is capable and nothing capable is cheaper, else
    the cheapest capable (``best``), else the requested model all the same."""
    chosen_cost: int | None
    requested_cost = asked.estimated_cost if asked else None
    if asked is not None and asked.kept and best is not None and asked.estimated_cost <= best.estimated_cost:
        chosen, provider, chosen_cost = requested, asked.model.provider, asked.estimated_cost
        reason = f"{requested} is already the cheapest model of tier {s.tier_needed} or above"
    elif best is not None:
        chosen, provider, chosen_cost = best.model.model, best.model.provider, best.estimated_cost
        reason = f"{chosen} is the cheapest model of tier {s.tier_needed} or above"
    else:
        chosen, provider, chosen_cost = requested, asked.model.provider if asked else "", requested_cost
        reason = "no candidate meets the need; the requested model stays"
    applied = chosen if mode == "enforced" else requested
    return Decision(s, requested, requested_cost, chosen, provider, chosen_cost, mode, applied, reason, candidates)


@dataclass(frozen=True, slots=True)
class Recorded:
    """A routing decision as the ledger keeps it."""

    ts_ms: int
    request_id: str
    principal: str
    mode: str
    requested: str
    chosen: str
    applied: str
    score: float
    requested_cost: int
    chosen_cost: int
    reason: str

    @property
    def saving(self) -> int:
        return max(0, self.requested_cost - self.chosen_cost) if self.chosen != self.requested else 0


@dataclass(frozen=True, slots=True)
class Summary:
    decisions: int
    changed: int
    saved: int  # nano-dollars, by enforced rewrites
    would_save: int  # nano-dollars, had suggest and dry_run decisions been applied


def parse_mode(text: str) -> Mode:
    value = text.strip().lower().replace("-", "_")
    if value not in MODES:
        raise FieldError("mode", f"must be suggest, dry_run or enforced, not {text!r}")
    return value  # type: ignore[return-value]
