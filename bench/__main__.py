"""Every benchmark, one report: ``python -m bench`` runs the ledger, budget, dashboard and
gateway benchmarks, each in a process of its own one after the other, and writes
``bench/RESULTS.md``: the machine, then each benchmark's figures beside their targets as it
printed them. The ledger benchmark measures the raw SQLite insert rate in the same run: the
ceiling for the ledger figures.

    python -m bench [--quick]   (--quick: smaller runs, for a look rather than a record)
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from engine.ledger.schema import SQLITE_VERSION

BENCHES = (
    ("Ledger", "bench.ledger", [], ["--events", "200000"]),
    ("Budgets", "bench.budgets", [], ["--events", "200000"]),
    ("Dashboard", "bench.dashboard", [], ["--events", "200000"]),
    ("Gateway and transport", "bench.gateway", [], ["--requests", "500"]),
)


def cpu_check() -> float:
    """Seconds for a fixed piece of pure Python work (best of 5). The machine is a shared
    virtual one: on 2026-11-23 a fixed piece of work took 0.20 ms at one hour and 0.41 ms an
    hour and a half later, and every figure moved with it; compare reports at similar values."""
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        sum(range(5_000_000))
        best = min(best, time.perf_counter() - started)
    return best


def machine() -> list[str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    memory = next((int(line.split()[1]) // 1024 // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), 0) if Path("/proc/meminfo").exists() else 0
    return [f"- when: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- CPU: {cpu}, {os.cpu_count()} cores; memory {memory} GiB",
            f"- OS: {platform.platform()}",
            f"- Python {platform.python_version()}, SQLite {SQLITE_VERSION}",
            f"- CPU check (`sum(range(5_000_000))`, best of 5, lower is faster): {cpu_check():.3f} s"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (not for the record)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()
    lines = ["# Benchmark results", "", "Written by `python -m bench`" + (" --quick" if args.quick else "") + ".", "",
             "## Machine", "", *machine(), ""]
    failed = 0
    for title, module, full, quick in BENCHES:
        print(f"== {title} ({module})", flush=True)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", module, *(quick if args.quick else full)],
                              capture_output=True, text=True)
        elapsed = time.perf_counter() - started
        output = done.stdout.strip()
        print(output)
        lines += [f"## {title}", "", f"`python -m {module}` ({elapsed:.0f} s)", "", "```", output, "```", ""]
        if done.returncode:
            failed += 1
            lines += [f"**Failed with exit status {done.returncode}:**", "", "```",
                      done.stderr.strip()[-2000:], "```", ""]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
