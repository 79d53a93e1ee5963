"""Models: the catalog with tiers, prices and health, provider health and breakers, recent
routing decisions with what they saved, and an explain box (``e``): type a prompt, see its
score and the choice. ``@gpt-4.1 prompt`` explains against another requested model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import Input, Static

from engine.clock import DAY_MS, iso
from engine.models import FieldError
from engine.money import format_usd
from engine.providers import Breaker, CatalogModel, Health
from engine.routing import Decision, Recorded, Summary, cause
from tui.messages import LOOKS
from tui.screens.base import DataScreen
from tui.widgets.vim_table import VimTable, right, short

if TYPE_CHECKING:
    from engine.engine import Engine

DEFAULT_REQUESTED = "gpt-4o"
CAPS = (("tools", "T"), ("json", "J"), ("vision", "V"), ("reasoning", "R"))


@dataclass(frozen=True, slots=True)
class ModelsData:
    catalog: list[CatalogModel]
    health: list[Health]
    breakers: dict[str, Breaker]
    decisions: list[Recorded]
    summary: Summary


class ModelsScreen(DataScreen):
    TITLE_TEXT = "Models and routing"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("e", "explain", "Explain a prompt", id="models.explain"),
        Binding("enter", "detail", "Details", show=False, id="models.detail"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.data: ModelsData | None = None

    def body(self) -> ComposeResult:
        yield Static("", id="routing-summary", classes="section-title")
        with Horizontal(id="models-main"):
            with Vertical(id="models-left"):
                yield Static("Catalog, cheapest first  (enter: a model's details)", classes="section-title")
                yield VimTable(id="catalog")
            with Vertical(id="models-right"):
                yield Static("Provider health, last 15 min", classes="section-title")
                yield VimTable(id="health")
                yield Static("Recent routing decisions", classes="section-title")
                yield VimTable(id="decisions")
        yield Input(placeholder="e: type a prompt and press enter to see its score and the model it would get "
                                "(@model prompt: against that model)", id="explain")
        yield Static("", id="explain-result")

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#catalog", VimTable).define(
            [("model", "model"), ("provider", "provider"), ("tier", right("tier")), ("latency", "latency"),
             ("in", right("in $/M")), ("out", right("out $/M")), ("context", right("context")),
             ("caps", "TJVR"), ("calls", right("calls 15m")), ("err", right("errors")),
             ("p95", right("p95 ms"))])
        self.query_one("#health", VimTable).define(
            [("provider", "provider"), ("state", "state"), ("calls", right("calls")), ("err", right("errors")),
             ("mean", right("mean ms")), ("p95", right("p95 ms"))])
        self.query_one("#decisions", VimTable).define(
            [("time", "time (UTC)"), ("who", "principal"), ("mode", "mode"), ("route", "requested → chosen"),
             ("saving", right("saves"))])

    async def load(self, engine: Engine) -> Any:
        health, breakers = await engine.provider_health()
        return ModelsData(await engine.catalog(), health, breakers, await engine.routing_decisions(50),
                          await engine.routing_summary(engine.now_ms() - 30 * DAY_MS))

    def detail(self) -> tuple[str, str] | None:
        """Everything about the model under the catalog's cursor (the table shows less on a narrow terminal)."""
        if self.data is None:
            return None
        key = self.query_one("#catalog", VimTable).current_key
        m = next((m for m in self.data.catalog if f"{m.provider}/{m.model}" == key), None)
        if m is None:
            return None
        p = m.price
        h = next((h for h in self.data.health if (h.provider, h.model) == (m.provider, m.model)), None)
        lines = [f"provider        {m.provider} (prices of {p.provider})",
                 f"cost tier       {m.cost_tier}  ({format_usd(m.blended_nanos_per_m)} per 1M tokens, 3 in : 1 out)",
                 f"latency tier    {m.latency_tier}",
                 f"input           {format_usd(p.input)} per 1M tokens"
                 + (f", cached {format_usd(p.cache_read)}" if p.cache_read is not None else ""),
                 f"output          {format_usd(p.output)} per 1M tokens",
                 f"context         {m.context:,} tokens" + (f", output up to {p.max_output_tokens:,}"
                                                            if p.max_output_tokens else ""),
                 f"capabilities    {', '.join(sorted(m.capabilities)) or 'none known'}",
                 "last 15 min     " + (f"{h.calls} calls, {100 * h.error_rate:.1f}% errors, mean "
                                        f"{h.mean_latency_ms:,} ms, p95 {h.p95_latency_ms:,} ms" if h else "no calls")]
        return (m.model, "\n".join(lines))

    def show(self, data: ModelsData) -> None:
        self.data = data
        s = data.summary
        share = f" ({100 * s.changed / s.decisions:.0f}%)" if s.decisions else ""
        self.query_one("#routing-summary", Static).update(
            f"Routing, last 30 days: {s.decisions:,} decisions, model changed in {s.changed:,}{share}; "
            f"saved {format_usd(s.saved)} (enforced), would have saved {format_usd(s.would_save)} "
            "(suggest, dry run)   [b]e[/b] explain a prompt")
        by_model = {(h.provider, h.model): h for h in data.health}
        degraded = {name for name, b in data.breakers.items() if b.state != "closed"}
        rows = []
        for m in data.catalog:
            h = by_model.get((m.provider, m.model))
            caps = "".join(letter if cap in m.capabilities else "·" for cap, letter in CAPS)
            rows.append((f"{m.provider}/{m.model}", [
                short(m.model, self.name_width() + 8), m.provider + (" (degraded)" if m.provider in degraded else ""),
                right(str(m.cost_tier)), m.latency_tier, right(format_usd(m.price.input)),
                right(format_usd(m.price.output)), right(f"{m.context // 1000:,}k" if m.context else "-"), caps,
                right(str(h.calls) if h else "0"), right(f"{100 * h.error_rate:.0f}%" if h else "-"),
                right(f"{h.p95_latency_ms:,}" if h else "-")]))
        catalog = self.query_one("#catalog", VimTable)
        catalog.show_only(("model", "tier", "in", "out", "calls") if self.narrow else
                          ("model", "provider", "tier", "in", "out", "calls") if not self.roomy else
                          ("model", "provider", "tier", "in", "out", "context", "calls", "err"))
        catalog.set_rows(rows)
        health_rows = []
        for h in (h for h in data.health if not h.model):
            b = data.breakers.get(h.provider)
            state = f"{b.state.replace('_', '-')}" if b is not None and b.state != "closed" else "ok"
            health_rows.append((h.provider, [h.provider, state, right(f"{h.calls:,}"),
                                             right(f"{100 * h.error_rate:.1f}%"), right(f"{h.mean_latency_ms:,}"),
                                             right(f"{h.p95_latency_ms:,}")]))
        for name in sorted(degraded - {h.provider for h in data.health}):
            health_rows.append((name, [name, data.breakers[name].state, right("0"), right("-"), right("-"),
                                       right("-")]))
        if not health_rows:
            health_rows = [("none", ["no calls in the last 15 min", "", "", "", "", ""])]
        self.query_one("#health", VimTable).set_rows(health_rows)
        def bare(model: str) -> str:
            return model.rsplit("/", 1)[-1]  # mistral/mistral-small-latest: the vendor is in the catalog

        decision_rows = [(f"{r.request_id}-{i}", [iso(r.ts_ms)[5:16].replace("T", " "), short(r.principal, 18), r.mode,
                                                  f"{bare(r.requested)} → {bare(r.chosen)}"
                                                  if r.chosen != r.requested else f"{bare(r.requested)} (kept)",
                                                  right(format_usd(r.saving))])
                         for i, r in enumerate(data.decisions)]
        if not decision_rows:
            decision_rows = [("none", ["", "", "", "no routing decisions yet", ""])]
        decisions = self.query_one("#decisions", VimTable)
        decisions.show_only(None if self.size.width >= 190 else ("time", "mode", "route", "saving") if not
                            self.details_beside else ("time", "route", "saving"))  # the pane takes the room
        decisions.set_rows(decision_rows)

    # ---- explain

    def action_explain(self) -> None:
        self.query_one("#explain", Input).focus()

    @on(Input.Submitted, "#explain")
    def _explain_submitted(self, event: Input.Submitted) -> None:
        self._explain(event.value)

    @work(exclusive=True, group=LOOKS, description="Not explained", exit_on_error=False)
    async def _explain(self, value: str) -> None:
        """The prompt scored and routed in a worker; a newer prompt replaces one still being explained."""
        engine = self.bapp.engine
        text = value.strip()
        if engine is None or not text:
            return
        requested = DEFAULT_REQUESTED
        if text.startswith("@") and " " in text:
            requested, text = text[1:].split(" ", 1)
        result = self.query_one("#explain-result", Static)
        try:
            decision = await engine.route({"messages": [{"role": "user", "content": text}]},
                                          principal=engine.actor, model=requested, record=False)
        except FieldError as exc:
            result.update(f"[b red]{exc}[/]")
            return
        result.update(explain_text(decision))


def explain_text(d: Decision) -> str:
    """The score with its top contributions, the choice and its cost against the requested model's."""
    s = d.score
    top = sorted((f for f in s.features if f.contribution > 0), key=lambda f: -f.contribution)[:4]
    parts = ", ".join(f"{f.name} +{f.contribution:.2f} ({f.note})" for f in top) or "nothing stands out"
    req = format_usd(d.requested_cost) if d.requested_cost is not None else "unpriced"
    chosen = format_usd(d.chosen_cost) if d.chosen_cost is not None else "unpriced"
    needs = f", needs {', '.join(sorted(s.needs))}" if s.needs else ""
    return (f"[b]score {s.value:.2f}[/b] → tier {s.tier_needed}+{needs}: {parts}\n"
            f"[b]{d.chosen}[/b] at about {chosen} against {d.requested} at {req} (saves "
            f"{format_usd(d.saving)}); {escape(cause(d))}")
