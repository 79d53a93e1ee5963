"""``budgeteer policy``: budgets added, listed, shown, edited, backtested and removed."""

from __future__ import annotations

import argparse
import time
from typing import Any

from engine.budgets import EDITABLE, Outcome, Overshoot, build_policy, edited_policy
from engine.clock import iso
from engine.engine import Engine
from engine.money import format_percent
from tui.cli.common import EXIT_OK, Parser, UsageError, dump_json, open_engine, progress_bar, table


def _policy_row(o: Outcome, over: list[Overshoot]) -> list[str]:
    p = o.policy
    fmt = p.format_amount
    used = o.consumed + o.held
    pct = format_percent(used, p.hard)
    return [p.id, p.name[:40], str(p.scope), str(p.window) + ("" if p.window.tz == "UTC" else f" {p.window.tz}"),
            p.mode if p.enabled else "disabled", fmt(o.consumed), fmt(o.held), fmt(p.hard), pct,
            fmt(sum(x.excess for x in over)) if over else "-"]


def _policy_json(o: Outcome, over: list[Overshoot]) -> dict[str, Any]:
    return {**o.policy.to_json(), "consumed": o.consumed, "held": o.held,
            "window_start": iso(o.window_start_ms), "window_end": iso(o.window_end_ms), "status": o.status,
            "overshoot": sum(x.excess for x in over),
            "overshoots": [{"request_id": x.request_id, "ts": iso(x.ts_ms), "held": x.held, "settled": x.settled}
                           for x in over]}


async def _with_overshoots(engine: Engine) -> list[tuple[Outcome, list[Overshoot]]]:
    """Each policy's status and the calls settled above their hold on it in its current window."""
    status = await engine.policy_status()
    found = await engine.overshoots(min((o.window_start_ms for o in status), default=0))
    return [(o, [x for x in found if x.policy_id == o.policy.id and x.ts_ms >= o.window_start_ms]) for o in status]


async def cmd_policy_add(args: argparse.Namespace) -> int:
    async with await open_engine(args) as engine:
        policy = build_policy(scope=args.scope, metric=args.metric, window=args.window, hard=args.hard, soft=args.soft,
                              mode=args.mode, action=args.action, tz=args.tz, name=args.name,
                              thresholds=args.thresholds, actor=engine.actor, now_ms=engine.now_ms())
        await engine.add_policy(policy)
    if args.json:
        print(dump_json(policy.to_json()))
    else:
        print(f"Added policy {policy.id}: {policy.name} (hard {policy.format_amount(policy.hard)}, {policy.mode}).")
    return EXIT_OK


async def cmd_policy_list(args: argparse.Namespace) -> int:
    async with await open_engine(args) as engine:
        status = await _with_overshoots(engine)
    if args.json:
        print(dump_json([_policy_json(o, over) for o, over in status]))
    elif not status:
        print("No policies yet. Add one with: budgeteer policy add --scope team:ml --metric usd --window month "
              "--hard 500")
    else:
        print(table(["id", "name", "scope", "window", "mode", "consumed", "held", "hard", "used", "overshoot"],
                    [_policy_row(o, over) for o, over in status], right=range(5, 10)))
    return EXIT_OK


async def cmd_policy_show(args: argparse.Namespace) -> int:
    async with await open_engine(args) as engine:
        await engine.policy(args.id)
        status, over = {o.policy.id: (o, x) for o, x in await _with_overshoots(engine)}[args.id]
    if args.json:
        print(dump_json(_policy_json(status, over)))
        return EXIT_OK
    p = status.policy
    fmt = p.format_amount
    rows = [["name", p.name], ["scope", str(p.scope)], ["metric", p.metric],
            ["window", f"{p.window} ({p.window.tz}), now {iso(status.window_start_ms)} to "
                       f"{iso(status.window_end_ms)}"],
            ["soft limit", fmt(p.soft) if p.soft is not None else "-"], ["hard limit", fmt(p.hard)],
            ["alert thresholds", ", ".join(f"{t}%" for t in p.thresholds)], ["mode", p.mode],
            ["on the hard limit", p.action], ["enabled", "yes" if p.enabled else "no"],
            ["consumed", fmt(status.consumed)], ["held", fmt(status.held)],
            ["overshoot", f"{fmt(sum(x.excess for x in over))} by {len(over)} call(s) settled above their hold"
                          if over else "-"],
            ["created", f"{iso(p.created_ms)} by {p.created_by or '?'}"],
            ["updated", f"{iso(p.updated_ms)} by {p.updated_by or '?'}"]]
    print(f"policy {p.id}")
    print("\n".join(f"  {k:<18} {v}" for k, v in rows))
    return EXIT_OK


async def cmd_policy_edit(args: argparse.Namespace) -> int:
    # An empty flag keeps the field, as an absent one does; an empty --soft removes the soft limit.
    changes: dict[str, Any] = {name: getattr(args, name) or None for name in EDITABLE if name != "enabled"}
    changes["soft"] = args.soft
    changes["enabled"] = None if args.enabled is None else args.enabled == "yes"
    async with await open_engine(args) as engine:
        policy = edited_policy(await engine.policy(args.id), changes, actor=engine.actor, now_ms=engine.now_ms())
        await engine.update_policy(policy)
    print(dump_json(policy.to_json()) if args.json else f"Updated policy {policy.id}: {policy.name}.")
    return EXIT_OK


async def cmd_policy_rm(args: argparse.Namespace) -> int:
    async with await open_engine(args) as engine:
        policy = await engine.remove_policy(args.id)
    print(f"Removed policy {policy.id}: {policy.name}.")
    return EXIT_OK



async def cmd_policy_backtest(args: argparse.Namespace) -> int:
    async with await open_engine(args) as engine:
        if args.id:
            policy = await engine.policy(args.id)
        else:
            missing = [f"--{n}" for n in ("scope", "metric", "window", "hard") if not getattr(args, n)]
            if missing:
                raise UsageError(f"give a policy ID or a draft policy; missing {', '.join(missing)}")
            policy = build_policy(scope=args.scope, metric=args.metric, window=args.window, hard=args.hard,
                                  soft=args.soft, tz=args.tz or "UTC", name=args.name or "draft", mode="enforced",
                                  thresholds=args.thresholds)
        start, end = engine.period(args.period)
        started = time.perf_counter()
        with progress_bar(f"Backtesting {policy.name}", quiet=args.json):  # no total: a pulse
            result = await engine.backtest(policy, start, end)
        elapsed = time.perf_counter() - started
    if args.json:
        print(dump_json({**result.as_dict(), "seconds": round(elapsed, 3)}))
        return EXIT_OK
    fmt = policy.format_amount
    print(f"Backtest of {policy.name} ({policy.scope}, hard {fmt(policy.hard)} per {policy.window}) over the last "
          f"{args.period}:")
    print(f"  calls in scope      {result.calls:,}")
    print(f"  would have blocked  {result.blocked:,}" + (f", first at {iso(result.first_block_ms)}"
                                                         if result.first_block_ms is not None else ""))
    print(f"  would have saved    {fmt(result.prevented)}  (of {fmt(result.prevented + result.allowed_total)})")
    print(f"  windows it blocked  {result.windows_hit:,}; soft-limit crossings {result.soft_crossings:,}")
    print(f"  ({elapsed:.2f} s)")
    return EXIT_OK


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("policy", parents=[common], help="budgets: add, list, show, edit, remove",
                       description="Budget policies: a scope, a metric, a window and limits.")
    psub = p.add_subparsers(dest="policy_command", parser_class=Parser, metavar="ACTION", required=True)

    def policy_fields(q: argparse.ArgumentParser, required: bool) -> None:
        q.add_argument("--scope", required=required, help="global, team:ml, principal:alice, model:gpt-4o, "
                       "team:ml+model:gpt-4o ...")
        q.add_argument("--metric", required=required, help="usd, tokens or requests")
        q.add_argument("--window", required=required, help="hour, day, week, month, quarter or rolling:30m|6h|7d")
        q.add_argument("--soft", help="soft limit (alerts): dollars for usd, a count otherwise")
        q.add_argument("--hard", required=required, help="hard limit: dollars for usd ($12.50), a count otherwise")
        q.add_argument("--mode", default=None if not required else "enforced",
                       help="enforced (blocks), dry_run (records would-block) or suggest (reports)")
        q.add_argument("--action", default=None if not required else "block",
                       help="on the hard limit: block, approval_required or downgrade")
        q.add_argument("--tz", default=None if not required else "UTC", help="IANA zone of calendar windows")
        q.add_argument("--name", help="a name people will recognise")
        q.add_argument("--thresholds", type=int, nargs="+", help="alert thresholds, %% of hard (default 50 80 100)")
        q.add_argument("--json", action="store_true", help="print JSON")

    q = psub.add_parser("add", parents=[common], help="add a policy")
    policy_fields(q, True)
    q.set_defaults(handler=cmd_policy_add)
    q = psub.add_parser("list", parents=[common], help="every policy with what it has consumed and holds")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=cmd_policy_list)
    q = psub.add_parser("show", parents=[common], help="one policy in full")
    q.add_argument("id")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=cmd_policy_show)
    q = psub.add_parser("edit", parents=[common], help="change a policy (fields not given are kept)")
    q.add_argument("id")
    policy_fields(q, False)
    q.add_argument("--enabled", choices=("yes", "no"), help="turn the policy on or off")
    q.set_defaults(handler=cmd_policy_edit)
    q = psub.add_parser("backtest", parents=[common], help="replay past usage against a policy or a draft")
    q.add_argument("id", nargs="?", help="an existing policy (or give a draft with the fields below)")
    policy_fields(q, False)
    q.add_argument("--period", default="30d", help="how far back to replay (default 30d)")
    q.set_defaults(handler=cmd_policy_backtest)
    q = psub.add_parser("rm", parents=[common], help="remove a policy")
    q.add_argument("id")
    q.set_defaults(handler=cmd_policy_rm)
