"""The test infrastructure for PostgreSQL (tests/pg.py, the fixtures in tests/conftest.py): a
throwaway cluster on a loopback port, an empty database of its own for each test, a restart that
keeps the data and the port, no server left behind, and the decision to run, skip or fail."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests import pg
from tests.pg import Cluster

# One worker holds the cluster for them all (one cluster started, not one per worker).
pytestmark = pytest.mark.xdist_group("postgres_cluster")

ROOT = Path(__file__).resolve().parent.parent


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (killed, not yet reaped by its new parent) is gone for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _wait_until_gone(pid: int, within_s: float = 60.0) -> bool:
    deadline = time.monotonic() + within_s
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# -- the cluster


async def test_the_cluster_listens_on_loopback_alone_with_the_test_settings(pg_cluster: Cluster) -> None:
    rows = pg.fetch(pg_cluster.dsn, "SELECT name, setting FROM pg_settings WHERE name IN ('listen_addresses', "
                        "'port', 'unix_socket_directories', 'fsync', 'synchronous_commit', 'full_page_writes', "
                        "'max_connections')")
    settings = {r["name"]: r["setting"] for r in rows}
    assert settings == {
        "listen_addresses": "127.0.0.1", "port": str(pg_cluster.port),
        "unix_socket_directories": str(pg_cluster.base), "fsync": "off", "synchronous_commit": "off",
        "full_page_writes": "off", "max_connections": "300"}
    # Its socket is in its own folder, not in /var/run/postgresql where a system server's lives.
    assert (pg_cluster.base / f".s.PGSQL.{pg_cluster.port}").is_socket()
    assert not Path(f"/var/run/postgresql/.s.PGSQL.{pg_cluster.port}").exists()
    assert pg_cluster.dsn == f"postgresql://postgres@127.0.0.1:{pg_cluster.port}/postgres"
    if os.geteuid() == 0:  # PostgreSQL refuses root: the server runs as the postgres user
        assert pg_cluster.data_dir.stat().st_uid == pg.pwd.getpwnam(pg.OWNER).pw_uid


async def test_a_fresh_database_is_empty_and_named_in_its_dsn(postgres_dsn: str, pg_cluster: Cluster) -> None:
    name = postgres_dsn.rsplit("/", 1)[1]
    assert postgres_dsn == f"postgresql://postgres@127.0.0.1:{pg_cluster.port}/{name}"
    [row] = pg.fetch(postgres_dsn, "SELECT current_database() AS db, count(*) AS n FROM pg_class c "
                         "JOIN pg_namespace s ON s.oid = c.relnamespace WHERE s.nspname NOT IN "
                         "('pg_catalog', 'information_schema', 'pg_toast')")
    assert (row["db"], row["n"]) == (name, 0)


@pytest.mark.parametrize("turn", [1, 2])
async def test_each_test_gets_its_own_database(postgres_dsn: str, turn: int) -> None:
    """Both turns create the same table: the second would find the first's if they shared a
    database (the module runs in one worker, so on one cluster)."""
    conn = await asyncpg.connect(postgres_dsn, timeout=30)
    try:
        await conn.execute("CREATE TABLE marker (turn int)")
        await conn.execute("INSERT INTO marker VALUES ($1)", turn)
        assert await conn.fetchval("SELECT count(*) FROM marker") == 1
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The shape of a fixture over both ledgers: PostgreSQL's database asked for at run time."""
    if request.param == "postgresql":
        return str(request.getfixturevalue("postgres_dsn"))
    return str(tmp_path / "ledger.db")


def test_a_database_asked_for_at_run_time_marks_the_test(backend: str, request: pytest.FixtureRequest) -> None:
    """The closing line counts a test whose PostgreSQL database a parametrized fixture asked for
    at run time, not only one that names the fixtures."""
    on_postgres = backend.startswith("postgresql://")
    assert (("postgresql", True) in request.node.user_properties) == on_postgres


async def test_a_crash_loses_nothing_committed_synchronously(postgres_dsn: str, pg_cluster: Cluster) -> None:
    """Immediate shutdown, then a start that recovers from the WAL: a transaction committed with
    synchronous_commit on (off by default here, for speed) is there afterwards."""
    conn = await asyncpg.connect(postgres_dsn, timeout=30)
    try:
        await conn.execute("CREATE TABLE kept (x int)")
        async with conn.transaction():
            await conn.execute("SET LOCAL synchronous_commit = on")
            await conn.execute("INSERT INTO kept VALUES (3)")
    finally:
        await conn.close()
    await asyncio.to_thread(pg_cluster.crash)
    assert not pg_cluster.running
    await asyncio.to_thread(pg_cluster.start)
    assert [r["x"] for r in pg.fetch(postgres_dsn, "SELECT x FROM kept")] == [3]


async def test_fresh_databases_are_distinct(pg_cluster: Cluster) -> None:
    first, second = pg.fresh_database(pg_cluster.dsn), pg.fresh_database(pg_cluster.dsn)
    try:
        assert first != second
        pg.execute(first, "CREATE TABLE only_here (x int)")
        assert pg.fetch(second, "SELECT 1 FROM pg_class WHERE relname = 'only_here'") == []
    finally:
        pg.drop_database(pg_cluster.dsn, first)
        pg.drop_database(pg_cluster.dsn, second)
    names = pg.fetch(pg_cluster.dsn, "SELECT datname FROM pg_database")
    assert {first.rsplit("/", 1)[1], second.rsplit("/", 1)[1]}.isdisjoint(r["datname"] for r in names)


async def test_a_restart_keeps_the_data_and_the_port(postgres_dsn: str, pg_cluster: Cluster) -> None:
    port, pid = pg_cluster.port, pg_cluster.proc.pid if pg_cluster.proc else None
    pg.execute(postgres_dsn, "CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)")

    await asyncio.to_thread(pg_cluster.restart)

    assert pg_cluster.port == port and pg_cluster.running
    assert pg_cluster.proc is not None and pg_cluster.proc.pid != pid  # a new server, not the old one
    assert [r["x"] for r in pg.fetch(postgres_dsn, "SELECT x FROM kept")] == [42]


async def test_stopped_it_refuses_connections_and_started_again_it_has_the_data(
        postgres_dsn: str, pg_cluster: Cluster) -> None:
    pg.execute(postgres_dsn, "CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)")
    await asyncio.to_thread(pg_cluster.stop_fast)
    try:
        assert not pg_cluster.running
        with pytest.raises(OSError):
            await asyncpg.connect(postgres_dsn, timeout=5)
    finally:
        await asyncio.to_thread(pg_cluster.start)
    assert [r["x"] for r in pg.fetch(postgres_dsn, "SELECT x FROM kept")] == [7]


def test_stop_leaves_no_server_and_no_folder(pg_bindir: Path) -> None:
    cluster = pg.start_cluster(pg_bindir, label="stop-test")
    assert cluster.proc is not None
    pid = cluster.proc.pid
    assert _alive(pid) and cluster.base.is_dir()
    cluster.stop()
    assert not _alive(pid) and not cluster.base.exists()
    cluster.stop()  # twice (the finalizer, then atexit): nothing happens


def test_a_killed_test_process_takes_its_server_with_it(pg_bindir: Path) -> None:
    """SIGKILL runs no finalizer and no atexit: the parent-death signal stops the server."""
    script = ("import sys, time; from tests import pg; "
              f"c = pg.start_cluster(pg.Path({str(pg_bindir)!r}), label='killed'); "
              "print(c.proc.pid, c.base, flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    with child.stdout:
        try:
            pid_text, base = child.stdout.readline().split()
            server = int(pid_text)
            assert _alive(server)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
    assert _wait_until_gone(server), "the server outlived the process that started it"
    # The next cluster started sweeps the folder the killed process left.
    assert Path(base) in pg.sweep_stale()


def test_clusters_go_to_dev_shm_only_when_it_has_room(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(pg, "SHM", tmp_path)
    monkeypatch.setattr(pg, "SHM_ROOM", 1)
    assert pg.base_parent() == tmp_path
    monkeypatch.setattr(pg, "SHM_ROOM", 1 << 62)  # more than any disk
    assert pg.base_parent() == Path(pg.tempfile.gettempdir())
    monkeypatch.setattr(pg, "SHM", tmp_path / "absent")
    monkeypatch.setattr(pg, "SHM_ROOM", 1)
    assert pg.base_parent() == Path(pg.tempfile.gettempdir())


# -- run, skip or fail


def _fake_binaries(folder: Path, names: tuple[str, ...] = pg.BINARIES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text("#!/bin/sh\n")
        (folder / name).chmod(0o755)
    return folder


def _decide(path: str, glob: str, ci: str | None = None, **kw: Any) -> pg.Availability:
    env = {"PATH": path} | ({"CI": ci} if ci is not None else {})
    return pg.availability(env, search_glob=glob, **{"is_root": False, "setpriv": "/usr/bin/setpriv", **kw})


def test_binaries_on_path_run_the_tests(tmp_path: Path) -> None:
    found = _fake_binaries(tmp_path / "bin")
    decided = _decide(f"{tmp_path / 'empty'}{os.pathsep}{found}", str(tmp_path / "none" / "*"))
    assert (decided.action, decided.bindir) == ("run", found)


def test_without_binaries_the_tests_are_skipped_saying_what_is_missing(tmp_path: Path) -> None:
    partial = _fake_binaries(tmp_path / "bin", ("initdb", "pg_ctl"))  # no postgres
    (tmp_path / "bin" / "postgres").write_text("not executable")
    decided = _decide(str(partial), str(tmp_path / "lib" / "*" / "bin"))
    assert decided == pg.Availability("skip", pg.MISSING)
    assert decided.reason == (
        "PostgreSQL binaries (initdb, pg_ctl, postgres) not found on PATH or in /usr/lib/postgresql/*/bin: "
        "the PostgreSQL ledger tests are skipped; install PostgreSQL to run them")


@pytest.mark.parametrize("ci", ["true", "TRUE", "1"])
def test_in_ci_missing_binaries_fail_rather_than_skip(tmp_path: Path, ci: str) -> None:
    decided = _decide(str(tmp_path), str(tmp_path / "lib" / "*" / "bin"), ci=ci)
    assert decided == pg.Availability("fail", pg.MISSING)


@pytest.mark.parametrize("ci", ["", "false", "0"])
def test_ci_not_true_skips(tmp_path: Path, ci: str) -> None:
    assert _decide(str(tmp_path), str(tmp_path / "x" / "*"), ci=ci).action == "skip"


def test_debians_folders_are_searched_newest_first(tmp_path: Path) -> None:
    for version in ("9.6", "13", "15"):
        _fake_binaries(tmp_path / "lib" / version / "bin")
    decided = _decide(str(tmp_path / "empty"), str(tmp_path / "lib" / "*" / "bin"), ci="true")
    assert (decided.action, decided.bindir) == ("run", tmp_path / "lib" / "15" / "bin")


def test_as_root_the_postgres_user_and_setpriv_are_needed(tmp_path: Path) -> None:
    path, glob = str(_fake_binaries(tmp_path / "bin")), str(tmp_path / "x" / "*")
    assert _decide(path, glob, is_root=True, user_exists=lambda name: False) == pg.Availability("skip", pg.NO_OWNER)
    assert _decide(path, glob, ci="true", is_root=True, setpriv=None) == pg.Availability("fail", pg.NO_SETPRIV)
    assert _decide(path, glob, is_root=True, user_exists=lambda name: name == "postgres").action == "run"
    assert _decide(path, glob, is_root=False, setpriv=None).action == "run"  # a non-root user runs them itself


# -- the closing line


class _Report:
    def __init__(self, when: str, outcome: str, longrepr: Any = None) -> None:
        self.when, self.longrepr = when, longrepr
        self.passed, self.failed, self.skipped = outcome == "passed", outcome == "failed", outcome == "skipped"


def test_the_closing_line_says_whether_they_ran_or_why_not() -> None:
    assert pg.Tally().summary() is None  # no PostgreSQL test selected: no line

    ran = pg.Tally()
    for _ in range(3):
        ran.add(_Report("setup", "passed"))
        ran.add(_Report("call", "passed"))
        ran.add(_Report("teardown", "passed"))
    assert ran.summary() == "PostgreSQL ledger tests: 3 ran against a throwaway cluster"

    skipped = pg.Tally()
    for _ in range(2):
        skipped.add(_Report("setup", "skipped", ("tests/conftest.py", 140, f"Skipped: {pg.MISSING}")))
    assert skipped.summary() == f"PostgreSQL ledger tests: 2 skipped: {pg.MISSING}"

    failed = pg.Tally()
    failed.add(_Report("setup", "failed", f"E   Failed: {pg.MISSING}"))
    assert failed.summary() == f"PostgreSQL ledger tests: 1 could not get a cluster: Failed: {pg.MISSING}"
