"""Calls, live: the ``tail -f`` of the ledger. Calls appear as they are recorded (by the
gateway, the governed transport, an import, any process), newest at the top, where the eye
lands and where a new row shows without scrolling; the cursor stays on the call it is on
while new ones arrive above it. Each poll reads only the calls recorded after the newest one
held (``Engine.recent_calls``), and the screen keeps at most ``RING`` of them.

``space`` holds the list still (the app's ``p`` stops every poll; this one keeps counting
what arrives and catches up on ``space`` again), ``f`` shows one status at a time, ``/``
filters by any text in a row, ``enter`` shows the call in full."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import Static

from engine.clock import iso
from engine.models import STATUSES, SettledCall
from engine.money import format_usd
from tui.screens.base import DataScreen
from tui.screens.message import MessageModal
from tui.widgets.vim_table import VimTable, right

if TYPE_CHECKING:
    from engine.engine import Engine

COLUMNS = ("time (UTC)", "principal", "team", "token", "model", "in / out", "cost", "latency", "status",
           "blocked by")
#: The columns each width shows, every cell whole (or elided with …): enter shows everything.
NARROW = ("time (UTC)", "principal", "model", "cost", "status")  # below 110 columns
MEDIUM = ("time (UTC)", "principal", "model", "cost", "status", "blocked by")  # below 150
WIDE = tuple(c for c in COLUMNS if c != "token")  # below 170
ROOMY = 170
STATUS_STYLE = {"ok": "", "error": "bold red", "blocked": "bold yellow"}


class CallsScreen(DataScreen):
    TITLE_TEXT = "Calls, live"
    RING = 500  # the most calls held for each view (all, and each status), and read in one poll
    LOOK_BACK = 100_000  # how many recorded calls a status's first read looks back through
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("space", "hold", "Hold", id="calls.hold"),
        Binding("f", "status_filter", "Status", id="calls.status"),
        Binding("enter", "detail", "Details", show=False, id="calls.detail"),
    ]

    def __init__(self) -> None:
        super().__init__()
        # Newest first, one ring for every call and one for each status: a status shows its own
        # last calls, not only those among the last of all.
        self.rings: dict[str | None, deque[SettledCall]] = {
            s: deque(maxlen=self.RING) for s in (None, *STATUSES)}
        self.filled: set[str | None] = set()  # the views read back once (the others only gain new calls)
        self.waiting: deque[SettledCall] = deque(maxlen=self.RING)  # arrived while held, newest first
        self.last_id = 0  # the newest call read: the next poll asks for what came after it
        self.held = False
        self.status: str | None = None  # one status shown, or all
        self.gap = False  # a poll found more than RING new calls: the older of them were not read
        self._dirty = True

    @property
    def calls(self) -> deque[SettledCall]:
        """The calls of the view shown."""
        return self.rings[self.status]

    def body(self) -> ComposeResult:
        yield Static("", id="calls-title", classes="section-title")
        yield VimTable(id="calls-table")

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#calls-table", VimTable).define([(c, c) for c in COLUMNS])

    async def load(self, engine: Engine) -> Any:
        """What was recorded since the last poll; for a status not yet read back, its own last calls."""
        new = await engine.recent_calls(after=self.last_id, limit=self.RING)
        top = new[0].id if new else self.last_id
        back: list[SettledCall] | None = None
        if self.status not in self.filled and self.status is not None and top:
            back = [c for c in await engine.recent_calls(after=max(0, top - self.LOOK_BACK), limit=self.RING,
                                                         status=self.status) if c.id <= top]
        return new, self.status, back

    def show(self, data: tuple[list[SettledCall], str | None, list[SettledCall] | None]) -> None:
        new, status, back = data
        if back is not None:
            self.rings[status] = deque(back, maxlen=self.RING)
            self._dirty = True
        if new:
            if self.last_id and len(new) == self.RING:
                self.gap = True
            self.last_id = new[0].id
            if self.held:
                self.waiting.extendleft(reversed(new))
            else:
                self._add(new)
        self.filled |= {None, status}
        self._redraw()

    def _add(self, calls: Iterable[SettledCall]) -> None:
        """New calls (newest first) into every view they belong to, each once."""
        for call in reversed(list(calls)):
            for ring in (self.rings[None], self.rings[call.event.status]):
                if not ring or call.id > ring[0].id:
                    ring.appendleft(call)
        self._dirty = True

    def on_resize(self) -> None:
        self._dirty = True  # the columns shown follow the width
        super().on_resize()

    def _redraw(self) -> None:
        title = self.query_one("#calls-title", Static)
        waiting = f"{len(self.waiting)}{'+' if len(self.waiting) == self.RING else ''}"
        state = f"[b]held[/b]: {waiting} new waiting, [b]space[/b] follows" if self.held else "live, [b]space[/b] holds"
        which = f"{self.status} calls" if self.status else "calls"
        if self.narrow:
            title.update(f"{len(self.calls)} {which} · {state} · [b]f[/b] status")
        else:
            title.update(f"The last {len(self.calls)} {which} recorded, newest first · {state} · [b]f[/b] status "
                         f"({self.status or 'all'}) · [b]/[/b] filter · [b]enter[/b] details"
                         + (f" · more than {self.RING} arrived at once, the older not shown" if self.gap else ""))
        if not self._dirty:
            return
        self._dirty = False
        layout = self._layout()
        short = layout in (NARROW, MEDIUM)
        rows: list[tuple[str, Sequence[str | Text]]] = [(str(c.id), self._cells(c, short)) for c in self.calls]
        if not rows:
            note = "No calls yet: they appear here as the gateway, the transport or an import records them."
            if self.status is not None:
                note = f"No {self.status} calls among the last {self.LOOK_BACK:,} recorded: f shows another status."
            rows = [("none", ["", "", "", "", note, "", "", "", "", ""])]
        table = self.query_one("#calls-table", VimTable)
        table.show_only(layout)
        table.set_rows(rows)

    def _layout(self) -> tuple[str, ...] | None:
        if self.narrow:
            return NARROW
        if not self.roomy:
            return MEDIUM
        return None if self.size.width >= ROOMY else WIDE

    def _cells(self, call: SettledCall, short: bool) -> list[str | Text]:
        """The row of a call; ``short``: the time of day only (below 150 columns)."""
        e = call.event
        when = iso(e.ts_ms)
        policy = e.tags.get("policy_name") or e.tags.get("policy") or ("not recorded" if e.status == "blocked" else "")
        return [when[11:19] if short else when[5:19].replace("T", " "), elide(e.principal, 20), elide(e.team, 12),
                elide(e.token_id, 16), elide(e.model, 20 if self.narrow else 26),
                right(f"{e.input_tokens:,} / {e.output_tokens:,}"), right(format_usd(e.cost_nanos or 0)),
                right(f"{e.latency_ms:,} ms"), Text(e.status, style=STATUS_STYLE.get(e.status, "")),
                elide(policy, 20)]

    def action_hold(self) -> None:
        self.held = not self.held
        if not self.held and self.waiting:
            self._add(self.waiting)
            self.waiting.clear()
        self._redraw()

    def action_status_filter(self) -> None:
        order = [None, *STATUSES]
        self.status = order[(order.index(self.status) + 1) % len(order)]
        self._dirty = True
        self._redraw()
        if self.status not in self.filled:
            self.reload(restart=True)  # its own last calls, read back once

    def action_detail(self) -> None:
        key = self.query_one("#calls-table", VimTable).current_key
        call = next((c for c in self.calls if str(c.id) == key), None)
        if call is None:
            return
        e = call.event
        lines = [f"request id       {e.request_id}", f"call             {call.id} in this ledger",
                 f"time             {iso(e.ts_ms)}", f"status           {e.status}"]
        if e.status == "blocked":
            lines.append(f"blocked by       {call.policy or 'not recorded (written without a policy)'}")
            if e.tags.get("override_request"):
                lines.append(f"override request {e.tags['override_request']}")
        lines += ["", f"principal        {e.principal}", f"team             {e.team}", f"token            {e.token_id}",
                  f"workspace        {e.workspace}", f"session          {e.session}", f"agent            {e.agent}",
                  "", f"provider         {e.provider}", f"model            {e.model}"]
        if e.tags.get("requested_model"):
            lines.append(f"requested model  {e.tags['requested_model']}")
        lines += ["", f"input tokens     {e.input_tokens:,}", f"  cached reads   {e.cached_input_tokens:,}",
                  f"  cache writes   {e.cache_write_tokens:,} (one-hour: {e.cache_write_1h_tokens:,})",
                  f"output tokens    {e.output_tokens:,}", f"  reasoning      {e.reasoning_tokens:,}",
                  "", f"cost             {format_usd(e.cost_nanos or 0, precise=True)} ({e.cost_source})",
                  f"latency          {e.latency_ms:,} ms",
                  "", "tags", json.dumps(e.tags, indent=2, sort_keys=True) if e.tags else "  none"]
        self.app.push_screen(MessageModal(f"Call {e.request_id}", "\n".join(lines)))


def elide(text: str, width: int) -> str:
    """The text whole if it fits ``width`` cells, else cut with … (enter shows it whole)."""
    return text if len(text) <= width else text[:width - 1] + "…"
