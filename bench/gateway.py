"""Gateway benchmark: the latency the gateway adds over calling the provider directly (p50
and p99 at 1, 50 and 200 concurrent connections), governed requests per second, and the
governed transport's added time per call. Targets (issue 7): p50 added <= 1 ms at 50
connections; at least 1,500 governed requests/s on a 2-core machine.

The provider (``bench.wire``), the gateway (``budgeteer gateway``) and the load (this process,
``bench.wire.load``) each run in a process of their own on 127.0.0.1, all on the same two
cores. The bench token's principal, team and workspace each have a hard daily USD budget
(too large to block), so every call is held and settled against three policies, as in a
governed deployment.

- **Latency.** The provider answers each call after its own delay, drawn from 20 to 80 ms by
  a seeded generator (far quicker than a real model), the same delays for the direct and
  the gateway run; the added latency of a call is its time through the gateway minus the
  time of the same call made directly. With a provider that answers at once instead, 50
  connections in a closed loop measure only saturation: each call waits behind the other
  49, and the "added" latency is 50 divided by the rate (Little's law), whatever the gateway
  does per call.
- **Throughput.** The provider answers at once; governed calls per second at 50 and 200
  connections.
- **Ledger check.** Afterwards, the ledger holds one event per answered call and no hold.

- **Sustained.** ``--sustained 60``: 50 connections for 60 s against an instant provider,
  called directly (the reference), then through the gateway with default flags and with
  routing off (each on a fresh ledger): calls/s and their share of the direct rate, p50, p99,
  the maximum latency, the longest stretch with no answer at all, and the gateway's CPU per call.

- **PostgreSQL.** ``--db postgresql://user@host:port/db``: one gateway on SQLite, one and two
  on PostgreSQL (scratch databases made on that server and dropped; the bench never starts a
  server), in the same run (``--rounds`` alternates them), one hard policy every call is held and
  settled against, the instant provider; calls/s beside the provider called directly, p50/p99,
  CPU per call, and the gateway's commits, operations and round trips to the database per batch and the time a
  batch holds the writer (counted by ``_instrument`` inside the gateway). The README's
  "PostgreSQL capacity" gives the figures and the model they fit.

The gateway runs with its default flags unless ``--routing`` says otherwise, and as
``budgeteer gateway`` serves it unless ``--upstream`` (its client to providers: ``http11``, the
default, or ``aiohttp``) or ``--protocol uvicorn`` (uvicorn's own httptools protocol, without the
gateway's limits on a request's head) swaps a part, for comparisons. The throughput rows print the gateway's CPU
per call, the figure that moves least when other processes share the cores: compare variants in
alternating runs.

The bench token has no rate limit unless ``--rpm``/``--tpm`` give it one (set high enough not to
refuse, they measure what a limited token's call costs: its take in the ledger's rate log).

    python -m bench.gateway [--requests 3000] [--routing off] [--sustained 60]
                            [--upstream http11|aiohttp] [--protocol gateway|uvicorn] [--rpm N] [--tpm N]
                            [--db postgresql://... [--rounds 2] [--connections 50]]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench import wire
from engine.budgets import build_policy
from engine.engine import Engine
from engine.ledger import is_dsn

ASK = {"model": "gpt-4o-mini", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
PATH = "/v1/chat/completions"
TRANSPORT_CALLS = 300


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def _asks(total: int, seed: int, delays: bool) -> list[dict[str, object]]:
    rng = random.Random(seed)
    return [{**ASK, "metadata": {"delay_ms": f"{rng.uniform(20, 80):.1f}"}} if delays else ASK for _ in range(total)]


def _run(port: int, asks: list[dict[str, object]], headers: dict[str, str],
         connections: int) -> tuple[list[float], float, int]:
    raw = [wire.post(PATH, ask, headers, f"127.0.0.1:{port}") for ask in asks]
    return asyncio.run(wire.load("127.0.0.1", port, raw, connections))


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def _ledger(db: Path) -> tuple[int, int]:
    async with await Engine.open(db) as engine:
        return await engine.event_count(), await engine.open_holds()


#: The bench token's rpm and tpm (``--rpm``, ``--tpm``): None, no limit (its calls never touch the
#: rate log); set, each call is also taken from the ledger's rate log (ratelimits.take).
LIMITS: tuple[int | None, int | None] = (None, None)
CATALOG = "vendor"  # how the provider is registered: every OpenAI model ("vendor") or gpt-4o-mini alone ("one")


async def _prepare(db: Path | str, provider_url: str,
                   scopes: tuple[str, ...] = ("workspace:default", "team:perf", "principal:bench"),
                   hard: str = "1000000") -> str:
    async with await Engine.open(db) as engine:
        for scope in scopes:
            await engine.add_policy(build_policy(scope=scope, metric="usd", window="day", hard=hard))
        await engine.vault_set("bench", "sk-bench-not-a-real-key")
        await engine.add_provider(name="fake", kind="openai", base_url=f"{provider_url}/v1", credential="vault:bench",
                                  **({"vendor": "openai"} if CATALOG == "vendor" else {"models": ["gpt-4o-mini"]}))
        _token, secret = await engine.create_token(name="bench", principal="bench", team="perf", rpm=LIMITS[0],
                                                   tpm=LIMITS[1])
        return secret


def _transport_added(db: Path, provider_url: str, calls: int) -> tuple[float, float]:
    """(plain ms per call, governed ms per call) of the openai SDK, sync, sequential."""
    import openai

    async def client() -> httpx.Client:
        async with await Engine.open(db) as engine:
            return engine.httpx_client(principal="bench-transport")  # type: ignore[no-any-return]

    governed_http = asyncio.run(client())
    plain = openai.OpenAI(base_url=f"{provider_url}/v1", api_key="sk", max_retries=0)
    governed = openai.OpenAI(base_url=f"{provider_url}/v1", api_key="sk", max_retries=0, http_client=governed_http)
    out = []
    for c in (plain, governed):
        c.chat.completions.create(**ASK)  # type: ignore[call-overload]
        started = time.perf_counter()
        for _ in range(calls):
            c.chat.completions.create(**ASK)  # type: ignore[call-overload]
        out.append((time.perf_counter() - started) * 1000 / calls)
    governed_http.close()
    return out[0], out[1]


UPSTREAM = "default"  # the gateway's client to providers (--upstream): its default unless named
PROTOCOL = "gateway"  # what serves the gateway (--protocol): the gateway's own uvicorn protocol unless named


def _start_gateway(db: Path | str, port: int, routing: str | None, env: dict[str, str],
                   stats: Path | None = None) -> subprocess.Popen[bytes]:
    """``budgeteer gateway`` on 127.0.0.1: with default flags unless ``routing`` is given; its
    upstream client and server protocol swapped for the ones named (``_serve``) if they are;
    ``stats``: its ledger writes counted, the counts written there on SIGUSR1 (``_instrument``)."""
    flags = ["--routing", routing] if routing else []
    launcher = ["tui.cli"] if (UPSTREAM, PROTOCOL) == ("default", "gateway") and stats is None else \
        ["bench.gateway", "--serve", UPSTREAM, PROTOCOL]
    if stats is not None:
        env = {**env, "BENCH_GATEWAY_STATS": str(stats)}
    process = subprocess.Popen([sys.executable, "-m", *launcher, "--db", str(db), "gateway", "--port", str(port),
                                *flags], env=env, stdout=subprocess.DEVNULL)
    _wait(f"http://127.0.0.1:{port}/healthz")
    return process


def _cpu_s(pid: int) -> float:
    """User plus system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _served() -> str:
    return "every OpenAI model of the price table" if CATALOG == "vendor" else "gpt-4o-mini alone"


def _label(routing: str | None) -> str:
    return "default flags" if routing is None else f"--routing {routing}"


def _limits() -> str:
    """The bench token's rate limits, as the header line says them."""
    said = [f"{name} {value:,}" for name, value in zip(("rpm", "tpm"), LIMITS, strict=True) if value]
    return f"the token's rate limits: {' and '.join(said)}" if said else "a token without rate limits"


def _variant() -> str:
    return f"upstream {UPSTREAM}, protocol {PROTOCOL}"


def sustained(seconds: float, connections: int, env: dict[str, str], tmp: Path) -> None:
    """The provider answers at once; ``connections`` callers for ``seconds`` each against the
    provider directly (the reference), the gateway with default flags, and the gateway with
    routing off, each gateway on a fresh ledger."""
    pport = _port()
    provider = subprocess.Popen([sys.executable, "-m", "bench.wire", "provider", "--port", str(pport)], env=env)
    provider_url = f"http://127.0.0.1:{pport}"
    rows = []
    try:
        _wait(f"{provider_url}/v1/models")
        print(f"{os.cpu_count()} cores; {_variant()}; sustained: {connections} connections for {seconds:.0f} s "
              f"each; the provider answers at once and serves {_served()}; 3 hard budgets on every governed call; "
              f"{_limits()}")
        direct = asyncio.run(wire.load_for("127.0.0.1", pport, wire.post(PATH, ASK, {}, f"127.0.0.1:{pport}"),
                                           connections, seconds))
        rows.append(("provider, direct", direct, None, 0))
        for routing in (None, "off"):
            db = tmp / f"sustained-{routing or 'default'}.db"
            secret = asyncio.run(_prepare(db, provider_url))
            gport = _port()
            gateway = _start_gateway(db, gport, routing, env)
            try:
                cpu = _cpu_s(gateway.pid)
                run = asyncio.run(wire.load_for("127.0.0.1", gport, wire.post(
                    PATH, ASK, {"authorization": f"Bearer {secret}"}, f"127.0.0.1:{gport}"), connections, seconds))
                cpu = _cpu_s(gateway.pid) - cpu
            finally:
                gateway.terminate()
                gateway.wait(timeout=30)
            events, holds = asyncio.run(_ledger(db))
            rows.append((f"gateway, {_label(routing)}", run, cpu, (events, holds)))
    finally:
        provider.terminate()
        provider.wait(timeout=30)
    print(f"{'':<26}{'calls/s':>8}  {'of direct':>9}  {'p50':>7}  {'p99':>7}  {'max':>8}  {'longest gap':>11}"
          f"  {'CPU/call':>8}  failures")
    base = len(direct.latencies) / direct.wall
    for name, run, cpu, _ in rows:
        rate = len(run.latencies) / run.wall
        per_call = f"{cpu * 1000 / max(1, len(run.latencies)):.2f}ms" if cpu is not None else "-"
        print(f"{name:<26}{rate:>8,.0f}  {rate / base:>8.0%}  {statistics.median(run.latencies):>5.1f}ms"
              f"  {_pct(run.latencies, 99):>5.1f}ms  {max(run.latencies):>6.1f}ms  {run.longest_gap_ms:>9.1f}ms"
              f"  {per_call:>8}  {run.failures}")
    default, off = rows[1][1], rows[2][1]
    share = (len(default.latencies) / default.wall) / (len(off.latencies) / off.wall)
    print(f"default flags against routing off: {share:.0%} of its calls/s")
    for name, run, _, (events, holds) in rows[1:]:
        print(f"ledger check, {name}: {events:,} events for {len(run.latencies):,} answered calls; {holds} holds open")


STAT_FIELDS = ("batches", "ops", "record_batches", "events", "statements", "batch_s")


def _instrument(out: Path) -> None:
    """Count the gateway's ledger writes (in its own process): operation batches (each one
    transaction, one commit) and the operations in them, ``record()`` batches and their events,
    the round trips to the server a batch makes (on PostgreSQL: a statement each, or all the
    statements of one text a pipelined batch sends ahead) and the time batches take on the
    writer's thread (on PostgreSQL: the write lock held, and waited for).
    On SIGUSR1 the counts so far go to ``out`` (JSON, with a sequence number)."""
    import json
    import signal

    from engine.ledger.pg.conn import PgConnection
    from engine.ledger.writer import GroupWriter

    counts: dict[str, float] = dict.fromkeys(STAT_FIELDS, 0)
    counts["seq"] = 0
    ops_sync, write_sync = GroupWriter._ops_sync, GroupWriter._write_sync

    def round_trips(self: GroupWriter) -> int:
        conn = self.conn
        return conn.round_trips if isinstance(conn, PgConnection) else 0

    def counted_ops(self: GroupWriter, ops: list[Any], sync: bool = True, wait: bool = True) -> Any:
        started, sent = time.perf_counter(), round_trips(self)
        results = ops_sync(self, ops, sync, wait)
        counts["batch_s"] += time.perf_counter() - started
        counts["statements"] += round_trips(self) - sent
        counts["batches"] += 1
        counts["ops"] += len(ops)
        return results

    def counted_write(self: GroupWriter, events: list[Any]) -> Any:
        sent = round_trips(self)
        results = write_sync(self, events)
        counts["statements"] += round_trips(self) - sent
        counts["record_batches"] += 1
        counts["events"] += len(events)
        return results

    def dump(*_: Any) -> None:
        counts["seq"] += 1
        partial = out.with_suffix(".part")
        partial.write_text(json.dumps(counts))
        partial.replace(out)

    GroupWriter._ops_sync = counted_ops  # type: ignore[method-assign]
    GroupWriter._write_sync = counted_write  # type: ignore[method-assign]
    signal.signal(signal.SIGUSR1, dump)


def _stats(process: subprocess.Popen[bytes], out: Path) -> dict[str, float]:
    """The counts of an instrumented gateway (``_instrument``) now."""
    import json
    import signal

    seq = json.loads(out.read_text())["seq"] if out.exists() else 0
    process.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if out.exists() and (found := json.loads(out.read_text()))["seq"] > seq:
            return {k: float(found[k]) for k in STAT_FIELDS}
        time.sleep(0.02)
    raise RuntimeError(f"gateway {process.pid} did not write its counts")


HOT_SCOPE = "workspace:default"  # --db: the one hard policy every call is held and settled against


async def _check(db: Path | str) -> tuple[int, int, list[tuple[int, int, int]]]:
    """(events, open holds, (consumed, held, hard) of each policy) of a ledger."""
    async with await Engine.open(db) as engine:
        status = [(o.consumed, o.held, o.policy.hard or 0) for o in await engine.policy_status()]
        return await engine.event_count(), await engine.open_holds(), status


def _split(ports: list[int], auth: dict[str, str], total: int) -> list[list[bytes]]:
    """``total`` calls shared out over the gateways at ``ports``, each addressed to its own."""
    return [[wire.post(PATH, ASK, auth, f"127.0.0.1:{port}")] * len(range(i, total, len(ports)))
            for i, port in enumerate(ports)]


async def _load_over(ports: list[int], asks: list[list[bytes]], connections: int) -> tuple[list[float], float, int]:
    """The load split over several gateways at once: each its share of the calls over its
    share of the connections; (latencies, wall seconds of the whole, failures)."""
    started = time.perf_counter()
    runs = await asyncio.gather(*(wire.load("127.0.0.1", port, share, max(1, connections // len(ports)))
                                  for port, share in zip(ports, asks, strict=True)))
    wall = time.perf_counter() - started
    return [t for run in runs for t in run[0]], wall, sum(run[2] for run in runs)


def compare(dsn: str, requests: int, connections: int, rounds: int, env: dict[str, str], tmp: Path) -> int:
    """``--db``: the provider answers at once; ``requests`` calls over ``connections`` through one
    gateway on SQLite, one on PostgreSQL and two on PostgreSQL (the load split over both), each
    on a fresh ledger whose one hard policy every call is held and settled against, the
    provider called directly just before each; ``rounds`` times, alternating. After each run,
    the ledger is checked. The exit status is 1 if a check fails."""
    from engine.ledger.pg.scratch import create_database, drop_database

    pport = _port()
    provider = subprocess.Popen([sys.executable, "-m", "bench.wire", "provider", "--port", str(pport)], env=env)
    provider_url = f"http://127.0.0.1:{pport}"
    configs = (("SQLite, 1 gateway", False, 1), ("PostgreSQL, 1 gateway", True, 1), ("PostgreSQL, 2 gateways", True, 2))
    bad = 0
    try:
        _wait(f"{provider_url}/v1/models")
        print(f"{os.cpu_count()} cores; {_variant()}; the provider answers at once and serves {_served()}; "
              f"one hard policy ({HOT_SCOPE}, usd per day) on every call; {requests:,} calls over {connections} "
              f"connections a row; PostgreSQL at {_redacted(dsn)}")
        print(f"{'':<24}{'calls/s':>8}  {'direct':>7}  {'p50':>7}  {'p99':>7}  {'CPU/call':>8}  {'commits':>7}"
              f"  {'ops/batch':>9}  {'trips/batch':>11}  {'ms/batch':>8}  failures")
        rates: dict[str, list[float]] = {}
        for round_ in range(rounds):
            for n, (name, postgres, gateways) in enumerate(configs):
                database = f"budgeteer_bench_{os.getpid()}_{round_}_{n}"
                location: Path | str = asyncio.run(create_database(dsn, database)) if postgres \
                    else tmp / f"{database}.db"
                try:
                    secret = asyncio.run(_prepare(location, provider_url, (HOT_SCOPE,)))
                    auth = {"authorization": f"Bearer {secret}"}
                    ports = [_port() for _ in range(gateways)]
                    outs = [tmp / f"{database}-{i}.json" for i in range(gateways)]
                    procs = [_start_gateway(location, port, None, env, out)
                             for port, out in zip(ports, outs, strict=True)]
                    try:
                        warm, _, _ = asyncio.run(_load_over(ports, _split(ports, auth, 200 * gateways),
                                                            connections))  # warm-up, counted in the ledger check
                        before = [_stats(proc, out) for proc, out in zip(procs, outs, strict=True)]
                        _, direct_wall, _ = _run(pport, [ASK] * requests, {}, connections)
                        cpu = sum(_cpu_s(proc.pid) for proc in procs)
                        shares = _split(ports, auth, requests)
                        through, wall, failed = asyncio.run(_load_over(ports, shares, connections))
                        cpu = sum(_cpu_s(proc.pid) for proc in procs) - cpu
                        time.sleep(0.2)  # settlements after the last answer, if any
                        after = [_stats(proc, out) for proc, out in zip(procs, outs, strict=True)]
                    finally:
                        for proc in procs:
                            proc.terminate()
                        for proc in procs:
                            proc.wait(timeout=30)
                    events, holds, status = asyncio.run(_check(location))
                finally:
                    if postgres:
                        asyncio.run(drop_database(dsn, database))
                got = {k: sum(a[k] - b[k] for a, b in zip(after, before, strict=True)) for k in STAT_FIELDS}
                batches = max(1.0, got["batches"] + got["record_batches"])
                answered = [t for t in through if not math.isnan(t)]
                rate = len(answered) / wall
                rates.setdefault(name, []).append(rate)
                stmts = f"{got['statements'] / batches:>11.1f}" if postgres else f"{'-':>11}"
                print(f"{name:<24}{rate:>8,.0f}  {requests / direct_wall:>7,.0f}  {statistics.median(answered):>5.1f}ms"
                      f"  {_pct(answered, 99):>5.1f}ms  {cpu * 1000 / max(1, len(answered)):>6.2f}ms"
                      f"  {batches:>7,.0f}  {(got['ops'] + got['events']) / batches:>9.1f}  {stmts}"
                      f"  {got['batch_s'] * 1000 / batches:>8.2f}  {failed}", flush=True)
                governed = len(answered) + sum(1 for t in warm if not math.isnan(t))
                over = [(c, h, limit) for c, h, limit in status if c + h > limit]
                ok = events == governed and holds == 0 and not over
                if not ok:
                    bad += 1
                print(f"  ledger check: {events:,} events for {governed:,} answered calls (warm-up "
                      f"included); {holds} holds open; hot policy {status[0][0] / 1e9:.6f} USD spent, "
                      f"{status[0][1] / 1e9:.6f} held of {status[0][2] / 1e9:,.0f}" + ("" if ok else "  FAILED"))
        sqlite = statistics.median(rates[configs[0][0]])
        for name, _, _ in configs[1:]:
            print(f"{name}: {statistics.median(rates[name]) / sqlite:.0%} of SQLite's calls/s (median of {rounds})")
    finally:
        provider.terminate()
        provider.wait(timeout=30)
    return 1 if bad else 0


def _redacted(dsn: str) -> str:
    from engine.ledger import redacted

    return redacted(dsn)


def _serve(upstream: str, protocol: str, argv: list[str]) -> None:
    """``budgeteer gateway`` itself (``argv``: its command line), its upstream client and the
    uvicorn protocol it is served with swapped for the bench's comparisons: ``protocol`` is
    ``gateway`` (its own) or ``uvicorn`` (uvicorn's HttpToolsProtocol as it is: no head limits)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from engine.integrations import gateway
    from tui.cli import main as cli

    if os.environ.get("BENCH_GATEWAY_STATS"):
        _instrument(Path(os.environ["BENCH_GATEWAY_STATS"]))
    if upstream != "default":
        gateway.UPSTREAM = upstream
    if protocol == "uvicorn":
        gateway.GatewayHttpProtocol.with_limits = classmethod(  # type: ignore[method-assign,assignment]
            lambda cls, limits: HttpToolsProtocol)
    raise SystemExit(cli(argv))


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        _serve(sys.argv[2], sys.argv[3], sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="calls per measurement")
    parser.add_argument("--routing", default=None,
                        help="the gateway's routing mode (off, suggest, ...); default: the gateway's own default")
    parser.add_argument("--sustained", type=float, metavar="SECONDS", default=None,
                        help="instead: 50 connections for SECONDS against the provider directly, the gateway with "
                             "default flags and with routing off (60 is the reference run)")
    parser.add_argument("--connections", type=int, default=50, help="with --sustained or --db: how many (default 50)")
    parser.add_argument("--catalog", choices=("vendor", "one"), default="vendor",
                        help="the provider serves every OpenAI model of the price table (vendor, as `provider add "
                             "--vendor openai`; routing weighs them all) or gpt-4o-mini alone (one)")
    parser.add_argument("--upstream", choices=("default", "http11", "aiohttp"), default="default",
                        help="the gateway's client to providers: its own default, the home-made HTTP/1.1 pool "
                             "(http11) or aiohttp's client (aiohttp)")
    parser.add_argument("--protocol", choices=("gateway", "uvicorn"), default="gateway",
                        help="what serves the gateway: its own uvicorn protocol (gateway) or uvicorn's httptools "
                             "protocol as it is (uvicorn: no limits on a request's head)")
    parser.add_argument("--rpm", type=int, default=None,
                        help="the bench token's requests per minute (default none); set it high enough not to refuse "
                             "to measure what a limited token's call costs")
    parser.add_argument("--tpm", type=int, default=None, help="the bench token's tokens per minute (default none)")
    parser.add_argument("--db", metavar="DSN", default=None,
                        help="instead: one gateway on SQLite, one and two on PostgreSQL (postgresql://user@host:port/"
                             "db: a server the bench makes scratch databases on, never starts) in the same run")
    parser.add_argument("--rounds", type=int, default=1, help="with --db: how many times to run the three, alternating")
    args = parser.parse_args()
    global CATALOG, UPSTREAM, PROTOCOL, LIMITS
    CATALOG, UPSTREAM, PROTOCOL, LIMITS = args.catalog, args.upstream, args.protocol, (args.rpm, args.tpm)
    env = {**os.environ, "BUDGETEER_VAULT_PASSPHRASE": "bench", "BUDGETEER_VAULT_BACKEND": "file"}
    os.environ.update({k: env[k] for k in ("BUDGETEER_VAULT_PASSPHRASE", "BUDGETEER_VAULT_BACKEND")})
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        if args.db:
            if not is_dsn(args.db):
                parser.error(f"--db: {args.db!r} is not a PostgreSQL address (postgresql://user@host:port/db)")
            raise SystemExit(compare(args.db, args.requests, args.connections, args.rounds, env, Path(tmp)))
        if args.sustained:
            sustained(args.sustained, args.connections, env, Path(tmp))
            return
        db = Path(tmp) / "ledger.db"
        pport, gport = _port(), _port()
        provider_url = f"http://127.0.0.1:{pport}"
        procs = [subprocess.Popen([sys.executable, "-m", "bench.wire", "provider", "--port", str(pport)], env=env)]
        try:
            _wait(f"{provider_url}/v1/models")
            secret = asyncio.run(_prepare(db, provider_url))
            procs.append(_start_gateway(db, gport, args.routing, env))
            auth = {"authorization": f"Bearer {secret}"}
            answered = 0
            print(f"{os.cpu_count()} cores; {_variant()}; gateway with {_label(args.routing)}; "
                  f"the provider serves {_served()}; 3 hard budgets on every call; {_limits()}")
            print(f"latency: the provider answers each call in 20-80 ms (seeded); {args.requests:,} calls a row")
            print(f"{'connections':>11}  {'direct p50':>10}  {'gateway p50':>11}  {'added p50':>9}  {'added p99':>9}"
                  f"  {'calls/s':>7}  failures")
            for seed, connections in enumerate((1, 50, 200)):
                total = min(args.requests, 400) if connections == 1 else args.requests
                asks = _asks(total, seed, delays=True)
                direct, _, _ = _run(pport, asks, {}, connections)
                through, wall, failed = _run(gport, asks, auth, connections)
                answered += total - failed
                added = [t - d for t, d in zip(through, direct, strict=True) if not (math.isnan(t) or math.isnan(d))]
                print(f"{connections:>11}  {statistics.median(direct):>8.2f}ms  {statistics.median(through):>9.2f}ms"
                      f"  {statistics.median(added):>7.2f}ms  {_pct(added, 99):>7.2f}ms  {total / wall:>7,.0f}"
                      f"  {failed}")
            print(f"throughput: the provider answers at once; {args.requests * 2:,} calls a row; "
                  "the provider called directly beside it")
            for connections in (50, 200):
                asks = _asks(args.requests * 2, 0, delays=False)
                _, direct_wall, _ = _run(pport, asks, {}, connections)
                cpu = _cpu_s(procs[1].pid)
                through, wall, failed = _run(gport, asks, auth, connections)
                cpu = _cpu_s(procs[1].pid) - cpu
                answered += len(asks) - failed
                print(f"{connections:>11} connections: {len(asks) / wall:>6,.0f} governed calls/s "
                      f"(direct {len(asks) / direct_wall:,.0f}/s, {direct_wall / wall:.0%}), "
                      f"p50 {statistics.median(through):.1f} ms, gateway CPU {cpu * 1000 / len(asks):.2f} ms a call, "
                      f"{failed} failures")
            plain_ms, governed_ms = _transport_added(db, provider_url, TRANSPORT_CALLS)
            print(f"transport: {plain_ms:.2f} ms a call plain, {governed_ms:.2f} ms governed "
                  f"(+{governed_ms - plain_ms:.2f} ms)")
        finally:
            for p in reversed(procs):
                p.terminate()
                p.wait(timeout=30)
        events, holds = asyncio.run(_ledger(db))
        governed = answered + TRANSPORT_CALLS + 1  # the transport's calls and its warm-up call
        print(f"ledger check: {events:,} events for {governed:,} answered governed calls; "
              f"{holds} holds open")


if __name__ == "__main__":
    main()
