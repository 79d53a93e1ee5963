"""How tight a hold is: held against settled cost on the demo's prompts (README: "The worst case").

Not a timing benchmark. The settled side is counted with OpenAI's real o200k tokenizer (the
``bpe-openai`` test extra ships its table) and OpenAI's documented chat framing (3 tokens a
message, 3 to prime the reply); Anthropic's tokenizer is not published, so its models' prompts
are counted with o200k too. Each call is taken to use all of its ``max_tokens`` (the case that
matters next to a limit); the old hold (the estimate, at uncached rates) is beside the new.

    python -m bench.holds [--max-tokens 256]
"""

from __future__ import annotations

import argparse

from bpe_openai import get_encoding

from engine.demo import _DEMO_ROUTES
from engine.models import Usage
from engine.pricing import (
    bundled_prices,
    cost_nanos,
    estimate_message_tokens,
    prompt_bound,
    uncached_cost_nanos,
    worst_cost_nanos,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()
    o200k = get_encoding("o200k_base")
    prices = bundled_prices()
    calls = [(model, prompt) for _, model, prompt in _DEMO_ROUTES] + [("gpt-4o-mini", "hi")]  # + the gateway tests'
    print("| model | prompt | tokens (o200k) | bound | old estimate | held/settled | old held/settled |")
    print("|---|---|--:|--:|--:|--:|--:|")
    ratios, old_ratios = [], []
    for model, prompt in calls:
        messages = [{"role": "user", "content": prompt}]
        body = {"model": model, "max_tokens": args.max_tokens, "messages": messages}
        counted = 3 + sum(3 + len(o200k.encode(m["role"])) + len(o200k.encode(m["content"])) for m in messages)
        price = prices.lookup(model, 0)
        assert price is not None
        settled = cost_nanos(price, Usage(input_tokens=counted, output_tokens=args.max_tokens))
        held = worst_cost_nanos(price, prompt_bound(body), args.max_tokens)
        estimate = estimate_message_tokens(messages)
        old = uncached_cost_nanos(price, estimate, args.max_tokens)
        ratios.append(held / settled)
        old_ratios.append(old / settled)
        short = prompt if len(prompt) <= 32 else prompt[:30] + "…"
        print(f"| {model} | {short!r} | {counted} | {prompt_bound(body)} | {estimate} | {held / settled:.3f} | "
              f"{old / settled:.3f} |")
    print(f"\nmax_tokens {args.max_tokens}: held/settled {min(ratios):.3f} to {max(ratios):.3f}; "
          f"the old hold {min(old_ratios):.3f} to {max(old_ratios):.3f}")


if __name__ == "__main__":
    main()
