"""The dashboard (``budgeteer`` with no command) and ``budgeteer screenshots``."""

from __future__ import annotations

import argparse
import html
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from engine.clock import FrozenClock
from engine.engine import Engine, ledger_location
from tui.cli.common import EXIT_OK, Failure, UsageError, now_clock, progress_bar


def _theme(name: str | None) -> str | None:
    """--theme, else BUDGETEER_THEME; a name Textual does not know is refused with the list."""
    from textual.theme import BUILTIN_THEMES

    name = name or os.environ.get("BUDGETEER_THEME") or None
    if name is not None and name not in BUILTIN_THEMES:
        raise UsageError(f"--theme: unknown theme {name!r}; choose one of {', '.join(sorted(BUILTIN_THEMES))}")
    return name


def run_dashboard(path: str | Path | None, refresh: float = 2.0, read_only: bool = False,
                  theme: str | None = None) -> int:
    from tui.app import BudgeteerApp

    db = ledger_location(path)
    if refresh < 0.2 or refresh > 3600:
        raise UsageError(f"--refresh must be between 0.2 and 3600 seconds (got {refresh:g})")
    app = BudgeteerApp(db_path=db, clock=now_clock(), refresh_seconds=refresh, read_only=read_only,
                       theme=_theme(theme))
    app.run()
    if app.fatal_error:
        raise Failure(app.fatal_error)
    return EXIT_OK


async def cmd_screenshots(args: argparse.Namespace) -> int:
    """SVGs of the dashboard on a deterministic demo ledger with a frozen clock."""
    from engine.demo import populate
    from tui.app import BudgeteerApp

    theme = _theme(getattr(args, "theme", None))
    suffix = f"-{theme}" if theme else ""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clock = FrozenClock(SCREENSHOT_NOW_MS)
    screens = (("1", "overview"), ("2", "usage"), ("3", "budgets"), ("4", "alerts"), ("5", "approvals"),
               ("6", "tokens"), ("7", "audit"), ("8", "models"), ("9", "vault"), ("0", "calls"))
    sizes = ((160, 48), (80, 24))
    with tempfile.TemporaryDirectory() as tmp, progress_bar("Writing the demo ledger") as bar:
        db = Path(tmp) / "demo.db"
        async with await Engine.open(db, clock=clock, durable=False) as engine:
            await populate(engine, end_ms=SCREENSHOT_NOW_MS, progress=bar)
        written: list[Path] = []
        bar(0, len(screens) * len(sizes), description="Drawing the screens")
        for width, height in sizes:
            app = BudgeteerApp(db_path=db, clock=clock, refresh_seconds=3600, label="demo ledger", theme=theme)
            async with app.run_test(size=(width, height)) as pilot:
                for key, mode in screens:
                    await pilot.press(key)
                    await app.workers.wait_for_complete()
                    await pilot.pause(0.2)
                    name = f"{mode}{suffix}-{width}x{height}.svg"
                    (out / name).write_text(svg_keep_spaces(app.export_screenshot()), encoding="utf-8")
                    written.append(out / name)
                    bar(len(written))
    for path in written:
        print(f"wrote {path}")
    return EXIT_OK


_SVG_TEXT = re.compile(r'(<text [^>]*?x=")([\d.]+)("[^>]*?textLength=")([\d.]+)("[^>]*>)([^<]*)(</text>)')


def svg_keep_spaces(svg: str) -> str:
    """Text runs that start or end with spaces, placed where their first visible letter is.

    Rich's SVG draws each run of one style at its own x. Viewers that strip a run's leading
    (non-breaking) spaces then drew its letters at the spaces' place, against the run before
    (``aadd`` for ``a add``, ``tperiod``), and stretched a run whose trailing spaces they
    dropped. Runs keep only their letters, at the column those letters are on.
    """
    def fix(m: re.Match[str]) -> str:
        start, x, middle, length, rest, content, end = m.groups()
        chars = html.unescape(content)
        if not chars:
            return m.group(0)
        width = float(length) / len(chars)
        lead = len(chars) - len(chars.lstrip("\u00a0 "))
        kept = chars.strip("\u00a0 ")
        if not kept:
            return ""  # spaces only: the background is drawn by its own rect
        shown = html.escape(kept, quote=False).replace(" ", "&#160;").replace("\u00a0", "&#160;")
        return (f"{start}{float(x) + lead * width:g}{middle}{len(kept) * width:g}{rest}{shown}{end}")

    return _SVG_TEXT.sub(fix, svg)



#: The frozen "now" of screenshots: 2026-11-18 12:00 UTC, a Wednesday.
SCREENSHOT_NOW_MS = 1_795_003_200_000


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("screenshots", parents=[common], help="regenerate the dashboard's SVG screenshots",
                       description="Write SVG screenshots of the dashboard on a deterministic demo ledger.")
    p.add_argument("--out", default="screenshots", help="folder to write to (default screenshots/)")
    p.add_argument("--theme", default=argparse.SUPPRESS, help="theme to draw in (file names get its name)")
    p.set_defaults(handler=cmd_screenshots)
