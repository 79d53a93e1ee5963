"""``budgeteer approvals``: override requests listed, asked for, approved and denied."""

from __future__ import annotations

import argparse
from typing import Any

from engine.approvals import OverrideRequest
from engine.budgets import parse_amount
from engine.clock import format_span, iso, parse_duration_ms
from engine.engine import Engine
from tui.cli.common import EXIT_OK, Parser, dump_json, open_engine, table


def _request_row(r: OverrideRequest, now: int) -> list[str]:
    fmt = r.format_amount
    granted = fmt(r.granted) if r.granted is not None else ""
    return [r.id, r.status, r.requester, r.policy_id, fmt(r.amount), granted, format_span(now - r.created_ms),
            r.reason[:60]]


async def cmd_approvals_list(args: argparse.Namespace) -> int:
    async with await open_engine(args) as engine:
        pending = None if args.all else not args.history
        requests = await engine.override_requests(pending=pending)
        now = engine.now_ms()
    if args.json:
        print(dump_json([r.as_dict() for r in requests]))
    elif not requests:
        print("No pending override requests." if pending else "No override requests.")
    else:
        print(table(["id", "status", "requester", "policy", "asked", "granted", "age", "reason"],
                    [_request_row(r, now) for r in requests]))
    return EXIT_OK


async def cmd_approvals_show(args: argparse.Namespace) -> int:
    async with await open_engine(args) as engine:
        r = await engine.override_request(args.id)
    if args.json:
        print(dump_json(r.as_dict()))
        return EXIT_OK
    lines = r.describe(engine.now_ms())
    lines[1:] = ["  " + line for line in lines[1:]]
    print("\n".join(lines))
    return EXIT_OK


async def _policy_amount(engine: Engine, policy_id: str, text: str | None, field_name: str = "amount") -> int | None:
    if text is None:
        return None
    return parse_amount(text, (await engine.policy(policy_id)).metric, field_name)


async def cmd_approvals_request(args: argparse.Namespace) -> int:
    async with await open_engine(args) as engine:
        amount = await _policy_amount(engine, args.policy, args.amount)
        assert amount is not None
        request, created = await engine.request_override(args.policy, amount, parse_duration_ms(args.ttl, "ttl"),
                                                         args.reason)
    print(("Opened" if created else "Already pending:") + f" {request.id} on {request.subject} "
          f"for {request.format_amount(request.amount)}.")
    return EXIT_OK


async def cmd_approvals_approve(args: argparse.Namespace) -> int:
    async with await open_engine(args) as engine:
        current = await engine.override_request(args.id)
        amount = await _policy_amount(engine, current.policy_id, args.amount)
        ttl = parse_duration_ms(args.ttl, "ttl") if args.ttl else None
        r = await engine.approve(args.id, amount, ttl, reason=args.reason or "")
    fmt = r.format_amount
    print(f"Approved {r.id}: {r.requester} may spend {fmt(r.granted or 0)} past {r.policy_id} "
          f"until {iso(r.grant_expires_ms or 0)}.")
    return EXIT_OK


async def cmd_approvals_deny(args: argparse.Namespace) -> int:
    async with await open_engine(args) as engine:
        r = await engine.deny(args.id, args.reason)
    print(f"Denied {r.id} ({r.requester} on {r.policy_id}): {r.decision_reason}.")
    return EXIT_OK


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("approvals", parents=[common], help="override requests: list, show, approve, deny",
                       description="Requests for headroom past a hard limit whose action is approval_required.")
    asub = p.add_subparsers(dest="approvals_command", parser_class=Parser, metavar="ACTION", required=True)
    q = asub.add_parser("list", parents=[common], help="pending requests, oldest first")
    q.add_argument("--history", action="store_true", help="decided requests instead, newest first")
    q.add_argument("--all", action="store_true", help="every request")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=cmd_approvals_list)
    q = asub.add_parser("show", parents=[common], help="one request with the evaluation that triggered it")
    q.add_argument("id")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=cmd_approvals_show)
    q = asub.add_parser("request", parents=[common], help="ask for headroom on a policy by hand")
    q.add_argument("--policy", required=True, help="policy id")
    q.add_argument("--amount", required=True, help="dollars for a usd policy, a count otherwise")
    q.add_argument("--ttl", default="1h", help="how long the headroom should last once granted (default 1h)")
    q.add_argument("--reason", required=True, help="what it is for")
    q.set_defaults(handler=cmd_approvals_request)
    q = asub.add_parser("approve", parents=[common], help="grant a request (its amount, or --amount)")
    q.add_argument("id")
    q.add_argument("--amount", help="grant this instead of what was asked")
    q.add_argument("--ttl", help="how long the grant lasts (default: what was asked)")
    q.add_argument("--reason", help="a note kept with the decision")
    q.set_defaults(handler=cmd_approvals_approve)
    q = asub.add_parser("deny", parents=[common], help="refuse a request")
    q.add_argument("id")
    q.add_argument("--reason", required=True, help="why (the requester sees it)")
    q.set_defaults(handler=cmd_approvals_deny)
