"""``budgeteer alerts``: threshold crossings, projected overruns and webhooks."""

from __future__ import annotations

import argparse
from typing import Any

from engine.clock import iso
from tui.cli.common import EXIT_OK, Parser, dump_json, open_engine, table


async def cmd_alerts_list(args: argparse.Namespace) -> int:
    async with await open_engine(args) as engine:
        if args.check_forecasts:
            await engine.check_forecasts()
        alerts = await engine.alerts(include_acked=args.all)
    if args.json:
        print(dump_json([a.as_dict() for a in alerts]))
    elif not alerts:
        print("No open alerts." if not args.all else "No alerts.")
    else:
        print(table(["id", "time", "policy", "kind", "message", "acked"],
                    [[str(a.id), iso(a.ts_ms)[:16], a.policy_id,
                      f"{a.kind} {a.threshold}%" if a.kind == "threshold" else a.kind, a.message,
                      a.acked_by or ""] for a in alerts], right=[0]))
    return EXIT_OK


async def cmd_alerts_ack(args: argparse.Namespace) -> int:
    async with await open_engine(args) as engine:
        alert = await engine.ack_alert(args.id)
    print(f"Acknowledged alert {alert.id} ({alert.message}).")
    return EXIT_OK


async def cmd_alerts_webhook(args: argparse.Namespace) -> int:
    async with await open_engine(args) as engine:
        if args.remove:
            await engine.remove_webhook(args.remove)
            print(f"Removed webhook {args.remove}.")
        if args.url:
            webhook_id = await engine.add_webhook(args.url, args.kind)
            print(f"Added webhook {webhook_id} ({args.kind}).")
        for webhook_id, url, kind in await engine.webhooks():
            print(f"  {webhook_id}  {kind:<8} {url}")
    return EXIT_OK


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("alerts", parents=[common], help="budget alerts: list, acknowledge, webhooks",
                       description="Threshold crossings and projected overruns.")
    asub = p.add_subparsers(dest="alerts_command", parser_class=Parser, metavar="ACTION", required=True)
    q = asub.add_parser("list", parents=[common], help="open alerts, newest first")
    q.add_argument("--all", action="store_true", help="include acknowledged alerts")
    q.add_argument("--check-forecasts", action="store_true", help="raise projected-overrun alerts first")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=cmd_alerts_list)
    q = asub.add_parser("ack", parents=[common], help="acknowledge an alert")
    q.add_argument("id", type=int)
    q.set_defaults(handler=cmd_alerts_ack)
    q = asub.add_parser("webhook", parents=[common], help="add or remove a webhook (or list them with no URL)")
    q.add_argument("url", nargs="?", help="http(s) address to POST alerts to")
    q.add_argument("--kind", default="generic", help="generic (JSON) or slack")
    q.add_argument("--remove", metavar="ID", help="remove the webhook with this id")
    q.set_defaults(handler=cmd_alerts_webhook)
