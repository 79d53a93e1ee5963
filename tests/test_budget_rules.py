"""The pure budget rules: scopes, calendar and rolling windows across DST, month ends,
leap days and quarters, validation messages, the hierarchy and the modes."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from engine.budgets import (
    Policy,
    Window,
    applicable,
    build_policy,
    decide,
    edited_policy,
    outcome,
    parse_scope,
    parse_window,
    window_bounds,
)
from engine.clock import DAY_MS, HOUR_MS, MINUTE_MS
from engine.models import FieldError


def ms(text: str, tz: str = "UTC") -> int:
    """Wall-clock time in a zone as UTC epoch ms."""
    local = datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz))
    return int(local.timestamp() * 1000)


def iso(ms_value: int, tz: str) -> str:
    return datetime.fromtimestamp(ms_value / 1000, ZoneInfo(tz)).isoformat()


# ------------------------------------------------------------------ windows


@pytest.mark.parametrize(
    ("tz", "now", "start", "end", "hours"),
    [
        # New York springs forward on 2026-03-08 at 02:00: that day has 23 hours.
        ("America/New_York", "2026-03-08T12:00", "2026-03-08T00:00:00-05:00", "2026-03-09T00:00:00-04:00", 23),
        # and falls back on 2026-11-01: 25 hours.
        ("America/New_York", "2026-11-01T23:30", "2026-11-01T00:00:00-04:00", "2026-11-02T00:00:00-05:00", 25),
        # Paris springs forward on 2026-03-29 and falls back on 2026-10-25.
        ("Europe/Paris", "2026-03-29T03:30", "2026-03-29T00:00:00+01:00", "2026-03-30T00:00:00+02:00", 23),
        ("Europe/Paris", "2026-10-25T01:00", "2026-10-25T00:00:00+02:00", "2026-10-26T00:00:00+01:00", 25),
        ("UTC", "2026-06-15T00:00", "2026-06-15T00:00:00+00:00", "2026-06-16T00:00:00+00:00", 24),
    ],
)
def test_calendar_days_follow_the_wall_clock_across_dst(tz: str, now: str, start: str, end: str,
                                                       hours: int) -> None:
    lo, hi = window_bounds(Window("day", tz=tz), ms(now, tz))
    assert iso(lo, tz) == start
    assert iso(hi, tz) == end
    assert hi - lo == hours * HOUR_MS


def test_week_starts_on_monday_across_a_dst_change() -> None:
    tz = "Europe/Paris"
    lo, hi = window_bounds(Window("week", tz=tz), ms("2026-10-28T09:00", tz))  # a Wednesday
    assert iso(lo, tz) == "2026-10-26T00:00:00+01:00"
    lo, hi = window_bounds(Window("week", tz=tz), ms("2026-10-25T09:00", tz))  # the Sunday of the change
    assert iso(lo, tz) == "2026-10-19T00:00:00+02:00"
    assert iso(hi, tz) == "2026-10-26T00:00:00+01:00"
    assert hi - lo == 7 * DAY_MS + HOUR_MS


@pytest.mark.parametrize(
    ("now", "start", "end"),
    [
        ("2026-01-31T23:59", "2026-01-01T00:00:00+00:00", "2026-02-01T00:00:00+00:00"),
        ("2026-02-28T12:00", "2026-02-01T00:00:00+00:00", "2026-03-01T00:00:00+00:00"),
        ("2028-02-29T12:00", "2028-02-01T00:00:00+00:00", "2028-03-01T00:00:00+00:00"),  # a leap day
        ("2026-12-31T23:59", "2026-12-01T00:00:00+00:00", "2027-01-01T00:00:00+00:00"),
    ],
)
def test_months_end_where_the_calendar_says(now: str, start: str, end: str) -> None:
    lo, hi = window_bounds(Window("month"), ms(now))
    assert (iso(lo, "UTC"), iso(hi, "UTC")) == (start, end)


def test_a_leap_day_is_its_own_day() -> None:
    lo, hi = window_bounds(Window("day", tz="America/New_York"), ms("2028-02-29T18:00", "America/New_York"))
    assert iso(lo, "America/New_York") == "2028-02-29T00:00:00-05:00"
    assert iso(hi, "America/New_York") == "2028-03-01T00:00:00-05:00"


@pytest.mark.parametrize(
    ("now", "start", "end"),
    [
        ("2026-01-01T00:00", "2026-01-01T00:00:00-05:00", "2026-04-01T00:00:00-04:00"),
        ("2026-03-31T23:59", "2026-01-01T00:00:00-05:00", "2026-04-01T00:00:00-04:00"),
        ("2026-04-01T00:00", "2026-04-01T00:00:00-04:00", "2026-07-01T00:00:00-04:00"),
        ("2026-11-15T10:00", "2026-10-01T00:00:00-04:00", "2027-01-01T00:00:00-05:00"),
    ],
)
def test_quarters_start_in_january_april_july_and_october(now: str, start: str, end: str) -> None:
    tz = "America/New_York"
    lo, hi = window_bounds(Window("quarter", tz=tz), ms(now, tz))
    assert (iso(lo, tz), iso(hi, tz)) == (start, end)


def test_hours_align_to_the_zone_even_at_half_hour_offsets() -> None:
    tz = "Asia/Kolkata"  # UTC+05:30
    lo, hi = window_bounds(Window("hour", tz=tz), ms("2026-06-01T10:45", tz))
    assert iso(lo, tz) == "2026-06-01T10:00:00+05:30" and hi - lo == HOUR_MS
    lo, hi = window_bounds(Window("hour"), ms("2026-06-01T10:45"))
    assert iso(lo, "UTC") == "2026-06-01T10:00:00+00:00"


def test_rolling_windows_end_now_and_reach_back_their_span() -> None:
    now = ms("2026-06-01T10:45")
    assert window_bounds(parse_window("rolling:30m"), now) == (now - 30 * MINUTE_MS, now)
    assert window_bounds(parse_window("rolling:6h"), now) == (now - 6 * HOUR_MS, now)
    assert window_bounds(parse_window("rolling:7d"), now) == (now - 7 * DAY_MS, now)
    assert str(parse_window("rolling:90m")) == "rolling:90m"


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("kwargs", "field", "reason"),
    [
        ({"scope": "galaxy:ml"}, "scope", "unknown kind 'galaxy'"),
        ({"scope": "team:"}, "scope", "empty or malformed id"),
        ({"scope": "team:a+model:b+agent:c"}, "scope", "at most two parts"),
        ({"scope": "team:a+team:b"}, "scope", "names team twice"),
        ({"metric": "euros"}, "metric", "must be one of usd, tokens, requests"),
        ({"window": "fortnight"}, "window", "must be hour, day, week, month, quarter or rolling"),
        ({"window": "rolling:0h"}, "window", "longer than zero"),
        ({"tz": "Mars/Olympus_Mons"}, "tz", "is not an IANA time zone"),
        ({"mode": "strict"}, "mode", "must be one of enforced, dry_run, suggest"),
        ({"action": "explode"}, "action", "must be one of block, approval_required, downgrade"),
        ({"soft": "20", "hard": "10"}, "soft", "must not be above the hard limit"),
        ({"hard": "-5"}, "hard", "must not be negative"),
        ({"hard": "0"}, "hard", "must be above zero"),
        ({"hard": "1.0000000001"}, "hard", "more than 9 decimal places"),
        ({"metric": "tokens", "hard": "12.5"}, "hard", "whole number of tokens"),
        ({"thresholds": [0, 50]}, "thresholds", "from 1 to 1000"),
    ],
)
def test_validation_names_the_field_and_the_reason(kwargs: dict[str, object], field: str, reason: str) -> None:
    values: dict[str, object] = {"scope": "team:ml", "metric": "usd", "window": "month", "hard": "100"}
    values.update(kwargs)
    with pytest.raises(FieldError) as info:
        build_policy(**values)  # type: ignore[arg-type]
    assert info.value.field == field
    assert reason in info.value.reason


def test_a_valid_policy_keeps_exactly_what_was_asked() -> None:
    p = build_policy(scope="model:gpt-4o+team:ml", metric="usd", window="rolling:6h", hard="$12.50", soft="10",
                     mode="dry_run", action="approval_required", tz="Europe/Paris", actor="alice", now_ms=5)
    assert (p.hard, p.soft) == (12_500_000_000, 10_000_000_000)
    assert str(p.scope) == "model:gpt-4o+team:ml"
    assert p.thresholds == (50, 80, 100)
    assert (p.mode, p.action, p.window.tz, p.created_by) == ("dry_run", "approval_required", "Europe/Paris", "alice")
    assert Policy.from_json(p.to_json()) == p


def test_an_edit_changes_what_is_given_and_keeps_the_rest_and_the_creation() -> None:
    old = build_policy(scope="team:ml", metric="usd", window="month", hard="500", soft="400.25", name="ML",
                       tz="Europe/Paris", thresholds=[10, 90], mode="dry_run", actor="alice", now_ms=5)
    new = edited_policy(old, {"hard": "$600", "soft": None, "enabled": False}, actor="bob", now_ms=9)
    assert new == Policy(id=old.id, name="ML", scope=old.scope, metric="usd", window=old.window,
                         hard=600_000_000_000, soft=400_250_000_000, thresholds=(10, 90), mode="dry_run",
                         action="block", enabled=False, created_by="alice", created_ms=5, updated_by="bob",
                         updated_ms=9)
    assert edited_policy(old, {}, actor="alice", now_ms=5) == old


def test_an_edit_takes_empty_text_as_typed() -> None:
    old = build_policy(scope="team:ml", metric="usd", window="month", hard="500", soft="400", name="ML")
    new = edited_policy(old, {"soft": "", "name": ""})
    assert (new.soft, new.name) == (None, "team:ml usd per month")  # no soft limit; the default name
    with pytest.raises(FieldError) as info:
        edited_policy(old, {"scope": ""})
    assert info.value.field == "scope"


def test_a_new_metric_keeps_neither_limit() -> None:
    old = build_policy(scope="global", metric="usd", window="day", hard="500", soft="400")
    with pytest.raises(FieldError) as info:
        edited_policy(old, {"metric": "tokens"})  # $500 is no count of tokens
    assert info.value.field == "hard"
    new = edited_policy(old, {"metric": "tokens", "hard": "1,000,000"})
    assert (new.metric, new.hard, new.soft) == ("tokens", 1_000_000, None)


def test_an_edit_refuses_a_field_a_policy_does_not_have() -> None:
    old = build_policy(scope="global", metric="usd", window="day", hard="5")
    with pytest.raises(FieldError) as info:
        edited_policy(old, {"created_by": "mallory"})
    assert info.value.field == "created_by"


# ------------------------------------------------------------------ hierarchy and modes

CALL = {"workspace": "acme", "team": "ml", "principal": "alice", "token": "tok1", "provider": "openai",
        "model": "gpt-4o", "session": "", "agent": ""}
BOUNDS = (0, DAY_MS)


def _policy(scope: str, hard: str, **kw: object) -> Policy:
    return build_policy(scope=scope, metric="usd", window="day", hard=hard, policy_id=f"p-{scope}",
                        **kw)  # type: ignore[arg-type]


def test_every_level_that_matches_applies_and_others_do_not() -> None:
    policies = [_policy("global", "1000"), _policy("team:ml", "100"), _policy("principal:alice", "10"),
                _policy("team:search", "1"), _policy("model:gpt-4o+team:ml", "50"), _policy("provider:openai", "500"),
                _policy("token:tok1", "5"), _policy("principal:bob", "1")]
    got = {str(p.scope) for p in applicable(policies, CALL)}
    assert got == {"global", "team:ml", "principal:alice", "model:gpt-4o+team:ml", "provider:openai", "token:tok1"}
    disabled = build_policy(scope="global", metric="usd", window="day", hard="1", enabled=False)
    assert applicable([disabled], CALL) == []


def test_a_call_under_its_team_budget_but_over_its_principal_budget_is_blocked() -> None:
    team = _policy("team:ml", "100")
    person = _policy("principal:alice", "10")
    cost = 3_000_000_000  # $3
    evaluation = decide([outcome(team, 50_000_000_000, 0, cost, BOUNDS),
                         outcome(person, 8_000_000_000, 0, cost, BOUNDS)])
    assert evaluation.decision == "block"
    assert evaluation.deciding is not None and evaluation.deciding.policy is person
    assert [o.status for o in evaluation.outcomes] == ["ok", "over"]


def test_the_tightest_of_two_breaking_policies_decides() -> None:
    a = _policy("team:ml", "10")
    b = _policy("principal:alice", "10")
    evaluation = decide([outcome(a, 9_000_000_000, 0, 2_000_000_000, BOUNDS),
                         outcome(b, 9_500_000_000, 0, 2_000_000_000, BOUNDS)])
    assert evaluation.deciding is not None and evaluation.deciding.policy is b


@pytest.mark.parametrize(
    ("mode", "action", "decision"),
    [
        ("enforced", "block", "block"),
        ("enforced", "approval_required", "needs_approval"),
        ("enforced", "downgrade", "downgrade"),
        ("dry_run", "block", "would_block"),
        ("suggest", "block", "would_block"),
    ],
)
def test_each_mode_and_action_decides_as_documented(mode: str, action: str, decision: str) -> None:
    p = _policy("team:ml", "10", mode=mode, action=action)
    evaluation = decide([outcome(p, 9_000_000_000, 500_000_000, 1_000_000_000, BOUNDS)])
    assert evaluation.decision == decision
    assert evaluation.allowed == (decision == "would_block")


def test_a_soft_limit_warns_and_lets_the_call_go() -> None:
    p = _policy("team:ml", "10", soft="8")
    evaluation = decide([outcome(p, 7_500_000_000, 0, 1_000_000_000, BOUNDS)])
    assert evaluation.decision == "allow_with_warning" and evaluation.allowed
    assert "soft limit of $8.00" in evaluation.outcomes[0].message


def test_held_amounts_count_against_the_limit() -> None:
    p = _policy("team:ml", "10")
    assert outcome(p, 5_000_000_000, 4_000_000_000, 1_000_000_000, BOUNDS).status == "ok"  # exactly at the limit
    assert outcome(p, 5_000_000_000, 4_000_000_001, 1_000_000_000, BOUNDS).status == "over"


def test_scopes_print_back_as_typed_in_a_stable_order() -> None:
    assert str(parse_scope("team:ml+model:gpt-4o")) == "model:gpt-4o+team:ml"
    assert str(parse_scope("global")) == "global"


def test_short_amounts_fit_a_table_cell() -> None:
    from engine.budgets import build_policy

    usd = build_policy(scope="global", metric="usd", window="day", hard="5", now_ms=0)
    tokens = build_policy(scope="global", metric="tokens", window="day", hard="12000000", now_ms=0)
    requests = build_policy(scope="global", metric="requests", window="day", hard="950", now_ms=0)
    assert usd.format_short(1_077_700_000_000) == "$1,077.70"
    assert tokens.format_short(130_581) == "130.5k tok"
    assert tokens.format_short(12_000_000) == "12.0M tok"
    assert tokens.format_short(999) == "999 tok"
    assert requests.format_short(950) == "950 req"


def test_a_look_from_outside_the_ledger_changes_no_counter() -> None:
    """evaluate_in_memory runs on the event loop while, on PostgreSQL, batches run on the writer's
    thread: its look at a rolling window must not drop minutes or lower the total."""
    from types import SimpleNamespace

    from engine.book import _Counter

    minute = 60_000
    policy = SimpleNamespace(window=SimpleNamespace(calendar=False, rolling_ms=10 * minute), metric="usd")
    counter = _Counter(policy)  # type: ignore[arg-type]
    for m in range(20):
        counter.minutes[m * minute] = 5
        counter.rolling_total += 5
    now = 20 * minute
    assert counter.consumed_at(now, prune=False) == 50  # minutes 10..19
    assert len(counter.minutes) == 20 and counter.rolling_total == 100  # nothing changed
    assert counter.consumed_at(now) == 50 and len(counter.minutes) == 10  # a batch's look prunes
