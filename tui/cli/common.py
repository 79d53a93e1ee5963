"""What every command group shares: exit codes, the two errors a command raises, the parser
class, human tables and JSON, the engine opened for ``--db`` (and the vault's passphrase asked
at a terminal), periods in words, JSON files read, and the progress bar. The groups import this
module and never each other (an import-linter contract).

The progress bar is drawn on standard error for the longer work (demo, import, export, backtest, ledger copy,
screenshots), only when stderr is a terminal and the output is for people. Piped, redirected or
with ``--json``, nothing at all is written. The bar goes away when the work is done.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, NoReturn, Protocol

from engine import errors
from engine.clock import FrozenClock
from engine.engine import Engine
from engine.errors import BudgeteerError
from engine.models import FieldError, parse_timestamp_ms
from engine.vault import VaultError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, errors.EXIT_FAILURE, errors.EXIT_USAGE


class UsageError(BudgeteerError):
    """Bad usage or bad input: exit 2 with this one sentence."""

    exit_status: ClassVar[int] = EXIT_USAGE
    http_status: ClassVar[int] = 400


class Failure(BudgeteerError):
    """Anything else that stops a command: exit 1 with this one sentence."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"budgeteer: {message} (see '{self.prog} --help')\n")


# ------------------------------------------------------------------------------ output


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def dump_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=False, default=str)


def period_words(period: str) -> str:
    """``the last 7d``, ``this month``, ``last month``, ``2026-11-01..2026-11-15``, ``all time``."""
    text = " ".join(period.lower().split())
    if text and text[0].isdigit() and ".." not in text:
        return f"the last {text}"
    return {"month": "this month", "week": "this week", "all": "all time"}.get(text, text)


# ------------------------------------------------------------------------------ input


def now_clock() -> FrozenClock | None:
    """``BUDGETEER_NOW`` (ISO time or epoch ms) freezes the clock: for screenshots and demos."""
    value = os.environ.get("BUDGETEER_NOW")
    if not value:
        return None
    try:
        return FrozenClock(parse_timestamp_ms(value, "BUDGETEER_NOW"))
    except FieldError as exc:
        raise UsageError(str(exc)) from None


async def open_engine(args: argparse.Namespace) -> Engine:
    """The engine for ``--db``, acting as the operator (on PostgreSQL the database role connected
    as: a BUDGETEER_USER it does not honour is said on stderr, once, before the command's output)."""
    engine = await Engine.open(args.db, clock=now_clock())
    if engine.identity_notice:
        print(f"budgeteer: warning: {engine.identity_notice}", file=sys.stderr)
    return engine


def _ask_passphrase(engine: Engine) -> None:
    """At a terminal, the file vault's passphrase is asked for (twice for a new vault)."""
    if os.environ.get("BUDGETEER_VAULT_PASSPHRASE") or not sys.stdin.isatty():
        return

    def ask() -> str:
        first = getpass.getpass("Vault passphrase: ")
        if not engine.vault().path.exists() and getpass.getpass("Again, to confirm (a new vault): ") != first:
            raise VaultError("the two passphrases differ; nothing was stored")
        return first

    engine.vault_passphrase = ask


async def vault_engine(args: argparse.Namespace) -> Engine:
    """The engine for ``--db``, whose file vault asks for its passphrase at a terminal."""
    engine = await open_engine(args)
    _ask_passphrase(engine)
    return engine


def read_json_file(path: Path, what: str) -> Any:
    try:
        with path.open("rb") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{what} {path} is a folder, not a file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{what} {path} is not valid JSON ({exc})") from None


# ------------------------------------------------------------------------------ progress


class Progress(Protocol):
    def __call__(self, done: float, total: float | None = None, *, description: str | None = None) -> None:
        """``done`` of ``total`` (None: keep the total given before; no total at all: a pulse)."""


def _silent(done: float, total: float | None = None, *, description: str | None = None) -> None:
    return None


def shows_progress(quiet: bool = False) -> bool:
    """Whether a bar would be drawn: stderr is a terminal and the caller is not ``quiet`` (``--json``)."""
    try:
        return not quiet and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


@contextmanager
def progress_bar(description: str, *, total: float | None = None, quiet: bool = False) -> Iterator[Progress]:
    """A callable that moves the bar (and does nothing when no bar is drawn)."""
    if not shows_progress(quiet):
        yield _silent
        return
    from rich.console import Console
    from rich.progress import BarColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as RichProgress

    with RichProgress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                      console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)

        def update(done: float, total: float | None = None, *, description: str | None = None) -> None:
            if total is not None:
                bar.update(task, total=total)
            if description is not None:
                bar.update(task, description=description)
            bar.update(task, completed=done)

        yield update
