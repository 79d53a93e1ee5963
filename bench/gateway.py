"""Gateway benchmark: the latency the gateway adds over calling the provider directly (p50
and p99 at 1, 50 and 200 concurrent connections), governed requests per second, and the
governed transport's added time per call. Targets (issue 7): p50 added <= 1 ms at 50
connections; at least 1,500 governed requests/s on a 2-core machine.

The fake provider and the gateway each run in a process of their own on 127.0.0.1 (the
gateway as ``budgeteer gateway``); the load comes from this process.

    python -m bench.gateway [--requests 3000] [--routing off]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from engine.engine import Engine

ASK = {"model": "gpt-4o-mini", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}


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


async def _load(url: str, headers: dict[str, str], connections: int, total: int) -> tuple[list[float], float, int]:
    """(latencies in ms, wall seconds, non-2xx count) of ``total`` requests over ``connections``."""
    latencies: list[float] = []
    failures = 0
    queue = iter(range(total))
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        async def worker() -> None:
            nonlocal failures
            for _ in queue:
                started = time.perf_counter()
                try:
                    r = await client.post(url, json=ASK, headers=headers)
                except httpx.HTTPError:  # a dropped connection counts as a failure, not a crash
                    failures += 1
                    continue
                latencies.append((time.perf_counter() - started) * 1000)
                failures += r.status_code >= 300
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        return latencies, time.perf_counter() - started, failures


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def _prepare(db: Path, provider_url: str) -> str:
    async with await Engine.open(db) as engine:
        await engine.vault_set("bench", "sk-bench-not-a-real-key")
        await engine.add_provider(name="fake", kind="openai", base_url=f"{provider_url}/v1", credential="vault:bench",
                                  models=["gpt-4o-mini"])
        _token, secret = await engine.create_token(name="bench", principal="bench", team="perf")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests per measurement")
    parser.add_argument("--routing", default="off", help="the gateway's routing mode (off, suggest, ...)")
    args = parser.parse_args()
    env = {**os.environ, "BUDGETEER_VAULT_PASSPHRASE": "bench", "BUDGETEER_VAULT_BACKEND": "file"}
    os.environ.update({k: env[k] for k in ("BUDGETEER_VAULT_PASSPHRASE", "BUDGETEER_VAULT_BACKEND")})
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "ledger.db"
        pport, gport = _port(), _port()
        provider_url, gateway_url = f"http://127.0.0.1:{pport}", f"http://127.0.0.1:{gport}"
        fake = subprocess.Popen([sys.executable, "-c", (
            "import uvicorn; from tests.asgi_servers import FakeOpenAI; "
            f"uvicorn.run(FakeOpenAI().app(), host='127.0.0.1', port={pport}, log_level='error')")], env=env)
        procs = [fake]
        try:
            _wait(f"{provider_url}/v1/models")
            secret = asyncio.run(_prepare(db, provider_url))
            procs.append(subprocess.Popen([sys.executable, "-m", "tui.cli", "--db", str(db), "gateway", "--port",
                                           str(gport), "--routing", args.routing], env=env,
                                          stdout=subprocess.DEVNULL))
            _wait(f"{gateway_url}/healthz")
            print(f"{args.requests:,} requests per row; gateway routing {args.routing}; {os.cpu_count()} cores")
            print(f"{'connections':>11}  {'direct p50':>10}  {'gateway p50':>11}  {'added p50':>9}  "
                  f"{'added p99':>9}  {'gateway req/s':>13}  failures")
            for connections in (1, 50, 200):
                total = min(args.requests, 500) if connections == 1 else args.requests
                direct, _, _ = asyncio.run(_load(f"{provider_url}/v1/chat/completions", {}, connections, total))
                through, wall, failed = asyncio.run(_load(f"{gateway_url}/v1/chat/completions",
                                                          {"authorization": f"Bearer {secret}"}, connections, total))
                print(f"{connections:>11}  {statistics.median(direct):>8.2f}ms  {statistics.median(through):>9.2f}ms"
                      f"  {statistics.median(through) - statistics.median(direct):>7.2f}ms"
                      f"  {_pct(through, 99) - _pct(direct, 99):>7.2f}ms  {total / wall:>13,.0f}  {failed}")
            plain_ms, governed_ms = _transport_added(db, provider_url, 300)
            print(f"transport: {plain_ms:.2f} ms a call plain, {governed_ms:.2f} ms governed "
                  f"(+{governed_ms - plain_ms:.2f} ms)")
        finally:
            for p in reversed(procs):
                p.terminate()
                p.wait(timeout=30)


if __name__ == "__main__":
    main()
