"""Dashboard benchmark: time to the first painted overview, and resident memory, on a
1,000,000-event ledger. Targets (issue 4): first screen under 1 s; RSS under 200 MB.

The ledger is built in this process; the dashboard then runs in a fresh child process of
its own, so the memory figure is the app's alone (interpreter, Textual, the engine and
whatever the screens load), not the benchmark's ledger build.

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

from bench.ledger import NOW_MS, _events
from engine.clock import FrozenClock
from engine.demo import demo_policies
from engine.engine import Engine


def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process. Not getrusage: its ru_maxrss survives
    exec, so a child forked from the big ledger-building parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


async def child(path: Path) -> None:
    started = time.perf_counter()
    from tui.app import BudgeteerApp
    from tui.widgets.kpi import KpiTile

    app = BudgeteerApp(db_path=path, clock=FrozenClock(NOW_MS), refresh_seconds=2)
    async with app.run_test(size=(160, 48)) as pilot:
        while True:
            await pilot.pause(0.005)
            tiles = app.screen.query(KpiTile)
            if tiles and str(tiles.first().query_one(".kpi-value").render()) != "…":
                break
        first_paint = time.perf_counter() - started
        rss_first = _status_mb("VmRSS")
        for _ in range(3):  # every screen, three times round, with live refreshes between
            for key in "2341":
                await pilot.press(key)
                await pilot.pause(0.3)
                await app.workers.wait_for_complete()
        await pilot.pause(2.5)
        rss_after = _status_mb("VmRSS")
    peak = _status_mb("VmHWM")
    print(json.dumps({"first_paint_s": first_paint, "rss_first_mb": rss_first,
                      "rss_after_mb": rss_after, "peak_rss_mb": peak}))


async def build(path: Path, events: int) -> None:
    async with await Engine.open(path, clock=FrozenClock(NOW_MS), durable=False) as engine:
        await engine.bulk_record(_events(events))
        for policy in demo_policies(NOW_MS):
            await engine.add_policy(policy)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        asyncio.run(child(args.child))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dash.db"
        asyncio.run(build(path, args.events))
        runs = []
        for _ in range(3):
            out = subprocess.run([sys.executable, "-m", "bench.dashboard", "--child", str(path)],
                                 check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
    paint = sorted(r["first_paint_s"] for r in runs)
    peak = max(r["peak_rss_mb"] for r in runs)
    print(f"ledger: {args.events:,} events; the dashboard runs in its own process, 3 runs")
    print(f"first overview painted (process start excluded, imports included): "
          f"median {paint[1]:.2f} s, worst {paint[-1]:.2f} s (target < 1 s)")
    print(f"resident memory: {runs[0]['rss_first_mb']:.0f} MB at first paint, "
          f"{runs[0]['rss_after_mb']:.0f} MB after every screen three times; peak over runs {peak:.0f} MB "
          f"(target < 200 MB)")


if __name__ == "__main__":
    main()
