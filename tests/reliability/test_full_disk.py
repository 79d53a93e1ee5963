"""A full disk under the ledger: nothing answered is lost.

The ledger lives on a tmpfs of a few megabytes; a filler file takes the rest of it while calls
are under way, through a real gateway (a process of its own) or the governed transport, to a
fake provider; then the filler goes. Every call the provider answered is then in the ledger
exactly once (replayed from the spill journal by the running process, or by the next one to
open the ledger when the gateway was stopped meanwhile), no hold is left open, the calls that
came while the ledger refused writes got 503 with Retry-After, and the log has no traceback
(one line per change of state). Needs root to mount the tmpfs: skipped otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from engine.budgets import build_policy
from engine.engine import Engine
from tests.asgi_servers import FakeOpenAI, free_port, serve
from tests.reliability import start_gateway

ASK = {"model": "gpt-4o-mini", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, mounted for the test and unmounted after it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem (tmpfs) needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path: Path) -> int:
    """Write ``path`` until the filesystem is full; the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        block = b"\0" * 65536
        while True:
            try:
                written += f.write(block)
            except OSError:
                break
        with contextlib.suppress(OSError):
            while True:
                written += f.write(b"\0" * 512)
    return written


async def _prepare(db: Path, provider: str) -> str:
    async with await Engine.open(db) as engine:
        await engine.vault_set("fake", "sk-full")
        await engine.add_provider(name="fake", kind="openai", base_url=f"{provider}/v1", credential="vault:fake",
                                  models=["gpt-4o-mini"])
        await engine.add_policy(build_policy(scope="global", metric="usd", window="day", hard="1000", name="All",
                                             policy_id="all"))
        return (await engine.create_token(name="load", principal="load"))[1]


def _start_gateway(db: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "BUDGETEER_VAULT_PASSPHRASE": "full", "BUDGETEER_VAULT_BACKEND": "file"}
    with open(log, "wb") as out:
        return start_gateway(db, port, env, out)


class Gate:
    """In front of a fake provider: while closed, calls wait at the provider (under way, their
    holds placed) and are counted; opened, they are answered."""

    def __init__(self) -> None:
        self.waiting = 0
        self._open = threading.Event()
        self._open.set()

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    def wrap(self, app: Any) -> Any:
        async def gated(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and not self._open.is_set():
                self.waiting += 1
                while not self._open.is_set():
                    await asyncio.sleep(0.01)
            await app(scope, receive, send)

        return gated


class Load:
    """Calls through the openai SDK, ``connections`` at a time, and what came of them."""

    def __init__(self, base: str, secret: str) -> None:
        self.base, self.secret = base, secret
        self.answered: list[str] = []  # request ids of the calls answered 200
        self.refused: list[httpx.Response] = []  # the 503s
        self.others: list[int] = []  # any other status

    async def run(self, count: int, connections: int = 32) -> None:
        """``count`` calls, every third one streamed."""
        gate = asyncio.Semaphore(connections)
        async with openai.AsyncOpenAI(base_url=f"{self.base}/v1", api_key=self.secret, max_retries=0,
                                      timeout=60) as client:
            async def one(n: int) -> None:
                async with gate:
                    try:
                        raw = await client.chat.completions.with_raw_response.create(  # type: ignore[call-overload]
                            **ASK, stream=n % 3 == 0)
                        if n % 3 == 0:
                            async for _ in raw.parse():
                                pass
                        self.answered.append(raw.headers["x-budgeteer-request-id"])
                    except openai.APIStatusError as exc:
                        if exc.status_code == 503:
                            self.refused.append(exc.response)
                        else:
                            self.others.append(exc.status_code)

            await asyncio.gather(*(one(n) for n in range(count)))


async def _fill_under_load(load: Load, filler: Path, gate: Gate) -> None:
    """40 calls; then 100 at once, held at the provider while the disk fills and 200 more come;
    then the provider answers the 100."""
    await load.run(40)
    gate.close()
    held = asyncio.ensure_future(load.run(100, connections=100))
    while gate.waiting < 100 and not held.done():
        await asyncio.sleep(0.01)
    await asyncio.to_thread(fill, filler)
    await load.run(200, connections=100)
    gate.open()
    await held


def test_full_disk_under_load_loses_no_answered_call(tmp_path: Path, small_disk: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUDGETEER_VAULT_PASSPHRASE", "full")
    fake, gate = FakeOpenAI(), Gate()
    db = small_disk / "ledger.db"
    log = tmp_path / "gateway.log"
    filler = small_disk / "filler"
    with serve(gate.wrap(fake.app())) as provider:
        secret = asyncio.run(_prepare(db, provider))
        port = free_port()
        process = _start_gateway(db, port, log)
        load = Load(f"http://127.0.0.1:{port}", secret)
        try:
            asyncio.run(_fill_under_load(load, filler, gate))
            full = (len(load.refused), list(load.others))
            filler.unlink()
            deadline = time.monotonic() + 30
            while "ledger writable again" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            during = len(load.answered)
            asyncio.run(load.run(20))
            recovered = len(load.answered) - during
        finally:
            filler.unlink(missing_ok=True)
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                raise
        calls = len(fake.requests)  # every call the provider answered

    async def check() -> None:
        async with await Engine.open(db) as engine:
            ids = [e.request_id async for e in engine.iter_events(0, engine.now_ms() + 60_000)]
            assert len(ids) == len(set(ids)), "a settlement was written twice"
            assert len(ids) == calls, f"{calls - len(ids)} calls the provider answered are not in the ledger"
            assert set(load.answered) <= set(ids)
            assert await engine.open_holds() == 0

    asyncio.run(check())
    refused, others = full
    assert refused, "no call was refused while the disk was full"
    assert not others, f"answers other than 200 and 503 while the disk was full: {others[:5]}"
    for response in load.refused:  # OpenAI's error shape, with a time to come back
        assert int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["code"] == "ledger_unavailable"
    assert recovered == 20  # the gateway took calls again once the disk had room, without a restart
    text = log.read_text()
    assert "Traceback" not in text, text[:3000]
    replayed = [int(n) for n in re.findall(r"ledger writable again, replayed (\d+) settlements", text)]
    assert sum(replayed) == 100, text[:3000]  # the calls the provider answered after the disk had filled
    assert text.count("ledger refusing writes") == len(replayed)  # one line per change of state
    assert "in memory" not in text  # the journal's room was allocated ahead: the full disk took its lines


def test_a_gateway_stopped_while_the_disk_is_full_leaves_its_spill_to_the_next_open(
        tmp_path: Path, small_disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUDGETEER_VAULT_PASSPHRASE", "full")
    fake, gate = FakeOpenAI(), Gate()
    db = small_disk / "ledger.db"
    log = tmp_path / "gateway.log"
    filler = small_disk / "filler"
    with serve(gate.wrap(fake.app())) as provider:
        secret = asyncio.run(_prepare(db, provider))
        port = free_port()
        process = _start_gateway(db, port, log)
        load = Load(f"http://127.0.0.1:{port}", secret)
        try:
            asyncio.run(_fill_under_load(load, filler, gate))
        finally:
            process.send_signal(signal.SIGINT)  # stopped with the disk still full
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                raise
        calls = len(fake.requests)
    assert Path(f"{db}.spill").stat().st_size > 0
    filler.unlink()

    async def check() -> None:
        for _ in range(2):  # the first open replays the journal; the second finds nothing to write
            async with await Engine.open(db) as engine:
                ids = [e.request_id async for e in engine.iter_events(0, engine.now_ms() + 60_000)]
                assert len(ids) == len(set(ids)) == calls
                assert set(load.answered) <= set(ids)
                assert await engine.open_holds() == 0

    asyncio.run(check())
    text = log.read_text()
    assert "Traceback" not in text, text[:3000]


async def test_transport_answers_and_spills_when_the_disk_fills(small_disk: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """The governed transport, in process: calls the provider answers after the disk filled
    get their answers and reach the ledger once space returns; a call meanwhile gets 503."""
    caplog.set_level(logging.WARNING)
    fake, gate = FakeOpenAI(), Gate()
    gate.close()
    filler = small_disk / "filler"
    with serve(gate.wrap(fake.app())) as provider:
        async with await Engine.open(small_disk / "ledger.db") as engine:
            await engine.add_policy(build_policy(scope="global", metric="usd", window="day", hard="1000",
                                                 name="All", policy_id="all"))
            client = openai.AsyncOpenAI(base_url=f"{provider}/v1", api_key="sk-fake", max_retries=0,
                                        http_client=engine.httpx_async_client(principal="app"))
            calls = [asyncio.ensure_future(client.chat.completions.create(**ASK, stream=n == 0))
                     for n in range(5)]
            deadline = time.monotonic() + 30
            while gate.waiting < 5 and time.monotonic() < deadline:  # all five under way at the provider
                await asyncio.sleep(0.02)
            await asyncio.to_thread(fill, filler)
            gate.open()
            answers = await asyncio.gather(*calls)
            async for _ in answers[0]:  # the stream, read to its end
                pass
            assert all(a.choices for a in answers[1:])
            assert engine.refusing is not None  # the settlements were refused, and spilled
            with pytest.raises(openai.APIStatusError) as refused:
                await client.chat.completions.create(**ASK)
            assert refused.value.status_code == 503
            assert int(refused.value.response.headers["retry-after"]) >= 1
            assert refused.value.response.json()["error"]["code"] == "ledger_unavailable"
            filler.unlink()
            while engine.refusing is not None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert await engine.event_count() == len(fake.requests) == 5
            assert await engine.open_holds() == 0
            await client.close()
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)
    assert caplog.text.count("ledger refusing writes") == caplog.text.count("ledger writable again") == 1
    assert "ledger writable again, replayed 5 settlements" in caplog.text
