"""``budgeteer ledger copy FROM TO``: a ledger moved between SQLite and PostgreSQL, exact.

A demo ledger (a day of ``engine.demo``'s traffic, with members, a webhook, a hold, a settled
call and a gateway's heartbeat added) is copied SQLite -> PostgreSQL -> SQLite: every row of
every table comes back the same, the sums over periods and dimensions agree on all three, and
the journal verifies on each, two ``ledger.copy`` entries longer. A target that holds anything
is refused, a failure midway leaves the target empty, and no password is ever shown.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from engine.access import AccessDenied
from engine.clock import DAY_MS, HOUR_MS, FrozenClock
from engine.demo import populate
from engine.engine import CallRequest, Engine
from engine.errors import BadInput
from engine.ledger import COPIED_TABLES, StoreError
from engine.ledger import copy as copy_mod
from engine.models import ROLLUP_DIMENSIONS, GatewayStatus
from tests.conftest import NOW_MS, event, isolated_home
from tui.cli import main

PASSPHRASE = "a passphrase for the copy tests"
PASSWORD = "hunter2-secret-pw"
OWNER, VIEWER = "olivia", "vera"




@pytest.fixture(autouse=True)
def _passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUDGETEER_VAULT_PASSPHRASE", PASSPHRASE)


def with_password(dsn: str) -> str:
    """The dsn with a password in it (trust authentication ignores it): it must never be shown."""
    parts = urlsplit(dsn)
    user = parts.username or "postgres"
    host = parts.hostname or "127.0.0.1"
    return urlunsplit(parts._replace(netloc=f"{user}:{PASSWORD}@{host}:{parts.port or 5432}"))


@pytest.fixture(scope="module")
def source_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo ledger (one day), plus what the demo does not make: members, a webhook, an open
    hold, a settled call and a gateway's heartbeat. Built once; the tests only read it."""
    folder = tmp_path_factory.mktemp("source")
    path = folder / "ledger.db"

    async def build() -> None:
        os.environ["BUDGETEER_VAULT_PASSPHRASE"] = PASSPHRASE
        async with await Engine.open(path, clock=FrozenClock(NOW_MS), actor=OWNER) as engine:
            await populate(engine, days=1, end_ms=NOW_MS)
            await engine.set_member(OWNER, "owner")
            await engine.set_member(VIEWER, "viewer")
            await engine.set_member("postgres", "owner")  # who acts on the PostgreSQL copies: the database role
            await engine.add_webhook("https://hooks.example.org/budgeteer")
            await engine.authorize(CallRequest(principal="alice", team="ml", model="gpt-4o", input_tokens=1000,
                                               max_tokens=1000))
            settled = await engine.authorize(CallRequest(principal="bob", team="ml", model="gpt-4o-mini",
                                                         input_tokens=500, max_tokens=500))
            assert settled.hold_id is not None
            await engine.settle(settled.hold_id, event(1, request_id=settled.request_id, principal="bob"))
            await engine.gateway_heartbeat(GatewayStatus("gw_1", "127.0.0.1:8787", 4242, NOW_MS - 60_000, NOW_MS,
                                                         None, 10, 1, 2, 0))

    with isolated_home(folder / "home"):
        asyncio.run(build())
    return path


def sqlite_rows(path: Path) -> dict[str, list[str]]:
    """Every copied table's rows (as sorted reprs of name -> value)."""
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return {t: sorted(repr(sorted(dict(r).items())) for r in conn.execute(f'SELECT * FROM "{t}"'))
                for t in COPIED_TABLES}
    finally:
        conn.close()


def postgres_rows(dsn: str) -> dict[str, list[str]]:
    async def read() -> dict[str, list[str]]:
        import asyncpg

        conn = await asyncpg.connect(dsn)
        try:
            return {t: sorted(repr(sorted(dict(r).items())) for r in await conn.fetch(f'SELECT * FROM "{t}"'))
                    for t in COPIED_TABLES}
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, read()).result()


def journal_ids(rows: dict[str, list[str]]) -> int:
    return len(rows["audit_journal"])


async def sums(engine: Engine) -> list[Any]:
    """Sums over several periods and every dimension (rollups), and by agent (raw events)."""
    out: list[Any] = []
    for start, end in ((NOW_MS - 2 * DAY_MS, NOW_MS + HOUR_MS), (NOW_MS - 7 * HOUR_MS, NOW_MS - 3 * HOUR_MS),
                       (NOW_MS - DAY_MS + 1234, NOW_MS - 61_000)):
        out.append(await engine.totals(start, end))
        for dim in ROLLUP_DIMENSIONS:
            out.append(await engine.breakdown(start, end, dim, limit=1000))
        out.append(await engine.totals(start, end, {"agent": "research"}))
    out.append(await engine.event_count())
    return out


async def copy(source: str | Path, target: str | Path, **kwargs: Any) -> Any:
    async with await Engine.open(source, clock=FrozenClock(NOW_MS), actor=kwargs.pop("actor", OWNER)) as engine:
        return await engine.copy_ledger(target, **kwargs)


async def verify(location: str | Path) -> Any:
    async with await Engine.open(location, clock=FrozenClock(NOW_MS)) as engine:
        return await engine.verify_audit()


def test_every_table_of_both_schemas_is_copied_or_the_backends_own() -> None:
    """A migration that adds a table must add it to the copy (or the copy fails loudly)."""
    from engine.ledger.pg.schema import MIGRATIONS as PG_MIGRATIONS
    from engine.ledger.schema import MIGRATIONS

    def created(scripts: tuple[str, ...]) -> set[str]:
        import re

        found = set()
        for script in scripts:
            found |= {m.lower() for m in re.findall(r"CREATE TABLE (\w+)", script)}
            found -= {m.lower() for m in re.findall(r"DROP TABLE (\w+)", script)}
            for old, new in re.findall(r"ALTER TABLE (\w+) RENAME TO (\w+)", script):
                found.discard(old.lower())
                found.add(new.lower())
        return found

    assert created(MIGRATIONS) - copy_mod.OWN_TABLES == set(COPIED_TABLES)
    assert created(PG_MIGRATIONS) - copy_mod.OWN_TABLES == set(COPIED_TABLES)
    assert len(COPIED_TABLES) == len(set(COPIED_TABLES))
    assert COPIED_TABLES.index("series") < COPIED_TABLES.index("usage_events")
    assert COPIED_TABLES.index("alerts") < COPIED_TABLES.index("webhook_deliveries")


async def test_sqlite_to_postgresql_to_sqlite_is_exact(source_db: Path, postgres_dsn: str, tmp_path: Path) -> None:
    pg = with_password(postgres_dsn)
    back = tmp_path / "elsewhere" / "back.db"  # another folder: another vault file, the key copied there
    before = sqlite_rows(source_db)
    async with await Engine.open(source_db, clock=FrozenClock(NOW_MS)) as engine:
        expected_sums = await sums(engine)
    entries = journal_ids(before)
    assert all(before[t] for t in ("usage_events", "holds", "hold_journal", "members", "webhooks", "gateways",
                                   "api_tokens", "override_requests", "routing_decisions", "audit_journal"))

    seen: list[tuple[int, int, str]] = []
    first = await copy(source_db, pg, progress=lambda done, total, table: seen.append((done, total, table)))
    assert first.events == len(before["usage_events"]) and first.events > 5000
    assert first.tables == {t: len(rows) for t, rows in before.items()}
    assert PASSWORD not in json.dumps(first.as_dict())
    assert seen[-1][0] == seen[-1][1] == first.rows  # progress reaches the end
    middle = postgres_rows(postgres_dsn)
    assert {t: len(r) for t, r in middle.items()} == {**first.tables, "audit_journal": entries + 1}

    second = await copy(pg, back)
    assert second.cost_nanos == first.cost_nanos and second.ledger_id == first.ledger_id
    after = sqlite_rows(back)
    for table in COPIED_TABLES:  # every row the same, ids and the ledger id included
        if table != "audit_journal":
            assert after[table] == before[table], table
    conn = sqlite3.connect(back)
    try:
        journal = conn.execute("SELECT id, action, actor, after FROM audit_journal ORDER BY id").fetchall()
        original = sqlite3.connect(source_db).execute("SELECT * FROM audit_journal ORDER BY id").fetchall()
        assert conn.execute("SELECT * FROM audit_journal WHERE id <= ? ORDER BY id", (entries,)).fetchall() == original
    finally:
        conn.close()
    assert [(i, a, who) for i, a, who, _ in journal[entries:]] == [(entries + 1, "ledger.copy", OWNER),
                                                                     (entries + 2, "ledger.copy", OWNER)]
    assert not any(PASSWORD in row[3] for row in journal)
    assert "postgresql://postgres:***@" in journal[entries][3]

    for location, length in ((pg, entries + 1), (back, entries + 2)):
        verified = await verify(location)
        assert verified.ok and verified.entries == length and verified.keyed_from == 1, (location, verified)
        async with await Engine.open(location, clock=FrozenClock(NOW_MS)) as engine:
            assert await sums(engine) == expected_sums

    # The copies go on as ledgers: new rows get the ids after the copied ones.
    async with await Engine.open(pg, clock=FrozenClock(NOW_MS), actor=OWNER) as engine:
        await engine.record(event(99_999, request_id="after-the-copy"))
        await engine.set_member("newcomer", "viewer")
        assert (await engine.verify_audit()).ok
    assert len(postgres_rows(postgres_dsn)["usage_events"]) == first.events + 1


async def test_postgresql_to_postgresql(source_db: Path, postgres_dsn: str) -> None:
    """Between two databases of one server (the second made beside the fixture's): the same rows,
    the sequences set past the copied ids on the second too."""
    import uuid

    name = f"copy_second_{uuid.uuid4().hex[:12]}"
    admin = urlunsplit(urlsplit(postgres_dsn)._replace(path="/postgres"))
    second = urlunsplit(urlsplit(postgres_dsn)._replace(path=f"/{name}"))
    run_admin(admin, f'CREATE DATABASE "{name}"')
    try:
        await copy(source_db, postgres_dsn)
        report = await copy(with_password(postgres_dsn), with_password(second))
        first_rows, second_rows = postgres_rows(postgres_dsn), postgres_rows(second)
        assert {t: r for t, r in second_rows.items() if t != "audit_journal"} == \
            {t: r for t, r in first_rows.items() if t != "audit_journal"}
        assert len(second_rows["audit_journal"]) == len(first_rows["audit_journal"]) + 1
        assert report.events == len(first_rows["usage_events"])
        assert (await verify(second)).ok
        async with await Engine.open(second, clock=FrozenClock(NOW_MS), actor=OWNER) as engine:
            await engine.record(event(77_777, request_id="next-on-the-second"))
            await engine.add_webhook("https://hooks.example.org/second")
            assert (await engine.verify_audit()).ok
    finally:
        run_admin(admin, f'DROP DATABASE "{name}" WITH (FORCE)')


def run_admin(dsn: str, sql: str) -> None:
    async def run() -> None:
        import asyncpg

        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run()).result()


@pytest.fixture(params=["sqlite", "sqlite-opened", "postgresql"])
async def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new file, an empty ledger file opened once already, or an empty database."""
    if request.param.startswith("sqlite"):
        path = tmp_path / "target" / "copy.db"
        if request.param == "sqlite-opened":
            async with await Engine.open(path, clock=FrozenClock(NOW_MS)):
                pass
        return str(path)
    return with_password(request.getfixturevalue("postgres_dsn"))


def holdings(location: str) -> dict[str, int]:
    if location.startswith("postgresql://"):
        rows = postgres_rows(location)
    else:
        if not Path(location).exists():
            return {}
        rows = sqlite_rows(Path(location))
    return {t: len(r) for t, r in rows.items() if r and t != "ledger_identity"}


async def test_a_target_that_holds_anything_is_refused(source_db: Path, target: str, tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    async with await Engine.open(other, clock=FrozenClock(NOW_MS)) as engine:
        await engine.record(event(1))
    await copy(other, target)
    held = holdings(target)
    assert held["usage_events"] == 1
    with pytest.raises(BadInput) as refused:
        await copy(source_db, target)
    message = str(refused.value)
    assert message.startswith("TO: the ledger at ") and "is not empty (it holds 1 events and " in message
    assert "nothing was written" in message and PASSWORD not in message
    assert holdings(target) == held


async def test_a_failure_midway_leaves_the_target_empty(source_db: Path, target: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    real = copy_mod._write
    calls = 0

    def failing(conn: Any, table: Any, rows: list[tuple[Any, ...]]) -> None:
        nonlocal calls
        calls += 1
        if table.name == "rollup_minute":  # events written, then this fails
            raise RuntimeError("the disk went away")
        real(conn, table, rows)

    monkeypatch.setattr(copy_mod, "_write", failing)
    existed = Path(target).exists()
    with pytest.raises(RuntimeError, match="the disk went away"):
        await copy(source_db, target)
    assert calls > 2
    assert holdings(target) == {}
    if not target.startswith("postgresql://"):
        assert Path(target).exists() == existed  # a file the copy made is gone with it, one it found stays
    monkeypatch.setattr(copy_mod, "_write", real)
    report = await copy(source_db, target)  # and the target takes a copy afterwards
    assert holdings(target)["usage_events"] == report.events


async def test_a_driver_error_midway_is_one_sentence_and_rolls_back(source_db: Path, postgres_dsn: str,
                                                                     tmp_path: Path) -> None:
    """PostgreSQL refuses what SQLite takes (a NUL character in a text): the copy fails whole."""
    bad = tmp_path / "bad.db"
    async with await Engine.open(bad, clock=FrozenClock(NOW_MS)) as engine:
        await engine.record(event(1))
        await engine.record(event(2, agent="nul\x00agent"))
    target = with_password(postgres_dsn)
    with pytest.raises(StoreError) as failed:
        await copy(bad, target)
    message = str(failed.value)
    assert message.startswith("copying into postgresql://postgres:***@") and "nothing was written" in message
    assert PASSWORD not in message and "\n" not in message
    assert holdings(target) == {}


async def test_only_who_may_manage_members_copies(source_db: Path, tmp_path: Path) -> None:
    target = tmp_path / "copy.db"
    with pytest.raises(AccessDenied, match=r"vera [(]viewer[)] lacks the manage_members permission"):
        await copy(source_db, target, actor=VIEWER)
    assert not target.exists()


async def test_the_same_ledger_and_nonsense_are_refused_by_name(source_db: Path, tmp_path: Path) -> None:
    with pytest.raises(BadInput, match=r"^TO: .* is the ledger being copied [(]FROM[)]"):
        await copy(source_db, source_db)
    (tmp_path / "folder").mkdir()
    with pytest.raises(BadInput, match=r"^TO: .* is a folder"):
        await copy(source_db, tmp_path / "folder")
    (tmp_path / "text.db").write_text("not a database at all, " * 100)
    with pytest.raises(BadInput, match=r"^TO: "):
        await copy(source_db, tmp_path / "text.db")
    other = sqlite3.connect(tmp_path / "other.db")  # an SQLite database, not a ledger
    other.execute("CREATE TABLE notes (body TEXT)")
    other.commit()
    other.close()
    with pytest.raises(BadInput, match=r"^TO: .* is an SQLite database but not a Budgeteer ledger$"):
        await copy(source_db, tmp_path / "other.db")
    assert sqlite3.connect(tmp_path / "other.db").execute("SELECT name FROM sqlite_master").fetchall() == [("notes",)]


async def test_what_is_written_to_the_source_meanwhile_is_not_copied(source_db: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The source is read as one snapshot: an event another process appends to it in the middle
    of the copy is not in the copy, and the copy is whole (its counts checked before the commit)."""
    work = tmp_path / "busy.db"
    await copy(source_db, work)  # a source of this test's own, to write to
    real, wrote = copy_mod._write, []

    def meanwhile(conn: Any, table: Any, rows: list[tuple[Any, ...]]) -> None:
        if table.name == "usage_events" and not wrote:
            other = sqlite3.connect(work)  # another writer of the source, as a gateway would be
            try:
                other.execute("INSERT INTO usage_events (ts_ms, request_id, series_id, session, agent, input_tokens, "
                              "cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, cost_nanos, "
                              "cost_source, latency_ms, status) SELECT ts_ms + 1, 'written-meanwhile', series_id, "
                              "session, agent, 1, 0, 0, 1, 0, 1000, cost_source, 5, status FROM usage_events "
                              "ORDER BY id DESC LIMIT 1")
                other.commit()
            finally:
                other.close()
            wrote.append(True)
        real(conn, table, rows)

    monkeypatch.setattr(copy_mod, "_write", meanwhile)
    before = sqlite_rows(work)
    report = await copy(work, tmp_path / "snapshot.db")
    assert wrote and report.events == len(before["usage_events"])
    assert sqlite_rows(tmp_path / "snapshot.db")["usage_events"] == before["usage_events"]
    assert len(sqlite_rows(work)["usage_events"]) == report.events + 1


async def _cli(fn: Callable[[], int]) -> int:
    """The command line runs its own event loop: off this test's."""
    return await asyncio.to_thread(fn)


async def test_the_command_line_end_to_end(source_db: Path, postgres_dsn: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUDGETEER_USER", OWNER)
    pg = with_password(postgres_dsn)
    back = tmp_path / "back.db"

    code = await _cli(lambda: main(["ledger", "copy", str(source_db), pg]))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "usage_events" in out and "events, $" in out and "postgresql://postgres:***@" in out
    code = await _cli(lambda: main(["ledger", "copy", pg, str(back), "--json"]))
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert report["events"] == report["tables"]["usage_events"] > 5000
    assert report["from"].startswith("postgresql://postgres:***@")
    code = await _cli(lambda: main(["audit", "verify", "--db", str(back)]))
    out, err = capsys.readouterr()
    assert code == 0 and "The audit journal is intact" in out, err
    code = await _cli(lambda: main(["audit", "verify", "--db", pg]))
    out, err = capsys.readouterr()
    assert code == 0 and "The audit journal is intact" in out, err

    for argv, field in ((["ledger", "copy", str(source_db), pg], "TO: "),
                        (["ledger", "copy", str(tmp_path / "missing.db"), str(tmp_path / "x.db")], "FROM: "),
                        (["ledger", "copy", str(source_db), ""], "TO: "),
                        (["ledger", "copy", str(source_db), "postgresql://postgres:" + PASSWORD + "@127.0.0.1:1/x"],
                         "TO: ")):
        code = await _cli(lambda argv=argv: main(argv))  # type: ignore[misc]
        out, err = capsys.readouterr()
        assert code == 2, (argv, err)
        assert err.startswith("budgeteer: " + field) and err.count("\n") == 1, err
        assert "Traceback" not in err and PASSWORD not in out + err
    assert not (tmp_path / "x.db").exists()


async def test_the_journal_key_travels_to_another_vault_and_not_elsewhere(source_db: Path, tmp_path: Path) -> None:
    """SQLite to SQLite in another folder: the target's vault (vault.json beside it) gets the
    key, and verifies; without it the copy's keyed entries would not verify."""
    target = tmp_path / "far" / "away.db"
    await copy(source_db, target)
    assert (target.parent / "vault.json").exists()
    assert (await verify(target)).ok
    (target.parent / "vault.json").unlink()
    unverified = await verify(target)  # the chain is keyed: without its key it does not verify, and says why
    assert not unverified.ok and "audit key import" in unverified.problem


async def test_a_locked_vault_or_another_key_for_the_ledger_is_refused(source_db: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from engine import audit
    from engine.vault import Vault

    monkeypatch.delenv("BUDGETEER_VAULT_PASSPHRASE")  # the source's vault holds the key: it must be read
    with pytest.raises(BadInput, match=r"^vault: holds the audit journal's key and is locked"):
        await copy(source_db, tmp_path / "locked" / "copy.db")
    assert not (tmp_path / "locked" / "copy.db").exists()
    monkeypatch.setenv("BUDGETEER_VAULT_PASSPHRASE", PASSPHRASE)
    async with await Engine.open(source_db, clock=FrozenClock(NOW_MS)) as engine:
        ledger_id = (await engine.audit_anchor()).ledger  # type: ignore[union-attr]
    other = audit.ChainKey(b"k" * 32, 1)
    Vault(tmp_path / "taken" / "vault.json").backend.set(audit.key_ref(ledger_id), other.to_secret(), NOW_MS)
    with pytest.raises(BadInput, match=r"^TO: the vault .* already holds another audit journal key"):
        await copy(source_db, tmp_path / "taken" / "copy.db")
    assert not (tmp_path / "taken" / "copy.db").exists()


@pytest.fixture
async def empty_source(tmp_path: Path) -> AsyncIterator[Path]:
    path = tmp_path / "empty.db"
    async with await Engine.open(path, clock=FrozenClock(NOW_MS)):
        pass
    yield path


async def test_an_empty_ledger_copies_its_id(empty_source: Path, tmp_path: Path) -> None:
    report = await copy(empty_source, tmp_path / "copy.db")
    assert report.events == 0 and report.tables["ledger_identity"] == 1
    assert (await verify(tmp_path / "copy.db")).ok
