"""Import and export: bad lines named by line, field and reason; strict is all-or-nothing;
CSV export is safe to open in a spreadsheet; a round trip loses nothing."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from engine.clock import DAY_MS
from engine.engine import Engine
from engine.integrations.files import ImportFileError, export_events, import_events, neutralise
from tests.conftest import NOW_MS, event


def _jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _good(n: int, **extra: object) -> dict[str, object]:
    return {"ts_ms": NOW_MS - 1000 * n, "request_id": f"imp-{n}", "provider": "openai", "model": "gpt-4o",
            "principal": "bob", "team": "search", "input_tokens": 1200, "output_tokens": 300, **extra}


async def test_bad_lines_are_skipped_and_named_by_line_field_and_reason(engine: Engine, tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "events.jsonl", [
        _good(1),
        _good(2, input_tokens=-5),
        "{not json",
        _good(4, model=""),
        _good(5, cost_nanos=1.5),
        _good(6, status="weird"),
        _good(7, colour="blue"),
        {k: v for k, v in _good(8, ts="2026-11-18T10:00:00").items() if k != "ts_ms"},
        _good(9, cached_input_tokens=5000),
        _good(10),
    ])
    report = await import_events(engine, path)
    assert report.recorded == 2
    got = [(e.line, e.field) for e in report.errors]
    assert got == [(2, "input_tokens"), (3, "json"), (4, "model"), (5, "cost_nanos"), (6, "status"),
                   (7, "colour"), (8, "ts"), (9, "cached_input_tokens")]
    reasons = {e.field: e.reason for e in report.errors}
    assert "must not be negative" in reasons["input_tokens"]
    assert "is required" in reasons["model"]
    assert "has no time zone" in reasons["ts"]
    assert "not a known event field" in reasons["colour"]
    assert (await engine.totals(0, NOW_MS + DAY_MS)).requests == 2


async def test_strict_import_writes_nothing_when_any_line_is_bad(engine: Engine, tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "events.jsonl", [_good(1), _good(2), _good(3, output_tokens="many")])
    report = await import_events(engine, path, strict=True)
    assert not report.written and report.recorded == 0
    assert [(e.line, e.field) for e in report.errors] == [(3, "output_tokens")]
    assert await engine.event_count() == 0
    good = _jsonl(tmp_path / "good.jsonl", [_good(1), _good(2)])
    assert (await import_events(engine, good, strict=True)).recorded == 2


async def test_importing_a_file_twice_counts_its_events_once(engine: Engine, tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "events.jsonl", [_good(i) for i in range(50)])
    first = await import_events(engine, path)
    second = await import_events(engine, path)
    assert (first.recorded, first.duplicates) == (50, 0)
    assert (second.recorded, second.duplicates) == (0, 50)
    assert (await engine.totals(0, NOW_MS + DAY_MS)).requests == 50


async def test_imported_events_without_a_cost_are_priced_or_marked_unpriced(engine: Engine, tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "events.jsonl", [_good(1), _good(2, model="no-such-model-v9")])
    await import_events(engine, path)
    events = {e.request_id: e async for e in engine.iter_events(0, NOW_MS + DAY_MS)}
    assert events["imp-1"].cost_source == "computed" and (events["imp-1"].cost_nanos or 0) > 0
    assert (events["imp-2"].cost_source, events["imp-2"].cost_nanos) == ("unpriced", 0)
    assert (await engine.totals(0, NOW_MS + DAY_MS)).unpriced == 1


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
async def test_export_then_import_round_trips_every_field(engine: Engine, tmp_path: Path, fmt: str) -> None:
    originals = [
        event(1, tags={"env": "prod", "ticket": "=HYPERLINK(\"x\")"}, session="s1", agent="a1"),
        event(2, principal="=cmd|' /C calc'!A0", team="+ops", model="@evil", cached_input_tokens=100,
              reasoning_tokens=20, status="error"),
        event(3, workspace="-ws", cost_nanos=0, cost_source="unpriced", model="mystery"),
        event(4, principal="'quoted", cost_nanos=123_456_789_012),
    ]
    await engine.record_many(originals)
    out = tmp_path / f"export.{fmt}"
    with out.open("w", newline="") as handle:
        assert await export_events(engine, handle, fmt, 0, NOW_MS + DAY_MS) == 4  # type: ignore[arg-type]
    other = await Engine.open(tmp_path / "other.db", clock=engine.clock)
    try:
        report = await import_events(other, out, strict=True)
        assert report.errors == [] and report.recorded == 4
        back = [e async for e in other.iter_events(0, NOW_MS + DAY_MS)]
    finally:
        await other.close()
    assert sorted(back, key=lambda e: e.request_id) == sorted(originals, key=lambda e: e.request_id)


async def test_csv_export_neutralises_formulas(engine: Engine) -> None:
    await engine.record(event(1, principal="=1+2", team="@SUM(A1)", model="-2+3", workspace="+x"))
    buffer = io.StringIO()
    await export_events(engine, buffer, "csv", 0, NOW_MS + DAY_MS)
    header, row = buffer.getvalue().splitlines()[:2]
    cells = dict(zip(header.split(","), row.split(","), strict=True))
    assert cells["principal"] == "'=1+2"
    assert cells["team"] == "'@SUM(A1)"
    assert cells["model"] == "'-2+3"
    assert cells["workspace"] == "'+x"
    for name, value in cells.items():
        assert not value.startswith(("=", "+", "-", "@")), name
    assert neutralise("plain") == "plain" and neutralise("\t=x") == "'\t=x"


async def test_csv_import_names_line_and_column(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(
        "ts,request_id,provider,model,input_tokens,output_tokens\n"
        "2026-11-18T10:00:00Z,c1,openai,gpt-4o,100,10\n"
        "2026-11-18T10:00:01Z,c2,openai,gpt-4o,ten,10\n"
        "2026-11-18T10:00:02Z,c3,openai\n"
        "2026-11-18T10:00:03Z,c4,anthropic,claude-sonnet-4-5-20250929,100,10\n")
    report = await import_events(engine, path)
    assert report.recorded == 2
    assert [(e.line, e.field) for e in report.errors] == [(3, "input_tokens"), (4, "csv")]
    assert "has 3 cells but the header names 6 columns" in report.errors[1].reason


async def test_whole_file_problems_are_one_clear_error(engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(ImportFileError, match="does not exist"):
        await import_events(engine, tmp_path / "missing.jsonl")
    headerless = tmp_path / "x.csv"
    headerless.write_text("1,2,3\n")
    with pytest.raises(ImportFileError, match="no request_id column"):
        await import_events(engine, headerless)
    binary = tmp_path / "x.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ImportFileError, match="not UTF-8"):
        await import_events(engine, binary)
