"""JSONL and CSV import and export of usage events.

Import reads a file line by line through ``validate_event``; a bad line is reported
with its line number, field and reason. No line is read whole past MAX_LINE_BYTES
characters: a longer one is skipped in chunks and reported by its number, so memory
stays bounded whatever the file holds. A UTF-8 byte-order mark at the start is taken off.
By default bad lines are skipped and listed and good ones written; ``strict`` writes
nothing unless every line is good, and then writes the whole file in one transaction.
Export writes exactly what the ledger holds; CSV cells that a spreadsheet would run as a formula are neutralised.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final, Literal, TextIO

from engine.clock import iso
from engine.errors import EXIT_USAGE, BudgeteerError
from engine.models import EVENT_FIELDS, FieldError, UsageEvent, validate_event
from engine.money import format_usd_plain

if TYPE_CHECKING:
    from engine.engine import Engine

ExportFormat = Literal["csv", "jsonl"]
EXPORT_COLUMNS: Final = ("ts", *EVENT_FIELDS, "cost_usd")
#: A spreadsheet runs a cell starting with one of these as a formula.
_FORMULA_STARTS: Final = ("=", "+", "-", "@", "\t", "\r")
_TEXT_COLUMNS: Final = frozenset(
    {"request_id", "provider", "model", "workspace", "team", "principal", "token_id", "session", "agent", "tags"})
MAX_LINE_BYTES: Final = 1 << 20  # characters of a line (4 MiB at most in memory)
_SKIP_CHUNK: Final = 1 << 16  # how much of an over-long line is read at a time to skip it
MAX_REPORTED_ERRORS: Final = 1000
PROGRESS_EVERY: Final = 5000  # events between two calls of a progress callback


class ImportFileError(BudgeteerError, ValueError):
    """The file as a whole cannot be read (missing, not text, no header...)."""

    exit_status, http_status, code = EXIT_USAGE, 400, "invalid_value"


@dataclass(slots=True, frozen=True)
class LineError:
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.field}: {self.reason}"


@dataclass(slots=True)
class ImportReport:
    path: str
    format: str
    lines: int = 0
    recorded: int = 0
    duplicates: int = 0
    bad: int = 0
    strict: bool = False
    written: bool = True
    errors: list[LineError] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "format": self.format, "lines": self.lines, "recorded": self.recorded,
            "duplicates": self.duplicates, "bad": self.bad, "strict": self.strict, "written": self.written,
            "errors": [{"line": e.line, "field": e.field, "reason": e.reason} for e in self.errors],
        }


def detect_format(path: Path, head: str) -> str:
    """``jsonl`` or ``csv``, from the extension, else from the first character."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    stripped = head.lstrip("\ufeff \t\r\n")
    return "jsonl" if stripped.startswith("{") else "csv"


class _LineTooLong(Exception):
    """A line longer than MAX_LINE_BYTES characters, skipped without being read whole."""


_TOO_LONG: Final = f"is longer than 1 MiB ({MAX_LINE_BYTES} characters); it was skipped unread"


class _Lines:
    """The lines of a text stream, each read with a bound: a line longer than MAX_LINE_BYTES is
    read on in chunks to its end, dropped, and raised as _LineTooLong; iterating goes on after
    it (the csv reader, fed from this, starts afresh at its next row). ``number`` is the number
    of the last line read."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.number = 0

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = self.stream.readline(MAX_LINE_BYTES + 1)
        if not line:
            raise StopIteration
        self.number += 1
        if len(line) > MAX_LINE_BYTES and not line.endswith(("\n", "\r")):
            while (rest := self.stream.readline(_SKIP_CHUNK)) and not rest.endswith(("\n", "\r")):
                pass
            raise _LineTooLong
        return line


def _jsonl_records(stream: IO[str]) -> Iterator[tuple[int, dict[str, Any] | FieldError]]:
    lines = _Lines(stream)
    while True:
        try:
            line = next(lines)
        except StopIteration:
            return
        except _LineTooLong:
            yield lines.number, FieldError("line", _TOO_LONG)
            continue
        number, text = lines.number, line.strip()
        if not text:
            continue
        if len(text) > MAX_LINE_BYTES:
            yield number, FieldError("line", _TOO_LONG)
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            yield number, FieldError("json", f"is not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(value, dict):
            yield number, FieldError("json", f"must be an object per line, not {type(value).__name__}")
            continue
        yield number, value


def _unescape(value: str) -> str:
    # Our own export prefixes a quote to neutralise formulas; take exactly that quote off.
    return value[1:] if value.startswith("'") and len(value) > 1 and value[1] in "=+-@\t\r'" else value


def _csv_records(stream: IO[str]) -> Iterator[tuple[int, dict[str, Any] | FieldError]]:
    lines = _Lines(stream)
    reader = csv.reader(lines)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        raise ImportFileError(f"the CSV header cannot be read: {exc}") from None
    except _LineTooLong:
        raise ImportFileError(f"the CSV header {_TOO_LONG}") from None
    header = [h.strip().lstrip("\ufeff") for h in header]
    if "request_id" not in header:
        raise ImportFileError("the CSV header has no request_id column; the first line must name the columns")
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield lines.number, FieldError("csv", str(exc))
            continue
        except _LineTooLong:
            yield lines.number, FieldError("line", _TOO_LONG)
            continue
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            yield lines.number, FieldError(
                "csv", f"has {len(row)} cells but the header names {len(header)} columns")
            continue
        record: dict[str, Any] = {}
        for name, cell in zip(header, row, strict=True):
            if name in _TEXT_COLUMNS:
                cell = _unescape(cell)
            if cell != "":
                record[name] = cell
        yield lines.number, record


def _parse(stream: IO[str], fmt: str) -> Iterator[tuple[int, UsageEvent | FieldError]]:
    records = _jsonl_records(stream) if fmt == "jsonl" else _csv_records(stream)
    for number, record in records:
        if isinstance(record, FieldError):
            yield number, record
            continue
        try:
            yield number, validate_event(record)
        except FieldError as exc:
            yield number, exc


def _open_text(path: Path) -> TextIO:
    try:
        return path.open("r", encoding="utf-8-sig", newline="")  # -sig: a byte-order mark is taken off
    except FileNotFoundError:
        raise ImportFileError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise ImportFileError(f"{path} is a folder, not a file") from None
    except PermissionError:
        raise ImportFileError(f"{path} cannot be read (permission denied)") from None


async def import_events(engine: Engine, path: Path, *, strict: bool = False,
                        progress: Callable[[int, int], None] | None = None) -> ImportReport:
    """Import a JSONL or CSV file of events into the ledger (see the module docstring).
    ``progress(bytes read, file size)`` is told how far the writing pass has read, now and then."""
    with _open_text(path) as stream:
        try:
            head = stream.read(4096)
        except UnicodeDecodeError:
            raise ImportFileError(f"{path} is not UTF-8 text") from None
    fmt = detect_format(path, head)
    report = ImportReport(path=str(path), format=fmt, strict=strict)

    def note(number: int, error: FieldError) -> None:
        report.bad += 1
        if len(report.errors) < MAX_REPORTED_ERRORS:
            report.errors.append(LineError(number, error.field, error.reason))

    size = path.stat().st_size

    def good_events(stream: TextIO, *, record_errors: bool, tell: bool = False) -> Iterator[UsageEvent]:
        for i, (number, item) in enumerate(_parse(stream, fmt)):
            if tell and progress is not None and not i % PROGRESS_EVERY:
                progress(min(stream.buffer.tell(), size), size)  # the bytes under the text read so far
            if record_errors:
                report.lines += 1
            if isinstance(item, FieldError):
                if record_errors:
                    note(number, item)
                continue
            yield item

    try:
        if strict:
            # First pass only validates; nothing is written unless every line is good.
            with _open_text(path) as stream:
                for _ in good_events(stream, record_errors=True):
                    pass
            if report.bad:
                report.written = False
                return report
            with _open_text(path) as stream:
                report.recorded, report.duplicates = await engine.import_usage(
                    good_events(stream, record_errors=False, tell=True), atomic=True, source=path.name)
        else:
            with _open_text(path) as stream:
                report.recorded, report.duplicates = await engine.import_usage(
                    good_events(stream, record_errors=True, tell=True), source=path.name)
    except UnicodeDecodeError as exc:
        raise ImportFileError(f"{path} is not UTF-8 text (byte {exc.start} of a line)") from None
    if progress is not None and report.written:
        progress(size, size)
    return report


# ---------------------------------------------------------------------------- export


def neutralise(value: str) -> str:
    """Make a CSV cell safe to open in a spreadsheet: a leading quote stops formula evaluation."""
    return "'" + value if value and (value[0] in _FORMULA_STARTS or value[0] == "'") else value


def _export_record(e: UsageEvent) -> dict[str, Any]:
    record = {"ts": iso(e.ts_ms), **e.as_dict()}
    record["cost_usd"] = format_usd_plain(e.cost_nanos or 0)
    return record


async def export_events(engine: Engine, out: IO[str], fmt: ExportFormat, start_ms: int, end_ms: int,
                        progress: Callable[[int], None] | None = None) -> int:
    """Write every event in [start, end) to ``out``; returns how many. ``progress(events written)``
    is called now and then."""
    count = 0
    if fmt == "jsonl":
        async for event in engine.iter_events(start_ms, end_ms):
            out.write(json.dumps(_export_record(event), separators=(",", ":")) + "\n")
            count += 1
            if progress is not None and not count % PROGRESS_EVERY:
                progress(count)
        return count
    if fmt != "csv":
        raise FieldError("format", f"must be csv or jsonl (got {fmt!r})")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(EXPORT_COLUMNS)
    async for event in engine.iter_events(start_ms, end_ms):
        record = _export_record(event)
        record["tags"] = json.dumps(record["tags"], separators=(",", ":"), sort_keys=True) if event.tags else ""
        writer.writerow([neutralise(str(record[c])) if c in _TEXT_COLUMNS else record[c] for c in EXPORT_COLUMNS])
        count += 1
        if progress is not None and not count % PROGRESS_EVERY:
            progress(count)
    return count
