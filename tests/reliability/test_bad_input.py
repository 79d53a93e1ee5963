"""Bad input, generated (hypothesis): every input surface answers a clear, named refusal and
never a traceback or a 500, and a rejected batch leaves the ledger's sums as they were."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.budgets import build_policy, parse_scope
from engine.clock import parse_duration_ms
from engine.engine import Engine
from engine.integrations.files import _parse
from engine.integrations.gateway import create_app
from engine.integrations.otlp import OtlpError, read
from engine.models import FieldError, validate_event
from engine.money import MoneyError, parse_usd
from tests.asgi_servers import serve
from tui import cli

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
                           lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids,
                                                                                     max_size=5), max_leaves=20)
EVENT_KEYS = ["ts", "ts_ms", "request_id", "provider", "model", "principal", "team", "input_tokens",
              "output_tokens", "cost_usd", "cost_nanos", "status", "tags", "latency_ms", "cached_input_tokens"]


@FUZZ
@given(st.dictionaries(st.sampled_from(EVENT_KEYS) | st.text(max_size=10), json_values, max_size=10))
def test_an_event_record_is_valid_or_refused_by_field(raw: dict[str, Any]) -> None:
    try:
        validate_event(raw)
    except FieldError as exc:
        assert exc.field and exc.reason


@FUZZ
@given(st.lists(st.text(max_size=80), max_size=6), st.sampled_from(["jsonl", "csv"]))
def test_import_lines_never_raise_anything_but_a_named_error(lines: list[str], fmt: str) -> None:
    header = "ts,request_id,provider,model,principal,input_tokens,output_tokens\n" if fmt == "csv" else ""
    for _number, item in _parse(io.StringIO(header + "\n".join(lines)), fmt):
        if isinstance(item, FieldError):
            assert item.field and item.reason


@FUZZ
@given(json_values)
def test_otlp_payloads_are_read_or_refused_as_a_whole(payload: Any) -> None:
    try:
        _events, report = read(payload)
    except OtlpError as exc:
        assert str(exc)
    else:
        assert report.rejected == len(report.reasons) or len(report.reasons) == 20


@FUZZ
@given(st.text(max_size=40))
def test_amounts_durations_and_scopes_are_refused_by_name(text: str) -> None:
    for parse in (parse_usd, parse_duration_ms, parse_scope):
        try:
            parse(text)  # type: ignore[operator]
        except (FieldError, MoneyError) as exc:
            assert str(exc)


@FUZZ
@given(st.fixed_dictionaries({"scope": st.text(max_size=20), "metric": st.sampled_from(["usd", "tokens", "x"]),
                              "window": st.text(max_size=12) | st.sampled_from(["day", "rolling:6h", "month"]),
                              "hard": st.text(max_size=10), "tz": st.text(max_size=20) | st.just("Europe/Paris")}))
def test_policy_specs_are_built_or_refused_by_field(spec: dict[str, str]) -> None:
    try:
        build_policy(**spec)  # type: ignore[arg-type]
    except FieldError as exc:
        assert exc.field and exc.reason


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=st.sampled_from([["policy", "add", "--scope"], ["policy", "add", "--scope", "global", "--metric", "usd",
                                                       "--window"], ["approvals", "request", "--policy", "p",
                                                                     "--reason", "r", "--ttl", "1h", "--amount"],
                        ["usage", "--period"], ["token", "create", "--name", "n", "--principal", "p", "--expires"],
                        ["policy", "add", "--scope", "global", "--metric", "usd", "--window", "day", "--hard", "5",
                         "--tz"]]),
       value=st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), min_size=1,
                     max_size=15).filter(lambda t: not t.startswith("-")))
def test_the_command_line_answers_bad_values_in_one_sentence(tmp_path_factory: pytest.TempPathFactory,
                                                              argv: list[str], value: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path_factory.mktemp("cli") / "l.db"
    capsys.readouterr()  # the capture is shared by every example of this test: start clean
    try:
        code = cli.main(["--db", str(db), *argv, value])
    except SystemExit as exit_:  # argparse's own refusals end the process so, with status 2
        code = exit_.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert code in (0, 1, 2)
    assert "Traceback" not in err
    if code:
        assert err.startswith("budgeteer: ") and len(err.strip().splitlines()) == 1, err


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    db = tmp_path_factory.mktemp("gw") / "l.db"

    async def token() -> str:
        async with await Engine.open(db) as engine:
            await engine.add_provider(name="nowhere", kind="openai", base_url="http://127.0.0.1:9/v1",
                                      models=["gpt-4o-mini"])
            return (await engine.create_token(name="fuzz", principal="fuzz", scopes=["chat", "traces"]))[1]

    secret = asyncio.run(token())
    with serve(create_app(db, max_body=16 * 1024)) as base:
        yield base, secret, db


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/v1/traces", "/v1/messages"]),
       st.one_of(json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=200)),
       st.dictionaries(st.sampled_from(["content-type", "x-budgeteer-session", "content-encoding"]),
                       # what an HTTP client can send at all: no space at either end of a value
                       st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20).map(str.strip),
                       max_size=2),
       st.booleans())
def test_gateway_bodies_and_headers_never_get_a_500(gateway: tuple[str, str, Path], path: str, body: bytes,
                                                    headers: dict[str, str], authorized: bool) -> None:
    base, secret, _db = gateway
    sent = {**headers, **({"authorization": f"Bearer {secret}"} if authorized else {})}
    response = httpx.post(f"{base}{path}", content=body, headers=sent, timeout=30)
    assert response.status_code < 500 or response.status_code in (502, 504), response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        shape = {"message", "type"} if path == "/v1/messages" else {"message", "type", "param", "code"}  # Anthropic's
        assert set(error) == shape and error["message"]


async def test_a_rejected_strict_batch_leaves_the_sums_as_they_were(tmp_path: Path) -> None:
    from engine.integrations.files import import_events

    db = tmp_path / "l.db"
    good = json.dumps({"ts": "2026-11-18T10:00:00Z", "request_id": "a", "provider": "openai", "model": "gpt-4o-mini",
                       "principal": "p", "input_tokens": 10, "output_tokens": 5})
    async with await Engine.open(db) as engine:
        path = tmp_path / "first.jsonl"
        path.write_text(good + "\n")
        await import_events(engine, path)
        before = await engine.totals(0, 2**50)
        bad = tmp_path / "bad.jsonl"
        bad.write_text(good.replace('"a"', '"b"') + "\n" + '{"request_id": "c", "input_tokens": -1}\n')
        report = await import_events(engine, bad, strict=True)
        assert report.bad == 1 and not report.written
        assert await engine.totals(0, 2**50) == before and await engine.event_count() == 1
