"""Import in bounded memory: an over-long line is refused by its number without being read
whole; a UTF-8 byte-order mark at the start of a JSONL or CSV file is accepted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from engine.engine import Engine
from engine.integrations.files import import_events
from tests.conftest import NOW_MS

LONG_LINE_MB = 64
_PEAK_RSS = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss; "
             "print(json.dumps([done.returncode, done.stdout, peak]))")


def _good(n: int) -> dict[str, object]:
    return {"ts_ms": NOW_MS - 1000 * n, "request_id": f"imp-{n}", "provider": "openai", "model": "gpt-4o",
            "principal": "bob", "input_tokens": 100, "output_tokens": 10}


def _import_peak_kb(db: Path, path: Path) -> tuple[int, dict[str, object], int]:
    """Run ``budgeteer import --json`` in a child process: (exit code, report, its peak RSS in KiB)."""
    wrapper = [sys.executable, "-c", "import json; " + _PEAK_RSS, sys.executable, "-m", "tui.cli", "--db", str(db),
               "import", str(path), "--json"]
    code, out, peak = json.loads(subprocess.run(wrapper, capture_output=True, text=True, check=True).stdout)
    return code, json.loads(out), peak


def test_a_line_far_over_the_limit_is_refused_by_number_without_being_read_whole(tmp_path: Path) -> None:
    small = tmp_path / "small.jsonl"
    small.write_text(json.dumps(_good(1)) + "\n" + json.dumps(_good(2)) + "\n")
    big = tmp_path / "big.jsonl"
    with big.open("w") as f:
        f.write(json.dumps(_good(1)) + "\n")
        f.write('{"request_id": "huge", "tags": {"x": "')
        chunk = "a" * (1 << 20)
        for _ in range(LONG_LINE_MB):
            f.write(chunk)
        f.write('"}}\n')
        f.write(json.dumps(_good(3)) + "\n")
    _, _, baseline = _import_peak_kb(tmp_path / "a.db", small)
    code, report, peak = _import_peak_kb(tmp_path / "b.db", big)
    print(f"peak RSS {baseline // 1024} MiB importing 2 lines, {peak // 1024} MiB with a {LONG_LINE_MB} MiB line")
    assert code == 2 and report["recorded"] == 2 and report["bad"] == 1
    # The 64 MB line was never held whole: the import's peak grows by a few MiB at most (the old
    # importer held the line and its stripped copy).
    assert peak - baseline < 16 * 1024, f"peak RSS grew by {(peak - baseline) // 1024} MiB"
    assert report["errors"] == [{"line": 2, "field": "line", "reason": report["errors"][0]["reason"]}]
    assert "longer than 1 MiB" in report["errors"][0]["reason"]


async def test_an_over_long_csv_line_is_named_and_the_rows_after_it_imported(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    header = "ts_ms,request_id,provider,model,principal,input_tokens,output_tokens\n"
    path.write_text(header + f"{NOW_MS - 1000},c-1,openai,gpt-4o,bob,100,10\n"
                    + f"{NOW_MS - 2000},c-2,openai,gpt-4o,{'b' * (3 << 20)},100,10\n"
                    + f"{NOW_MS - 3000},c-3,openai,gpt-4o,bob,100,10\n")
    report = await import_events(engine, path)
    assert report.recorded == 2 and [(e.line, e.field) for e in report.errors] == [(3, "line")]


async def test_a_byte_order_mark_is_accepted_at_the_start_of_jsonl_and_csv(engine: Engine, tmp_path: Path) -> None:
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + (json.dumps(_good(1)) + "\n" + json.dumps(_good(2)) + "\n").encode())
    report = await import_events(engine, jsonl)
    assert (report.recorded, report.bad) == (2, 0), report.errors
    csv_file = tmp_path / "bom.csv"
    csv_file.write_bytes(b"\xef\xbb\xbf" + (
        "request_id,ts_ms,provider,model,principal,input_tokens,output_tokens\n"
        f"c-1,{NOW_MS - 1000},openai,gpt-4o,bob,100,10\n").encode())
    report = await import_events(engine, csv_file)
    assert (report.recorded, report.bad) == (1, 0), report.errors
