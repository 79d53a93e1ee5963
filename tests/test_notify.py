"""Changes reach every process at once on PostgreSQL (issue 20): a policy, a token, an approval,
a price version or a provider changed by one process reaches every other engine, gateway and
dashboard on the ledger within a second through LISTEN/NOTIFY, with the caches' own time to
live set out of the way (an hour), so that only the notification can have brought it. The
listener comes back by itself after the server restarts. On SQLite nothing is pushed.

The waits below are deadlines of the issue's ("within one second"), not measurements."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.budgets import build_policy
from engine.engine import CallRequest, Engine
from engine.integrations.governor import Governor
from engine.ledger import changes, open_ledger
from engine.ledger.pg.store import PostgresStore
from engine.tokens import Token

WITHIN_S = 1.0  # the bound: a change reaches every process within one second
DOLLAR = 1_000_000_000


def _in_thread(job: Callable[[], Awaitable[Any]]) -> Any:
    """Run a coroutine to its end on a loop of its own in another thread (the gateways' tests are
    synchronous, and a fixture may run under the test's loop)."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(asyncio.run(job())))  # type: ignore[arg-type]
    thread.start()
    thread.join()
    return out[0] if out else None


# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------


class Heard:
    """The kinds a subscriber was told, and a wait for one of them."""

    def __init__(self) -> None:
        self.kinds: list[str] = []
        self._event = asyncio.Event()

    def __call__(self, kind: str) -> None:
        self.kinds.append(kind)
        self._event.set()

    async def wait_for(self, kind: str, within_s: float = WITHIN_S) -> None:
        deadline = asyncio.get_running_loop().time() + within_s
        while kind not in self.kinds:
            self._event.clear()
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise AssertionError(f"{kind!r} did not arrive within {within_s} s (heard: {self.kinds})")
            try:
                await asyncio.wait_for(self._event.wait(), left)
            except TimeoutError:
                pass


async def _until(check: Callable[[], Awaitable[bool]], within_s: float = WITHIN_S, what: str = "") -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within_s} s: {what}")
        await asyncio.sleep(0.02)


def _call(n: int) -> CallRequest:
    return CallRequest(principal="alice", team="ml", model="gpt-4o", provider="openai", input_tokens=1000,
                       max_tokens=1000, request_id=f"call-{n}")


# ---- SQLite: nothing is pushed


async def test_sqlite_pushes_nothing(db_path: Path) -> None:
    async with await Engine.open(db_path) as one, await Engine.open(db_path) as other:
        heard = Heard()
        other.on_change(heard)
        await one.add_policy(build_policy(scope="global", metric="usd", window="day", hard="1"))
        await one.create_token(name="t", principal="alice")
        await asyncio.sleep(0.1)
        assert not other.notifies and heard.kinds == []


# ---- what is sent, and when


async def test_a_change_is_announced_at_its_commit_and_never_when_rolled_back(postgres_dsn: str,
                                                                              tmp_path: Path) -> None:
    writer = await open_ledger(postgres_dsn, home=tmp_path)
    listener = await open_ledger(postgres_dsn, home=tmp_path)
    try:
        assert isinstance(listener, PostgresStore) and listener.notifies
        heard = Heard()
        listener.on_change(heard)

        def fails(tx: Any) -> None:
            tx.save_policy("p1", "{}", 1)
            raise ValueError("undone")

        def prices(tx: Any) -> None:
            tx.save_prices([("acme-1", "", 0, "", '{"model": "acme-1"}', "test", 1)])

        with pytest.raises(ValueError):
            await writer.transact(fails)
        # Batched together: the failing operation is rolled back to its savepoint, the other commits.
        results = await asyncio.gather(writer.transact(fails), writer.transact(prices), return_exceptions=True)
        assert isinstance(results[0], ValueError) and results[1] is None
        await heard.wait_for(changes.PRICE)
        # Notifications arrive in commit order: a policy's would have come before the prices'.
        assert changes.POLICY not in heard.kinds
        # Reads and usage announce nothing.
        heard.kinds.clear()
        await writer.read_with(lambda view: view.tokens.listing())
        await writer.transact(lambda tx: tx.save_policy("p2", "{}", 2))
        await heard.wait_for(changes.POLICY)
        assert heard.kinds == [changes.POLICY]
    finally:
        await writer.close()
        await listener.close()


# ---- policies, prices, providers, approvals between two engines


async def test_a_policy_edited_on_one_engine_is_enforced_by_the_other_within_a_second(postgres_dsn: str) -> None:
    async with await Engine.open(postgres_dsn) as one, await Engine.open(postgres_dsn) as other:
        heard = Heard()
        other.on_change(heard)
        policy = await one.add_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="100",
                                                   name="ML daily", policy_id="ml-day"))
        await heard.wait_for(changes.POLICY)
        first = await other.authorize(_call(1))
        assert first.allowed
        # Routing's advice from memory is dropped at once (the next batch would read the policy anyway).
        heard.kinds.clear()
        await one.update_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="0.001",
                                             name="ML daily", policy_id=policy.id))
        await heard.wait_for(changes.POLICY)
        assert other.budgets.evaluate_in_memory({"team": "ml"}, other.worst_case(_call(2)), other.now_ms()) is None
        refused = await other.authorize(_call(2))
        assert not refused.allowed and refused.evaluation.deciding is not None
        assert refused.evaluation.deciding.policy.id == policy.id


async def test_a_price_version_and_a_provider_reach_a_running_engine(postgres_dsn: str) -> None:
    async with await Engine.open(postgres_dsn) as one, await Engine.open(postgres_dsn) as other:
        heard = Heard()
        other.on_change(heard)
        assert other.price_for("acme-large") is None
        await one.import_prices({"acme-large": {"input_cost_per_token": 0.000001, "output_cost_per_token": 0.000002,
                                                "litellm_provider": "acme", "mode": "chat"}})
        await heard.wait_for(changes.PRICE)  # told once the price book has read the ledger again
        price = other.price_for("acme-large")
        assert price is not None and price.input == 1_000 * 1_000_000  # $1e-6 a token in femto-dollars
        governor = Governor(other)
        assert [m for m in await other.catalog(max_age_s=3600) if m.provider == "acme-cloud"] == []
        assert await governor.registered(max_age_s=3600) == []
        await one.add_provider(name="acme-cloud", kind="openai", base_url="https://acme.example/v1",
                               models=["acme-large"])
        await heard.wait_for(changes.PROVIDER)
        assert [m.model for m in await other.catalog(max_age_s=3600) if m.provider == "acme-cloud"] == ["acme-large"]
        assert [p.name for p in await governor.registered(max_age_s=3600)] == ["acme-cloud"]
        assert [p.name for p in (await governor.served()).get("acme-large", [])] == ["acme-cloud"]


async def test_an_override_request_and_its_approval_are_announced(postgres_dsn: str) -> None:
    async with await Engine.open(postgres_dsn, actor="bob") as one, await Engine.open(postgres_dsn) as other:
        await one.add_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="10",
                                          action="approval_required", policy_id="ml-day"))
        heard = Heard()
        other.on_change(heard)
        request, _ = await one.request_override("ml-day", 5 * DOLLAR, 3_600_000, "nightly evals")
        await heard.wait_for(changes.APPROVAL)
        heard.kinds.clear()
        one.actor = "olivia"
        await one.approve(request.id)
        await heard.wait_for(changes.APPROVAL)
        assert (await other.override_request(request.id)).status == "approved"


# ---- a token revoked: refused by every running gateway within a second


def test_a_token_revoked_is_refused_by_every_gateway_within_a_second(
        postgres_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.integrations import gateway as gw
    from tests.asgi_servers import FakeOpenAI, serve

    monkeypatch.setattr(gw, "TOKEN_CACHE_S", 3600.0)  # only the notification can bring the revocation
    monkeypatch.setenv("BUDGETEER_VAULT_PASSPHRASE", "pw")
    fake = FakeOpenAI()
    with serve(fake.app()) as provider_url:
        async def prepare() -> tuple[Token, str]:
            async with await Engine.open(postgres_dsn) as engine:
                await engine.vault_set("fake", "sk-fake-key")
                await engine.add_provider(name="fake", kind="openai", base_url=f"{provider_url}/v1",
                                          credential="vault:fake", models=["gpt-4o-mini"])
                return await engine.create_token(name="t", principal="alice", team="ml")

        token, secret = _in_thread(prepare)
        ask = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        auth = {"authorization": f"Bearer {secret}"}
        with serve(gw.create_app(postgres_dsn)) as first, serve(gw.create_app(postgres_dsn)) as second, \
                httpx.Client(timeout=10) as http:
            bases = [f"{first}/v1", f"{second}/v1"]
            for base in bases:  # each gateway has the token in its cache now
                assert http.post(f"{base}/chat/completions", headers=auth, json=ask).status_code == 200

            async def revoke() -> None:
                async with await Engine.open(postgres_dsn) as engine:  # a third process: the command line
                    await engine.revoke_token(token.id)

            _in_thread(revoke)
            revoked = time.monotonic()
            for base in bases:
                while (answer := http.post(f"{base}/chat/completions", headers=auth, json=ask)).status_code == 200:
                    assert time.monotonic() - revoked < WITHIN_S, "a revoked token still served after a second"
                    time.sleep(0.02)
                assert answer.status_code == 401 and "revoked" in answer.json()["error"]["message"]


# ---- the listener after a restart of the server


async def test_the_listener_reconnects_after_the_server_restarts(pg_cluster: Any, postgres_dsn: str) -> None:
    async with await Engine.open(postgres_dsn) as other:
        store = other.store
        assert isinstance(store, PostgresStore) and other.notifies
        heard = Heard()
        other.on_change(heard)
        await asyncio.to_thread(pg_cluster.restart)

        async def back() -> bool:
            return store.listener.connects == 2 and store.listener.listening

        await _until(back, 30, "the listener connected again")
        await heard.wait_for(changes.ANY)  # what was sent while it was away is lost: everything is dropped
        async with await Engine.open(postgres_dsn) as one:
            await one.add_policy(build_policy(scope="global", metric="usd", window="day", hard="1"))
        await heard.wait_for(changes.POLICY)


# ---- the dashboard: a pushed change is read with the timer's refresh effectively off


async def _budgets_showing_first(pilot: Any) -> Any:
    """The dashboard's Budgets screen, once it shows the one policy ``first``."""
    from tui.screens.budgets import BudgetsScreen

    await pilot.press("3")
    await pilot.app.workers.wait_for_complete()
    await pilot.pause(0.05)
    screen = pilot.app.screen
    assert isinstance(screen, BudgetsScreen) and set(screen.policies) == {"first"}
    return screen


async def test_the_dashboard_reads_a_pushed_change_with_its_timer_off(postgres_dsn: str) -> None:
    from tui.app import BudgeteerApp

    async with await Engine.open(postgres_dsn) as one:
        await one.add_policy(build_policy(scope="global", metric="usd", window="day", hard="10", name="First",
                                          policy_id="first"))
        app = BudgeteerApp(db_path=postgres_dsn, refresh_seconds=3600)  # type: ignore[arg-type]
        async with app.run_test(size=(160, 48)) as pilot:
            screen = await _budgets_showing_first(pilot)
            assert app.engine is not None and app.engine.notifies
            await one.add_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="5", name="Second",
                                              policy_id="second"))

            async def shown() -> bool:
                await pilot.pause(0.02)
                return set(screen.policies) == {"first", "second"}

            await _until(shown, WITHIN_S, "the dashboard shows the policy another process added")
            app.update_status()
            assert "live, on change and every 3600 s" in screen._status_text


async def test_a_change_heard_during_a_read_is_read_again_after_it(db_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The read under way may have read before the change: the dashboard reads once more when it
    ends (the change delivered by hand, as the ledger's listener would, on an SQLite file)."""
    from tui.app import BudgeteerApp
    from tui.screens.budgets import BudgetsScreen

    load = BudgetsScreen.load
    slow = asyncio.Event()

    async def slow_load(self: BudgetsScreen, engine: Engine) -> Any:
        data = await load(self, engine)
        if slow.is_set():
            slow.clear()
            await asyncio.sleep(0.5)  # the change is committed and heard while this read ends
        return data

    monkeypatch.setattr(BudgetsScreen, "load", slow_load)
    async with await Engine.open(db_path) as one:
        await one.add_policy(build_policy(scope="global", metric="usd", window="day", hard="10", name="First",
                                          policy_id="first"))
        app = BudgeteerApp(db_path=db_path, refresh_seconds=3600)
        async with app.run_test(size=(160, 48)) as pilot:
            screen = await _budgets_showing_first(pilot)
            slow.set()
            await pilot.press("r")  # a read that has read already and ends in half a second
            await pilot.pause(0.05)
            assert screen.loading_data
            await one.add_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="5", name="Second",
                                              policy_id="second"))
            app._ledger_notified(changes.POLICY)

            async def shown() -> bool:
                await pilot.pause(0.02)
                return set(screen.policies) == {"first", "second"}

            await _until(shown, 3, "the change heard during a read is on screen after it")
