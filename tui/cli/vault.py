"""``budgeteer vault``: provider credentials in the keyring or an encrypted file."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from engine.clock import iso
from tui.cli.common import EXIT_OK, Parser, dump_json, open_engine, table, vault_engine


def _read_secret(ref: str) -> str:
    """From a hidden prompt at a terminal, else one line of standard input; never an argument."""
    if sys.stdin.isatty():
        return getpass.getpass(f"Secret for vault:{ref} (not shown): ")
    return sys.stdin.readline().rstrip("\r\n")


async def cmd_vault_status(args: argparse.Namespace) -> int:
    async with await open_engine(args) as engine:
        status = await engine.vault_status()
    if args.json:
        print(dump_json({"backend": status.backend, "why": status.why, "location": status.location}))
    else:
        print(f"backend   {status.backend}\nwhy       {status.why}\nlocation  {status.location}")
        print("Force a choice with BUDGETEER_VAULT_BACKEND=keyring|file.")
    return EXIT_OK


async def cmd_vault_set(args: argparse.Namespace) -> int:
    async with await vault_engine(args) as engine:
        secret = _read_secret(args.ref)
        entry = await engine.vault_set(args.ref, secret)
        del secret
        backend = (await engine.vault_status()).backend
    print(f"Stored vault:{entry.ref} ({entry.fingerprint}) in the {backend} vault.")
    return EXIT_OK


async def cmd_vault_list(args: argparse.Namespace) -> int:
    async with await open_engine(args) as engine:
        entries = await engine.vault_entries()
        status = await engine.vault_status()
    if args.json:
        print(dump_json([e.as_dict() for e in entries]))
    elif not entries:
        print(f"The {status.backend} vault holds no credentials. Add one with: budgeteer vault set REF")
    else:
        print(table(["reference", "fingerprint", "updated"],
                    [[f"vault:{e.ref}", e.fingerprint, iso(e.updated_ms)[:19]] for e in entries]))
    return EXIT_OK


async def cmd_vault_rm(args: argparse.Namespace) -> int:
    async with await vault_engine(args) as engine:
        entry = await engine.vault_remove(args.ref)
    print(f"Removed vault:{entry.ref} ({entry.fingerprint}).")
    return EXIT_OK


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("vault", parents=[common], help="provider credentials: status, set, list, rm",
                       description="Credentials live in the OS keyring, or an encrypted file where none works "
                                   "(BUDGETEER_VAULT_PASSPHRASE or a prompt). Secrets are never arguments.")
    vsub = p.add_subparsers(dest="vault_command", parser_class=Parser, metavar="ACTION", required=True)
    q = vsub.add_parser("status", parents=[common], help="which backend is in use, and why")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=cmd_vault_status)
    q = vsub.add_parser("set", parents=[common], help="store a credential read from stdin or a hidden prompt")
    q.add_argument("ref", help="a name such as openai-prod (used as vault:openai-prod)")
    q.set_defaults(handler=cmd_vault_set)
    q = vsub.add_parser("list", parents=[common], help="references and fingerprints, never secrets")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=cmd_vault_list)
    q = vsub.add_parser("rm", parents=[common], help="remove a credential")
    q.add_argument("ref")
    q.set_defaults(handler=cmd_vault_rm)
