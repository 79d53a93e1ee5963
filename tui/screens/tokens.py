"""API tokens: every token with its state, last use and spend this month; create (the secret
is shown once, with a copy to the clipboard that works over SSH), revoke and rotate."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static

from engine.clock import format_span, iso, parse_duration_ms
from engine.money import format_usd
from engine.tokens import PREFIX, SCOPES, Token, parse_limit
from tui.messages import LedgerChanged
from tui.screens.base import DataScreen
from tui.screens.confirm import ConfirmModal
from tui.screens.form import Field, FormModal
from tui.widgets.vim_table import Cell, VimTable, right, short, sortable

if TYPE_CHECKING:
    from engine.engine import Engine

T = TypeVar("T")
COLUMNS = ("name", "prefix", "principal", "team", "scopes", "state", "rpm", "tpm", "expires", "last used", "month")
NARROW_COLUMNS = ("name", "principal", "state", "last used", "month")
MEDIUM_COLUMNS = tuple(c for c in COLUMNS if c not in ("team", "scopes", "tpm"))


class SecretModal(ModalScreen[None]):
    """A new token's secret, shown this once; ``c`` puts it on the clipboard by OSC 52, which
    reaches the operator's own terminal over SSH (and through tmux with set-clipboard on)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("c", "copy", "Copy", id="secret.copy"),
        Binding("escape,enter,q", "close", "Close", id="secret.close"),
    ]

    def __init__(self, token: Token, secret: str, what: str) -> None:
        super().__init__()
        self.token, self.secret, self.what = token, secret, what

    def compose(self) -> ComposeResult:
        with Vertical(classes="modal"):
            yield Static(f"[b]{self.what}: {self.token.name}[/b] ({self.token.id})", classes="modal-title")
            yield Static("The secret, shown this once; Budgeteer keeps only its hash:")
            yield Static(self.secret, markup=False, id="secret", classes="secret")
            yield Static("[b]c[/b] copy to the clipboard   [b]esc[/b] close (it cannot be shown again)",
                         id="secret-keys")

    def action_copy(self) -> None:
        self.app.copy_to_clipboard(self.secret)
        self.query_one("#secret-keys", Static).update(
            "Copied by OSC 52 to your terminal's clipboard.   [b]esc[/b] close")

    def action_close(self) -> None:
        self.secret = ""
        self.dismiss(None)


class TokensScreen(DataScreen):
    TITLE_TEXT = "API tokens"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("n", "create", "New token", id="tokens.create"),
        Binding("x", "revoke", "Revoke", id="tokens.revoke"),
        Binding("R", "rotate", "Rotate", id="tokens.rotate"),
        Binding("enter", "detail", "Details", show=False, id="tokens.detail"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.tokens: dict[str, Token] = {}
        self.now_ms = 0

    def body(self) -> ComposeResult:
        yield Static("", id="tokens-title", classes="section-title")
        yield VimTable(id="tokens-table")

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#tokens-table", VimTable).define(
            [(c, right(c) if c in ("rpm", "tpm", "month") else c) for c in COLUMNS])

    async def load(self, engine: Engine) -> Any:
        return await engine.tokens(), engine.now_ms()

    def show(self, data: tuple[list[Token], int]) -> None:
        found, now = data
        self.now_ms = now
        # Active first, newest first within each state.
        order = {"active": 0, "expired": 1, "revoked": 2}
        found = sorted(found, key=lambda t: (order[t.state(now)], -t.created_ms))
        self.tokens = {t.id: t for t in found}
        active = sum(1 for t in found if t.state(now) == "active")
        self.query_one("#tokens-title", Static).update(
            f"{active} active of {len(found)}   [b]n[/b] new   [b]x[/b] revoke   [b]R[/b] rotate   "
            "[b]enter[/b] details")
        rows = [(t.id, self._row(t, now)) for t in found]
        if not rows:
            rows = [("none", ["No API tokens yet: press n to create one.", *[""] * (len(COLUMNS) - 1)])]
        table = self.query_one("#tokens-table", VimTable)
        table.show_only(NARROW_COLUMNS if self.narrow else None if self.roomy else MEDIUM_COLUMNS)
        table.set_rows(rows)

    def _row(self, t: Token, now: int) -> list[Any]:
        state = t.state(now)
        colors = self.gauge_colors()
        shown = f"[{colors['ok'] if state == 'active' else colors['over']}]{state}[/]"
        expires = "never" if t.expires_ms is None else (
            f"in {format_span(t.expires_ms - now)}" if t.expires_ms > now else iso(t.expires_ms)[:10])
        last = "never" if t.last_used_ms is None else f"{format_span(now - t.last_used_ms)} ago"
        scopes = ",".join(t.scopes)
        scopes = scopes if len(scopes) <= 24 else scopes[:23] + "…"
        return [short(t.name, self.name_width()), f"{PREFIX}{t.prefix}…", t.principal, t.team or "-", scopes,
                Text.from_markup(shown), right(str(t.rpm or "-")), right(str(t.tpm or "-")),
                Cell(expires, t.expires_ms), Cell(last, None if t.last_used_ms is None else now - t.last_used_ms),
                sortable(format_usd(t.used_this_month), t.used_this_month)]

    def _selected(self) -> Token | None:
        return self.tokens.get(self.query_one("#tokens-table", VimTable).current_key or "")

    def detail(self) -> tuple[str, str] | None:
        t = self._selected()
        if t is None:
            return None
        now = self.now_ms
        lines = [f"id            {t.id}", f"prefix        {PREFIX}{t.prefix}… (the secret itself is not kept)",
                 f"state         {t.state(now)}",
                 f"acts for      {t.principal}" + (f" (team {t.team})" if t.team else ""),
                 f"workspace     {t.workspace}", f"scopes        {', '.join(t.scopes)}",
                 f"rate limits   {t.limits}",
                 f"created       {iso(t.created_ms)} by {t.created_by}",
                 f"expires       {iso(t.expires_ms) if t.expires_ms else 'never'}",
                 f"last used     {iso(t.last_used_ms) if t.last_used_ms else 'never'}",
                 f"this month    {format_usd(t.used_this_month)}"]
        if t.revoked_ms:
            lines.append(f"revoked       {iso(t.revoked_ms)}")
        if t.rotated_from:
            lines.append(f"replaces      {t.rotated_from}")
        if t.replaced_by:
            lines.append(f"replaced by   {t.replaced_by}")
        return (f"Token {t.name}", "\n".join(lines))

    async def action_create(self) -> None:
        engine = await self.permitted("manage_tokens", "tokens")
        if engine is None:
            return

        async def submit(values: dict[str, str]) -> tuple[Token, str]:
            expires = values["expires"]
            return await engine.create_token(
                name=values["name"], principal=values["principal"], team=values["team"],
                scopes=values["scopes"].replace(" ", ",").split(","), rpm=parse_limit(values["rpm"], "rpm"),
                tpm=parse_limit(values["tpm"], "tpm"),
                expires_ms=engine.now_ms() + parse_duration_ms(expires, "expires") if expires else None)

        self.app.push_screen(FormModal("New API token", [
            Field("name", "Name", "", "what the token is for: ci-bot, notebook"),
            Field("principal", "Acts for", "", "who calls with it: alice, svc-search"),
            Field("team", "Team", "", "optional: the caller's team"),
            Field("scopes", "Scopes", "chat,embeddings,responses,models", ", ".join(SCOPES)),
            Field("rpm", "Requests/min", "", "optional: at most this many requests a minute"),
            Field("tpm", "Tokens/min", "", "optional: at most this many tokens a minute"),
            Field("expires", "Expires in", "90d", "30d, 12h; empty: never")], submit, save_label="Create"),
            self._created)

    def _created(self, result: tuple[Token, str] | None) -> None:
        if result is not None:
            token, secret = result
            self.app.push_screen(SecretModal(token, secret, "New token"))
            self.query_one("#tokens-table", VimTable).select(token.id)
            self.post_message(LedgerChanged())

    async def _live(self, refusal: str) -> tuple[Engine, Token] | None:
        """The selected token, if not revoked (else ``refusal`` as a notice), and the engine
        when this identity may manage tokens."""
        token = self._selected()
        if token is None:
            return None
        if token.revoked_ms is not None:
            self.notify(f"{token.name} {refusal}", severity="warning")
            return None
        engine = await self.permitted("manage_tokens", "tokens")
        return None if engine is None else (engine, token)

    def _confirmed(self, question: str, change: Callable[[], Awaitable[T]], refused: str,
                   done: Callable[[T], None]) -> None:
        """Ask, then make the change; a refusal is a notice titled ``refused``."""
        def answer(yes: bool | None) -> None:
            if yes:
                self.change(change, done, refused)

        self.app.push_screen(ConfirmModal(question), answer)

    async def action_revoke(self) -> None:
        found = await self._live("is already revoked")
        if found is None:
            return
        engine, token = found
        self._confirmed(
            f"Revoke the token {token.name!r} ({PREFIX}{token.prefix}…) of {token.principal}? Calls with it stop "
            "at once.", lambda: engine.revoke_token(token.id), "Not revoked",
            lambda _t: self.notify(f"Revoked {token.name} ({PREFIX}{token.prefix}…): calls with it now get 401"))

    async def action_rotate(self) -> None:
        found = await self._live("is revoked; create a new token instead")
        if found is None:
            return
        engine, token = found

        def show(result: tuple[Token, Token, str]) -> None:
            _old, new, secret = result
            self.app.push_screen(SecretModal(new, secret, "Rotated token"))
            self.query_one("#tokens-table", VimTable).select(new.id)

        self._confirmed(f"Rotate {token.name!r}? The current secret stops working now and a new one is shown "
                        "once.", lambda: engine.rotate_token(token.id), "Not rotated", show)
