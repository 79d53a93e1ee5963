"""``budgeteer pricing``: the price table imported and shown."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from engine.clock import iso
from engine.models import parse_timestamp_ms
from engine.money import format_usd
from engine.pricing import PricingError
from tui.cli.common import EXIT_OK, Parser, UsageError, dump_json, open_engine, read_json_file, table


async def cmd_pricing_import(args: argparse.Namespace) -> int:
    path = Path(args.file)
    data = read_json_file(path, "the price file")
    effective = parse_timestamp_ms(args.effective_from, "--effective-from") if args.effective_from else None
    async with await open_engine(args) as engine:
        try:
            stored, skipped = await engine.import_prices(
                data, effective_from_ms=effective, workspace=args.workspace or "", source=str(path.name))
        except PricingError as exc:
            raise UsageError(str(exc)) from None
        effective = engine.now_ms() if effective is None else effective
    if args.json:
        print(dump_json({"stored": stored, "skipped": skipped, "effective_from": iso(effective),
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
    async with await open_engine(args) as engine:
        at = parse_timestamp_ms(args.at, "--at") if args.at else engine.now_ms()
        price = engine.price_for(args.model, workspace=args.workspace or "", at_ms=at)
        versions = engine.prices.versions(args.model) if price else []
    if price is None:
        raise UsageError(f"model: no price for {args.model!r}; import one with 'budgeteer pricing import FILE'")
    if args.json:
        print(dump_json({**price.to_json(), "versions": [
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
    print(table(["rate", "per 1M tokens"], rows, right=[1]))
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


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("pricing", parents=[common], help="the price table",
                       description="Import and inspect model prices.")
    psub = p.add_subparsers(dest="pricing_command", parser_class=Parser, metavar="ACTION", required=True)
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
