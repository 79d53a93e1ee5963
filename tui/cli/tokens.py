"""``budgeteer token``: API tokens created, listed, revoked and rotated."""

from __future__ import annotations

import argparse
from typing import Any

from engine.clock import iso, parse_duration_ms
from engine.money import format_usd
from tui.cli.common import EXIT_OK, Parser, dump_json, open_engine, table


async def cmd_token_create(args: argparse.Namespace) -> int:
    async with await open_engine(args) as engine:
        expires = engine.now_ms() + parse_duration_ms(args.expires, "expires") if args.expires else None
        token, secret = await engine.create_token(name=args.name, principal=args.principal, team=args.team or "",
                                                  scopes=args.scopes, rpm=args.rpm, tpm=args.tpm, expires_ms=expires)
    if args.json:
        print(dump_json({**token.as_dict(engine.now_ms()), "secret": secret}))
        return EXIT_OK
    print(f"Created {token.id} ({token.name}) for {token.principal}, scopes {', '.join(token.scopes)}; "
          f"{token.limits}.")
    print("The secret, shown this once (store it now; Budgeteer keeps only its SHA-256):")
    print(f"  {secret}")
    return EXIT_OK


async def cmd_token_list(args: argparse.Namespace) -> int:
    async with await open_engine(args) as engine:
        found = await engine.tokens()
        now = engine.now_ms()
    if args.json:
        print(dump_json([{**t.as_dict(now), "used_this_month_nanos": t.used_this_month} for t in found]))
    elif not found:
        print("No API tokens. Create one with: budgeteer token create --name NAME --principal WHO")
    else:
        print(table(["id", "prefix", "name", "principal", "state", "scopes", "rpm", "tpm", "last used", "month"],
                    [[t.id, f"bgt_{t.prefix}…", t.name, t.principal, t.state(now), ",".join(t.scopes),
                      str(t.rpm or "-"), str(t.tpm or "-"), iso(t.last_used_ms)[:16] if t.last_used_ms else "never",
                      format_usd(t.used_this_month)] for t in found], right=[6, 7, 9]))
    return EXIT_OK


async def cmd_token_revoke(args: argparse.Namespace) -> int:
    async with await open_engine(args) as engine:
        token = await engine.revoke_token(args.id)
    print(f"Revoked {token.id} ({token.name}); calls with it are refused from now on.")
    return EXIT_OK


async def cmd_token_rotate(args: argparse.Namespace) -> int:
    async with await open_engine(args) as engine:
        old, new, secret = await engine.rotate_token(args.id)
    print(f"Revoked {old.id}; its successor is {new.id} ({new.name}). The new secret, shown this once:")
    print(f"  {secret}")
    return EXIT_OK


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("token", parents=[common], help="API tokens: create, list, revoke, rotate",
                       description="Bearer tokens for the gateway; the secret is shown once.")
    tsub = p.add_subparsers(dest="token_command", parser_class=Parser, metavar="ACTION", required=True)
    q = tsub.add_parser("create", parents=[common], help="a new token (prints its secret once)")
    q.add_argument("--name", required=True, help="what the token is for")
    q.add_argument("--principal", required=True, help="who calls with it")
    q.add_argument("--team", help="the caller's team")
    q.add_argument("--scopes", nargs="+", help="chat embeddings responses models traces usage:read "
                   "(default: chat embeddings responses models)")
    q.add_argument("--rpm", type=int, help="requests per minute at most")
    q.add_argument("--tpm", type=int, help="tokens per minute at most")
    q.add_argument("--expires", help="lifetime, e.g. 30d or 12h (default: never)")
    q.add_argument("--json", action="store_true", help="print JSON (the secret included, once)")
    q.set_defaults(handler=cmd_token_create)
    q = tsub.add_parser("list", parents=[common], help="every token, its state, last use and spend this month")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=cmd_token_list)
    q = tsub.add_parser("revoke", parents=[common], help="refuse a token from now on")
    q.add_argument("id", help="token id (tok_...) or its bgt_ prefix")
    q.set_defaults(handler=cmd_token_revoke)
    q = tsub.add_parser("rotate", parents=[common], help="revoke a token and issue its successor")
    q.add_argument("id", help="token id (tok_...) or its bgt_ prefix")
    q.set_defaults(handler=cmd_token_rotate)
