"""The vault: which backend keeps the credentials and why, each credential by reference and
short fingerprint (never the secret), the providers that use it; ``n`` adds one (typed
hidden), ``x`` removes one, ``t`` tests the providers that use the selected credential."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import Static

from engine.clock import iso
from engine.errors import BudgeteerError
from engine.providers import Provider
from engine.vault import Entry, Status
from tui.messages import LOOKS, LedgerChanged
from tui.screens.base import DataScreen
from tui.screens.confirm import ConfirmModal
from tui.screens.form import Field, FormModal
from tui.widgets.vim_table import VimTable

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from engine.engine import Engine


@dataclass(frozen=True, slots=True)
class VaultData:
    status: Status
    entries: list[Entry] | None  # None: locked (the file vault's passphrase is not known yet)
    providers: list[Provider]


class VaultScreen(DataScreen):
    TITLE_TEXT = "Credential vault"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("n", "add", "Add", id="vault.add"),
        Binding("x", "remove", "Remove", id="vault.remove"),
        Binding("t", "test", "Test", id="vault.test"),
        Binding("u", "unlock", "Unlock", show=False, id="vault.unlock"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.data: VaultData | None = None

    def body(self) -> ComposeResult:
        yield Static("", id="vault-status")
        yield Static("", id="vault-title", classes="section-title")
        yield VimTable(id="vault-table")

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#vault-table", VimTable).define(
            [(c, c) for c in ("reference", "fingerprint", "updated (UTC)", "used by")])

    async def load(self, engine: Engine) -> Any:
        status = await engine.vault_status()
        # Listing the file vault reads only names and fingerprints: no passphrase needed.
        return VaultData(status, await engine.vault_entries(), await engine.providers())

    def show(self, data: VaultData) -> None:
        self.data = data
        s = data.status
        self.query_one("#vault-status", Static).update(
            f"[b]{s.backend}[/b] backend: {escape(s.why)}\n[dim]{escape(s.location)} · "
            "BUDGETEER_VAULT_BACKEND=keyring|file forces a choice[/dim]")
        entries = data.entries or []
        self.query_one("#vault-title", Static).update(
            f"{len(entries)} credentials   [b]n[/b] add   [b]x[/b] remove   [b]t[/b] test the providers using it")
        users: dict[str, list[str]] = {}
        for p in data.providers:
            if p.credential:
                users.setdefault(p.credential.removeprefix("vault:"), []).append(p.name)
        rows = [(e.ref, [f"vault:{e.ref}", e.fingerprint, iso(e.updated_ms)[:19].replace("T", " ") if e.updated_ms
                         else "-", ", ".join(users.get(e.ref, [])) or "-"]) for e in entries]
        if not rows:
            rows = [("none", ["No credentials: press n to add one.", "", "", ""])]
        self.query_one("#vault-table", VimTable).set_rows(rows)

    def _selected(self) -> Entry | None:
        key = self.query_one("#vault-table", VimTable).current_key
        return next((e for e in (self.data.entries or []) if e.ref == key), None) if self.data else None

    # ---- the passphrase of a file vault

    def _with_key(self, then: Callable[[], Awaitable[None]]) -> None:
        """Run ``then`` once the vault can be opened: asks for the file vault's passphrase first
        when neither BUDGETEER_VAULT_PASSPHRASE nor an earlier answer gives it."""
        engine = self.bapp.engine
        if engine is None:
            return
        if not engine.vault().needs_passphrase:
            self._run(then)
            return

        async def submit(values: dict[str, str]) -> bool:
            await engine.vault_unlock(values["passphrase"])
            return True

        def unlocked(ok: bool | None) -> None:
            if ok:
                self._run(then)

        new = not engine.vault().path.exists()
        self.app.push_screen(FormModal(
            "Vault passphrase", [Field("passphrase", "Passphrase", "", "kept in memory for this session only",
                                       password=True)], submit, save_label="Unlock",
            intro=("A new vault file: this passphrase will encrypt it. " if new else "")
            + f"The file vault at {engine.vault().path} is locked."), unlocked)

    def _run(self, then: Callable[[], Awaitable[None]]) -> None:
        self.run_worker(then(), group=LOOKS, description="Vault", exit_on_error=False)

    def action_unlock(self) -> None:
        async def done() -> None:
            self.notify("The vault is unlocked for this session")

        self._with_key(done)

    # ---- changes

    async def action_add(self) -> None:
        engine = await self.permitted("manage_vault", "the vault")
        if engine is None:
            return

        async def form() -> None:
            async def submit(values: dict[str, str]) -> Entry:
                return await engine.vault_set(values["ref"], values["secret"])

            self.app.push_screen(FormModal("Add a credential", [
                Field("ref", "Reference", "", "openai-prod, used as vault:openai-prod"),
                Field("secret", "Secret", "", "the provider key (not shown as you type)", password=True)],
                submit, save_label="Store"), self._stored)

        self._with_key(form)

    def _stored(self, entry: Entry | None) -> None:
        if entry is not None:
            self.notify(f"Stored vault:{entry.ref} ({entry.fingerprint})")
            self.query_one("#vault-table", VimTable).select(entry.ref)
            self.post_message(LedgerChanged())

    async def action_remove(self) -> None:
        entry = self._selected()
        engine = await self.permitted("manage_vault", "the vault") if entry is not None else None
        if engine is None or entry is None:
            return

        async def remove() -> None:
            def answer(yes: bool | None) -> None:
                if yes:
                    self.change(lambda: engine.vault_remove(entry.ref), f"Removed vault:{entry.ref}", "Not removed")

            self.app.push_screen(ConfirmModal(f"Remove vault:{entry.ref} ({entry.fingerprint})? Providers using it "
                                              "will fail to authenticate."), answer)

        self._with_key(remove)

    async def action_test(self) -> None:
        engine, entry = self.bapp.engine, self._selected()
        if engine is None or entry is None or self.data is None:
            return
        names = [p.name for p in self.data.providers if p.credential == f"vault:{entry.ref}"]
        if not names:
            self.notify(f"No provider uses vault:{entry.ref}; add one with budgeteer provider add ... "
                        f"--credential vault:{entry.ref}", severity="warning")
            return

        async def test() -> None:
            for name in names:
                try:
                    result = await engine.test_connection(name)
                except BudgeteerError as exc:
                    self.notify(str(exc), title=f"{name}: not tested", severity="error")
                    continue
                self.notify(f"{result.state} in {result.latency_ms} ms: {result.detail}", title=name,
                            severity="information" if result.state == "ok" else "error")

        self._with_key(test)
