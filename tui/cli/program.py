"""The parser every command group registers itself into, and ``main``: one run of the command
line, from the arguments to the exit status."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime
from typing import Any

from engine.errors import BudgeteerError
from tui.cli import (
    alerts,
    approvals,
    audit,
    check,
    dashboard,
    demo,
    events,
    gateway,
    ledger,
    members,
    policy,
    pricing,
    providers,
    tokens,
    usage,
    vault,
)
from tui.cli.common import EXIT_FAILURE, EXIT_OK, Parser, UsageError

#: The command groups, in the order ``budgeteer --help`` lists their commands.
GROUPS = (demo, dashboard, usage, events, policy, alerts, approvals, tokens, members, audit, gateway, vault,
          providers, check, pricing, ledger)


def build_parser() -> argparse.ArgumentParser:
    db_help = "ledger file (env BUDGETEER_DB; default: the user data directory)"
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", default=argparse.SUPPRESS, help=db_help)
    parser = Parser(prog="budgeteer", description="Govern what your organisation spends on language models. "
                    "With no command, opens the dashboard.")
    parser.add_argument("--db", default=None, help=db_help)
    parser.add_argument("--refresh", type=float, default=2.0, help="dashboard refresh in seconds (default 2)")
    parser.add_argument("--read-only", action="store_true", help="dashboard: look, change nothing")
    parser.add_argument("--theme", help="dashboard theme, e.g. ansi-dark or ansi-light to use the terminal's "
                        "own colours (default textual-dark; env BUDGETEER_THEME)")
    parser.add_argument("--version", action="version", version="budgeteer 0.1.0")
    sub = parser.add_subparsers(dest="command", parser_class=Parser, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub, common)
    return parser


def _normalise_dates(args: argparse.Namespace) -> None:
    # Accept plain dates (2026-11-01) where a time is asked for: midnight UTC.
    for name in ("effective_from", "at"):
        value = getattr(args, name, None)
        if value and len(value) == 10 and value[4] == "-":
            try:
                datetime.strptime(value, "%Y-%m-%d")
            except ValueError:
                raise UsageError(f"--{name.replace('_', '-')}: {value!r} is not a date") from None
            setattr(args, name, value + "T00:00:00Z")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "db", None) is None:
        args.db = None
    debug = bool(os.environ.get("BUDGETEER_DEBUG"))
    try:
        _normalise_dates(args)
        handler: Callable[[argparse.Namespace], Coroutine[Any, Any, int] | int] | None = getattr(args, "handler", None)
        if handler is None:
            return dashboard.run_dashboard(args.db or None, args.refresh, args.read_only,
                                           args.theme)
        done = handler(args)  # a coroutine runs in its own event loop; the gateway runs uvicorn's
        code = done if isinstance(done, int) else asyncio.run(done)
        if code == EXIT_OK and getattr(args, "open_after", None):
            return dashboard.run_dashboard(args.open_after, args.refresh, args.read_only, args.theme)
        return code
    except BudgeteerError as exc:
        if debug:
            raise
        print(f"budgeteer: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("budgeteer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        sys.stderr.close()
        return EXIT_OK
    except OSError as exc:
        if debug:
            raise
        print(f"budgeteer: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:  # the last line of defence: one sentence, never a traceback
        if debug:
            raise
        print(f"budgeteer: unexpected error: {type(exc).__name__}: {exc} (BUDGETEER_DEBUG=1 shows details)",
              file=sys.stderr)
        return EXIT_FAILURE
