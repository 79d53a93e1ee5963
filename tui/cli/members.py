"""``budgeteer member``: workspace members and their roles."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from engine.clock import iso
from tui.cli.common import EXIT_OK, Parser, dump_json, open_engine, table


async def cmd_member_list(args: argparse.Namespace) -> int:
    async with await open_engine(args) as engine:
        found = await engine.members()
        me, role = engine.actor, await engine.role()
    if args.json:
        print(dump_json([m.as_dict() for m in found]))
        return EXIT_OK
    if not found:
        print(f"No members: this is a single-user ledger and {me} may do everything. "
              f"Add the first owner with: budgeteer member set {me} owner")
        return EXIT_OK
    print(table(["user", "role", "added", "by"], [[m.user, m.role, iso(m.added_ms)[:10], m.added_by] for m in found]))
    print(f"You are {me} ({role or 'not a member'}).")
    return EXIT_OK


async def cmd_member_set(args: argparse.Namespace) -> int:
    async with await open_engine(args) as engine:
        member = await engine.set_member(args.user, args.role)
        notice = await engine.member_notice(member.user)
    print(f"{member.user} is now {member.role}.")
    if notice:
        print(f"budgeteer: warning: {notice}", file=sys.stderr)
    return EXIT_OK


async def cmd_member_rm(args: argparse.Namespace) -> int:
    async with await open_engine(args) as engine:
        member = await engine.remove_member(args.user)
    print(f"Removed {member.user} ({member.role}).")
    return EXIT_OK


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("member", parents=[common], help="workspace members and roles",
                       description="Roles: owner, admin, operator, viewer. You act as BUDGETEER_USER (or your "
                                   "login) on an SQLite ledger, as the database role you connect as on PostgreSQL.")
    msub = p.add_subparsers(dest="member_command", parser_class=Parser, metavar="ACTION", required=True)
    q = msub.add_parser("list", parents=[common], help="members and their roles")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=cmd_member_list)
    q = msub.add_parser("set", parents=[common], help="add a member or change a role")
    q.add_argument("user")
    q.add_argument("role", help="owner, admin, operator or viewer")
    q.set_defaults(handler=cmd_member_set)
    q = msub.add_parser("rm", parents=[common], help="remove a member")
    q.add_argument("user")
    q.set_defaults(handler=cmd_member_rm)
