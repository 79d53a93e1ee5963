"""The ``budgeteer`` command line: opens the dashboard by default, and scripts the engine.

A contract (see the README): every command takes ``--db`` (env ``BUDGETEER_DB``),
prints human tables by default and JSON with ``--json``, exits 0 on success, 2 on bad
usage or bad input and 1 on any other failure, with one clear sentence on stderr and
never a traceback (``BUDGETEER_DEBUG=1`` shows one).
"""

from __future__ import annotations

import argparse
import asyncio
import html
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from engine.access import AccessDenied
from engine.approvals import ApprovalError, OverrideRequest
from engine.budgets import Outcome, Overshoot, parse_amount
from engine.clock import DAY_MS, MINUTE_MS, FrozenClock, format_span, iso, parse_duration_ms
from engine.engine import Engine, default_db_path, local_identity
from engine.ledger import StoreError
from engine.models import FieldError, parse_timestamp_ms
from engine.money import MoneyError, format_percent, format_usd, format_usd_plain
from engine.tokens import TokenRefused
from engine.vault import VaultError
from tui.progress import progress_bar

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
BY_CHOICES = ("model", "provider", "team", "principal", "workspace", "token_id", "agent", "session")


def _period_words(period: str) -> str:
    """``the last 7d``, ``this month``, ``last month``, ``2026-11-01..2026-11-15``, ``all time``."""
    text = " ".join(period.lower().split())
    if text and text[0].isdigit() and ".." not in text:
        return f"the last {text}"
    return {"month": "this month", "week": "this week", "all": "all time"}.get(text, text)


class UsageError(Exception):
    """Bad usage or bad input: exit 2 with this one sentence."""


class Failure(Exception):
    """Anything else that stops a command: exit 1 with this one sentence."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"budgeteer: {message} (see '{self.prog} --help')\n")


# ------------------------------------------------------------------------------ output


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=False, default=str)


def _money_json(nanos: int) -> dict[str, Any]:
    return {"cost_nanos": nanos, "cost_usd": format_usd_plain(nanos)}


# ------------------------------------------------------------------------------ commands


def _now_clock() -> FrozenClock | None:
    """``BUDGETEER_NOW`` (ISO time or epoch ms) freezes the clock: for screenshots and demos."""
    value = os.environ.get("BUDGETEER_NOW")
    if not value:
        return None
    try:
        return FrozenClock(parse_timestamp_ms(value, "BUDGETEER_NOW"))
    except FieldError as exc:
        raise UsageError(str(exc)) from None


async def _open(args: argparse.Namespace) -> Engine:
    return await Engine.open(args.db, clock=_now_clock())


async def cmd_usage(args: argparse.Namespace) -> int:
    async with await _open(args) as engine:
        report = await engine.usage_report(args.period, args.by, limit=args.limit)
    totals, rows = report["totals"], report["rows"]
    if args.json:
        print(_json({
            "period": report["period"], "start": iso(report["start_ms"]), "end": iso(report["end_ms"]),
            "by": args.by,
            "totals": {**totals.as_dict(), "cost_usd": format_usd_plain(totals.cost_nanos)},
            "rows": [{args.by: r.key, **r.totals.as_dict(), "cost_usd": format_usd_plain(r.totals.cost_nanos)}
                     for r in rows],
        }))
        return EXIT_OK
    if not totals.requests:
        print(f"No usage in {_period_words(report['period'])}. Import events with 'budgeteer import FILE' "
              "or try 'budgeteer demo'.")
        return EXIT_OK
    body = []
    for r in rows:
        t = r.totals
        share = f"{100 * t.cost_nanos / totals.cost_nanos:.1f}%" if totals.cost_nanos else "-"
        body.append([r.key or "(none)", f"{t.requests:,}", f"{t.tokens:,}", format_usd(t.cost_nanos), share,
                     f"{100 * t.error_rate:.1f}%", f"{t.unpriced:,}" if t.unpriced else ""])
    body.append(["total", f"{totals.requests:,}", f"{totals.tokens:,}", format_usd(totals.cost_nanos), "100%",
                 f"{100 * totals.error_rate:.1f}%", f"{totals.unpriced:,}" if totals.unpriced else ""])
    print(f"Usage, {_period_words(report['period'])} ({iso(report['start_ms'])[:16]} to "
          f"{iso(report['end_ms'])[:16]} UTC), "
          f"by {args.by}")
    print(_table([args.by, "requests", "tokens", "cost", "share", "errors", "unpriced"], body, right=range(1, 7)))
    if totals.unpriced:
        print(f"\n{totals.unpriced:,} calls have no price in the table and are counted at $0 (unpriced); "
              "add prices with 'budgeteer pricing import FILE'.")
    return EXIT_OK


async def cmd_import(args: argparse.Namespace) -> int:
    from engine.integrations.files import ImportFileError, import_events

    path = Path(args.file)
    otlp = _otlp_payload(path)
    if otlp is not None:
        return await _import_otlp(args, path, otlp)
    async with await _open(args) as engine:
        try:
            with progress_bar(f"Importing {path.name}", quiet=args.json) as bar:
                report = await import_events(engine, path, strict=args.strict, progress=bar)
        except ImportFileError as exc:
            raise UsageError(str(exc)) from None
    if args.json:
        print(_json(report.as_dict()))
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

    async with await _open(args) as engine:
        try:
            with progress_bar(f"Importing {path.name}", quiet=args.json):
                report = await engine.import_otlp(payload, path.name)
        except OtlpError as exc:
            raise UsageError(f"{path}: {exc}") from None
    if args.json:
        print(_json(report.as_dict()))
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
    async with await _open(args) as engine:
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


def _read_json_file(path: Path, what: str) -> Any:
    try:
        with path.open("rb") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{what} {path} is a folder, not a file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{what} {path} is not valid JSON ({exc})") from None


async def cmd_pricing_import(args: argparse.Namespace) -> int:
    from engine.pricing import PricingError

    path = Path(args.file)
    data = _read_json_file(path, "the price file")
    effective = parse_timestamp_ms(args.effective_from, "--effective-from") if args.effective_from else None
    async with await _open(args) as engine:
        try:
            stored, skipped = await engine.import_prices(
                data, effective_from_ms=effective, workspace=args.workspace or "", source=str(path.name))
        except PricingError as exc:
            raise UsageError(str(exc)) from None
        effective = engine.now_ms() if effective is None else effective
    if args.json:
        print(_json({"stored": stored, "skipped": skipped, "effective_from": iso(effective),
                     "workspace": args.workspace or ""}))
    else:
        scope = f" for workspace {args.workspace}" if args.workspace else ""
        print(f"Stored {stored:,} prices{scope}, effective from {iso(effective)}; "
              f"{len(skipped):,} entries skipped (no per-token price or bad values).")
        if args.verbose:
            for line in skipped:
                print(f"  {line}")
    return EXIT_OK


def _per_million(femtos: int | None) -> str:
    # femto-dollars per token = nano-dollars per million tokens
    return "-" if femtos is None else format_usd(femtos, precise=True)


async def cmd_pricing_show(args: argparse.Namespace) -> int:
    async with await _open(args) as engine:
        at = parse_timestamp_ms(args.at, "--at") if args.at else engine.now_ms()
        price = engine.price_for(args.model, workspace=args.workspace or "", at_ms=at)
        versions = engine.prices.versions(args.model) if price else []
    if price is None:
        raise UsageError(f"model: no price for {args.model!r}; import one with 'budgeteer pricing import FILE'")
    if args.json:
        print(_json({**price.to_json(), "versions": [
            {"effective_from": iso(v.effective_from_ms), "workspace": v.workspace, "source": v.source}
            for v in versions]}))
        return EXIT_OK
    rows = [
        ["input", _per_million(price.input)],
        ["cached input (read)", _per_million(price.cache_read if price.cache_read is not None else price.input)],
        ["cache write", _per_million(price.cache_write if price.cache_write is not None else price.input)],
        ["cache write, 1 hour", _per_million(price.cache_write_1h if price.cache_write_1h is not None else
                                             price.cache_write if price.cache_write is not None else price.input)],
        ["output", _per_million(price.output)],
        ["reasoning output", _per_million(price.reasoning if price.reasoning is not None else price.output)],
    ]
    for tier in price.tiers:
        rows.append([f"input above {tier.threshold_tokens:,} tokens", _per_million(tier.input)])
        rows.append([f"output above {tier.threshold_tokens:,} tokens", _per_million(tier.output)])
        for name, rate in (("cached input", tier.cache_read), ("cache write", tier.cache_write),
                           ("cache write, 1 hour", tier.cache_write_1h)):
            if rate is not None:
                rows.append([f"{name} above {tier.threshold_tokens:,} tokens", _per_million(rate)])
    print(f"{price.model} ({price.provider}, {price.mode})")
    print(_table(["rate", "per 1M tokens"], rows, right=[1]))
    ctx = f"{price.max_input_tokens:,}" if price.max_input_tokens else "unknown"
    out = f"{price.max_output_tokens:,}" if price.max_output_tokens else "unknown"
    print(f"context: {ctx} input tokens, {out} output tokens")
    if price.capabilities:
        print(f"supports: {', '.join(sorted(price.capabilities))}")
    print(f"source: {price.source or 'bundled'}; effective from "
          f"{iso(price.effective_from_ms)[:10] if price.effective_from_ms else 'the beginning'}"
          f"{'; workspace ' + price.workspace if price.workspace else ''}")
    if len(versions) > 1:
        print(f"{len(versions)} versions: " + ", ".join(
            (iso(v.effective_from_ms)[:10] if v.effective_from_ms else "initial") + (f" ({v.workspace})"
                                                                                     if v.workspace else "")
            for v in versions))
    return EXIT_OK


def _demo_path(args: argparse.Namespace) -> tuple[Path, str | None]:
    """The ledger --db or BUDGETEER_DB names, as for every command, and which of them named it;
    with neither, demo.db beside the default ledger, never the ledger itself."""
    if args.db:
        return Path(args.db), "--db"
    if os.environ.get("BUDGETEER_DB"):
        return default_db_path(), "BUDGETEER_DB"
    return default_db_path().with_name("demo.db"), None


async def cmd_demo(args: argparse.Namespace) -> int:
    from engine.demo import populate

    if args.days < 1 or args.days > 400:
        raise UsageError(f"--days must be between 1 and 400 (got {args.days})")
    path, named_by = _demo_path(args)
    if path.exists():
        if named_by and not args.replace:
            async with await Engine.open(path) as probe:
                count = await probe.event_count()
            if count:
                raise UsageError(f"{named_by} {path} already holds {count:,} events; the demo writes only to a "
                                 "fresh ledger (choose another --db, or add --replace to start it over)")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    clock = _now_clock()
    started = time.perf_counter()
    async with await Engine.open(path, clock=clock, durable=False) as engine:
        end_ms = engine.now_ms()
        with progress_bar(f"Writing {args.days} days of demo traffic") as bar:
            total = await populate(engine, days=args.days, seed=args.seed, end_ms=end_ms, progress=bar)
        elapsed = time.perf_counter() - started
        month = await engine.totals(end_ms - args.days * DAY_MS, end_ms + MINUTE_MS)
    print(f"Wrote a demo ledger of {total:,} events over {args.days} days "
          f"({format_usd(month.cost_nanos)} of spend) to {path} in {elapsed:.1f} s.")
    if args.open:
        args.open_after = path  # the dashboard runs its own event loop, after this one ends
    else:
        print(f"Open it with: budgeteer --db {path}")
    return EXIT_OK


def _theme(name: str | None) -> str | None:
    """--theme, else BUDGETEER_THEME; a name Textual does not know is refused with the list."""
    from textual.theme import BUILTIN_THEMES

    name = name or os.environ.get("BUDGETEER_THEME") or None
    if name is not None and name not in BUILTIN_THEMES:
        raise UsageError(f"--theme: unknown theme {name!r}; choose one of {', '.join(sorted(BUILTIN_THEMES))}")
    return name


def _run_dashboard(path: Path | None, refresh: float = 2.0, read_only: bool = False,
                   theme: str | None = None) -> int:
    from tui.app import BudgeteerApp

    db = path or default_db_path()
    if refresh < 0.2 or refresh > 3600:
        raise UsageError(f"--refresh must be between 0.2 and 3600 seconds (got {refresh:g})")
    app = BudgeteerApp(db_path=db, clock=_now_clock(), refresh_seconds=refresh, read_only=read_only,
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


def _policy_row(o: Outcome, over: list[Overshoot]) -> list[str]:
    p = o.policy
    fmt = p.format_amount
    used = o.consumed + o.held
    pct = format_percent(used, p.hard)
    return [p.id, p.name[:40], str(p.scope), str(p.window) + ("" if p.window.tz == "UTC" else f" {p.window.tz}"),
            p.mode if p.enabled else "disabled", fmt(o.consumed), fmt(o.held), fmt(p.hard), pct,
            fmt(sum(x.excess for x in over)) if over else "-"]


def _policy_json(o: Outcome, over: list[Overshoot]) -> dict[str, Any]:
    return {**o.policy.to_json(), "consumed": o.consumed, "held": o.held,
            "window_start": iso(o.window_start_ms), "window_end": iso(o.window_end_ms), "status": o.status,
            "overshoot": sum(x.excess for x in over),
            "overshoots": [{"request_id": x.request_id, "ts": iso(x.ts_ms), "held": x.held, "settled": x.settled}
                           for x in over]}


async def _with_overshoots(engine: Engine) -> list[tuple[Outcome, list[Overshoot]]]:
    """Each policy's status and the calls settled above their hold on it in its current window."""
    status = await engine.policy_status()
    found = await engine.overshoots(min((o.window_start_ms for o in status), default=0))
    return [(o, [x for x in found if x.policy_id == o.policy.id and x.ts_ms >= o.window_start_ms]) for o in status]


async def cmd_policy_add(args: argparse.Namespace) -> int:
    from engine.budgets import build_policy

    async with await _open(args) as engine:
        policy = build_policy(scope=args.scope, metric=args.metric, window=args.window, hard=args.hard, soft=args.soft,
                              mode=args.mode, action=args.action, tz=args.tz, name=args.name,
                              thresholds=args.thresholds, actor=local_identity(), now_ms=engine.now_ms())
        await engine.add_policy(policy)
    if args.json:
        print(_json(policy.to_json()))
    else:
        print(f"Added policy {policy.id}: {policy.name} (hard {policy.format_amount(policy.hard)}, {policy.mode}).")
    return EXIT_OK


async def cmd_policy_list(args: argparse.Namespace) -> int:
    async with await _open(args) as engine:
        status = await _with_overshoots(engine)
    if args.json:
        print(_json([_policy_json(o, over) for o, over in status]))
    elif not status:
        print("No policies yet. Add one with: budgeteer policy add --scope team:ml --metric usd --window month "
              "--hard 500")
    else:
        print(_table(["id", "name", "scope", "window", "mode", "consumed", "held", "hard", "used", "overshoot"],
                     [_policy_row(o, over) for o, over in status], right=range(5, 10)))
    return EXIT_OK


async def cmd_policy_show(args: argparse.Namespace) -> int:
    async with await _open(args) as engine:
        await engine.policy(args.id)
        status, over = {o.policy.id: (o, x) for o, x in await _with_overshoots(engine)}[args.id]
    if args.json:
        print(_json(_policy_json(status, over)))
        return EXIT_OK
    p = status.policy
    fmt = p.format_amount
    rows = [["name", p.name], ["scope", str(p.scope)], ["metric", p.metric],
            ["window", f"{p.window} ({p.window.tz}), now {iso(status.window_start_ms)} to "
                       f"{iso(status.window_end_ms)}"],
            ["soft limit", fmt(p.soft) if p.soft is not None else "-"], ["hard limit", fmt(p.hard)],
            ["alert thresholds", ", ".join(f"{t}%" for t in p.thresholds)], ["mode", p.mode],
            ["on the hard limit", p.action], ["enabled", "yes" if p.enabled else "no"],
            ["consumed", fmt(status.consumed)], ["held", fmt(status.held)],
            ["overshoot", f"{fmt(sum(x.excess for x in over))} by {len(over)} call(s) settled above their hold"
                          if over else "-"],
            ["created", f"{iso(p.created_ms)} by {p.created_by or '?'}"],
            ["updated", f"{iso(p.updated_ms)} by {p.updated_by or '?'}"]]
    print(f"policy {p.id}")
    print("\n".join(f"  {k:<18} {v}" for k, v in rows))
    return EXIT_OK


async def cmd_policy_edit(args: argparse.Namespace) -> int:
    from engine.budgets import build_policy

    async with await _open(args) as engine:
        old = await engine.policy(args.id)
        fmt_amount = (lambda n: format_usd_plain(n)) if old.metric == "usd" else str
        metric = args.metric or old.metric
        keep_amounts = metric == old.metric
        policy = build_policy(
            scope=args.scope or str(old.scope), metric=metric, window=args.window or str(old.window),
            hard=args.hard or (fmt_amount(old.hard) if keep_amounts else ""),
            soft=args.soft if args.soft is not None else (
                fmt_amount(old.soft) if old.soft is not None and keep_amounts else None),
            mode=args.mode or old.mode, action=args.action or old.action, tz=args.tz or old.window.tz,
            name=args.name or old.name, thresholds=args.thresholds or old.thresholds,
            enabled=old.enabled if args.enabled is None else args.enabled == "yes",
            actor=local_identity(), now_ms=engine.now_ms(), policy_id=old.id)
        policy = replace(policy, created_by=old.created_by, created_ms=old.created_ms)
        await engine.update_policy(policy)
    print(_json(policy.to_json()) if args.json else f"Updated policy {policy.id}: {policy.name}.")
    return EXIT_OK


async def cmd_policy_rm(args: argparse.Namespace) -> int:
    async with await _open(args) as engine:
        policy = await engine.remove_policy(args.id)
    print(f"Removed policy {policy.id}: {policy.name}.")
    return EXIT_OK


async def cmd_check(args: argparse.Namespace) -> int:
    from engine.engine import CallRequest

    for name in ("input_tokens", "max_tokens"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise UsageError(f"--{name.replace('_', '-')} must not be negative (got {value})")
    call = CallRequest(principal=args.principal, model=args.model, provider=args.provider or "", team=args.team or "",
                       workspace=args.workspace or "default", token_id=args.token or "", session=args.session or "",
                       agent=args.agent or "", input_tokens=args.input_tokens or 0, max_tokens=args.max_tokens)
    async with await _open(args) as engine:
        cost = engine.worst_case(call)
        evaluation = await engine.check(call)
    if args.json:
        print(_json({**evaluation.as_dict(), "worst_case": {"usd_nanos": cost.usd, "cost_usd": format_usd_plain(
            cost.usd), "tokens": cost.tokens, "priced": cost.priced}}))
        return EXIT_OK
    print(f"decision: {evaluation.decision}   (worst case {format_usd(cost.usd) if cost.priced else 'unpriced'}, "
          f"{cost.tokens:,} tokens)")
    if not evaluation.outcomes:
        print("No policy applies to this call.")
    for o in evaluation.outcomes:
        marker = "*" if evaluation.deciding is o else " "
        print(f" {marker} [{o.status:>4}] {o.policy.id} {o.message}")
    return EXIT_OK


async def cmd_policy_backtest(args: argparse.Namespace) -> int:
    from engine.budgets import build_policy

    async with await _open(args) as engine:
        if args.id:
            policy = await engine.policy(args.id)
        else:
            missing = [f"--{n}" for n in ("scope", "metric", "window", "hard") if not getattr(args, n)]
            if missing:
                raise UsageError(f"give a policy ID or a draft policy; missing {', '.join(missing)}")
            policy = build_policy(scope=args.scope, metric=args.metric, window=args.window, hard=args.hard,
                                  soft=args.soft, tz=args.tz or "UTC", name=args.name or "draft", mode="enforced",
                                  thresholds=args.thresholds)
        start, end = engine.period(args.period)
        started = time.perf_counter()
        with progress_bar(f"Backtesting {policy.name}", quiet=args.json):  # no total: a pulse
            result = await engine.backtest(policy, start, end)
        elapsed = time.perf_counter() - started
    if args.json:
        print(_json({**result.as_dict(), "seconds": round(elapsed, 3)}))
        return EXIT_OK
    fmt = policy.format_amount
    print(f"Backtest of {policy.name} ({policy.scope}, hard {fmt(policy.hard)} per {policy.window}) over the last "
          f"{args.period}:")
    print(f"  calls in scope      {result.calls:,}")
    print(f"  would have blocked  {result.blocked:,}" + (f", first at {iso(result.first_block_ms)}"
                                                         if result.first_block_ms is not None else ""))
    print(f"  would have saved    {fmt(result.prevented)}  (of {fmt(result.prevented + result.allowed_total)})")
    print(f"  windows it blocked  {result.windows_hit:,}; soft-limit crossings {result.soft_crossings:,}")
    print(f"  ({elapsed:.2f} s)")
    return EXIT_OK


async def cmd_alerts_list(args: argparse.Namespace) -> int:
    async with await _open(args) as engine:
        if args.check_forecasts:
            await engine.check_forecasts()
        alerts = await engine.alerts(include_acked=args.all)
    if args.json:
        print(_json([a.as_dict() for a in alerts]))
    elif not alerts:
        print("No open alerts." if not args.all else "No alerts.")
    else:
        print(_table(["id", "time", "policy", "kind", "message", "acked"],
                     [[str(a.id), iso(a.ts_ms)[:16], a.policy_id,
                       f"{a.kind} {a.threshold}%" if a.kind == "threshold" else a.kind, a.message,
                       a.acked_by or ""] for a in alerts], right=[0]))
    return EXIT_OK


async def cmd_alerts_ack(args: argparse.Namespace) -> int:
    async with await _open(args) as engine:
        alert = await engine.ack_alert(args.id)
    print(f"Acknowledged alert {alert.id} ({alert.message}).")
    return EXIT_OK


async def cmd_alerts_webhook(args: argparse.Namespace) -> int:
    async with await _open(args) as engine:
        if args.remove:
            await engine.remove_webhook(args.remove)
            print(f"Removed webhook {args.remove}.")
        if args.url:
            webhook_id = await engine.add_webhook(args.url, args.kind)
            print(f"Added webhook {webhook_id} ({args.kind}).")
        for webhook_id, url, kind in await engine.webhooks():
            print(f"  {webhook_id}  {kind:<8} {url}")
    return EXIT_OK


# ---------------------------------------------------------------- approvals, tokens, members, audit

def _request_row(r: OverrideRequest, now: int) -> list[str]:
    fmt = r.format_amount
    granted = fmt(r.granted) if r.granted is not None else ""
    return [r.id, r.status, r.requester, r.policy_id, fmt(r.amount), granted, format_span(now - r.created_ms),
            r.reason[:60]]


async def cmd_approvals_list(args: argparse.Namespace) -> int:
    async with await _open(args) as engine:
        pending = None if args.all else not args.history
        requests = await engine.override_requests(pending=pending)
        now = engine.now_ms()
    if args.json:
        print(_json([r.as_dict() for r in requests]))
    elif not requests:
        print("No pending override requests." if pending else "No override requests.")
    else:
        print(_table(["id", "status", "requester", "policy", "asked", "granted", "age", "reason"],
                     [_request_row(r, now) for r in requests]))
    return EXIT_OK


async def cmd_approvals_show(args: argparse.Namespace) -> int:
    async with await _open(args) as engine:
        r = await engine.override_request(args.id)
    if args.json:
        print(_json(r.as_dict()))
        return EXIT_OK
    lines = r.describe(engine.now_ms())
    lines[1:] = ["  " + line for line in lines[1:]]
    print("\n".join(lines))
    return EXIT_OK


async def _policy_amount(engine: Engine, policy_id: str, text: str | None, field_name: str = "amount") -> int | None:
    if text is None:
        return None
    return parse_amount(text, (await engine.policy(policy_id)).metric, field_name)


async def cmd_approvals_request(args: argparse.Namespace) -> int:
    async with await _open(args) as engine:
        amount = await _policy_amount(engine, args.policy, args.amount)
        assert amount is not None
        request, created = await engine.request_override(args.policy, amount, parse_duration_ms(args.ttl, "ttl"),
                                                         args.reason)
    print(("Opened" if created else "Already pending:") + f" {request.id} on {request.subject} "
          f"for {request.format_amount(request.amount)}.")
    return EXIT_OK


async def cmd_approvals_approve(args: argparse.Namespace) -> int:
    async with await _open(args) as engine:
        current = await engine.override_request(args.id)
        amount = await _policy_amount(engine, current.policy_id, args.amount)
        ttl = parse_duration_ms(args.ttl, "ttl") if args.ttl else None
        r = await engine.approve(args.id, amount, ttl, reason=args.reason or "")
    fmt = r.format_amount
    print(f"Approved {r.id}: {r.requester} may spend {fmt(r.granted or 0)} past {r.policy_id} "
          f"until {iso(r.grant_expires_ms or 0)}.")
    return EXIT_OK


async def cmd_approvals_deny(args: argparse.Namespace) -> int:
    async with await _open(args) as engine:
        r = await engine.deny(args.id, args.reason)
    print(f"Denied {r.id} ({r.requester} on {r.policy_id}): {r.decision_reason}.")
    return EXIT_OK


async def cmd_token_create(args: argparse.Namespace) -> int:
    async with await _open(args) as engine:
        expires = engine.now_ms() + parse_duration_ms(args.expires, "expires") if args.expires else None
        token, secret = await engine.create_token(name=args.name, principal=args.principal, team=args.team or "",
                                                  scopes=args.scopes, rpm=args.rpm, tpm=args.tpm, expires_ms=expires)
    if args.json:
        print(_json({**token.as_dict(engine.now_ms()), "secret": secret}))
        return EXIT_OK
    print(f"Created {token.id} ({token.name}) for {token.principal}, scopes {', '.join(token.scopes)}; "
          f"{token.limits}.")
    print("The secret, shown this once (store it now; Budgeteer keeps only its SHA-256):")
    print(f"  {secret}")
    return EXIT_OK


async def cmd_token_list(args: argparse.Namespace) -> int:
    async with await _open(args) as engine:
        found = await engine.tokens()
        now = engine.now_ms()
    if args.json:
        print(_json([{**t.as_dict(now), "used_this_month_nanos": t.used_this_month} for t in found]))
    elif not found:
        print("No API tokens. Create one with: budgeteer token create --name NAME --principal WHO")
    else:
        print(_table(["id", "prefix", "name", "principal", "state", "scopes", "rpm", "tpm", "last used", "month"],
                     [[t.id, f"bgt_{t.prefix}…", t.name, t.principal, t.state(now), ",".join(t.scopes),
                       str(t.rpm or "-"), str(t.tpm or "-"), iso(t.last_used_ms)[:16] if t.last_used_ms else "never",
                       format_usd(t.used_this_month)] for t in found], right=[6, 7, 9]))
    return EXIT_OK


async def cmd_token_revoke(args: argparse.Namespace) -> int:
    async with await _open(args) as engine:
        token = await engine.revoke_token(args.id)
    print(f"Revoked {token.id} ({token.name}); calls with it are refused from now on.")
    return EXIT_OK


async def cmd_token_rotate(args: argparse.Namespace) -> int:
    async with await _open(args) as engine:
        old, new, secret = await engine.rotate_token(args.id)
    print(f"Revoked {old.id}; its successor is {new.id} ({new.name}). The new secret, shown this once:")
    print(f"  {secret}")
    return EXIT_OK


async def cmd_member_list(args: argparse.Namespace) -> int:
    async with await _open(args) as engine:
        found = await engine.members()
        me, role = engine.actor, await engine.role()
    if args.json:
        print(_json([m.as_dict() for m in found]))
        return EXIT_OK
    if not found:
        print(f"No members: this is a single-user ledger and {me} may do everything. "
              f"Add the first owner with: budgeteer member set {me} owner")
        return EXIT_OK
    print(_table(["user", "role", "added", "by"], [[m.user, m.role, iso(m.added_ms)[:10], m.added_by] for m in found]))
    print(f"You are {me} ({role or 'not a member'}).")
    return EXIT_OK


async def cmd_member_set(args: argparse.Namespace) -> int:
    async with await _open(args) as engine:
        member = await engine.set_member(args.user, args.role)
    print(f"{member.user} is now {member.role}.")
    return EXIT_OK


async def cmd_member_rm(args: argparse.Namespace) -> int:
    async with await _open(args) as engine:
        member = await engine.remove_member(args.user)
    print(f"Removed {member.user} ({member.role}).")
    return EXIT_OK


async def cmd_audit_list(args: argparse.Namespace) -> int:
    async with await _open(args) as engine:
        found = await engine.audit_entries(limit=args.limit, text=args.filter or "")
    if args.json:
        print(_json([e.as_dict() for e in found]))
    elif not found:
        print("The audit journal is empty.")
    else:
        print(_table(["#", "time", "actor", "action", "subject", "change"],
                     [[str(e.id), iso(e.ts_ms)[:19], e.actor, e.action, e.subject, e.summary(60)] for e in found],
                     right=[0]))
    return EXIT_OK


async def cmd_audit_verify(args: argparse.Namespace) -> int:
    from engine.audit import Anchor

    anchor = None
    if args.anchor:
        try:
            anchor = Anchor.from_json(_read_json_file(Path(args.anchor), "the anchor file"))
        except ValueError as exc:
            raise UsageError(f"the anchor file {args.anchor}: {exc}") from None
    async with await _open(args) as engine:
        result = await engine.verify_audit(anchor)
    if result.ok:
        keyed = (f"keyed from entry {result.keyed_from} by the vault's key" if result.keyed_from is not None
                 else "not keyed (the vault holds no key for this ledger yet)")
        print(f"The audit journal is intact: {result.entries:,} entries, each linked to the one before; {keyed}."
              + (f" The anchor's entry {anchor.entry} is there, unchanged." if anchor else ""))
        return EXIT_OK
    raise Failure(f"audit journal: {result.problem}")


async def cmd_audit_anchor(args: argparse.Namespace) -> int:
    async with await _open(args) as engine:
        anchor = await engine.audit_anchor()
    if anchor is None:
        raise Failure("the audit journal is empty: there is no head to anchor yet")
    print(_json({**anchor.as_dict(), "at": iso(engine.now_ms())}))
    return EXIT_OK


#: The frozen "now" of screenshots: 2026-11-18 12:00 UTC, a Wednesday.
SCREENSHOT_NOW_MS = 1_795_003_200_000


# ------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    db_help = "ledger file (env BUDGETEER_DB; default: the user data directory)"
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", default=argparse.SUPPRESS, help=db_help)
    parser = _Parser(prog="budgeteer", description="Govern what your organisation spends on language models. "
                     "With no command, opens the dashboard.")
    parser.add_argument("--db", default=None, help=db_help)
    parser.add_argument("--refresh", type=float, default=2.0, help="dashboard refresh in seconds (default 2)")
    parser.add_argument("--read-only", action="store_true", help="dashboard: look, change nothing")
    parser.add_argument("--theme", help="dashboard theme, e.g. ansi-dark or ansi-light to use the terminal's "
                        "own colours (default textual-dark; env BUDGETEER_THEME)")
    parser.add_argument("--version", action="version", version="budgeteer 0.1.0")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    p = sub.add_parser("demo", parents=[common], help="write a realistic demo ledger",
                       description="Write a realistic, deterministic month of traffic to a fresh ledger "
                                   "(default: demo.db beside the default ledger).")
    p.add_argument("--days", type=int, default=30, help="days of history (default 30)")
    p.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    p.add_argument("--open", action="store_true", help="open the dashboard on it afterwards")
    p.add_argument("--replace", action="store_true", help="start over a --db ledger that already holds events")
    p.set_defaults(handler=cmd_demo)

    p = sub.add_parser("screenshots", parents=[common], help="regenerate the dashboard's SVG screenshots",
                       description="Write SVG screenshots of the dashboard on a deterministic demo ledger.")
    p.add_argument("--out", default="screenshots", help="folder to write to (default screenshots/)")
    p.add_argument("--theme", default=argparse.SUPPRESS, help="theme to draw in (file names get its name)")
    p.set_defaults(handler=cmd_screenshots)

    p = sub.add_parser("usage", parents=[common], help="spend and tokens for a period",
                       description="Totals and a breakdown of usage for a period.")
    p.add_argument("--period", default="30d", help="24h, 7d, 30d, 90d (any Nh/Nd), today, week, month, 'last month', "
                   "a range of days 2026-11-01..2026-11-15, or all (default 30d)")
    p.add_argument("--by", default="model", choices=BY_CHOICES, help="break down by (default model)")
    p.add_argument("--limit", type=int, default=50, help="rows at most (default 50)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_usage)

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

    p = sub.add_parser("policy", parents=[common], help="budgets: add, list, show, edit, remove",
                       description="Budget policies: a scope, a metric, a window and limits.")
    psub = p.add_subparsers(dest="policy_command", parser_class=_Parser, metavar="ACTION", required=True)

    def policy_fields(q: argparse.ArgumentParser, required: bool) -> None:
        q.add_argument("--scope", required=required, help="global, team:ml, principal:alice, model:gpt-4o, "
                       "team:ml+model:gpt-4o ...")
        q.add_argument("--metric", required=required, help="usd, tokens or requests")
        q.add_argument("--window", required=required, help="hour, day, week, month, quarter or rolling:30m|6h|7d")
        q.add_argument("--soft", help="soft limit (alerts): dollars for usd, a count otherwise")
        q.add_argument("--hard", required=required, help="hard limit: dollars for usd ($12.50), a count otherwise")
        q.add_argument("--mode", default=None if not required else "enforced",
                       help="enforced (blocks), dry_run (records would-block) or suggest (reports)")
        q.add_argument("--action", default=None if not required else "block",
                       help="on the hard limit: block, approval_required or downgrade")
        q.add_argument("--tz", default=None if not required else "UTC", help="IANA zone of calendar windows")
        q.add_argument("--name", help="a name people will recognise")
        q.add_argument("--thresholds", type=int, nargs="+", help="alert thresholds, %% of hard (default 50 80 100)")
        q.add_argument("--json", action="store_true", help="print JSON")

    q = psub.add_parser("add", parents=[common], help="add a policy")
    policy_fields(q, True)
    q.set_defaults(handler=cmd_policy_add)
    q = psub.add_parser("list", parents=[common], help="every policy with what it has consumed and holds")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=cmd_policy_list)
    q = psub.add_parser("show", parents=[common], help="one policy in full")
    q.add_argument("id")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=cmd_policy_show)
    q = psub.add_parser("edit", parents=[common], help="change a policy (fields not given are kept)")
    q.add_argument("id")
    policy_fields(q, False)
    q.add_argument("--enabled", choices=("yes", "no"), help="turn the policy on or off")
    q.set_defaults(handler=cmd_policy_edit)
    q = psub.add_parser("backtest", parents=[common], help="replay past usage against a policy or a draft")
    q.add_argument("id", nargs="?", help="an existing policy (or give a draft with the fields below)")
    policy_fields(q, False)
    q.add_argument("--period", default="30d", help="how far back to replay (default 30d)")
    q.set_defaults(handler=cmd_policy_backtest)
    q = psub.add_parser("rm", parents=[common], help="remove a policy")
    q.add_argument("id")
    q.set_defaults(handler=cmd_policy_rm)

    p = sub.add_parser("alerts", parents=[common], help="budget alerts: list, acknowledge, webhooks",
                       description="Threshold crossings and projected overruns.")
    asub = p.add_subparsers(dest="alerts_command", parser_class=_Parser, metavar="ACTION", required=True)
    q = asub.add_parser("list", parents=[common], help="open alerts, newest first")
    q.add_argument("--all", action="store_true", help="include acknowledged alerts")
    q.add_argument("--check-forecasts", action="store_true", help="raise projected-overrun alerts first")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=cmd_alerts_list)
    q = asub.add_parser("ack", parents=[common], help="acknowledge an alert")
    q.add_argument("id", type=int)
    q.set_defaults(handler=cmd_alerts_ack)
    q = asub.add_parser("webhook", parents=[common], help="add or remove a webhook (or list them with no URL)")
    q.add_argument("url", nargs="?", help="http(s) address to POST alerts to")
    q.add_argument("--kind", default="generic", help="generic (JSON) or slack")
    q.add_argument("--remove", metavar="ID", help="remove the webhook with this id")
    q.set_defaults(handler=cmd_alerts_webhook)

    p = sub.add_parser("approvals", parents=[common], help="override requests: list, show, approve, deny",
                       description="Requests for headroom past a hard limit whose action is approval_required.")
    asub = p.add_subparsers(dest="approvals_command", parser_class=_Parser, metavar="ACTION", required=True)
    q = asub.add_parser("list", parents=[common], help="pending requests, oldest first")
    q.add_argument("--history", action="store_true", help="decided requests instead, newest first")
    q.add_argument("--all", action="store_true", help="every request")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=cmd_approvals_list)
    q = asub.add_parser("show", parents=[common], help="one request with the evaluation that triggered it")
    q.add_argument("id")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=cmd_approvals_show)
    q = asub.add_parser("request", parents=[common], help="ask for headroom on a policy by hand")
    q.add_argument("--policy", required=True, help="policy id")
    q.add_argument("--amount", required=True, help="dollars for a usd policy, a count otherwise")
    q.add_argument("--ttl", default="1h", help="how long the headroom should last once granted (default 1h)")
    q.add_argument("--reason", required=True, help="what it is for")
    q.set_defaults(handler=cmd_approvals_request)
    q = asub.add_parser("approve", parents=[common], help="grant a request (its amount, or --amount)")
    q.add_argument("id")
    q.add_argument("--amount", help="grant this instead of what was asked")
    q.add_argument("--ttl", help="how long the grant lasts (default: what was asked)")
    q.add_argument("--reason", help="a note kept with the decision")
    q.set_defaults(handler=cmd_approvals_approve)
    q = asub.add_parser("deny", parents=[common], help="refuse a request")
    q.add_argument("id")
    q.add_argument("--reason", required=True, help="why (the requester sees it)")
    q.set_defaults(handler=cmd_approvals_deny)

    p = sub.add_parser("token", parents=[common], help="API tokens: create, list, revoke, rotate",
                       description="Bearer tokens for the gateway; the secret is shown once.")
    tsub = p.add_subparsers(dest="token_command", parser_class=_Parser, metavar="ACTION", required=True)
    q = tsub.add_parser("create", parents=[common], help="a new token (prints its secret once)")
    q.add_argument("--name", required=True, help="what the token is for")
    q.add_argument("--principal", required=True, help="who calls with it")
    q.add_argument("--team", help="the caller's team")
    q.add_argument("--scopes", nargs="+", help="chat embeddings responses models traces usage:read "
                   "(default: chat embeddings responses models)")
    q.add_argument("--rpm", type=int, help="requests per minute at most")
    q.add_argument("--tpm", type=int, help="tokens per minute at most")
    q.add_argument("--expires", help="lifetime, e.g. 30d or 12h (default: never)")
    q.add_argument("--json", action="store_true", help="print JSON (the secret included, once)")
    q.set_defaults(handler=cmd_token_create)
    q = tsub.add_parser("list", parents=[common], help="every token, its state, last use and spend this month")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=cmd_token_list)
    q = tsub.add_parser("revoke", parents=[common], help="refuse a token from now on")
    q.add_argument("id", help="token id (tok_...) or its bgt_ prefix")
    q.set_defaults(handler=cmd_token_revoke)
    q = tsub.add_parser("rotate", parents=[common], help="revoke a token and issue its successor")
    q.add_argument("id", help="token id (tok_...) or its bgt_ prefix")
    q.set_defaults(handler=cmd_token_rotate)

    p = sub.add_parser("member", parents=[common], help="workspace members and roles",
                       description="Roles: owner, admin, operator, viewer. You act as BUDGETEER_USER (or your login).")
    msub = p.add_subparsers(dest="member_command", parser_class=_Parser, metavar="ACTION", required=True)
    q = msub.add_parser("list", parents=[common], help="members and their roles")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=cmd_member_list)
    q = msub.add_parser("set", parents=[common], help="add a member or change a role")
    q.add_argument("user")
    q.add_argument("role", help="owner, admin, operator or viewer")
    q.set_defaults(handler=cmd_member_set)
    q = msub.add_parser("rm", parents=[common], help="remove a member")
    q.add_argument("user")
    q.set_defaults(handler=cmd_member_rm)

    p = sub.add_parser("audit", parents=[common], help="the audit journal: list, verify, anchor",
                       description="Every change and decision, each entry chained to the one before by a hash "
                                   "keyed by a key in the vault.")
    usub = p.add_subparsers(dest="audit_command", parser_class=_Parser, metavar="ACTION", required=True)
    q = usub.add_parser("list", parents=[common], help="newest entries first")
    q.add_argument("--filter", help="keep entries whose actor, action or subject contain this")
    q.add_argument("--limit", type=int, default=50, help="entries at most (default 50)")
    q.add_argument("--json", action="store_true", help="print JSON (before and after included)")
    q.set_defaults(handler=cmd_audit_list)
    q = usub.add_parser("verify", parents=[common], help="check the hash chain; exit 1 naming the entry at fault")
    q.add_argument("--anchor", metavar="FILE",
                   help="an anchor 'audit anchor' printed: its entry must still be there, unchanged")
    q.set_defaults(handler=cmd_audit_verify)
    q = usub.add_parser("anchor", parents=[common],
                        help="print the head (ledger, entry id, hash) as JSON, to keep somewhere else")
    q.set_defaults(handler=cmd_audit_anchor)

    from tui import cli_providers

    cli_providers.register(sub, common)

    p = sub.add_parser("check", parents=[common], help="what the budgets would decide for a call",
                       description="Evaluate a call against every applicable policy without holding anything.")
    p.add_argument("--principal", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--team")
    p.add_argument("--workspace")
    p.add_argument("--provider")
    p.add_argument("--token")
    p.add_argument("--session")
    p.add_argument("--agent")
    p.add_argument("--input-tokens", type=int, help="estimated input tokens (default 0)")
    p.add_argument("--max-tokens", type=int, help="output cap (default: the model's most output, else 4096)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_check)

    p = sub.add_parser("pricing", parents=[common], help="the price table",
                       description="Import and inspect model prices.")
    psub = p.add_subparsers(dest="pricing_command", parser_class=_Parser, metavar="ACTION", required=True)
    q = psub.add_parser("import", parents=[common], help="import a LiteLLM-format price file")
    q.add_argument("file", help="model_prices_and_context_window.json or a file of the same shape")
    q.add_argument("--effective-from", help="ISO date/time from which these prices apply (default: now)")
    q.add_argument("--workspace", help="apply only to this workspace (an override)")
    q.add_argument("--verbose", action="store_true", help="list the skipped entries")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=cmd_pricing_import)
    q = psub.add_parser("show", parents=[common], help="show a model's price")
    q.add_argument("model")
    q.add_argument("--workspace", help="the price this workspace pays")
    q.add_argument("--at", help="the price in force at this ISO time (default: now)")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=cmd_pricing_show)
    return parser


def _normalise_dates(args: argparse.Namespace) -> None:
    # Accept plain dates (2026-11-01) where a time is asked for: midnight UTC.
    for name in ("effective_from", "at"):
        value = getattr(args, name, None)
        if value and len(value) == 10 and value[4] == "-":
            try:
                datetime.strptime(value, "%Y-%m-%d")
            except ValueError:
                raise UsageError(f"--{name.replace('_', '-')}: {value!r} is not a date") from None
            setattr(args, name, value + "T00:00:00Z")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "db", None) is None:
        args.db = None
    debug = bool(os.environ.get("BUDGETEER_DEBUG"))
    try:
        _normalise_dates(args)
        handler: Callable[[argparse.Namespace], Awaitable[int]] | None = getattr(args, "handler", None)
        if handler is None:
            return _run_dashboard(Path(args.db) if args.db else None, args.refresh, args.read_only, args.theme)
        code = handler(args) if getattr(args, "sync", False) else asyncio.run(handler(args))  # type: ignore[arg-type]
        if code == EXIT_OK and getattr(args, "open_after", None):
            return _run_dashboard(args.open_after, args.refresh, args.read_only, args.theme)
        return code
    except (UsageError, FieldError, MoneyError) as exc:
        if debug:
            raise
        print(f"budgeteer: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (Failure, StoreError, AccessDenied, ApprovalError, TokenRefused, VaultError) as exc:
        if debug:
            raise
        print(f"budgeteer: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("budgeteer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        sys.stderr.close()
        return EXIT_OK
    except OSError as exc:
        if debug:
            raise
        print(f"budgeteer: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:  # the last line of defence: one sentence, never a traceback
        if debug:
            raise
        print(f"budgeteer: unexpected error: {type(exc).__name__}: {exc} (BUDGETEER_DEBUG=1 shows details)",
              file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
