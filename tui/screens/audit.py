"""The audit journal: every change to a policy, token, membership or vault entry and every
approval decision, newest first; ``/`` filters by actor, action or subject in the ledger
itself (not only the rows on screen), ``v`` verifies the hash chain, ``enter`` shows the
before and after of one entry."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import Input, Static

from engine.audit import AuditEntry
from engine.clock import iso
from engine.vault import VaultError
from tui.messages import LOOKS
from tui.screens.base import DataScreen
from tui.widgets.vim_table import VimTable

if TYPE_CHECKING:
    from engine.engine import Engine

LIMIT = 500


class AuditScreen(DataScreen):
    TITLE_TEXT = "Audit journal"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("v", "verify", "Verify chain", id="audit.verify"),
        Binding("enter", "detail", "Details", show=False, id="audit.detail"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.entries: dict[str, AuditEntry] = {}
        self.text = ""

    def body(self) -> ComposeResult:
        yield Static("", id="audit-title", classes="section-title")
        yield VimTable(id="audit-table")

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#audit-table", VimTable).define(
            [(c, c) for c in ("#", "time (UTC)", "actor", "action", "subject", "change")])

    @on(Input.Changed, "#filter")
    def _search(self, event: Input.Changed) -> None:
        """Search the whole journal, not only the newest rows loaded."""
        self.text = event.value.strip()
        self.reload(restart=True)

    async def load(self, engine: Engine) -> Any:
        return await engine.audit_entries(limit=LIMIT, text=self.text)

    def show(self, data: list[AuditEntry]) -> None:
        self.entries = {str(e.id): e for e in data}
        found = f"{len(data)}{'+' if len(data) == LIMIT else ''} {'entry' if len(data) == 1 else 'entries'}"
        if self.text:
            found += f" matching {self.text!r}"
        self.query_one("#audit-title", Static).update(
            f"{found}, newest first   [b]/[/b] filter   [b]v[/b] verify the chain   [b]enter[/b] before and after")
        width = max(24, self.size.width - 122)  # what the other columns leave; enter shows all of it
        rows = [(str(e.id), [str(e.id), iso(e.ts_ms)[:19].replace("T", " "), e.actor, e.action, e.subject,
                             e.summary(width)]) for e in data]
        if not rows:
            rows = [("none", ["", "", "", "", "No entries." if self.text else "The journal is empty.", ""])]
        table = self.query_one("#audit-table", VimTable)
        table.show_only(("time (UTC)", "actor", "action", "subject") if self.narrow else None)
        table.set_rows(rows)

    def detail(self) -> tuple[str, str] | None:
        entry = self.entries.get(self.query_one("#audit-table", VimTable).current_key or "")
        if entry is None:
            return None
        lines = [f"entry     {entry.id}", f"time      {iso(entry.ts_ms)}", f"actor     {entry.actor}",
                 f"action    {entry.action}", f"subject   {entry.subject}", f"hash      {entry.hash}",
                 f"follows   {entry.prev_hash}", "", "changed"]
        for key, before, after in entry.changes():
            lines.append(f"  {key}: {entry.shown(key, before)} → {entry.shown(key, after)}")
        lines += ["", "before, as stored (amounts in " + ("nano-dollars" if entry.metric == "usd" else entry.metric)
                  + ", times in ms)", json.dumps(entry.before, indent=2), "", "after, as stored",
                  json.dumps(entry.after, indent=2)]
        return (f"Audit entry {entry.id}", "\n".join(lines))

    def action_verify(self) -> None:
        self._verify()

    @work(exclusive=True, group=LOOKS, description="Journal not verified", exit_on_error=False)
    async def _verify(self) -> None:
        """The whole chain checked in a worker (a long journal takes a while; keys keep working)."""
        engine = self.bapp.engine
        if engine is None:
            return
        try:
            result = await engine.verify_audit()
        except VaultError as exc:
            self.notify(f"The chain is keyed by a key in the vault, which cannot be read: {exc}",
                        title="Journal not verified", severity="error", timeout=30)
            return
        if result.ok:
            self.notify(f"The chain of {result.entries:,} entries is intact", title="Journal verified")
        else:
            self.notify(f"{result.problem}", title="Journal tampered with", severity="error", timeout=30)
