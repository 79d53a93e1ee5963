"""``budgeteer ledger copy FROM TO``: a ledger moved between SQLite and PostgreSQL, exact."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from engine.ledger import is_dsn, redacted
from engine.money import format_usd, format_usd_plain
from tui.cli.common import EXIT_OK, Parser, UsageError, dump_json, progress_bar, vault_engine


def _location(text: str, name: str) -> str:
    text = (text or "").strip()
    if not text:
        raise UsageError(f"{name}: is empty; give a ledger file or a postgresql://user@host:port/db address")
    if text.startswith(("postgres:", "postgresql:")) and not is_dsn(text):
        raise UsageError(f"{name}: {redacted(text)} is not a database address; write it as "
                         "postgresql://user@host:port/db")
    return text


async def cmd_ledger_copy(args: argparse.Namespace) -> int:
    source, target = _location(args.source, "FROM"), _location(args.target, "TO")
    if not is_dsn(source):
        path = Path(source).expanduser()
        if path.is_dir():
            raise UsageError(f"FROM: {path} is a folder, not a ledger file")
        if not path.exists():
            raise UsageError(f"FROM: there is no ledger file at {path}")
    args.db = source
    shown = redacted(target)
    async with await vault_engine(args) as engine:
        with progress_bar(f"Copying the ledger to {shown}", quiet=args.json) as bar:
            def progress(done: int, total: int, table: str) -> None:
                bar(done, max(total, 1), description=f"Copying {table.replace('_', ' ')}")

            report = await engine.copy_ledger(target, progress=progress)
    if args.json:
        print(dump_json({**report.as_dict(), "cost_usd": format_usd_plain(report.cost_nanos)}))
        return EXIT_OK
    width = max(len(name) for name in report.tables)
    print(f"Copied the ledger {report.ledger_id} from {report.source} to {report.target} in {report.seconds:.1f} s:")
    for name, rows in report.tables.items():
        print(f"  {name.ljust(width)}  {rows:>12,}")
    print(f"{report.events:,} events, {format_usd(report.cost_nanos)} in all, {report.rows:,} rows. "
          f"Check it with: budgeteer audit verify --db {report.target}")
    return EXIT_OK


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("ledger", help="move a ledger: copy it into an empty one (SQLite or PostgreSQL)",
                       description="A ledger as a whole.")
    lsub = p.add_subparsers(dest="ledger_command", parser_class=Parser, metavar="ACTION", required=True)
    q = lsub.add_parser("copy", help="copy every record of FROM into the empty ledger TO, exact",
                        description="Copy a ledger into an empty one: SQLite to PostgreSQL, PostgreSQL to SQLite "
                                    "(or either to its own kind). Every record with its id, the ledger's id and "
                                    "the audit journal (its key shared with TO's vault), in one transaction: all "
                                    "of it or nothing. TO must be empty (a new file, or an empty database). FROM "
                                    "is read as it was when the copy began; what is written to it meanwhile is "
                                    "not copied. Needs the manage_members permission on FROM.")
    q.add_argument("source", metavar="FROM", help="the ledger to copy: a file or postgresql://user@host:port/db")
    q.add_argument("target", metavar="TO", help="an empty ledger: a new file or an empty PostgreSQL database")
    q.add_argument("--json", action="store_true", help="print what was copied as JSON")
    q.set_defaults(handler=cmd_ledger_copy)
