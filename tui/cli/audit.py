"""``budgeteer audit``: the hash-chained journal listed, verified and anchored."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from engine.audit import Anchor
from engine.clock import iso
from tui.cli.common import EXIT_OK, Failure, Parser, UsageError, dump_json, open_engine, read_json_file, table


async def cmd_audit_list(args: argparse.Namespace) -> int:
    async with await open_engine(args) as engine:
        found = await engine.audit_entries(limit=args.limit, text=args.filter or "")
    if args.json:
        print(dump_json([e.as_dict() for e in found]))
    elif not found:
        print("The audit journal is empty.")
    else:
        print(table(["#", "time", "actor", "action", "subject", "change"],
                    [[str(e.id), iso(e.ts_ms)[:19], e.actor, e.action, e.subject, e.summary(60)] for e in found],
                    right=[0]))
    return EXIT_OK


async def cmd_audit_verify(args: argparse.Namespace) -> int:
    anchor = None
    if args.anchor:
        try:
            anchor = Anchor.from_json(read_json_file(Path(args.anchor), "the anchor file"))
        except ValueError as exc:
            raise UsageError(f"the anchor file {args.anchor}: {exc}") from None
    async with await open_engine(args) as engine:
        result = await engine.verify_audit(anchor)
    if result.ok:
        keyed = (f"keyed from entry {result.keyed_from} by the vault's key" if result.keyed_from is not None
                 else "not keyed (the vault holds no key for this ledger yet)")
        print(f"The audit journal is intact: {result.entries:,} entries, each linked to the one before; {keyed}."
              + (f" The anchor's entry {anchor.entry} is there, unchanged." if anchor else ""))
        return EXIT_OK
    raise Failure(f"audit journal: {result.problem}")


async def cmd_audit_anchor(args: argparse.Namespace) -> int:
    async with await open_engine(args) as engine:
        anchor = await engine.audit_anchor()
    if anchor is None:
        raise Failure("the audit journal is empty: there is no head to anchor yet")
    print(dump_json({**anchor.as_dict(), "at": iso(engine.now_ms())}))
    return EXIT_OK


async def cmd_audit_key(args: argparse.Namespace) -> int:
    async with await open_engine(args) as engine:
        if args.key_action == "export":
            text = await engine.export_audit_key()
        else:
            if sys.stdin.isatty():
                raise UsageError("audit key import reads the key from stdin: "
                                 "budgeteer audit key import < key.json")
            checked = await engine.import_audit_key(sys.stdin.read())
    if args.key_action == "export":
        print(text)  # a secret, asked for: to a file, or to the other machine's 'audit key import'
    else:
        print(f"Kept the audit journal's key in this machine's vault: it verifies all {checked:,} entries.",
              file=sys.stderr)
    return EXIT_OK


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("audit", parents=[common], help="the audit journal: list, verify, anchor",
                       description="Every change and decision, each entry chained to the one before by a hash "
                                   "keyed by a key in the vault.")
    usub = p.add_subparsers(dest="audit_command", parser_class=Parser, metavar="ACTION", required=True)
    q = usub.add_parser("list", parents=[common], help="newest entries first")
    q.add_argument("--filter", help="keep entries whose actor, action or subject contain this")
    q.add_argument("--limit", type=int, default=50, help="entries at most (default 50)")
    q.add_argument("--json", action="store_true", help="print JSON (before and after included)")
    q.set_defaults(handler=cmd_audit_list)
    q = usub.add_parser("verify", parents=[common], help="check the hash chain; exit 1 naming the entry at fault")
    q.add_argument("--anchor", metavar="FILE",
                   help="an anchor 'audit anchor' printed: its entry must still be there, unchanged")
    q.set_defaults(handler=cmd_audit_verify)
    q = usub.add_parser("anchor", parents=[common],
                        help="print the head (ledger, entry id, hash) as JSON, to keep somewhere else")
    q.set_defaults(handler=cmd_audit_anchor)
    q = usub.add_parser("key", parents=[common],
                        help="carry the journal's chain key between machines sharing a PostgreSQL ledger",
                        description="export prints the key (a secret) to stdout; import reads it from stdin and "
                                    "keeps it in this machine's vault once it verifies the journal.")
    q.add_argument("key_action", choices=("export", "import"), metavar="export|import")
    q.set_defaults(handler=cmd_audit_key)
