"""``budgeteer gateway``: the OpenAI- and Anthropic-compatible gateway, served."""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.engine import home_dir, ledger_location
from engine.ledger import local_path, redacted
from engine.money import parse_usd
from engine.vault import Vault, vault_path
from tui.cli.common import EXIT_OK, UsageError, now_clock


def _gateway_passphrase(db: Path) -> Callable[[], str] | None:
    """A locked file vault's passphrase, asked once at the terminal before serving and checked
    (a wrong one stops here, not at the first call); None when the environment gives it."""
    path = vault_path(db)
    vault = Vault(path)
    if not vault.needs_passphrase or not path.exists() or not sys.stdin.isatty():
        return None
    passphrase = getpass.getpass("Vault passphrase (for the providers' keys): ")
    Vault(path, lambda: passphrase).unlock()
    return lambda: passphrase


def cmd_gateway(args: argparse.Namespace) -> int:
    """Serve the gateway until interrupted; a graceful stop releases the holds of calls under way."""
    import uvicorn

    from engine.integrations.gateway import HttpLimits, create_app
    from engine.routing import parse_mode

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
    allowance = parse_usd(args.down_allowance, "--down-allowance") if args.when_ledger_down == "allow" else None
    db = ledger_location(args.db)
    app = create_app(db, clock=now_clock(), routing_mode=mode, max_body=args.max_body,
                     address=f"{args.host}:{args.port}",
                     vault_passphrase=_gateway_passphrase(local_path(db, home=home_dir())),
                     sync_interval_s=args.sync_interval, limits=limits, down_allowance=allowance)
    print(f"budgeteer gateway on http://{args.host}:{args.port}/v1 over {redacted(db)} (routing: {mode}); ctrl+c stops")
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
    p.add_argument("--when-ledger-down", choices=("refuse", "allow"), default="refuse",
                   help="while the ledger cannot be written (its database down or failing over): refuse new calls "
                        "with 503 and Retry-After (default), or allow them up to --down-allowance of spend from "
                        "this gateway; answered calls are kept in the spill journal and replayed either way")
    p.add_argument("--down-allowance", default="1.00", metavar="USD",
                   help="with --when-ledger-down allow: the most this gateway lets calls spend while the ledger "
                        "cannot be written, counted at their worst case until settled (default 1.00)")
    p.set_defaults(handler=cmd_gateway)
