"""Dashboard benchmark on a 1,000,000-event ledger, in one run: time to the first painted
overview; a screen switch (key pressed to the new screen painted with fresh data) and a
period change on Usage (`t` to the new period's data painted), each beside a screen switch
in a bare Textual app with two screens on the same machine (the reference); and resident
memory after 1, 3, 5 and 20 tours of the ten screens. The dashboard runs at the default
2 s refresh, as users run it.

Targets (issues 4 and 18): first screen under 1 s; RSS under 200 MB; a switch at most twice
the bare app's; RSS after 20 tours at most 10 MB above after one.

The ledger is built in this process; each dashboard (and the bare app) then runs in a fresh
child process of its own, so the memory figure is the app's alone (interpreter, Textual,
the engine and whatever the screens load), not the benchmark's ledger build.

    python -m bench.dashboard [--events 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.ledger import NOW_MS, _events
from engine.clock import FrozenClock
from engine.demo import demo_policies
from engine.engine import Engine

KEYS = "1234567890"  # every screen, one tour
TOURS = (1, 3, 5, 20)  # resident memory measured after these many tours


def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process. Not getrusage: its ru_maxrss survives
    exec, so a child forked from the big ledger-building parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median": ordered[len(ordered) // 2], "p90": ordered[int(len(ordered) * 0.9)], "n": len(ordered)}


async def child(path: Path, full: bool) -> None:
    started = time.perf_counter()
    from tui.app import BudgeteerApp
    from tui.screens.base import DataScreen
    from tui.widgets.kpi import KpiTile

    app = BudgeteerApp(db_path=path, clock=FrozenClock(NOW_MS))  # the default refresh, 2 s
    out: dict[str, Any] = {}
    async with app.run_test(size=(160, 48)) as pilot:
        while True:
            await pilot.pause(0.005)
            tiles = app.screen.query(KpiTile)
            if tiles and str(tiles.first().query_one(".kpi-value").render()) != "…":
                break
        out["first_paint_s"] = time.perf_counter() - started
        out["rss_first_mb"] = _status_mb("VmRSS")
        if full:

            async def fresh(key: str) -> float:
                """Press ``key``; seconds until the screen it leads to has read and painted its data."""
                before = getattr(app.screen, "_loader", None)
                t0 = time.perf_counter()
                await pilot.press(key)
                while True:
                    screen = app.screen
                    loader = getattr(screen, "_loader", None)
                    if isinstance(screen, DataScreen) and loader is not before and loader is not None \
                            and loader.is_finished:
                        break
                    await pilot.pause(0.001)
                await pilot.pause()  # the paint of what it showed
                return time.perf_counter() - t0

            switches: list[float] = []
            rss: dict[str, float] = {}
            for tour in range(1, TOURS[-1] + 1):
                for key in KEYS:
                    elapsed = await fresh(key)
                    if tour > 1:  # the first visit of each screen builds it
                        switches.append(elapsed)
                if tour in TOURS:
                    rss[str(tour)] = _status_mb("VmRSS")
            await fresh("2")
            periods = [await fresh("t") for _ in range(25)]  # 1h, 24h, 7d, 30d, 90d, five times round
            out.update(switch=_stats(switches), period=_stats(periods), rss_tours=rss)
    out["peak_rss_mb"] = _status_mb("VmHWM")
    print(json.dumps(out))


async def bare() -> None:
    """The reference: a bare Textual app, two screens (a header, a table of 20 rows, a footer),
    switched by key; the same measure as the dashboard's (key pressed to the screen painted)."""
    from typing import ClassVar

    from textual.app import App, ComposeResult
    from textual.binding import Binding, BindingType
    from textual.screen import Screen
    from textual.widgets import DataTable, Footer, Header

    class Table(Screen[None]):
        def compose(self) -> ComposeResult:
            yield Header()
            yield DataTable()
            yield Footer()

        def on_mount(self) -> None:
            table = self.query_one(DataTable)
            table.add_columns("name", "spend", "tokens")
            table.add_rows([(f"row {i}", f"${i}.00", f"{i * 1000:,}") for i in range(20)])

    class Bare(App[None]):
        MODES: ClassVar[dict[str, type[Screen[None]]]] = {"a": Table, "b": Table}  # type: ignore[assignment]
        BINDINGS: ClassVar[list[BindingType]] = [Binding("1", "switch_mode('a')", "A"),
                                                 Binding("2", "switch_mode('b')", "B")]

        async def on_mount(self) -> None:
            await self.switch_mode("a")

    app = Bare()
    samples: list[float] = []
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        for i in range(TOURS[-1] * len(KEYS)):
            key, mode = ("2", "b") if i % 2 == 0 else ("1", "a")
            t0 = time.perf_counter()
            await pilot.press(key)
            while app.current_mode != mode:
                await pilot.pause(0.001)
            await pilot.pause()
            if i >= 2:
                samples.append(time.perf_counter() - t0)
    print(json.dumps({"switch": _stats(samples)}))


async def build(path: Path, events: int) -> None:
    async with await Engine.open(path, clock=FrozenClock(NOW_MS), durable=False) as engine:
        await engine.bulk_record(_events(events))
        for policy in demo_policies(NOW_MS):
            await engine.add_policy(policy)


def _run(*args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "bench.dashboard", *args],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        asyncio.run(bare())
        return
    if args.child:
        asyncio.run(child(args.child, args.full))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dash.db"
        asyncio.run(build(path, args.events))
        reference = _run("--bare")
        runs = [_run("--child", str(path), "--full")] + [_run("--child", str(path)) for _ in range(2)]
    paint = sorted(r["first_paint_s"] for r in runs)
    peak = max(r["peak_rss_mb"] for r in runs)
    full, ref = runs[0], reference["switch"]
    print(f"ledger: {args.events:,} events; the dashboard runs in its own process at the default 2 s refresh, "
          f"160x48, 3 runs (the switches, period changes and tours in the first)")
    print(f"first overview painted (process start excluded, imports included): "
          f"median {paint[1]:.2f} s, worst {paint[-1]:.2f} s (target < 1 s)")
    for name, figure in (("screen switch, key to the new screen painted with fresh data", full["switch"]),
                         ("period change on Usage (t), key to the new period painted", full["period"])):
        print(f"{name} ({figure['n']} times): median {1000 * figure['median']:.0f} ms, "
              f"p90 {1000 * figure['p90']:.0f} ms; bare Textual app's switch median {1000 * ref['median']:.0f} ms, "
              f"p90 {1000 * ref['p90']:.0f} ms; ratio {figure['median'] / ref['median']:.1f}x median, "
              f"{figure['p90'] / ref['p90']:.1f}x p90 (target for a switch <= 2x)")
    rss = full["rss_tours"]
    print(f"resident memory: {full['rss_first_mb']:.0f} MB at first paint; after 1 / 3 / 5 / 20 tours of the ten "
          f"screens {' / '.join(f'{rss[str(t)]:.0f}' for t in TOURS)} MB: {rss['20'] - rss['1']:+.1f} MB from 1 to 20 "
          f"(target <= +10 MB); peak over runs {peak:.0f} MB (target < 200 MB)")


if __name__ == "__main__":
    main()
