"""The command line as scripts use it: exit codes, one-sentence errors, JSON output."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import NOW_MS
from tui.cli import main

NOW_ISO = "2026-11-18T12:00:00Z"


@pytest.fixture(autouse=True)
def _frozen_now(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUDGETEER_NOW", NOW_ISO)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _events_file(path: Path, n: int = 20, bad: bool = False) -> Path:
    lines = []
    for i in range(n):
        lines.append(json.dumps({"ts_ms": NOW_MS - i * 60_000, "request_id": f"cli-{i}", "provider": "openai",
                                 "model": "gpt-4o-mini" if i % 2 else "gpt-4o", "team": ("ml", "search")[i % 2],
                                 "principal": f"user{i % 3}", "input_tokens": 1000, "output_tokens": 100}))
    if bad:
        lines.insert(3, json.dumps({"ts_ms": NOW_MS, "request_id": "bad", "provider": "openai", "model": "gpt-4o",
                                    "input_tokens": "-3"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_import_usage_and_export_work_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "l.db")
    code, out, _ = run(capsys, "--db", db, "import", str(_events_file(tmp_path / "e.jsonl")))
    assert code == 0 and "Imported 20 events" in out
    code, out, _ = run(capsys, "usage", "--db", db, "--period", "24h", "--by", "team", "--json")
    report = json.loads(out)
    assert code == 0
    assert report["totals"]["requests"] == 20
    # 10 x gpt-4o (1,000 x 2.5e9 + 100 x 1e10 fd = 3.5e12) + 10 x gpt-4o-mini (1,000 x 1.5e8 + 100 x 6e8 = 2.1e11)
    assert report["totals"]["cost_nanos"] == 10 * 3_500_000 + 10 * 210_000
    assert report["totals"]["cost_usd"] == "0.0371"
    assert {r["team"] for r in report["rows"]} == {"ml", "search"}
    code, out, _ = run(capsys, "--db", db, "usage", "--period", "7d")
    assert code == 0 and "gpt-4o" in out and "$0.04" in out
    target = tmp_path / "out.csv"
    code, _, err = run(capsys, "--db", db, "export", "--period", "30d", "--out", str(target))
    assert code == 0 and "Exported 20 events" in err
    assert target.read_text().count("\n") == 21
    code, out, _ = run(capsys, "--db", db, "export", "--format", "jsonl")
    assert code == 0 and len(out.splitlines()) == 20


def test_usage_by_agent_over_a_range_of_days(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "l.db")
    events = tmp_path / "e.jsonl"
    events.write_text("\n".join(json.dumps({
        "ts_ms": NOW_MS - i * 60_000, "request_id": f"a-{i}", "provider": "openai", "model": "gpt-4o",
        "agent": ("research", "")[i % 2], "session": f"s{i % 3}", "input_tokens": 10, "output_tokens": 1})
        for i in range(6)) + "\n")
    assert run(capsys, "--db", db, "import", str(events))[0] == 0
    code, out, _ = run(capsys, "--db", db, "usage", "--period", "2026-11-18..2026-11-18", "--by", "agent")
    assert code == 0, out
    assert out.startswith("Usage, 2026-11-18..2026-11-18 (2026-11-18T00:00 to 2026-11-19T00:00 UTC), by agent")
    assert re.search(r"^research\s+3\s", out, re.M) and re.search(r"^\(none\)\s+3\s", out, re.M)
    code, out, _ = run(capsys, "--db", db, "usage", "--period", "2026-11-18..2026-11-01")
    assert code == 2 and not out


def test_bad_lines_exit_2_and_are_listed_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "l.db")
    path = _events_file(tmp_path / "e.jsonl", bad=True)
    code, out, err = run(capsys, "--db", db, "import", "--strict", str(path))
    assert code == 2
    assert "line 4: input_tokens: must not be negative" in err
    assert "nothing was imported" in err
    code, out, err = run(capsys, "--db", db, "import", str(path))
    assert code == 2 and "Imported 20 events" in out and "1 of 21 lines were bad and skipped" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["usage", "--period", "fortnight"], "period: must be a number and a unit"),
        (["import", "/no/such/file.jsonl"], "does not exist"),
        (["export", "--period", "7d"], "--format is required"),
        (["pricing", "show", "acme-llm-9000"], "model: no price for 'acme-llm-9000'"),
        (["pricing", "import", "/no/such.json"], "does not exist"),
        (["pricing", "import", "--effective-from", "2026-13-45", "x.json"], "is not a date"),
        (["demo", "--days", "0"], "--days must be between 1 and 400"),
    ],
)
def test_bad_input_exits_2_with_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            argv: list[str], message: str) -> None:
    code, _, err = run(capsys, "--db", str(tmp_path / "l.db"), *argv)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["usage", "--by", "colour"], ["frobnicate"], ["export", "--format", "xml"]])
def test_bad_usage_exits_2_naming_the_argument(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and err.startswith("budgeteer: ") and len(err.strip().splitlines()) == 1


def test_a_newer_ledger_is_a_failure_with_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import sqlite3

    db = tmp_path / "l.db"
    assert run(capsys, "--db", str(db), "usage")[0] == 0
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    code, _, err = run(capsys, "--db", str(db), "usage")
    assert code == 1 and "newer than this Budgeteer understands" in err


def test_pricing_import_applies_from_its_date_and_per_workspace(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "l.db")
    table = tmp_path / "prices.json"
    table.write_text(json.dumps({"gpt-4o": {"input_cost_per_token": 5e-06, "output_cost_per_token": 2e-05,
                                            "litellm_provider": "openai", "mode": "chat"}}))
    code, out, _ = run(capsys, "--db", db, "pricing", "import", str(table), "--effective-from", "2026-11-18")
    assert code == 0 and "Stored 1 prices" in out
    code, out, _ = run(capsys, "--db", db, "pricing", "import", str(table), "--effective-from", "2026-11-01",
                       "--workspace", "vip", "--json")
    assert json.loads(out)["stored"] == 1
    events = tmp_path / "e.jsonl"
    events.write_text("\n".join(json.dumps(
        {"ts": ts, "request_id": rid, "provider": "openai", "model": "gpt-4o", "workspace": ws,
         "input_tokens": 1000, "output_tokens": 0}) for rid, ts, ws in [
        ("old", "2026-11-17T23:59:59Z", "default"), ("new", "2026-11-18T00:00:00Z", "default"),
        ("vip", "2026-11-05T00:00:00Z", "vip")]) + "\n")
    assert run(capsys, "--db", db, "import", str(events))[0] == 0
    code, out, _ = run(capsys, "--db", db, "export", "--format", "jsonl")
    costs = {json.loads(line)["request_id"]: json.loads(line)["cost_nanos"] for line in out.splitlines()}
    assert costs == {"old": 2_500_000, "new": 5_000_000, "vip": 5_000_000}
    code, out, _ = run(capsys, "--db", db, "pricing", "show", "gpt-4o")
    assert code == 0 and "$5.00" in out and "$20.00" in out
    assert "3 versions: initial, 2026-11-18, 2026-11-01 (vip)" in out
    code, out, _ = run(capsys, "--db", db, "pricing", "show", "gpt-4o", "--at", "2026-11-01", "--json")
    assert json.loads(out)["input"] == 2_500_000_000


def test_demo_refuses_to_overwrite_a_ledger_with_events(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "real.db")
    run(capsys, "--db", db, "import", str(_events_file(tmp_path / "e.jsonl")))
    code, _, err = run(capsys, "--db", db, "demo", "--days", "1")
    assert code == 2 and "already holds 20 events" in err
    code, out, _ = run(capsys, "--db", db, "demo", "--days", "1", "--replace")
    assert code == 0 and "Wrote a demo ledger of" in out


def test_demo_writes_a_deterministic_month_beside_the_default_ledger(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "demo", "--days", "2", "--seed", "5")
    assert code == 0
    demo_db = Path(os.environ["BUDGETEER_HOME"]) / "demo.db"
    assert demo_db.exists() and str(demo_db) in out
    first = json.loads(run(capsys, "--db", str(demo_db), "usage", "--period", "all", "--json")[1])
    assert run(capsys, "demo", "--days", "2", "--seed", "5")[0] == 0
    again = json.loads(run(capsys, "--db", str(demo_db), "usage", "--period", "all", "--json")[1])
    assert first == again and first["totals"]["requests"] > 10_000


def test_budgeteer_db_names_the_demo_ledger_as_db_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    chosen = tmp_path / "chosen" / "ledger.db"
    chosen.parent.mkdir()
    monkeypatch.setenv("BUDGETEER_DB", str(chosen))
    code, out, _ = run(capsys, "demo", "--days", "1")
    assert code == 0 and str(chosen) in out
    assert sorted(p.name for p in chosen.parent.iterdir() if p.suffix == ".db") == ["ledger.db"]  # no demo.db
    assert not (Path(os.environ["BUDGETEER_HOME"]) / "demo.db").exists()
    written = json.loads(run(capsys, "usage", "--period", "all", "--json")[1])["totals"]["requests"]
    assert written > 5_000
    # A ledger named by BUDGETEER_DB is as safe as one named by --db: not overwritten unless --replace.
    code, _, err = run(capsys, "demo", "--days", "1")
    assert code == 2 and f"BUDGETEER_DB {chosen} already holds {written:,} events" in err
    assert run(capsys, "demo", "--days", "1", "--seed", "9", "--replace")[0] == 0


def test_demo_open_opens_the_dashboard_on_the_new_ledger(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import tui.cli.dashboard

    opened: list[Path | None] = []
    monkeypatch.setattr(tui.cli.dashboard, "run_dashboard", lambda path, *rest: opened.append(path) or 0)
    code, _, _ = run(capsys, "demo", "--days", "1", "--open")
    assert code == 0
    assert opened == [Path(os.environ["BUDGETEER_HOME"]) / "demo.db"]


def test_the_installed_script_reports_errors_without_a_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "BUDGETEER_DB": str(tmp_path / "env.db")}
    done = subprocess.run([sys.executable, "-m", "tui.cli", "import", str(tmp_path / "nope.csv")],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == f"budgeteer: {tmp_path / 'nope.csv'} does not exist"
    done = subprocess.run([sys.executable, "-m", "tui.cli", "usage", "--json"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 0 and json.loads(done.stdout)["totals"]["requests"] == 0
    assert (tmp_path / "env.db").exists()  # BUDGETEER_DB chose the ledger


def test_python_dash_m_reports_a_gateway_flag_as_the_script_does(tmp_path: Path) -> None:
    # The gateway's command lived in a module that imported tui.cli back: under ``python -m
    # tui.cli`` that was a second copy of the module, whose UsageError the first did not catch
    # ("unexpected error: UsageError", exit 1). One package, one UsageError: exit 2 and the sentence.
    done = subprocess.run([sys.executable, "-m", "tui.cli", "--db", str(tmp_path / "l.db"), "gateway", "--port",
                           "70000"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == "budgeteer: --port must be between 1 and 65535 (got 70000)"


def test_policies_are_added_listed_edited_checked_and_removed(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "l.db")
    run(capsys, "--db", db, "import", str(_events_file(tmp_path / "e.jsonl")))
    code, out, _ = run(capsys, "--db", db, "policy", "add", "--scope", "team:ml", "--metric", "usd", "--window",
                       "day", "--hard", "$0.05", "--soft", "0.02", "--name", "ML daily", "--json")
    assert code == 0
    policy = json.loads(out)
    assert (policy["hard"], policy["soft"], policy["scope"]) == (50_000_000, 20_000_000, "team:ml")
    code, out, _ = run(capsys, "--db", db, "policy", "list", "--json")
    listed = json.loads(out)
    # ml had the 10 gpt-4o calls today: 10 x $0.0035
    assert listed[0]["id"] == policy["id"] and listed[0]["consumed"] == 35_000_000
    code, out, _ = run(capsys, "--db", db, "check", "--principal", "user0", "--team", "ml", "--model", "gpt-4o",
                       "--input-tokens", "1000", "--max-tokens", "1000", "--json")
    verdict = json.loads(out)
    assert verdict["decision"] == "allow_with_warning"  # $0.035 + $0.0125 passes the $0.02 soft limit only
    assert verdict["outcomes"][0]["projected"] == 35_000_000 + 12_500_000
    code, out, _ = run(capsys, "--db", db, "check", "--principal", "user0", "--team", "ml", "--model", "gpt-4o",
                       "--input-tokens", "1000", "--max-tokens", "3000")
    assert code == 0 and out.startswith("decision: block") and "would pass the hard limit" in out
    code, out, _ = run(capsys, "--db", db, "policy", "edit", policy["id"], "--hard", "1", "--mode", "dry_run")
    assert code == 0
    shown = json.loads(run(capsys, "--db", db, "policy", "show", policy["id"], "--json")[1])
    assert (shown["hard"], shown["soft"], shown["mode"], shown["name"]) == (1_000_000_000, 20_000_000, "dry_run",
                                                                             "ML daily")
    code, _, err = run(capsys, "--db", db, "policy", "edit", policy["id"], "--soft", "5")
    assert code == 2 and "soft: must not be above the hard limit" in err
    code, out, _ = run(capsys, "--db", db, "policy", "rm", policy["id"])
    assert code == 0 and json.loads(run(capsys, "--db", db, "policy", "list", "--json")[1]) == []
    code, _, err = run(capsys, "--db", db, "policy", "show", policy["id"])
    assert code == 2 and f"no policy '{policy['id']}'" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--scope", "planet:earth", "--metric", "usd", "--window", "day", "--hard", "5"],
         "scope: has an unknown kind"),
        (["--scope", "global", "--metric", "usd", "--window", "day", "--hard", "-5"], "hard: must not be negative"),
        (["--scope", "global", "--metric", "usd", "--window", "day", "--hard", "5", "--tz", "Nowhere/Place"],
         "tz: is not an IANA time zone"),
        (["--scope", "global", "--metric", "usd", "--window", "day", "--hard", "5", "--mode", "loose"],
         "mode: must be one of"),
        (["--scope", "global", "--metric", "usd", "--window", "day", "--hard", "5", "--soft", "6"],
         "soft: must not be above the hard limit"),
    ],
)
def test_policy_add_refuses_bad_values_naming_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       argv: list[str], message: str) -> None:
    code, _, err = run(capsys, "--db", str(tmp_path / "l.db"), "policy", "add", *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_alerts_are_listed_and_acknowledged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "l.db")
    run(capsys, "--db", db, "policy", "add", "--scope", "team:ml", "--metric", "requests", "--window", "day",
        "--hard", "10")
    run(capsys, "--db", db, "import", str(_events_file(tmp_path / "e.jsonl")))  # 10 ml requests today
    code, out, _ = run(capsys, "--db", db, "alerts", "list", "--json")
    alerts = json.loads(out)
    assert code == 0 and [a["threshold"] for a in alerts] == [100]  # past all three at once: the highest
    code, out, _ = run(capsys, "--db", db, "alerts", "ack", str(alerts[0]["id"]))
    assert code == 0 and "Acknowledged alert" in out
    assert len(json.loads(run(capsys, "--db", db, "alerts", "list", "--json")[1])) == 0
    assert len(json.loads(run(capsys, "--db", db, "alerts", "list", "--all", "--json")[1])) == 1
    code, _, err = run(capsys, "--db", db, "alerts", "ack", "999")
    assert code == 2 and "id: no alert 999" in err


def test_an_unknown_theme_is_refused_with_the_choices(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run(capsys, "--db", str(tmp_path / "l.db"), "--theme", "ansi-purple")
    assert code == 2 and "--theme: unknown theme 'ansi-purple'" in err and "ansi-light" in err
    monkeypatch.setenv("BUDGETEER_THEME", "nope")
    code, _, err = run(capsys, "screenshots", "--out", str(tmp_path / "shots"))
    assert code == 2 and "unknown theme 'nope'" in err and not (tmp_path / "shots").exists()


def test_approvals_tokens_and_the_audit_journal_from_the_command_line(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = str(tmp_path / "l.db")
    code, out, _ = run(capsys, "--db", db, "policy", "add", "--scope", "team:ml", "--metric", "usd", "--window",
                       "day", "--hard", "1", "--action", "approval_required", "--json")
    policy_id = json.loads(out)["id"]
    monkeypatch.setenv("BUDGETEER_USER", "alice")
    code, out, _ = run(capsys, "--db", db, "approvals", "request", "--policy", policy_id, "--amount", "5",
                       "--ttl", "2h", "--reason", "eval run")
    assert code == 0 and "Opened ovr_" in out
    request_id = out.split()[1]
    code, _, err = run(capsys, "--db", db, "approvals", "approve", request_id)
    assert code == 1 and "alice cannot approve their own request" in err
    monkeypatch.setenv("BUDGETEER_USER", "bob")
    code, out, _ = run(capsys, "--db", db, "approvals", "approve", request_id, "--amount", "3")
    assert code == 0 and "alice may spend $3.00" in out
    code, _, err = run(capsys, "--db", db, "approvals", "deny", request_id, "--reason", "late")
    assert code == 1 and "already approved by bob" in err
    code, out, _ = run(capsys, "--db", db, "token", "create", "--name", "ci", "--principal", "alice", "--rpm", "60")
    secret = out.split()[-1]
    assert code == 0 and secret.startswith("bgt_")
    assert "; 60 requests a minute, no token limit." in out
    code, out, _ = run(capsys, "--db", db, "token", "list")
    assert code == 0 and secret not in out and secret[:12] + "…" in out
    code, out, _ = run(capsys, "--db", db, "audit", "list", "--json")
    assert code == 0 and secret not in out
    assert [e["action"] for e in json.loads(out)] == ["token.create", "override.approve", "override.request",
                                                       "policy.add"]
    code, out, _ = run(capsys, "--db", db, "audit", "list")
    assert code == 0 and "status pending→approved, granted -→$3.00" in out  # dollars, not nano-dollars
    assert "created: amount $5.00" in out and "created: hard $1.00" in out
    code, out, _ = run(capsys, "--db", db, "audit", "verify")
    assert code == 0 and "intact: 4 entries" in out
    import sqlite3

    conn = sqlite3.connect(db)
    conn.executescript("DROP TRIGGER audit_journal_no_update; DROP TRIGGER audit_journal_no_delete;")
    conn.execute("UPDATE audit_journal SET actor = 'mallory' WHERE id = 2")
    conn.commit()
    conn.close()
    code, _, err = run(capsys, "--db", db, "audit", "verify")
    assert code == 1 and "entry 2 was edited" in err


@pytest.mark.parametrize(("flag", "value"), [("--sync-interval", "-1"), ("--sync-interval", "nan"),
                                             ("--port", "0"), ("--max-body", "10"), ("--header-timeout", "0"),
                                             ("--keep-alive", "nan"), ("--max-headers", "1"),
                                             ("--max-header-bytes", "10")])
def test_gateway_refuses_a_bad_setting_by_name_before_serving(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              flag: str, value: str) -> None:
    code, out, err = run(capsys, "--db", str(tmp_path / "l.db"), "gateway", flag, value)
    assert code == 2 and flag in err and "Traceback" not in err and not out
