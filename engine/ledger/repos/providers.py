"""Providers, their circuit breakers and the calls their health is judged by
(``providers``, ``provider_breakers``, ``usage_events``): the rows behind ``engine.providers``,
which keeps the registry's rules, the health book and the breakers' judgement."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final

from engine.ledger.changes import PROVIDER, announce
from engine.ledger.dbapi import Connection
from engine.providers import Breaker, HealthRow, Provider

_COLUMNS: Final = "name, kind, base_url, credential, vendor, models, enabled, created_ms, created_by"
#: ``HealthRow``s: the window's calls grouped by provider, model, second, failure and latency.
_HEALTH_SELECT: Final = (
    "SELECT s.provider, s.model, e.ts_ms / 1000, e.status = 'error', e.latency_ms, count(*) "
    "FROM usage_events e JOIN series s ON s.id = e.series_id WHERE {where} AND e.status != 'blocked' "
    "GROUP BY 1, 2, 3, 4, 5")


def _provider(row: Sequence[Any]) -> Provider:
    name, kind, url, credential, vendor, models, enabled, created, by = row
    return Provider(name, kind, url, credential, vendor, tuple(json.loads(models)), bool(enabled), created, by)


class Providers:
    __slots__ = ("conn",)

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def get(self, name: str) -> Provider | None:
        row = self.conn.execute(f"SELECT {_COLUMNS} FROM providers WHERE name = ?", (name,)).fetchone()
        return None if row is None else _provider(row)

    def exists(self, name: str) -> bool:
        return self.conn.execute("SELECT 1 FROM providers WHERE name = ?", (name,)).fetchone() is not None

    def listing(self) -> list[Provider]:
        return [_provider(r) for r in self.conn.execute(f"SELECT {_COLUMNS} FROM providers ORDER BY name")]

    def insert(self, p: Provider) -> None:
        self.conn.execute(f"INSERT INTO providers ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (p.name, p.kind, p.base_url, p.credential, p.vendor, json.dumps(list(p.models)),
                            int(p.enabled), p.created_ms, p.created_by))
        announce(self.conn, PROVIDER)

    def remove(self, name: str) -> None:
        """The provider and its breaker."""
        self.conn.execute("DELETE FROM providers WHERE name = ?", (name,))
        self.conn.execute("DELETE FROM provider_breakers WHERE provider = ?", (name,))
        announce(self.conn, PROVIDER)

    # ---- health and breakers

    def health_rows(self, after_id: int | None, since_ms: int) -> tuple[list[HealthRow], int]:
        """The calls since ``since_ms`` up to the last event now, and that event's id: all of them
        (``after_id`` None: a process starting, one grouped read of the window), or only those
        appended after event ``after_id`` (a refresh: the new ones, by the primary key). No
        transaction is needed: ids are given in commit order (one writer at a time), so every event
        up to the last id read is committed and seen by the next statement."""
        last = int(self.conn.execute("SELECT max(id) FROM usage_events").fetchall()[0][0] or 0)
        if after_id is None:
            rows = self.conn.execute(_HEALTH_SELECT.format(where="e.ts_ms >= ? AND e.id <= ?"),
                                      (since_ms, last)).fetchall()
        else:  # ``+e.ts_ms``: walk the new ids, never the timestamp index
            rows = self.conn.execute(_HEALTH_SELECT.format(where="e.id > ? AND e.id <= ? AND +e.ts_ms >= ?"),
                                      (after_id, last, since_ms)).fetchall()
        return rows, last

    def breakers(self) -> dict[str, Breaker]:
        return {r[0]: Breaker(r[0], r[1], r[2], r[3])
                for r in self.conn.execute("SELECT provider, state, since_ms, reason FROM provider_breakers")}

    def set_breaker(self, b: Breaker) -> None:
        self.conn.execute("INSERT INTO provider_breakers (provider, state, since_ms, reason) VALUES (?, ?, ?, ?) "
                           "ON CONFLICT (provider) DO UPDATE SET state = excluded.state, since_ms = excluded.since_ms, "
                           "reason = excluded.reason", (b.provider, b.state, b.since_ms, b.reason))
