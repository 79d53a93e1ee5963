"""Progress on stderr for the command line's longer work: a bar when stderr is a terminal (a real
pseudo-terminal here), nothing at all when it is piped or the output is --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import NOW_MS

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")

BAR = "━".encode()


def _env() -> dict[str, str]:
    # Rich's own overrides of what a terminal is, in case the machine sets them, are left out.
    env = {k: v for k, v in os.environ.items() if k not in ("TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    return {**env, "BUDGETEER_NOW": "2026-11-18T12:00:00Z", "TERM": "xterm-256color", "COLUMNS": "100"}


def _piped(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "tui.cli", *argv], capture_output=True, env=_env(), timeout=120,
                          stdin=subprocess.DEVNULL)


def _on_a_terminal(*argv: str) -> tuple[int, bytes]:
    """Run with stderr on a pseudo-terminal; the exit code and every byte written to it."""
    import pty

    leader, follower = pty.openpty()
    try:
        child = subprocess.Popen([sys.executable, "-m", "tui.cli", *argv], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=follower, env=_env())
        os.close(follower)
        follower = -1
        seen = bytearray()
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the child has gone and closed its side
                break
            if not data:
                break
            seen += data
        return child.wait(timeout=120), bytes(seen)
    finally:
        os.close(leader)
        if follower != -1:
            os.close(follower)


def _events(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"ts_ms": NOW_MS - i * 1000, "request_id": f"p-{i}", "provider": "openai",
                                        "model": "gpt-4o-mini", "team": "ml", "input_tokens": 100,
                                        "output_tokens": 10}) + "\n" for i in range(n)))
    return path


def test_piped_or_json_the_long_commands_write_nothing_on_stderr(tmp_path: Path) -> None:
    db = str(tmp_path / "demo.db")
    demo = _piped("--db", db, "demo", "--days", "2")
    assert demo.returncode == 0 and demo.stderr == b"" and b"Wrote a demo ledger" in demo.stdout
    imported = _piped("--db", str(tmp_path / "i.db"), "import", str(_events(tmp_path / "e.jsonl", 12_000)))
    assert imported.returncode == 0 and imported.stderr == b"" and b"Imported 12,000 events" in imported.stdout
    out = tmp_path / "all.jsonl"
    exported = _piped("--db", db, "export", "--out", str(out))
    count = len(out.read_bytes().splitlines())
    assert exported.returncode == 0 and exported.stderr == f"Exported {count:,} events to {out} (jsonl).\n".encode()
    to_stdout = _piped("--db", db, "export", "--format", "csv")
    assert to_stdout.returncode == 0 and to_stdout.stderr == b"" and len(to_stdout.stdout.splitlines()) == count + 1
    backtest = _piped("--db", db, "policy", "backtest", "--scope", "global", "--metric", "usd", "--window", "day",
                      "--hard", "5", "--period", "7d")
    assert backtest.returncode == 0 and backtest.stderr == b"" and b"would have blocked" in backtest.stdout
    copied = _piped("ledger", "copy", db, str(tmp_path / "copy.db"))
    assert copied.returncode == 0 and copied.stderr == b"" and b"Copied the ledger" in copied.stdout


def test_a_terminal_gets_a_progress_bar_and_json_still_gets_none(tmp_path: Path) -> None:
    db = str(tmp_path / "demo.db")
    code, seen = _on_a_terminal("--db", db, "demo", "--days", "2")
    assert code == 0 and b"Writing 2 days of demo traffic" in seen and BAR in seen
    events = str(_events(tmp_path / "e.jsonl", 12_000))
    code, seen = _on_a_terminal("--db", str(tmp_path / "i.db"), "import", events)
    assert code == 0 and b"Importing e.jsonl" in seen and BAR in seen
    code, seen = _on_a_terminal("--db", db, "export", "--out", str(tmp_path / "all.csv"))
    assert code == 0 and b"Exporting" in seen and BAR in seen
    code, seen = _on_a_terminal("--db", db, "policy", "backtest", "--scope", "global", "--metric", "usd", "--window",
                                "day", "--hard", "5", "--period", "7d")
    assert code == 0 and b"Backtesting draft" in seen
    code, seen = _on_a_terminal("ledger", "copy", db, str(tmp_path / "copy.db"))
    assert code == 0 and b"Copying" in seen and BAR in seen
    code, seen = _on_a_terminal("ledger", "copy", db, str(tmp_path / "copy2.db"), "--json")
    assert code == 0 and seen == b""
    # --json is for scripts: not a byte on the terminal, even with stderr on one.
    code, seen = _on_a_terminal("--db", str(tmp_path / "j.db"), "import", events, "--json")
    assert code == 0 and seen == b""
    code, seen = _on_a_terminal("--db", db, "policy", "backtest", "--scope", "global", "--metric", "usd", "--window",
                                "day", "--hard", "5", "--period", "7d", "--json")
    assert code == 0 and seen == b""
