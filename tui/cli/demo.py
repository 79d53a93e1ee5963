"""``budgeteer demo``: a realistic, deterministic demo ledger."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from engine.clock import DAY_MS, MINUTE_MS
from engine.engine import Engine, default_db_path, ledger_location
from engine.ledger import is_dsn, redacted, remove_ledger
from engine.money import format_usd
from tui.cli.common import EXIT_OK, UsageError, now_clock, progress_bar


def _demo_path(args: argparse.Namespace) -> tuple[Path | str, str | None]:
    """The ledger --db or BUDGETEER_DB names, as for every command, and which of them named it;
    with neither, demo.db beside the default ledger, never the ledger itself."""
    if args.db:
        return ledger_location(args.db), "--db"
    if os.environ.get("BUDGETEER_DB"):
        return ledger_location(), "BUDGETEER_DB"
    return default_db_path().with_name("demo.db"), None


async def cmd_demo(args: argparse.Namespace) -> int:
    from engine.demo import populate

    if args.days < 1 or args.days > 400:
        raise UsageError(f"--days must be between 1 and 400 (got {args.days})")
    path, named_by = _demo_path(args)
    if is_dsn(path):  # a database is never dropped by the demo: it writes only into an empty one
        async with await Engine.open(path) as probe:
            count = await probe.event_count()
        if count:
            raise UsageError(f"{named_by} {redacted(path)} already holds {count:,} events; the demo writes only to a "
                             "fresh ledger (choose another database; --replace does not empty a PostgreSQL ledger)")
    elif Path(path).exists():
        if named_by and not args.replace:
            async with await Engine.open(path) as probe:
                count = await probe.event_count()
            if count:
                raise UsageError(f"{named_by} {path} already holds {count:,} events; the demo writes only to a "
                                 "fresh ledger (choose another --db, or add --replace to start it over)")
        remove_ledger(path)
    clock = now_clock()
    started = time.perf_counter()
    async with await Engine.open(path, clock=clock, durable=False) as engine:
        end_ms = engine.now_ms()
        with progress_bar(f"Writing {args.days} days of demo traffic") as bar:
            total = await populate(engine, days=args.days, seed=args.seed, end_ms=end_ms, progress=bar)
        elapsed = time.perf_counter() - started
        month = await engine.totals(end_ms - args.days * DAY_MS, end_ms + MINUTE_MS)
    print(f"Wrote a demo ledger of {total:,} events over {args.days} days "
          f"({format_usd(month.cost_nanos)} of spend) to {redacted(path)} in {elapsed:.1f} s.")
    if args.open:
        args.open_after = path  # the dashboard runs its own event loop, after this one ends
    else:
        print(f"Open it with: budgeteer --db {redacted(path)}")
    return EXIT_OK


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("demo", parents=[common], help="write a realistic demo ledger",
                       description="Write a realistic, deterministic month of traffic to a fresh ledger "
                                   "(default: demo.db beside the default ledger).")
    p.add_argument("--days", type=int, default=30, help="days of history (default 30)")
    p.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    p.add_argument("--open", action="store_true", help="open the dashboard on it afterwards")
    p.add_argument("--replace", action="store_true", help="start over a --db ledger that already holds events")
    p.set_defaults(handler=cmd_demo)
