"""``budgeteer import`` and ``export``: events (JSONL, CSV) and OTLP traces in and out."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from tui.cli.common import EXIT_OK, EXIT_USAGE, UsageError, dump_json, open_engine, progress_bar


async def cmd_import(args: argparse.Namespace) -> int:
    from engine.integrations.files import ImportFileError, import_events

    path = Path(args.file)
    otlp = _otlp_payload(path)
    if otlp is not None:
        return await _import_otlp(args, path, otlp)
    async with await open_engine(args) as engine:
        try:
            with progress_bar(f"Importing {path.name}", quiet=args.json) as bar:
                report = await import_events(engine, path, strict=args.strict, progress=bar)
        except ImportFileError as exc:
            raise UsageError(str(exc)) from None
    if args.json:
        print(dump_json(report.as_dict()))
    else:
        if report.written:
            print(f"Imported {report.recorded:,} events from {path} ({report.format}); "
                  f"{report.duplicates:,} duplicates skipped, {report.bad:,} bad lines skipped.")
        for error in report.errors:
            print(f"  {error}", file=sys.stderr)
        if report.bad > len(report.errors):
            print(f"  ... and {report.bad - len(report.errors):,} more", file=sys.stderr)
    if report.bad:
        if report.strict:
            print(f"budgeteer: nothing was imported: {report.bad:,} of {report.lines:,} lines are bad "
                  "(--strict writes only a file with no bad line)", file=sys.stderr)
        else:
            print(f"budgeteer: {report.bad:,} of {report.lines:,} lines were bad and skipped", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _otlp_payload(path: Path) -> Any | None:
    """The OTLP traces of a file (JSON, JSON lines, protobuf, any of them gzip-compressed),
    else None: it is then an events file."""
    from engine.integrations.otlp import OtlpError, is_otlp_file, load_file

    try:
        with path.open("rb") as f:
            head = f.read(65536)
        if not is_otlp_file(path.name, head):
            return None
        return load_file(path.read_bytes(), path.name)
    except OSError:
        return None  # the events importer reports a missing file its own way
    except OtlpError as exc:
        raise UsageError(f"{path}: {str(exc).removeprefix('body: ')}") from None


async def _import_otlp(args: argparse.Namespace, path: Path, payload: Any) -> int:
    from engine.integrations.otlp import OtlpError

    async with await open_engine(args) as engine:
        try:
            with progress_bar(f"Importing {path.name}", quiet=args.json):
                report = await engine.import_otlp(payload, path.name)
        except OtlpError as exc:
            raise UsageError(f"{path}: {exc}") from None
    if args.json:
        print(dump_json(report.as_dict()))
    else:
        print(f"Imported {report.accepted:,} model calls from {report.spans:,} spans in {path} (OTLP); "
              f"{report.duplicates:,} duplicates, {report.skipped:,} spans that are not model calls, "
              f"{report.rejected:,} rejected.")
        for reason in report.reasons:
            print(f"  {reason}", file=sys.stderr)
    return EXIT_USAGE if report.rejected else EXIT_OK


async def cmd_export(args: argparse.Namespace) -> int:
    from engine.integrations.files import export_events

    fmt = args.format
    if fmt is None:
        suffix = Path(args.out).suffix.lower() if args.out else ""
        fmt = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(suffix)
        if fmt is None:
            raise UsageError("--format is required (csv or jsonl) unless --out ends in .csv or .jsonl")
    to_terminal = not args.out and sys.stdout.isatty()  # no bar over the events themselves
    async with await open_engine(args) as engine:
        with progress_bar("Exporting", quiet=to_terminal) as bar:
            start, end = engine.period(args.period)
            total = (await engine.totals(start, end)).requests  # from the rollups: the bar's length, no scan

            def progress(count: int) -> None:
                bar(count, max(total, count))

            if not args.out:
                count = await export_events(engine, sys.stdout, fmt, start, end, progress)
            else:
                out = Path(args.out)
                # Write beside the target and rename, so a failed export never leaves half a file.
                fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent if str(out.parent) else ".")
                try:
                    with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
                        count = await export_events(engine, handle, fmt, start, end, progress)
                    os.replace(tmp, out)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
    if args.out:
        print(f"Exported {count:,} events to {args.out} ({fmt}).", file=sys.stderr)
    return EXIT_OK


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("import", parents=[common], help="import JSONL or CSV events, or OTLP traces",
                       description="Import usage events from a JSONL or CSV file. Bad lines are listed with "
                                   "their line number, field and reason and skipped (exit 2); --strict writes "
                                   "nothing unless every line is good. An OTLP traces file (JSON, JSON lines, "
                                   "or protobuf named .pb/.binpb, any of them gzip-compressed) is read as "
                                   "/v1/traces reads it.")
    p.add_argument("file", help="a .jsonl or .csv file, or OTLP traces")
    p.add_argument("--strict", action="store_true", help="write nothing if any line is bad")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=cmd_import)

    p = sub.add_parser("export", parents=[common], help="export events as CSV or JSONL",
                       description="Export raw events. CSV cells that a spreadsheet would run as a formula "
                                   "are prefixed with a quote.")
    p.add_argument("--format", choices=("csv", "jsonl"), help="csv or jsonl (default: from --out)")
    p.add_argument("--period", default="all", help="24h, 7d, 30d, 90d, today, month or all (default all)")
    p.add_argument("--out", help="file to write (default: standard output)")
    p.set_defaults(handler=cmd_export)
