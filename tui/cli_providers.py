"""The command line of the vault, the provider registry and the models:
``budgeteer vault status|set|list|rm``, ``provider add|list|rm`` and
``models status|list|explain|test-connection``."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.clock import iso
from engine.engine import Engine
from engine.money import format_usd
from engine.providers import served as served_models
from engine.routing import MODES, cause
from engine.vault import VaultError
from tui.cli import EXIT_OK, Failure, UsageError, _json, _open, _Parser, _table


def _ask_passphrase(engine: Engine) -> None:
    """At a terminal, the file vault's passphrase is asked for (twice for a new vault)."""
    if os.environ.get("BUDGETEER_VAULT_PASSPHRASE") or not sys.stdin.isatty():
        return

    def ask() -> str:
        first = getpass.getpass("Vault passphrase: ")
        if not engine.vault().path.exists() and getpass.getpass("Again, to confirm (a new vault): ") != first:
            raise VaultError("the two passphrases differ; nothing was stored")
        return first

    engine.vault_passphrase = ask


async def _vault_engine(args: argparse.Namespace) -> Engine:
    engine = await _open(args)
    _ask_passphrase(engine)
    return engine


def _read_secret(ref: str) -> str:
    """From a hidden prompt at a terminal, else one line of standard input; never an argument."""
    if sys.stdin.isatty():
        return getpass.getpass(f"Secret for vault:{ref} (not shown): ")
    return sys.stdin.readline().rstrip("\r\n")


async def cmd_vault_status(args: argparse.Namespace) -> int:
    async with await _open(args) as engine:
        status = await engine.vault_status()
    if args.json:
        print(_json({"backend": status.backend, "why": status.why, "location": status.location}))
    else:
        print(f"backend   {status.backend}\nwhy       {status.why}\nlocation  {status.location}")
        print("Force a choice with BUDGETEER_VAULT_BACKEND=keyring|file.")
    return EXIT_OK


async def cmd_vault_set(args: argparse.Namespace) -> int:
    async with await _vault_engine(args) as engine:
        secret = _read_secret(args.ref)
        entry = await engine.vault_set(args.ref, secret)
        del secret
        backend = (await engine.vault_status()).backend
    print(f"Stored vault:{entry.ref} ({entry.fingerprint}) in the {backend} vault.")
    return EXIT_OK


async def cmd_vault_list(args: argparse.Namespace) -> int:
    async with await _open(args) as engine:
        entries = await engine.vault_entries()
        status = await engine.vault_status()
    if args.json:
        print(_json([e.as_dict() for e in entries]))
    elif not entries:
        print(f"The {status.backend} vault holds no credentials. Add one with: budgeteer vault set REF")
    else:
        print(_table(["reference", "fingerprint", "updated"],
                     [[f"vault:{e.ref}", e.fingerprint, iso(e.updated_ms)[:19]] for e in entries]))
    return EXIT_OK


async def cmd_vault_rm(args: argparse.Namespace) -> int:
    async with await _vault_engine(args) as engine:
        entry = await engine.vault_remove(args.ref)
    print(f"Removed vault:{entry.ref} ({entry.fingerprint}).")
    return EXIT_OK


async def cmd_provider_add(args: argparse.Namespace) -> int:
    async with await _open(args) as engine:
        provider = await engine.add_provider(
            name=args.name, kind=args.kind, base_url=args.base_url, credential=args.credential or "",
            vendor=args.vendor or "", models=(args.models or "").split(","))
        served = served_models(engine.prices.models(engine.now_ms()), [provider])
    print(f"Added {provider.name} ({provider.kind}, {provider.base_url}), serving {len(served)} models"
          + (f", credential {provider.credential}" if provider.credential else ", no credential") + ".")
    return EXIT_OK


async def cmd_provider_list(args: argparse.Namespace) -> int:
    async with await _open(args) as engine:
        found = await engine.providers()
    if args.json:
        print(_json([p.as_dict() for p in found]))
    elif not found:
        print("No providers registered: routing considers every chat model of the price table. "
              "Add one with: budgeteer provider add NAME --kind openai --base-url URL --credential vault:REF")
    else:
        print(_table(["name", "kind", "base url", "credential", "vendor", "models", "enabled"],
                     [[p.name, p.kind, p.base_url, p.credential or "-", p.vendor or "-",
                       ",".join(p.models) or "(vendor's)", "yes" if p.enabled else "no"] for p in found]))
    return EXIT_OK


async def cmd_provider_rm(args: argparse.Namespace) -> int:
    async with await _open(args) as engine:
        provider = await engine.remove_provider(args.name)
    print(f"Removed {provider.name}.")
    return EXIT_OK


async def cmd_models_list(args: argparse.Namespace) -> int:
    async with await _open(args) as engine:
        catalog = await engine.catalog()
    if args.json:
        print(_json([m.as_dict() for m in catalog]))
        return EXIT_OK
    print(_table(["model", "provider", "tier", "latency", "input $/M", "output $/M", "context", "capabilities"],
                 [[m.model, m.provider, str(m.cost_tier), m.latency_tier, format_usd(m.price.input),
                   format_usd(m.price.output), f"{m.context:,}" if m.context else "-",
                   ",".join(sorted(m.capabilities))] for m in catalog], right=[2, 4, 5, 6]))
    return EXIT_OK


async def cmd_models_status(args: argparse.Namespace) -> int:
    async with await _open(args) as engine:
        health, breakers = await engine.provider_health(args.minutes * 60_000)
        registered = {p.name for p in await engine.providers()}
    if args.json:
        print(_json({"providers": [{"provider": h.provider, "model": h.model or None, "calls": h.calls,
                                    "errors": h.errors, "error_rate": round(h.error_rate, 4),
                                    "mean_latency_ms": h.mean_latency_ms, "p95_latency_ms": h.p95_latency_ms}
                                   for h in health],
                     "breakers": {n: {"state": b.state, "since": iso(b.since_ms), "reason": b.reason}
                                  for n, b in breakers.items()}}))
        return EXIT_OK
    names = sorted(registered | {h.provider for h in health} | set(breakers))
    if not names:
        print(f"No calls in the last {args.minutes} min and no providers registered.")
        return EXIT_OK
    rows = []
    for name in names:
        b = breakers.get(name)
        degraded = b is not None and b.state != "closed"
        mine = [h for h in health if h.provider == name]
        if not mine:
            rows.append([name, "(all)", "degraded" if degraded else "no calls", "0", "-", "-", "-",
                         f"{b.state}: {b.reason}" if b and degraded else ""])
        for h in mine:  # the provider's own line ("" model) comes first
            first = not h.model
            rows.append([name if first else "", h.model or "(all)", ("degraded" if degraded else "ok") if first else "",
                         str(h.calls), f"{100 * h.error_rate:.1f}%", f"{h.mean_latency_ms:,}",
                         f"{h.p95_latency_ms:,}", f"{b.state}: {b.reason}" if first and b and degraded else ""])
    print(f"Last {args.minutes} min:")
    print(_table(["provider", "model", "state", "calls", "errors", "mean ms", "p95 ms", "breaker"], rows,
                 right=[3, 4, 5, 6]))
    return EXIT_OK


async def cmd_models_explain(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    request: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}]}
    async with await _open(args) as engine:
        decision = await engine.route(request, principal=args.principal or engine.actor, team=args.team or "",
                                      model=args.model, mode=args.mode, max_tokens=args.max_tokens, record=False)
    if args.json:
        print(_json(decision.as_dict()))
        return EXIT_OK
    s = decision.score
    print(f"Complexity {s.value:.3f}: needs cost tier {s.tier_needed} or above"
          + (f", and {', '.join(sorted(s.needs))}" if s.needs else "") + f"; about {s.input_tokens:,} prompt tokens.")
    print(_table(["feature", "measure", "weight", "adds", "seen"],
                 [[f.name, f"{f.value:.2f}", f"{f.weight:.2f}", f"{f.contribution:.3f}", f.note] for f in s.features],
                 right=[1, 2, 3]))
    print()
    print(_table(["", "model", "provider", "tier", "est. cost", "why"],
                 [["kept" if c.kept else "dropped", c.model.model, c.model.provider, str(c.model.cost_tier),
                   format_usd(c.estimated_cost), c.why] for c in decision.candidates[:args.limit]], right=[3, 4]))
    if len(decision.candidates) > args.limit:
        print(f"... {len(decision.candidates) - args.limit} more (--limit N, or --json for all)")
    print()
    req = format_usd(decision.requested_cost) if decision.requested_cost is not None else "unpriced"
    chosen = format_usd(decision.chosen_cost) if decision.chosen_cost is not None else "unpriced"
    print(f"Choice: {decision.chosen} at about {chosen} against {decision.requested} at {req} "
          f"(saves {format_usd(decision.saving)}); {cause(decision)}")
    print(f"Mode {decision.mode}: the call would go to {decision.applied}.")
    return EXIT_OK


async def cmd_models_test(args: argparse.Namespace) -> int:
    async with await _vault_engine(args) as engine:
        names = [args.provider] if args.provider else [p.name for p in await engine.providers()]
        if not names:
            raise UsageError("no providers registered; add one with budgeteer provider add")
        results = [await engine.test_connection(name, timeout_s=args.timeout) for name in names]
    if args.json:
        print(_json([r.as_dict() for r in results]))
    else:
        print(_table(["provider", "state", "latency ms", "detail"],
                     [[r.provider, r.state, f"{r.latency_ms:,}", r.detail] for r in results], right=[2]))
    if any(r.state != "ok" for r in results):
        raise Failure(f"{sum(r.state != 'ok' for r in results)} of {len(results)} providers failed the test")
    return EXIT_OK


def _gateway_passphrase(db: Path) -> Callable[[], str] | None:
    """A locked file vault's passphrase, asked once at the terminal before serving and checked
    (a wrong one stops here, not at the first call); None when the environment gives it."""
    from engine.vault import Vault

    path = Path(os.environ.get("BUDGETEER_VAULT_FILE") or db.with_name("vault.json")).expanduser()
    vault = Vault(path)
    if not vault.needs_passphrase or not path.exists() or not sys.stdin.isatty():
        return None
    passphrase = getpass.getpass("Vault passphrase (for the providers' keys): ")
    Vault(path, lambda: passphrase).unlock()
    return lambda: passphrase


def cmd_gateway(args: argparse.Namespace) -> int:
    """Serve the gateway until interrupted; a graceful stop releases the holds of calls under way."""
    import uvicorn

    from engine.engine import default_db_path
    from engine.integrations.gateway import HttpLimits, create_app
    from engine.routing import parse_mode
    from tui.cli import _now_clock

    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be between 1 and 65535 (got {args.port})")
    if args.max_body < 1024:
        raise UsageError(f"--max-body must be at least 1024 bytes (got {args.max_body})")
    if not 0 <= args.sync_interval <= 10:
        raise UsageError(f"--sync-interval must be between 0 and 10 seconds (got {args.sync_interval})")
    if args.max_header_bytes < 1024:
        raise UsageError(f"--max-header-bytes must be at least 1024 (got {args.max_header_bytes})")
    if args.max_headers < 8:
        raise UsageError(f"--max-headers must be at least 8 (got {args.max_headers})")
    for flag, seconds in (("--header-timeout", args.header_timeout), ("--keep-alive", args.keep_alive)):
        if not 0 < seconds <= 3600:
            raise UsageError(f"{flag} must be more than 0 and at most 3600 seconds (got {seconds:g})")
    limits = HttpLimits(header_bytes=args.max_header_bytes, headers=args.max_headers,
                        header_timeout_s=args.header_timeout, keep_alive_s=args.keep_alive)
    mode = args.routing if args.routing == "off" else parse_mode(args.routing)
    db = Path(args.db) if args.db else default_db_path()
    app = create_app(db, clock=_now_clock(), routing_mode=mode, max_body=args.max_body,
                     address=f"{args.host}:{args.port}", vault_passphrase=_gateway_passphrase(db),
                     sync_interval_s=args.sync_interval, limits=limits)
    print(f"budgeteer gateway on http://{args.host}:{args.port}/v1 over {db} (routing: {mode}); ctrl+c stops")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=15,
                timeout_keep_alive=args.keep_alive, access_log=False, http=app.http_protocol)
    return EXIT_OK


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("gateway", parents=[common], help="serve the OpenAI-compatible gateway",
                       description="The OpenAI HTTP API in front of the registered providers, every call governed.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8787, help="port (default 8787)")
    p.add_argument("--routing", default="suggest", help="routing mode: suggest, dry_run, enforced or off")
    p.add_argument("--max-body", type=int, default=4 * 1024 * 1024, help="largest request body in bytes (4 MiB)")
    p.add_argument("--sync-interval", type=float, default=0.1, metavar="SECONDS",
                   help="settlements are committed before each answer and reach the disk within this long "
                        "(a power cut loses at most this much); 0 waits for the disk before each answer (default 0.1)")
    p.add_argument("--max-header-bytes", type=int, default=64 * 1024, metavar="BYTES",
                   help="largest request line and headers; more is refused 431 (default 65536)")
    p.add_argument("--max-headers", type=int, default=100, metavar="N",
                   help="most header fields in a request; more is refused 431 (default 100)")
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="time for a request's headers to arrive, from its first byte or the connection's opening; "
                        "then 408 and the connection closed (default 10)")
    p.add_argument("--keep-alive", type=float, default=75.0, metavar="SECONDS",
                   help="an idle connection between requests is closed after this long (default 75)")
    p.set_defaults(handler=cmd_gateway, sync=True)

    p = sub.add_parser("vault", parents=[common], help="provider credentials: status, set, list, rm",
                       description="Credentials live in the OS keyring, or an encrypted file where none works "
                                   "(BUDGETEER_VAULT_PASSPHRASE or a prompt). Secrets are never arguments.")
    vsub = p.add_subparsers(dest="vault_command", parser_class=_Parser, metavar="ACTION", required=True)
    q = vsub.add_parser("status", parents=[common], help="which backend is in use, and why")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=cmd_vault_status)
    q = vsub.add_parser("set", parents=[common], help="store a credential read from stdin or a hidden prompt")
    q.add_argument("ref", help="a name such as openai-prod (used as vault:openai-prod)")
    q.set_defaults(handler=cmd_vault_set)
    q = vsub.add_parser("list", parents=[common], help="references and fingerprints, never secrets")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=cmd_vault_list)
    q = vsub.add_parser("rm", parents=[common], help="remove a credential")
    q.add_argument("ref")
    q.set_defaults(handler=cmd_vault_rm)

    p = sub.add_parser("provider", parents=[common], help="the provider registry: add, list, rm")
    psub = p.add_subparsers(dest="provider_command", parser_class=_Parser, metavar="ACTION", required=True)
    q = psub.add_parser("add", parents=[common], help="register a provider")
    q.add_argument("name", help="e.g. openai, anthropic, local-vllm")
    q.add_argument("--kind", required=True, help="openai (any OpenAI-compatible server) or anthropic")
    q.add_argument("--base-url", required=True, help="e.g. https://api.openai.com/v1")
    q.add_argument("--credential", help="a vault reference, vault:REF (never the key itself)")
    q.add_argument("--vendor", help="whose price-table models it serves: openai, anthropic, gemini, mistral")
    q.add_argument("--models", help="comma-separated models it serves (default: the vendor's)")
    q.set_defaults(handler=cmd_provider_add)
    q = psub.add_parser("list", parents=[common], help="registered providers")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=cmd_provider_list)
    q = psub.add_parser("rm", parents=[common], help="remove a provider")
    q.add_argument("name")
    q.set_defaults(handler=cmd_provider_rm)

    p = sub.add_parser("models", parents=[common], help="the model catalog, health, routing explained, tests")
    msub = p.add_subparsers(dest="models_command", parser_class=_Parser, metavar="ACTION", required=True)
    q = msub.add_parser("list", parents=[common], help="models with tiers, prices and capabilities")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=cmd_models_list)
    q = msub.add_parser("status", parents=[common], help="provider health from the ledger, and breakers")
    q.add_argument("--minutes", type=int, default=15, help="the span to judge health over (default 15)")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=cmd_models_status)
    q = msub.add_parser("explain", parents=[common], help="score a prompt and show the routing choice")
    q.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    q.add_argument("--model", default="gpt-4o", help="the model the caller asked for (default gpt-4o)")
    q.add_argument("--principal", help="whose budgets apply (default: you)")
    q.add_argument("--team")
    q.add_argument("--max-tokens", type=int, help="output cap (default 1024)")
    q.add_argument("--mode", default="suggest", choices=MODES)
    q.add_argument("--limit", type=int, default=15, help="candidates shown (default 15)")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=cmd_models_explain)
    q = msub.add_parser("test-connection", parents=[common], help="check credentials against /models")
    q.add_argument("--provider", help="one provider (default: every registered one)")
    q.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=cmd_models_test)

