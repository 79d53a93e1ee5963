"""Who is acting (issue 20): on PostgreSQL, the database role the operator connects as
(``session_user``), whatever ``BUDGETEER_USER`` says; on SQLite, ``BUDGETEER_USER`` (else the
login name). Real roles on a real server: CREATE ROLE ... LOGIN, connected to as
``postgresql://ROLE@127.0.0.1:PORT/DB`` (trust authentication on the loopback)."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import openai
import pytest

from engine.budgets import build_policy
from engine.clock import FrozenClock
from engine.engine import CallRequest, Engine
from engine.integrations.gateway import create_app
from tests.asgi_servers import FakeOpenAI, serve
from tests.conftest import event
from tui.cli import main

POLICY = ["policy", "add", "--scope", "team:ml", "--metric", "usd", "--window", "day", "--hard", "1", "--json"]




def _admin(dsn: str, *statements: str) -> None:
    """Run statements as the superuser of ``dsn`` (the fixture's database: postgres@...)."""
    import asyncpg  # type: ignore[import-untyped]  # only engine.ledger imports the driver; tests may

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


def as_role(dsn: str, role: str) -> str:
    """``dsn`` connected to as ``role`` instead (no password: trust on the loopback)."""
    parts = urlsplit(dsn)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{role}@{host}"))


@dataclass(frozen=True)
class Roles:
    """Three login roles of this test's own (roles are the cluster's: a suffix keeps tests apart),
    each granted what the README's "Who is acting" gives an operator, on a ledger the fixture's
    superuser created."""

    alice: str
    vera: str
    mallory: str
    dsn: str

    def dsn_of(self, role: str) -> str:
        return as_role(self.dsn, role)


@pytest.fixture
def roles(postgres_dsn: str) -> Iterator[Roles]:
    suffix = uuid.uuid4().hex[:6]
    names = Roles(f"alice_{suffix}", f"vera_{suffix}", f"mallory_{suffix}", postgres_dsn)
    people = (names.alice, names.vera, names.mallory)
    asyncio.run(_create_ledger(postgres_dsn))
    _admin(postgres_dsn, *(f"CREATE ROLE {r} LOGIN" for r in people),
           *(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {r}" for r in people),
           *(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {r}" for r in people))
    yield names
    _admin(postgres_dsn, *(f"DROP OWNED BY {r}" for r in people), *(f"DROP ROLE {r}" for r in people))


async def _create_ledger(dsn: str) -> None:
    async with await Engine.open(dsn):  # the schema, made by the database's owner
        pass


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _journal(capsys: pytest.CaptureFixture[str], db: str) -> list[tuple[str, str]]:
    code, out, err = run(capsys, "--db", db, "audit", "list", "--json")
    assert code == 0, err
    return [(e["actor"], e["action"]) for e in reversed(json.loads(out))]


def test_on_postgresql_the_journal_names_the_role_connected_as_whatever_budgeteer_user_says(
        roles: Roles, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    alice = roles.dsn_of(roles.alice)
    code, _, err = run(capsys, "--db", alice, "member", "set", roles.alice, "owner")
    assert code == 0 and err == ""
    monkeypatch.setenv("BUDGETEER_USER", roles.mallory)
    code, out, err = run(capsys, "--db", alice, *POLICY)
    assert code == 0, err
    assert err == (f"budgeteer: warning: BUDGETEER_USER={roles.mallory} is ignored on a PostgreSQL ledger: you act "
                   f"as {roles.alice}, the database role you connect as\n")
    policy = json.loads(out)
    assert policy["created_by"] == roles.alice
    monkeypatch.setenv("BUDGETEER_USER", roles.alice)  # the role's own name: nothing to say
    code, out, err = run(capsys, "--db", alice, "member", "list")
    assert code == 0 and err == "" and f"You are {roles.alice} (owner)." in out
    monkeypatch.delenv("BUDGETEER_USER")
    monkeypatch.setenv("BUDGETEER_ACTOR", roles.mallory)
    code, _, err = run(capsys, "--db", alice, "policy", "edit", policy["id"], "--hard", "2")
    assert code == 0 and f"BUDGETEER_ACTOR={roles.mallory} is ignored" in err
    assert _journal(capsys, alice) == [(roles.alice, "member.set"), (roles.alice, "policy.add"),
                                       (roles.alice, "policy.edit")]


def test_a_viewer_role_cannot_change_a_policy_even_claiming_to_be_an_owner(
        roles: Roles, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    alice, vera = roles.dsn_of(roles.alice), roles.dsn_of(roles.vera)
    assert run(capsys, "--db", alice, "member", "set", roles.alice, "owner")[0] == 0
    assert run(capsys, "--db", alice, "member", "set", roles.vera, "viewer")[0] == 0
    code, out, err = run(capsys, "--db", vera, *POLICY)
    assert (code, out) == (1, "")
    assert err == f"budgeteer: {roles.vera} (viewer) lacks the edit_policies permission\n"
    monkeypatch.setenv("BUDGETEER_USER", roles.alice)  # on SQLite this would make vera the owner
    code, out, err = run(capsys, "--db", vera, *POLICY)
    assert (code, out) == (1, "")
    assert err.splitlines()[-1] == f"budgeteer: {roles.vera} (viewer) lacks the edit_policies permission"
    code, out, _ = run(capsys, "--db", vera, "policy", "list", "--json")  # reading is a viewer's right
    assert code == 0 and json.loads(out) == []
    # A role that is not a member is refused as itself, not as whoever it claims to be.
    code, _, err = run(capsys, "--db", roles.dsn_of(roles.mallory), *POLICY)
    assert code == 1 and err.endswith(f"budgeteer: {roles.mallory} (not a member) lacks the edit_policies "
                                      "permission\n")
    monkeypatch.delenv("BUDGETEER_USER")
    assert _journal(capsys, alice) == [(roles.alice, "member.set"), (roles.alice, "member.set")]


def test_budgeteer_user_still_names_who_acts_on_sqlite(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    db = str(tmp_path / "l.db")
    monkeypatch.setenv("BUDGETEER_USER", "mallory")
    code, out, err = run(capsys, "--db", db, *POLICY)
    assert code == 0 and err == "" and json.loads(out)["created_by"] == "mallory"
    monkeypatch.setenv("BUDGETEER_USER", "olivia")
    assert run(capsys, "--db", db, "member", "set", "olivia", "owner")[0] == 0
    assert run(capsys, "--db", db, "member", "set", "vera", "viewer") == (0, "vera is now viewer.\n", "")  # no roles
    monkeypatch.setenv("BUDGETEER_USER", "vera")
    code, _, err = run(capsys, "--db", db, *POLICY)
    assert code == 1 and err == "budgeteer: vera (viewer) lacks the edit_policies permission\n"
    monkeypatch.setenv("BUDGETEER_USER", "olivia")  # a file cannot tell who opens it: a courtesy, not a lock
    assert run(capsys, "--db", db, *POLICY)[0] == 0
    assert _journal(capsys, db) == [("mallory", "policy.add"), ("olivia", "member.set"), ("olivia", "member.set"),
                                    ("olivia", "policy.add")]


def test_the_first_owner_of_a_postgresql_ledger_is_the_role_that_adds_it(
        roles: Roles, capsys: pytest.CaptureFixture[str]) -> None:
    alice = roles.dsn_of(roles.alice)
    code, out, err = run(capsys, "--db", alice, "member", "list")
    assert code == 0 and f"Add the first owner with: budgeteer member set {roles.alice} owner" in out
    code, _, err = run(capsys, "--db", alice, "member", "set", roles.vera, "owner")
    assert code == 2
    assert err == (f"budgeteer: user: the first owner must be you, {roles.alice} (the database role you connect "
                   f"as): you could not act as {roles.vera} afterwards; add yourself first, then {roles.vera}\n")
    code, _, err = run(capsys, "--db", alice, "member", "set", roles.alice, "viewer")
    assert code == 2 and "the first member must be an owner" in err
    assert run(capsys, "--db", alice, "member", "set", roles.alice, "owner")[0] == 0
    code, _, err = run(capsys, "--db", alice, "member", "set", roles.vera, "owner")  # then anyone, as on SQLite
    assert code == 0 and err == ""
    code, out, err = run(capsys, "--db", alice, "member", "set", f"vear_{roles.alice}", "viewer")  # misspelt: said
    assert (code, out) == (0, f"vear_{roles.alice} is now viewer.\n")
    assert err == (f"budgeteer: warning: user: vear_{roles.alice} is no login role of this database, so nobody acts "
                   f"as vear_{roles.alice} until the role exists (CREATE ROLE \"vear_{roles.alice}\" LOGIN)\n")
    assert run(capsys, "--db", alice, "member", "rm", f"vear_{roles.alice}")[0] == 0
    code, out, _ = run(capsys, "--db", alice, "member", "list", "--json")
    assert {(m["user"], m["role"], m["added_by"]) for m in json.loads(out)} == {
        (roles.alice, "owner", roles.alice), (roles.vera, "owner", roles.alice)}


async def test_code_that_names_its_actor_keeps_it_on_postgresql(roles: Roles,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway acts as ``gateway`` (a token's principal is the call's, not the actor): the rule
    is about the operator's identity, which only the command line and the dashboard leave unnamed."""
    monkeypatch.setenv("BUDGETEER_USER", roles.mallory)
    async with await Engine.open(roles.dsn_of(roles.alice), actor="gateway") as engine:
        assert (engine.actor, engine.identity_notice) == ("gateway", None)
    async with await Engine.open(roles.dsn_of(roles.alice)) as engine:
        assert engine.actor == roles.alice
        assert engine.identity_notice is not None and roles.mallory in engine.identity_notice


# ---- the README's grants, as written there


def _readme_grants() -> str:
    """The SQL block of the README's "Who is acting"."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("#### Who is acting"):]
    return section[section.index("```sql") + len("```sql"):section.index("```", section.index("```sql") + 6)]


def _grants_for(sql: str, *, people: str, viewer: str, gateway: str) -> list[str]:
    """The README's statements, its example roles (alice, olga; vera; gateway) replaced by this test's."""
    statements = [s.strip() for s in re.sub(r"--[^\n]*", "", sql).split(";") if s.strip()]
    names = {" TO alice, olga": f" TO {people}", " TO vera": f" TO {viewer}", " TO gateway": f" TO {gateway}"}
    out = []
    for statement in statements:
        [grantee] = [k for k in names if statement.endswith(k)]
        out.append(statement.replace(grantee, names[grantee]))
    return out


def _refused(dsn: str, statement: str) -> str:
    import asyncpg

    async def run() -> str:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(statement)
        except asyncpg.InsufficientPrivilegeError as exc:
            return str(exc)
        finally:
            await conn.close()
        return "done"

    return asyncio.run(run())


def test_a_gateway_role_with_the_readme_grants_governs_calls_and_can_change_no_policy(
        postgres_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    suffix = uuid.uuid4().hex[:6]
    gateway, person, viewer = f"gw_{suffix}", f"olga_{suffix}", f"vera_{suffix}"
    fake = FakeOpenAI()

    async def prepare(url: str) -> str:
        async with await Engine.open(postgres_dsn) as engine:  # the owner (here the fixture's superuser)
            await engine.add_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="100"))
            await engine.add_policy(build_policy(scope="principal:q", metric="usd", window="day", hard="0.000001",
                                                 action="approval_required"))
            await engine.add_provider(name="fake", kind="openai", base_url=f"{url}/v1", models=["gpt-4o-mini"])
            _, secret = await engine.create_token(name="t", principal="p", team="ml")
            _, other = await engine.create_token(name="q", principal="q", team="ml")
            return f"{secret} {other}"

    _admin(postgres_dsn, *(f"CREATE ROLE {r} LOGIN" for r in (gateway, person, viewer)))
    try:
        with serve(fake.app()) as url:
            secret, other = asyncio.run(prepare(url)).split()
            _admin(postgres_dsn, *_grants_for(_readme_grants(), people=person, viewer=viewer, gateway=gateway))
            with (serve(create_app(as_role(postgres_dsn, gateway), upstream_timeout=5.0)) as base,
                  openai.OpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=0) as client,
                  openai.OpenAI(base_url=f"{base}/v1", api_key=other, max_retries=0) as asker):
                reply = client.chat.completions.create(model="gpt-4o-mini",
                                                       messages=[{"role": "user", "content": "hi"}])
                assert reply.choices[0].message.content == FakeOpenAI.REPLY
                stream = client.chat.completions.create(model="gpt-4o-mini", stream=True,
                                                        messages=[{"role": "user", "content": "hi"}])
                assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == FakeOpenAI.REPLY
                with pytest.raises(openai.APIStatusError) as refused:
                    asker.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
                assert refused.value.status_code == 402 and "override request" in refused.value.message

        async def after() -> tuple[int, int, int, list[bool]]:
            async with await Engine.open(postgres_dsn) as engine:
                events = [e async for e in engine.iter_events(0, engine.now_ms() + 60_000)]
                return (len(events), await engine.open_holds(), len(await engine.override_requests()),
                        [t.last_used_ms is not None for t in await engine.tokens()])

        assert asyncio.run(after()) == (3, 0, 1, [True, True])
        # Its login cannot change what decides a call, nor write the journal, even past Budgeteer.
        as_gateway = as_role(postgres_dsn, gateway)
        for statement in ("UPDATE policies SET deleted = 1", "DELETE FROM members",
                          "UPDATE api_tokens SET revoked_ms = NULL",
                          "INSERT INTO audit_journal (id, ts_ms, actor, action, subject, prev_hash, hash) "
                          "VALUES (999, 0, 'x', 'x', 'x', 'x', 'x')"):
            assert _refused(as_gateway, statement).startswith("permission denied for table"), statement
        # Through Budgeteer, a role missing a grant is told so in one sentence.
        code, out, err = run(capsys, "--db", as_gateway, *POLICY)
        assert (code, out) == (1, "")
        assert err.startswith(f"budgeteer: the database role {gateway} lacks a privilege the ledger needs "
                              "(permission denied for table ")
        # A person with the people's grants works as the matrix says (a single-user ledger: anything).
        code, out, err = run(capsys, "--db", as_role(postgres_dsn, person), *POLICY)
        assert code == 0, err
    finally:
        _admin(postgres_dsn, *(f"DROP OWNED BY {r}" for r in (gateway, person, viewer)),
               *(f"DROP ROLE {r}" for r in (gateway, person, viewer)))


def test_a_viewer_role_with_the_readme_grants_reads_everything_and_the_server_keeps_it_from_changing_anything(
        postgres_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    suffix = uuid.uuid4().hex[:6]
    owner, viewer = f"olivia_{suffix}", f"vera_{suffix}"
    _admin(postgres_dsn, *(f"CREATE ROLE {r} LOGIN" for r in (owner, viewer)))

    async def prepare() -> None:
        async with await Engine.open(as_role(postgres_dsn, owner)) as engine:  # a people's role, as the README
            await engine.set_member(owner, "owner")
            await engine.set_member(viewer, "viewer")
            await engine.add_policy(build_policy(scope="team:ml", metric="usd", window="day", hard="1",
                                                 thresholds=[50]))
            now = engine.now_ms()
            for n in range(3):  # $0.90 of $1: the 50 % alert is due
                await engine.record(event(n, ts_ms=now - 1000 + n, cost_nanos=300_000_000))
            await engine.create_token(name="ci", principal="p")
        # A hold left by a call of a day ago (a clock set back a day): the next transaction of any
        # process, the viewer's included, closes it as expired.
        async with await Engine.open(as_role(postgres_dsn, owner), clock=FrozenClock(now - 86_400_000)) as engine:
            authorized = await engine.authorize(CallRequest(principal="p", team="ml", model="gpt-4o-mini",
                                                            input_tokens=10, max_tokens=10))
            assert authorized.allowed and await engine.open_holds() == 1

    try:
        asyncio.run(_create_ledger(postgres_dsn))
        _admin(postgres_dsn, *_grants_for(_readme_grants(), people=owner, viewer=viewer, gateway=owner))
        asyncio.run(prepare())
        as_viewer = as_role(postgres_dsn, viewer)
        for argv in (["policy", "list"], ["member", "list"], ["alerts", "list"], ["token", "list"],
                     ["approvals", "list"], ["usage"], ["audit", "list"], ["audit", "verify"]):
            code, out, err = run(capsys, "--db", as_viewer, *argv)
            assert code == 0 and err == "", (argv, err)
            assert argv != ["alerts", "list"] or "50%" in out, out
        code, _, err = run(capsys, "--db", as_viewer, *POLICY)
        assert code == 1 and err == f"budgeteer: {viewer} (viewer) lacks the edit_policies permission\n"
        async def holds() -> int:
            async with await Engine.open(as_role(postgres_dsn, owner)) as engine:
                return await engine.open_holds()

        assert asyncio.run(holds()) == 0
        for statement in ("UPDATE policies SET deleted = 1", f"UPDATE members SET role = 'owner' WHERE \"user\" = "
                          f"'{viewer}'", "UPDATE api_tokens SET revoked_ms = 1", "DELETE FROM usage_events"):
            assert _refused(as_viewer, statement).startswith("permission denied for table"), statement
    finally:
        _admin(postgres_dsn, *(f"DROP OWNED BY {r}" for r in (owner, viewer)),
               *(f"DROP ROLE {r}" for r in (owner, viewer)))


async def test_the_dashboard_acts_as_the_role_and_says_once_that_budgeteer_user_is_ignored(
        roles: Roles, monkeypatch: pytest.MonkeyPatch) -> None:
    from tui.app import BudgeteerApp

    monkeypatch.setenv("BUDGETEER_USER", roles.mallory)
    app = BudgeteerApp(db_path=roles.dsn_of(roles.alice), refresh_seconds=3600)
    async with app.run_test(size=(120, 40)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause(0.05)
        assert app.engine is not None and (app.actor, app.engine.actor) == (roles.alice, roles.alice)
        notes = [(str(n.title), str(n.message)) for n in app._notifications]
        assert notes.count(("Who is acting", f"BUDGETEER_USER={roles.mallory} is ignored on a PostgreSQL ledger: you "
                                             f"act as {roles.alice}, the database role you connect as")) == 1
        assert app.sub_title == roles.dsn_of(roles.alice)


def test_the_command_line_and_the_dashboard_never_name_their_actor() -> None:
    """They act as the operator: the engine decides who that is (the role on PostgreSQL), so no
    module of tui passes ``actor=`` to ``Engine.open``, sets ``engine.actor`` or asks
    ``local_identity()``, whose BUDGETEER_USER PostgreSQL does not honour."""
    import ast

    found = []
    for path in sorted((Path(__file__).resolve().parent.parent / "tui").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "open"
                    and any(k.arg == "actor" for k in node.keywords)):
                found.append(f"{path.name}:{node.lineno} Engine.open(actor=...)")
            if isinstance(node, ast.Name | ast.alias) and getattr(node, "id", getattr(node, "name", "")) in (
                    "local_identity", "claimed_identity"):
                found.append(f"{path.name}:{node.lineno} local_identity")
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Attribute) and t.attr == "actor"
                                                    and not (isinstance(t.value, ast.Name) and t.value.id == "self")
                                                    for t in node.targets):
                found.append(f"{path.name}:{node.lineno} engine.actor = ...")
    assert found == []
