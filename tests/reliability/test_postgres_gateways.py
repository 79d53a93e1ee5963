"""Several gateways, real processes, on one PostgreSQL ledger.

- 1,000 calls at once spread over three gateways under one hard budget: never above the limit,
  then calls one at a time until it binds: no more than one call's worst case left unspent (no
  false refusal from a leaked hold), no hold left, every answered call once in the ledger.
- Two gateways under load, one of them killed with SIGKILL and started again, again and again:
  every answered call once in the ledger, the budget counters equal to the ledger's sums.
- A gateway whose clock is minutes off: it judges by the database's clock, so it neither expires
  another gateway's holds early nor dates its calls wrongly.
- PostgreSQL restarted under load: 503s (with Retry-After) while it is down, the gateways go on
  by themselves afterwards, and every answered call is in the ledger exactly once.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from engine.engine import Engine
from tests import pg
from tests.reliability import start_gateway
from tests.reliability.test_crash_and_writers import ASK, _load_until_killed, _port, _prepare, each_answered_once

pytestmark = pytest.mark.xdist_group("postgres_gateways")

FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("BUDGETEER_VAULT_PASSPHRASE", "pg")
    return {**os.environ, "BUDGETEER_VAULT_PASSPHRASE": "pg", "BUDGETEER_VAULT_BACKEND": "file"}


def _stop(*processes: subprocess.Popen[bytes]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _ledger(dsn: str) -> tuple[list[str], int, int]:
    """Every event's request id, the cost of the calls made, the open holds."""
    async with await Engine.open(dsn) as engine:
        events = [e async for e in engine.iter_events(0, engine.now_ms() + 60_000)]
        made = sum(e.cost_nanos or 0 for e in events if e.status != "blocked")
        return [e.request_id for e in events], made, await engine.open_holds()


def _worst_case(dsn: str) -> int:
    """The largest amount one call held on the budget (a call's worst case)."""
    return int(pg.fetch(dsn, "SELECT max(delta) FROM hold_journal WHERE reason = 'hold'")[0][0])


async def _post(client: httpx.AsyncClient, url: str, secret: str) -> httpx.Response | None:
    try:
        return await client.post(f"{url}/v1/chat/completions", json=ASK, headers={"authorization": f"Bearer {secret}"})
    except httpx.HTTPError:
        return None


def test_a_thousand_calls_over_three_gateways_never_pass_one_hard_budget(
        postgres_dsn: str, provider: str, env: dict[str, str]) -> None:
    limit = 2_000_000  # $0.002: about 300 calls' worth
    secret = asyncio.run(_prepare(postgres_dsn, provider, "0.002"))  # type: ignore[arg-type]
    ports = [_port() for _ in range(3)]
    # A minute for a request's head to arrive, not 10 s: on a starved 2-core machine the client's
    # own process may open a connection and write the request seconds apart (then 408, unanswered).
    gateways = [start_gateway(postgres_dsn, port, env, subprocess.DEVNULL, "--header-timeout", "60") for port in ports]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    answered: list[str] = []
    codes: list[int] = []
    try:
        async def burst() -> None:
            gate = asyncio.Semaphore(300)
            async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=300)) as client:
                async def one(i: int) -> None:
                    async with gate:
                        r = await _post(client, urls[i % 3], secret)
                    codes.append(0 if r is None else r.status_code)  # 0: no answer
                    if r is not None and r.status_code == 200:
                        answered.append(r.headers["x-budgeteer-request-id"])

                await asyncio.gather(*(one(i) for i in range(1000)))
                # The calls keep coming, one at a time, round the gateways, until three in a row are refused.
                refused_in_a_row, i = 0, 0
                while refused_in_a_row < 3 and i < 2000:
                    await one(i)
                    refused_in_a_row = refused_in_a_row + 1 if codes[-1] == 402 else 0
                    i += 1

        asyncio.run(burst())
    finally:
        _stop(*gateways)
    assert set(codes) <= {0, 200, 402}, sorted(set(codes))
    # A call with no answer at all (the client saw its connection closed: on a starved machine, a
    # kept-alive connection the gateway closes as the client reuses it) spent nothing it was told
    # of; a few are tolerated, the budget's promises below hold for every call either way.
    assert codes.count(0) <= len(codes) // 20, f"{codes.count(0)} calls got no answer"
    assert codes.count(402) >= 3  # the budget did bind
    ids, made, open_holds = asyncio.run(_ledger(postgres_dsn))
    worst = _worst_case(postgres_dsn)
    assert made <= limit  # never above the limit
    assert limit - made < worst  # no more than one call's worst case below it
    assert open_holds == 0
    assert len(ids) == len(set(ids))  # each call once
    assert set(answered) <= set(ids) and len(answered) == codes.count(200)


def test_sigkill_loop_across_two_gateways_loses_nothing_answered(postgres_dsn: str, provider: str,
                                                                 env: dict[str, str]) -> None:
    loops = int(os.environ.get("BUDGETEER_CRASH_LOOPS", "3"))
    secret = asyncio.run(_prepare(postgres_dsn, provider, "1000"))  # type: ignore[arg-type]
    steady_port = _port()
    steady = start_gateway(postgres_dsn, steady_port, env)
    acknowledged: list[str] = []
    stop = False
    rnd = random.Random(20261201)
    try:
        async def steady_load() -> None:
            async with httpx.AsyncClient(timeout=10) as client:
                while not stop:
                    r = await _post(client, f"http://127.0.0.1:{steady_port}", secret)
                    if r is not None and r.status_code == 200:
                        acknowledged.append(r.headers["x-budgeteer-request-id"])

        async def run() -> None:
            nonlocal stop
            background = asyncio.create_task(steady_load())
            for _ in range(loops):
                port = _port()
                victim = await asyncio.to_thread(start_gateway, postgres_dsn, port, env)
                await _load_until_killed(f"http://127.0.0.1:{port}", secret, victim, rnd.uniform(0.3, 1.5),
                                         acknowledged)
                await asyncio.to_thread(victim.wait, 30)
                assert victim.returncode == -signal.SIGKILL
            stop = True
            await background

        asyncio.run(run())
    finally:
        _stop(steady)
    assert len(acknowledged) > loops

    asyncio.run(each_answered_once(postgres_dsn, acknowledged))


SKEWED_SCRIPT = textwrap.dedent("""
    import asyncio, sys, time
    from engine.engine import Engine

    async def main(dsn):
        async with await Engine.open(dsn) as engine:
            await engine.expire_holds()
            print(time.time_ns() // 1_000_000, engine.now_ms(), await engine.open_holds())

    asyncio.run(main(sys.argv[1]))
""")


@pytest.fixture
def faketime() -> Path:
    if not FAKETIME_LIB.exists():
        reason = f"libfaketime ({FAKETIME_LIB}, Debian's faketime) is not installed: the clock-skew test cannot run"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason)
        pytest.skip(reason)
    return FAKETIME_LIB


def test_a_gateway_whose_clock_is_off_judges_by_the_databases(postgres_dsn: str, provider: str,
                                                               env: dict[str, str], faketime: Path) -> None:
    """A process whose clock runs 15 minutes ahead (past the holds' 10-minute time to live) does
    not expire another's holds, and a gateway 15 minutes behind dates its calls by the database."""
    secret = asyncio.run(_prepare(postgres_dsn, provider, "1000"))  # type: ignore[arg-type]

    async def hold() -> str:
        async with await Engine.open(postgres_dsn) as engine:
            from engine.engine import CallRequest

            auth = await engine.authorize(CallRequest(principal="p", model="gpt-4o-mini", max_tokens=10))
            assert auth.allowed and auth.hold_id
            return auth.hold_id

    asyncio.run(hold())
    ahead = {**env, "LD_PRELOAD": str(faketime), "FAKETIME": "+15m", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    out = subprocess.run([sys.executable, "-c", SKEWED_SCRIPT, postgres_dsn], env=ahead, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    local, judged, still_open = map(int, out)
    real = time.time_ns() // 1_000_000
    assert local - real > 14 * 60_000  # its own clock is off
    assert abs(judged - real) < 5_000  # but it judges by the database's
    assert still_open == 1  # the other process's hold was not expired early

    behind = {**env, "LD_PRELOAD": str(faketime), "FAKETIME": "-15m", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    port = _port()
    gateway = start_gateway(postgres_dsn, port, behind)
    try:
        with httpx.Client(timeout=30) as client:
            r = client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=ASK,
                            headers={"authorization": f"Bearer {secret}"})
        assert r.status_code == 200
    finally:
        _stop(gateway)

    async def dated() -> int:
        async with await Engine.open(postgres_dsn) as engine:
            return max([e.ts_ms async for e in engine.iter_events(0, engine.now_ms() + 60_000)])

    assert abs(asyncio.run(dated()) - time.time_ns() // 1_000_000) < 60_000


def test_postgresql_restarted_under_load(postgres_dsn: str, pg_cluster: object, provider: str,
                                         env: dict[str, str]) -> None:
    secret = asyncio.run(_prepare(postgres_dsn, provider, "1000"))  # type: ignore[arg-type]
    ports = [_port() for _ in range(2)]
    gateways = [start_gateway(postgres_dsn, port, env) for port in ports]
    answered: list[str] = []
    codes: dict[str, list[int]] = {"before": [], "during": [], "after": [], "done": []}
    phase = "before"
    retry_after: set[str] = set()
    try:
        async def load(url: str, client: httpx.AsyncClient) -> None:
            while phase != "done":
                r = await _post(client, url, secret)
                if r is None:
                    codes[phase].append(0)
                    continue
                codes[phase].append(r.status_code)
                if r.status_code == 200:
                    answered.append(r.headers["x-budgeteer-request-id"])
                elif r.status_code == 503:
                    retry_after.add(r.headers.get("retry-after", ""))
                    await asyncio.sleep(0.05)

        async def run() -> None:
            nonlocal phase
            async with httpx.AsyncClient(timeout=30) as client:
                workers = [asyncio.create_task(load(f"http://127.0.0.1:{port}", client))
                           for port in ports for _ in range(8)]
                await asyncio.sleep(2)
                phase = "during"
                await asyncio.to_thread(pg_cluster.stop_fast)  # type: ignore[attr-defined]
                await asyncio.sleep(2)
                await asyncio.to_thread(pg_cluster.start)  # type: ignore[attr-defined]
                # The gateways find the server again by themselves; the calls succeed again.
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and codes["during"][-20:].count(200) < 20:
                    await asyncio.sleep(0.2)
                phase = "after"
                await asyncio.sleep(2)
                phase = "done"
                await asyncio.gather(*workers)

        asyncio.run(run())
    finally:
        _stop(*gateways)  # a gateway replays what it spilled before it ends, if it has not yet
    assert codes["before"].count(200) > 0
    assert 503 in codes["during"]  # refused, fail closed, while the server was down
    assert set(codes["during"]) <= {200, 503}, sorted(set(codes["during"]))
    assert codes["after"] and set(codes["after"]) == {200}  # no gateway restarted by hand
    assert retry_after and "" not in retry_after
    ids, _, _ = asyncio.run(_ledger(postgres_dsn))
    assert len(ids) == len(set(ids))  # exactly once
    missing = set(answered) - set(ids)
    assert not missing, f"{len(missing)} answered calls are not in the ledger"


def test_when_the_ledger_is_down_allow_spends_no_more_than_the_allowance(
        postgres_dsn: str, pg_cluster: object, provider: str, env: dict[str, str]) -> None:
    """``--when-ledger-down allow``: calls go on while PostgreSQL is down, until this gateway's
    allowance is spent (then 503); once it is back, every call answered meanwhile is in the
    ledger, once."""
    allowance = 200_000  # $0.0002: a few calls' worst case
    secret = asyncio.run(_prepare(postgres_dsn, provider, "1000"))  # type: ignore[arg-type]
    port = _port()
    gateway = start_gateway(postgres_dsn, port, env, subprocess.DEVNULL, "--when-ledger-down", "allow",
                            "--down-allowance", "0.0002")
    url = f"http://127.0.0.1:{port}"
    answered: list[str] = []
    during: list[int] = []
    try:
        async def run() -> None:
            async with httpx.AsyncClient(timeout=30) as client:
                r = await _post(client, url, secret)
                assert r is not None and r.status_code == 200  # the gateway knows the token
                answered.append(r.headers["x-budgeteer-request-id"])
                await asyncio.to_thread(pg_cluster.stop_fast)  # type: ignore[attr-defined]
                for _ in range(40):
                    r = await _post(client, url, secret)
                    assert r is not None
                    during.append(r.status_code)
                    if r.status_code == 200:
                        answered.append(r.headers["x-budgeteer-request-id"])
                    else:
                        assert r.status_code == 503 and r.headers.get("retry-after"), r.text
                await asyncio.to_thread(pg_cluster.start)  # type: ignore[attr-defined]
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:  # back by itself: the calls are governed again
                    r = await _post(client, url, secret)
                    if r is not None and r.status_code == 200:
                        answered.append(r.headers["x-budgeteer-request-id"])
                        break
                    await asyncio.sleep(0.3)

        asyncio.run(run())
    finally:
        _stop(gateway)
    assert 200 in during and 503 in during  # allowed until the allowance was spent, refused then
    assert during.index(503) > 0 and 200 not in during[during.index(503):]

    async def check() -> tuple[list[str], int]:
        async with await Engine.open(postgres_dsn) as engine:
            events = [e async for e in engine.iter_events(0, engine.now_ms() + 60_000)]
            return [e.request_id for e in events], sum(e.cost_nanos or 0 for e in events[1:-1])

    ids, spent_while_down = asyncio.run(check())
    assert len(ids) == len(set(ids)) and set(answered) <= set(ids)
    assert 0 < spent_while_down <= allowance
