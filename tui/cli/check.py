"""``budgeteer check``: what the budgets would decide for a call."""

from __future__ import annotations

import argparse
from typing import Any

from engine.engine import CallRequest
from engine.money import format_usd, format_usd_plain
from tui.cli.common import EXIT_OK, UsageError, dump_json, open_engine


async def cmd_check(args: argparse.Namespace) -> int:
    for name in ("input_tokens", "max_tokens"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise UsageError(f"--{name.replace('_', '-')} must not be negative (got {value})")
    call = CallRequest(principal=args.principal, model=args.model, provider=args.provider or "", team=args.team or "",
                       workspace=args.workspace or "default", token_id=args.token or "", session=args.session or "",
                       agent=args.agent or "", input_tokens=args.input_tokens or 0, max_tokens=args.max_tokens)
    async with await open_engine(args) as engine:
        cost = engine.worst_case(call)
        evaluation = await engine.check(call)
    if args.json:
        print(dump_json({**evaluation.as_dict(), "worst_case": {
            "usd_nanos": cost.usd, "cost_usd": format_usd_plain(cost.usd), "tokens": cost.tokens,
            "priced": cost.priced}}))
        return EXIT_OK
    print(f"decision: {evaluation.decision}   (worst case {format_usd(cost.usd) if cost.priced else 'unpriced'}, "
          f"{cost.tokens:,} tokens)")
    if not evaluation.outcomes:
        print("No policy applies to this call.")
    for o in evaluation.outcomes:
        marker = "*" if evaluation.deciding is o else " "
        print(f" {marker} [{o.status:>4}] {o.policy.id} {o.message}")
    return EXIT_OK


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("check", parents=[common], help="what the budgets would decide for a call",
                       description="Evaluate a call against every applicable policy without holding anything.")
    p.add_argument("--principal", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--team")
    p.add_argument("--workspace")
    p.add_argument("--provider")
    p.add_argument("--token")
    p.add_argument("--session")
    p.add_argument("--agent")
    p.add_argument("--input-tokens", type=int, help="estimated input tokens (default 0)")
    p.add_argument("--max-tokens", type=int, help="output cap (default: the model's most output, else 4096)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_check)
