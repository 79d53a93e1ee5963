"""Attacks and faults run against real processes: bad input, crashes, a full disk, secrets."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx


def start_gateway(db: Path | str, port: int, env: dict[str, str],
                  output: int | IO[bytes] = subprocess.DEVNULL, *options: str) -> subprocess.Popen[bytes]:
    """``budgeteer gateway --routing off`` (and ``options``) on 127.0.0.1:``port``, once it answers /healthz."""
    process = subprocess.Popen([sys.executable, "-m", "tui.cli", "--db", str(db), "gateway", "--port", str(port),
                                "--routing", "off", *options], env=env, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5)
            return process
        except httpx.HTTPError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("the gateway did not start")
