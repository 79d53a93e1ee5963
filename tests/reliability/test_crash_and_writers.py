"""Crash safety and two writers, with real processes on one ledger.

- A gateway under load is killed with SIGKILL at a random moment and restarted, again and
  again (``BUDGETEER_CRASH_LOOPS``, 3 by default, 20 for the full run). Afterwards every
  request that got a 2xx is in the ledger exactly once, no hold outlives its TTL, and the
  budget counters a fresh engine builds equal the ledger's sums.
- A gateway and the governed transport in another process call at once under one hard
  budget: no event lost or counted twice, the budget never passed.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from engine.budgets import DEFAULT_HOLD_TTL_MS, build_policy
from engine.clock import FrozenClock
from engine.engine import Engine
from tests.asgi_servers import post_all
from tests.reliability import start_gateway

ASK = {"model": "gpt-4o-mini", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("BUDGETEER_VAULT_PASSPHRASE", "crash")
    return {**os.environ, "BUDGETEER_VAULT_PASSPHRASE": "crash", "BUDGETEER_VAULT_BACKEND": "file"}


async def _prepare(db: Path, provider: str, hard: str) -> str:
    async with await Engine.open(db) as engine:
        await engine.vault_set("fake", "sk-crash")
        await engine.add_provider(name="fake", kind="openai", base_url=f"{provider}/v1", credential="vault:fake",
                                  models=["gpt-4o-mini"])
        await engine.add_policy(build_policy(scope="global", metric="usd", window="day", hard=hard, name="All",
                                             policy_id="all"))
        return (await engine.create_token(name="load", principal="load"))[1]


async def _load_until_killed(url: str, secret: str, process: subprocess.Popen[bytes], kill_after: float,
                             acknowledged: list[str]) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        async def worker() -> None:
            while process.poll() is None:
                try:
                    r = await client.post(f"{url}/v1/chat/completions", json=ASK,
                                          headers={"authorization": f"Bearer {secret}"})
                except httpx.HTTPError:
                    continue  # the gateway died under this request: it never said yes
                if 200 <= r.status_code < 300:
                    acknowledged.append(r.headers["x-budgeteer-request-id"])

        async def killer() -> None:
            await asyncio.sleep(kill_after)
            process.send_signal(signal.SIGKILL)

        await asyncio.gather(killer(), *(worker() for _ in range(16)))


def test_sigkill_under_load_loses_nothing_acknowledged(tmp_path: Path, provider: str, env: dict[str, str]) -> None:
    loops = int(os.environ.get("BUDGETEER_CRASH_LOOPS", "3"))
    db = tmp_path / "ledger.db"
    secret = asyncio.run(_prepare(db, provider, "1000"))
    acknowledged: list[str] = []
    rnd = random.Random(20261123)
    for _ in range(loops):
        port = _port()
        process = start_gateway(db, port, env)
        asyncio.run(_load_until_killed(f"http://127.0.0.1:{port}", secret, process, rnd.uniform(0.3, 1.5),
                                       acknowledged))
        process.wait(timeout=30)
        assert process.returncode == -signal.SIGKILL
    assert len(acknowledged) > loops  # the load really ran

    async def check() -> None:
        await each_answered_once(db, acknowledged)
        later = FrozenClock(int(time.time() * 1000) + DEFAULT_HOLD_TTL_MS + 1_000)
        async with await Engine.open(db, clock=later) as engine:
            await engine.expire_holds()
            assert await engine.open_holds() == 0  # what the killed gateways held expires on time

    asyncio.run(check())


async def each_answered_once(location: Path | str, acknowledged: list[str]) -> None:
    """Every answered call is in the ledger at ``location``, each once, and the policy's
    counters, rebuilt by a fresh engine, are what the ledger's totals say."""
    async with await Engine.open(location) as engine:
        ids = [e.request_id async for e in engine.iter_events(0, engine.now_ms() + 60_000)]
        assert len(ids) == len(set(ids))
        missing = set(acknowledged) - set(ids)
        assert not missing, f"{len(missing)} answered calls are not in the ledger"
        [status] = await engine.policy_status()
        assert status.consumed == (await engine.totals(status.window_start_ms, status.window_end_ms)).cost_nanos


TRANSPORT_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    import openai
    from engine.engine import Engine

    async def main(db, base, calls):
        ok = blocked = 0
        async with await Engine.open(db) as engine:
            http = engine.httpx_async_client(principal="transport")
            client = openai.AsyncOpenAI(base_url=base, api_key="sk", http_client=http, max_retries=0)

            async def one():
                nonlocal ok, blocked
                try:
                    await client.chat.completions.create(model="gpt-4o-mini", max_tokens=50,
                                                         messages=[{"role": "user", "content": "hi"}])
                    ok += 1
                except openai.APIStatusError as exc:
                    assert exc.status_code == 402, exc
                    blocked += 1

            await asyncio.gather(*(one() for _ in range(calls)))
            await http.aclose()
        print(ok, blocked)

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
""")


def test_a_gateway_and_a_transport_in_another_process_share_one_budget(tmp_path: Path, provider: str,
                                                                        env: dict[str, str]) -> None:
    db = tmp_path / "ledger.db"
    secret = asyncio.run(_prepare(db, provider, "0.002"))  # about 300 calls' worth; 800 are tried
    port = _port()
    gateway = start_gateway(db, port, env)
    try:
        transport = subprocess.Popen([sys.executable, "-c", TRANSPORT_SCRIPT, str(db), f"{provider}/v1", "400"],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        codes = asyncio.run(post_all(f"http://127.0.0.1:{port}/v1/chat/completions", ASK,
                                     {"authorization": f"Bearer {secret}"}, 400, connections=50, timeout=60))
        out, err = transport.communicate(timeout=300)
        assert transport.returncode == 0, err
    finally:
        gateway.send_signal(signal.SIGINT)
        gateway.wait(timeout=30)
    transport_ok, transport_blocked = map(int, out.split())
    assert set(codes) <= {200, 402} and transport_ok + transport_blocked == 400

    async def check() -> None:
        async with await Engine.open(db) as engine:
            events = [e async for e in engine.iter_events(0, engine.now_ms() + 60_000)]
            made = [e for e in events if e.status != "blocked"]
            assert len(made) == codes.count(200) + transport_ok  # none lost, none twice
            # Each refusal recorded once, as a blocked call naming the policy.
            blocked = [e for e in events if e.status == "blocked"]
            assert len(blocked) == codes.count(402) + transport_blocked and all(e.tags["policy"] for e in blocked)
            assert len({e.request_id for e in events}) == len(events)
            assert {e.principal for e in events} <= {"load", "transport"}
            assert sum(e.cost_nanos or 0 for e in events) <= 2_000_000  # $0.002: never passed
            assert codes.count(402) + transport_blocked > 0  # the budget did bind
            assert await engine.open_holds() == 0

    asyncio.run(check())
