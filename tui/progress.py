"""A progress bar on standard error for the command line's longer work (demo, import, export,
backtest, screenshots): drawn only when stderr is a terminal and the output is for people. Piped,
redirected or with ``--json``, nothing at all is written. The bar goes away when the work is done."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


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
