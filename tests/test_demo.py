"""The demo ledger: deterministic, varied, and shaped like real traffic."""

from __future__ import annotations

import itertools
from collections import Counter

from engine.clock import DAY_MS
from engine.demo import DEMO_MODELS, generate_demo
from engine.models import UsageEvent
from engine.pricing import bundled_prices
from tests.conftest import NOW_MS


def _all(**kwargs: int) -> list[UsageEvent]:
    return [e for batch in generate_demo(end_ms=NOW_MS, **kwargs) for e in batch]


def test_the_same_seed_gives_the_same_events_and_another_seed_does_not() -> None:
    assert _all(days=2, seed=3) == _all(days=2, seed=3)
    assert _all(days=2, seed=3) != _all(days=2, seed=4)


def test_a_month_has_at_least_200000_varied_events_in_order() -> None:
    events = _all(days=30)
    assert len(events) >= 200_000
    assert len({e.workspace for e in events}) >= 3
    assert len({e.team for e in events}) >= 6
    assert len({e.principal for e in events}) >= 30
    assert len({e.model for e in events}) >= 8
    assert len({e.provider for e in events}) >= 4
    assert all(NOW_MS - 30 * DAY_MS < e.ts_ms <= NOW_MS for e in events)
    assert all(a.ts_ms <= b.ts_ms for a, b in itertools.pairwise(events))
    assert len({e.request_id for e in events}) == len(events)
    for e in events:
        assert e.cached_input_tokens + e.cache_write_tokens <= e.input_tokens
        assert e.reasoning_tokens <= e.output_tokens
    embeddings = {m.name for m in DEMO_MODELS if m.kind == "embedding"}
    assert all(e.output_tokens == 0 for e in events if e.model in embeddings)
    # Every demo model has a price, so the demo shows no unpriced calls.
    book = bundled_prices()
    assert all(book.lookup(m.name, NOW_MS, "", m.provider) for m in DEMO_MODELS)
    # Weekends are quieter than weekdays.
    per_weekday = Counter((e.ts_ms // DAY_MS + 3) % 7 for e in events)
    weekday_mean = sum(per_weekday[d] for d in range(5)) / 5
    weekend_mean = (per_weekday[5] + per_weekday[6]) / 2
    assert weekend_mean < 0.6 * weekday_mean
    # Outages leave bursts of errors: some hour has far more errors than the average hour.
    errors_per_hour = Counter(e.ts_ms // 3_600_000 for e in events if e.status == "error")
    assert max(errors_per_hour.values()) >= 10 * (sum(errors_per_hour.values()) / (30 * 24))
    assert any(e.status == "blocked" for e in events)
