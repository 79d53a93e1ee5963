"""``budgeteer provider`` and ``models``: the registry, the catalog, health, routing explained."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from engine.clock import iso
from engine.money import format_usd
from engine.providers import served as served_models
from engine.routing import MODES, cause
from tui.cli.common import EXIT_OK, Failure, Parser, UsageError, dump_json, open_engine, table, vault_engine


async def cmd_provider_add(args: argparse.Namespace) -> int:
    async with await open_engine(args) as engine:
        provider = await engine.add_provider(
            name=args.name, kind=args.kind, base_url=args.base_url, credential=args.credential or "",
            vendor=args.vendor or "", models=(args.models or "").split(","))
        served = served_models(engine.prices.models(engine.now_ms()), [provider])
    print(f"Added {provider.name} ({provider.kind}, {provider.base_url}), serving {len(served)} models"
          + (f", credential {provider.credential}" if provider.credential else ", no credential") + ".")
    return EXIT_OK


async def cmd_provider_list(args: argparse.Namespace) -> int:
    async with await open_engine(args) as engine:
        found = await engine.providers()
    if args.json:
        print(dump_json([p.as_dict() for p in found]))
    elif not found:
        print("No providers registered: routing considers every chat model of the price table. "
              "Add one with: budgeteer provider add NAME --kind openai --base-url URL --credential vault:REF")
    else:
        print(table(["name", "kind", "base url", "credential", "vendor", "models", "enabled"],
                    [[p.name, p.kind, p.base_url, p.credential or "-", p.vendor or "-",
                      ",".join(p.models) or "(vendor's)", "yes" if p.enabled else "no"] for p in found]))
    return EXIT_OK


async def cmd_provider_rm(args: argparse.Namespace) -> int:
    async with await open_engine(args) as engine:
        provider = await engine.remove_provider(args.name)
    print(f"Removed {provider.name}.")
    return EXIT_OK


async def cmd_models_list(args: argparse.Namespace) -> int:
    async with await open_engine(args) as engine:
        catalog = await engine.catalog()
    if args.json:
        print(dump_json([m.as_dict() for m in catalog]))
        return EXIT_OK
    print(table(["model", "provider", "tier", "latency", "input $/M", "output $/M", "context", "capabilities"],
                [[m.model, m.provider, str(m.cost_tier), m.latency_tier, format_usd(m.price.input),
                  format_usd(m.price.output), f"{m.context:,}" if m.context else "-",
                  ",".join(sorted(m.capabilities))] for m in catalog], right=[2, 4, 5, 6]))
    return EXIT_OK


async def cmd_models_status(args: argparse.Namespace) -> int:
    async with await open_engine(args) as engine:
        health, breakers = await engine.provider_health(args.minutes * 60_000)
        registered = {p.name for p in await engine.providers()}
    if args.json:
        print(dump_json({"providers": [{"provider": h.provider, "model": h.model or None, "calls": h.calls,
                                        "errors": h.errors, "error_rate": round(h.error_rate, 4),
                                        "mean_latency_ms": h.mean_latency_ms, "p95_latency_ms": h.p95_latency_ms}
                                       for h in health],
                         "breakers": {n: {"state": b.state, "since": iso(b.since_ms), "reason": b.reason}
                                      for n, b in breakers.items()}}))
        return EXIT_OK
    names = sorted(registered | {h.provider for h in health} | set(breakers))
    if not names:
        print(f"No calls in the last {args.minutes} min and no providers registered.")
        return EXIT_OK
    rows = []
    for name in names:
        b = breakers.get(name)
        degraded = b is not None and b.state != "closed"
        mine = [h for h in health if h.provider == name]
        if not mine:
            rows.append([name, "(all)", "degraded" if degraded else "no calls", "0", "-", "-", "-",
                         f"{b.state}: {b.reason}" if b and degraded else ""])
        for h in mine:  # the provider's own line ("" model) comes first
            first = not h.model
            rows.append([name if first else "", h.model or "(all)", ("degraded" if degraded else "ok") if first else "",
                         str(h.calls), f"{100 * h.error_rate:.1f}%", f"{h.mean_latency_ms:,}",
                         f"{h.p95_latency_ms:,}", f"{b.state}: {b.reason}" if first and b and degraded else ""])
    print(f"Last {args.minutes} min:")
    print(table(["provider", "model", "state", "calls", "errors", "mean ms", "p95 ms", "breaker"], rows,
                right=[3, 4, 5, 6]))
    return EXIT_OK


async def cmd_models_explain(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    request: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}]}
    async with await open_engine(args) as engine:
        decision = await engine.route(request, principal=args.principal or engine.actor, team=args.team or "",
                                      model=args.model, mode=args.mode, max_tokens=args.max_tokens, record=False)
    if args.json:
        print(dump_json(decision.as_dict()))
        return EXIT_OK
    s = decision.score
    print(f"Complexity {s.value:.3f}: needs cost tier {s.tier_needed} or above"
          + (f", and {', '.join(sorted(s.needs))}" if s.needs else "") + f"; about {s.input_tokens:,} prompt tokens.")
    print(table(["feature", "measure", "weight", "adds", "seen"],
                [[f.name, f"{f.value:.2f}", f"{f.weight:.2f}", f"{f.contribution:.3f}", f.note] for f in s.features],
                right=[1, 2, 3]))
    print()
    print(table(["", "model", "provider", "tier", "est. cost", "why"],
                [["kept" if c.kept else "dropped", c.model.model, c.model.provider, str(c.model.cost_tier),
                  format_usd(c.estimated_cost), c.why] for c in decision.candidates[:args.limit]], right=[3, 4]))
    if len(decision.candidates) > args.limit:
        print(f"... {len(decision.candidates) - args.limit} more (--limit N, or --json for all)")
    print()
    req = format_usd(decision.requested_cost) if decision.requested_cost is not None else "unpriced"
    chosen = format_usd(decision.chosen_cost) if decision.chosen_cost is not None else "unpriced"
    print(f"Choice: {decision.chosen} at about {chosen} against {decision.requested} at {req} "
          f"(saves {format_usd(decision.saving)}); {cause(decision)}")
    print(f"Mode {decision.mode}: the call would go to {decision.applied}.")
    return EXIT_OK


async def cmd_models_test(args: argparse.Namespace) -> int:
    async with await vault_engine(args) as engine:
        names = [args.provider] if args.provider else [p.name for p in await engine.providers()]
        if not names:
            raise UsageError("no providers registered; add one with budgeteer provider add")
        results = [await engine.test_connection(name, timeout_s=args.timeout) for name in names]
    if args.json:
        print(dump_json([r.as_dict() for r in results]))
    else:
        print(table(["provider", "state", "latency ms", "detail"],
                    [[r.provider, r.state, f"{r.latency_ms:,}", r.detail] for r in results], right=[2]))
    if any(r.state != "ok" for r in results):
        raise Failure(f"{sum(r.state != 'ok' for r in results)} of {len(results)} providers failed the test")
    return EXIT_OK


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("provider", parents=[common], help="the provider registry: add, list, rm")
    psub = p.add_subparsers(dest="provider_command", parser_class=Parser, metavar="ACTION", required=True)
    q = psub.add_parser("add", parents=[common], help="register a provider")
    q.add_argument("name", help="e.g. openai, anthropic, local-vllm")
    q.add_argument("--kind", required=True, help="openai (any OpenAI-compatible server) or anthropic")
    q.add_argument("--base-url", required=True, help="e.g. https://api.openai.com/v1")
    q.add_argument("--credential", help="a vault reference, vault:REF (never the key itself)")
    q.add_argument("--vendor", help="whose price-table models it serves: openai, anthropic, gemini, mistral")
    q.add_argument("--models", help="comma-separated models it serves (default: the vendor's)")
    q.set_defaults(handler=cmd_provider_add)
    q = psub.add_parser("list", parents=[common], help="registered providers")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=cmd_provider_list)
    q = psub.add_parser("rm", parents=[common], help="remove a provider")
    q.add_argument("name")
    q.set_defaults(handler=cmd_provider_rm)

    p = sub.add_parser("models", parents=[common], help="the model catalog, health, routing explained, tests")
    msub = p.add_subparsers(dest="models_command", parser_class=Parser, metavar="ACTION", required=True)
    q = msub.add_parser("list", parents=[common], help="models with tiers, prices and capabilities")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=cmd_models_list)
    q = msub.add_parser("status", parents=[common], help="provider health from the ledger, and breakers")
    q.add_argument("--minutes", type=int, default=15, help="the span to judge health over (default 15)")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=cmd_models_status)
    q = msub.add_parser("explain", parents=[common], help="score a prompt and show the routing choice")
    q.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    q.add_argument("--model", default="gpt-4o", help="the model the caller asked for (default gpt-4o)")
    q.add_argument("--principal", help="whose budgets apply (default: you)")
    q.add_argument("--team")
    q.add_argument("--max-tokens", type=int, help="output cap (default 1024)")
    q.add_argument("--mode", default="suggest", choices=MODES)
    q.add_argument("--limit", type=int, default=15, help="candidates shown (default 15)")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=cmd_models_explain)
    q = msub.add_parser("test-connection", parents=[common], help="check credentials against /models")
    q.add_argument("--provider", help="one provider (default: every registered one)")
    q.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=cmd_models_test)
