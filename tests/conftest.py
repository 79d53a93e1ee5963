"""Shared fixtures: a real SQLite ledger in a temporary folder and a frozen clock; a throwaway
PostgreSQL cluster (tests/pg.py), started only when a test asks for one.

The developer's own environment (BUDGETEER_DB, BUDGETEER_HOME, BUDGETEER_NOW) is kept
out of every test.
"""

from __future__ import annotations

import gc
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from engine.clock import FrozenClock
from engine.models import UsageEvent
from tests import pg

if TYPE_CHECKING:
    from engine.engine import Engine
    from engine.ledger import Store
    from tests.pg import Cluster

#: 2026-11-18 12:00:00 UTC, a Wednesday.
NOW_MS = 1_795_003_200_000


@contextmanager
def isolated_home(home: Path) -> Iterator[None]:
    """The environment ``_clean_env`` gives each test, for fixtures wider than a test (a
    session's or a module's ledger), which are built before any test's own fixtures: without
    it such a ledger's journal key went to the developer's keyring, and was found there on the
    next run."""
    saved = {name: os.environ.get(name) for name in (*_OWN_ENV, "BUDGETEER_HOME", "BUDGETEER_VAULT_BACKEND")}
    for name in _OWN_ENV:
        os.environ.pop(name, None)
    os.environ["BUDGETEER_HOME"] = str(home)
    os.environ["BUDGETEER_VAULT_BACKEND"] = "file"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_OWN_ENV = ("BUDGETEER_DB", "BUDGETEER_NOW", "BUDGETEER_DEBUG", "BUDGETEER_VAULT_PASSPHRASE", "BUDGETEER_VAULT_FILE")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for name in _OWN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BUDGETEER_HOME", str(tmp_path / "home"))
    # Never the developer's real keychain: the file vault, unless a test installs a test keyring.
    monkeypatch.setenv("BUDGETEER_VAULT_BACKEND", "file")
    yield


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(NOW_MS)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


#: The ledger's backends: a test that takes ``ledger_at`` (``engine`` and ``open_store`` do) runs on each.
BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(params=BACKENDS)
def ledger_at(request: pytest.FixtureRequest, db_path: Path) -> Path | str:
    """Where the test's ledger is: an SQLite file, and (the same test again) a fresh database on
    the worker's PostgreSQL cluster, which skips (or, in CI, fails) without PostgreSQL."""
    if request.param == "sqlite":
        return db_path
    request.node.user_properties.append((_PG_PROPERTY, True))
    return str(request.getfixturevalue("postgres_dsn"))


@pytest.fixture
async def open_store(ledger_at: Path | str, tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Store]]]:
    """``await open_store()``: a store on the test's ledger (each backend in turn), closed after the test."""
    from engine.ledger import open_ledger

    stores: list[Store] = []

    async def opened(**options: Any) -> Store:
        store = await open_ledger(ledger_at, home=tmp_path / "home", **options)
        stores.append(store)
        return store

    yield opened
    for store in stores:
        await store.close()


@pytest.fixture
async def engine(ledger_at: Path | str, clock: FrozenClock) -> AsyncIterator[Engine]:
    from engine.engine import Engine

    eng = await Engine.open(ledger_at, clock=clock)
    try:
        yield eng
    finally:
        await eng.close()


def event(n: int = 0, **overrides: object) -> UsageEvent:
    """A small valid event with a fixed cost, for tests that do not care about prices."""
    values: dict[str, object] = {
        "ts_ms": NOW_MS - 3_600_000 + n * 1000,
        "request_id": f"req-{n}",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "workspace": "acme",
        "team": "ml",
        "principal": "alice",
        "input_tokens": 1000,
        "output_tokens": 200,
        "cost_nanos": 270_000,
        "cost_source": "provider",
        "latency_ms": 420,
    }
    values.update(overrides)
    return UsageEvent(**values)  # type: ignore[arg-type]


@pytest.fixture(params=["http11", "aiohttp"])
def upstream(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The gateway's client to providers (``engine.integrations.gateway.UPSTREAM``): a test
    that takes it runs with each."""
    from engine.integrations import gateway

    monkeypatch.setattr(gateway, "UPSTREAM", request.param)
    return str(request.param)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test marked http11_only (how the home-made pool does it: its socket pausing, its wait
    queue, its errors' words) is not collected against aiohttp's client, nor one marked
    sqlite_only (how the SQLite file does it: its log, its statements) against PostgreSQL,
    rather than skipped: a skip in this suite means something needed is missing."""
    kept, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        on_aiohttp = "aiohttp" in params.values()
        on_postgres = params.get("ledger_at") == "postgresql"
        (dropped if (on_aiohttp and item.get_closest_marker("http11_only"))
         or (on_postgres and item.get_closest_marker("sqlite_only")) else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
    items.sort(key=_starts_first)


#: The longest tests (10-50 s each, wall, from --durations), started first: xdist hands out the
#: tests in this order to whichever worker is free, and the longest coming last (the dashboard's
#: tests are collected last) left one worker on them while the others had nothing left to do.
#: Only the order changes; a test renamed or gone from here is simply run in its usual place.
#: (Tests of an xdist_group are one unit each, which xdist already sends first.)
SLOW_FIRST = (
    "tests/reliability/test_secrecy.py::test_no_secret_anywhere",
    "tests/tui/test_keys.py::test_esc_leaves_every_text_box",
    "tests/tui/test_tables.py::test_every_visible_cell_is_the_engines_value",
    "tests/tui/test_lean.py::test_touring_the_screens_keeps_no_widgets_alive",
    "tests/test_gateway.py::test_a_thousand_concurrent_calls_never_overspend",
    "tests/test_bound.py::test_a_thousand_calls_counted_at_every_byte_never_pass_a_hard_budget",
    "tests/reliability/test_bad_input.py::test_gateway_bodies_and_headers_never_get_a_500",
    "tests/test_alerts.py::test_a_fresh_demo_ledger_raises_one_threshold_alert_per_policy",
    "tests/test_vault.py::test_no_secret_in_any_output_file_or_row",
    "tests/test_cli_progress.py::test_a_terminal_gets_a_progress_bar_and_json_still_gets_none",
    "tests/test_cli_progress.py::test_piped_or_json_the_long_commands_write_nothing_on_stderr",
    "tests/tui/test_keys.py::test_the_footer_shows_the_screens_keys_first_and_never_cuts_help_and_quit",
    "tests/tui/test_app.py::test_a_poll_that_reaches_a_screen_still_mounting_waits_for_its_columns",
    "tests/reliability/test_shared_rate_limits.py::test_tpm_over_two_gateways_holds_across_them",
    "tests/reliability/test_crash_and_writers.py::test_a_gateway_and_a_transport_in_another_process_share_one_budget",
    "tests/tui/test_app.py::test_filter_and_vim_keys_in_a_table",
    "tests/tui/test_app.py::test_each_screen_binding_does_what_it_says",
    "tests/reliability/test_shared_rate_limits.py::test_rpm_50_over_two_gateways_answers_50_calls_in_the_minute",
    "tests/reliability/test_crash_and_writers.py::test_sigkill_under_load_loses_nothing_acknowledged",
)
_SLOW_RANK = {name: rank for rank, name in enumerate(SLOW_FIRST)}


def _starts_first(item: pytest.Item) -> int:
    return _SLOW_RANK.get(item.nodeid.split("[", 1)[0], len(SLOW_FIRST))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Python's cyclic garbage collector ran every 700 new objects and scanned, at each of its
    full passes, everything imported and collected (Textual, the engine, 1,400 test items):
    about a sixth of the dashboard tests' CPU. What exists now is kept for the session (frozen:
    never scanned again) and the collector runs every 50,000 new objects; each test's garbage
    is collected at its teardown (below), so whatever it leaves unclosed is still reported
    against that test, as before."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """After the test's fixtures are finalized and before pytest looks for unraisable exceptions
    (a socket left open, collected: a ResourceWarning), so the warning is this test's."""
    gc.collect()


# -- PostgreSQL (issue 20): one throwaway cluster per xdist worker, a fresh database per test.


@pytest.fixture(scope="session")
def pg_bindir() -> Path:
    """The folder of PostgreSQL's binaries. Without them the test is skipped, saying what is
    missing; in CI (CI=true) it fails instead."""
    found = pg.availability()
    if found.action == "fail":
        pytest.fail(found.reason, pytrace=False)
    if found.action == "skip" or found.bindir is None:
        pytest.skip(found.reason)
    return found.bindir


@pytest.fixture(scope="session")
def pg_cluster(pg_bindir: Path) -> Iterator[Cluster]:
    """A PostgreSQL server of this worker's own, started the first time a test asks for it and
    stopped (its folder removed) at the end of the session (atexit too, and with the process if
    it is killed)."""
    cluster = pg.start_cluster(pg_bindir, label=os.environ.get("PYTEST_XDIST_WORKER", "main"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgres_dsn(request: pytest.FixtureRequest) -> Iterator[str]:
    """A new, empty database on the worker's cluster, for this test alone: its dsn
    (postgresql://postgres@127.0.0.1:PORT/NAME). Dropped after the test. A test that stopped
    the server (a restart under load that failed half-way, say) leaves it running again.

    It marks the test as a PostgreSQL one before asking for the cluster (which may skip), so the
    closing line counts it even when a parametrized fixture asks for this one at run time
    (``request.getfixturevalue("postgres_dsn")``), where the test's fixture names do not show it."""
    _mark_postgres(request.node)
    pg_cluster: Cluster = request.getfixturevalue("pg_cluster")
    pg_cluster.start()  # nothing when it runs
    dsn = pg.fresh_database(pg_cluster.dsn)
    yield dsn
    pg_cluster.start()
    pg.drop_database(pg_cluster.dsn, dsn)


#: The user property that marks a test report as one of a PostgreSQL test (it travels from the
#: xdist workers to the controller with the report).
_PG_PROPERTY = "postgresql"


def _mark_postgres(item: pytest.Item) -> None:
    if (_PG_PROPERTY, True) not in item.user_properties:
        item.user_properties.append((_PG_PROPERTY, True))


def pytest_runtest_setup(item: pytest.Item) -> None:
    if "pg_bindir" in getattr(item, "fixturenames", ()):
        _mark_postgres(item)


_TALLY = pg.Tally()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if (_PG_PROPERTY, True) in report.user_properties:
        _TALLY.add(report)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> Iterator[None]:
    """After the short summary (the skips' reasons), just above the closing count."""
    yield
    line = _TALLY.summary()
    if line is not None:
        terminalreporter.write_line(line, yellow=bool(_TALLY.skipped or _TALLY.failed), bold=True)
