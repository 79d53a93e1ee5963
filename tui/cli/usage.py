"""``budgeteer usage``: spend and tokens for a period."""

from __future__ import annotations

import argparse
from typing import Any

from engine.clock import iso
from engine.money import format_usd, format_usd_plain
from tui.cli.common import EXIT_OK, dump_json, open_engine, period_words, table

BY_CHOICES = ("model", "provider", "team", "principal", "workspace", "token_id", "agent", "session")


async def cmd_usage(args: argparse.Namespace) -> int:
    async with await open_engine(args) as engine:
        report = await engine.usage_report(args.period, args.by, limit=args.limit)
    totals, rows = report["totals"], report["rows"]
    if args.json:
        print(dump_json({
            "period": report["period"], "start": iso(report["start_ms"]), "end": iso(report["end_ms"]),
            "by": args.by,
            "totals": {**totals.as_dict(), "cost_usd": format_usd_plain(totals.cost_nanos)},
            "rows": [{args.by: r.key, **r.totals.as_dict(), "cost_usd": format_usd_plain(r.totals.cost_nanos)}
                     for r in rows],
        }))
        return EXIT_OK
    if not totals.requests:
        print(f"No usage in {period_words(report['period'])}. Import events with 'budgeteer import FILE' "
              "or try 'budgeteer demo'.")
        return EXIT_OK
    body = []
    for r in rows:
        t = r.totals
        share = f"{100 * t.cost_nanos / totals.cost_nanos:.1f}%" if totals.cost_nanos else "-"
        body.append([r.key or "(none)", f"{t.requests:,}", f"{t.tokens:,}", format_usd(t.cost_nanos), share,
                     f"{100 * t.error_rate:.1f}%", f"{t.unpriced:,}" if t.unpriced else ""])
    body.append(["total", f"{totals.requests:,}", f"{totals.tokens:,}", format_usd(totals.cost_nanos), "100%",
                 f"{100 * totals.error_rate:.1f}%", f"{totals.unpriced:,}" if totals.unpriced else ""])
    print(f"Usage, {period_words(report['period'])} ({iso(report['start_ms'])[:16]} to "
          f"{iso(report['end_ms'])[:16]} UTC), "
          f"by {args.by}")
    print(table([args.by, "requests", "tokens", "cost", "share", "errors", "unpriced"], body, right=range(1, 7)))
    if totals.unpriced:
        print(f"\n{totals.unpriced:,} calls have no price in the table and are counted at $0 (unpriced); "
              "add prices with 'budgeteer pricing import FILE'.")
    return EXIT_OK


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("usage", parents=[common], help="spend and tokens for a period",
                       description="Totals and a breakdown of usage for a period.")
    p.add_argument("--period", default="30d", help="24h, 7d, 30d, 90d (any Nh/Nd), today, week, month, 'last month', "
                   "a range of days 2026-11-01..2026-11-15, or all (default 30d)")
    p.add_argument("--by", default="model", choices=BY_CHOICES, help="break down by (default model)")
    p.add_argument("--limit", type=int, default=50, help="rows at most (default 50)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_usage)
