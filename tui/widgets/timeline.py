"""A plotext timeline of spend, tokens or requests, with optional soft and hard budget lines.

Floats appear here and only here: plotting needs them, the ledger never sees them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import UTC, datetime

from textual_plotext import PlotextPlot

from engine.money import NANOS_PER_USD

# Without colour, series are told apart by their marker (the legend shows it).
MONO_MARKERS = ("braille", "•", "x", "+", "o", "*", "#", "@")
# Series colours under an ANSI theme: names that read on a dark and on a light terminal
# (no white, no yellow, no black), the terminal's own foreground last.
ANSI_SERIES = ("blue", "green", "red", "magenta", "cyan", "default")


class Timeline(PlotextPlot):
    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._series: list[tuple[str, list[tuple[int, int]]]] = []
        self._metric = "usd"
        self._lines: list[tuple[str, int]] = []
        self._legend = False
        self._loaded = False  # until the first read lands: "loading…", never a false "no data"

    def on_mount(self) -> None:
        super().on_mount()
        self.app.theme_changed_signal.subscribe(self, lambda _theme: self._follow_theme())
        self._follow_theme()

    def _ansi(self) -> bool:
        """An ANSI theme names colours the terminal decides (``ansi_default`` has no RGB value)."""
        return str(self.app.theme_variables.get("background", "")).startswith("ansi_")

    def _follow_theme(self) -> None:
        # textual-plotext's "auto" theme takes RGB values from the app's theme, and reads an
        # ANSI theme's ``ansi_default`` as black: black ticks on a black canvas. Plotext's
        # "clear" theme leaves canvas and text to the terminal, which is what ANSI themes want.
        self.theme = "clear" if self._ansi() else "auto"
        self._draw()

    def _mark_color(self, label: str) -> str | tuple[int, int, int]:
        from textual.color import Color, ColorParseError

        variable = "error" if label == "hard" else "warning"
        if self._ansi():
            return "red" if label == "hard" else "yellow"
        try:
            return Color.parse(self.app.theme_variables[variable]).rgb
        except (KeyError, ColorParseError):
            return "red" if label == "hard" else "yellow"

    def show_points(self, points: Sequence[tuple[int, int]], *, metric: str = "usd",
                    lines: Sequence[tuple[str, int]] = ()) -> None:
        self.show_series([("total", list(points))], metric=metric, lines=lines)

    def show_series(self, series: Sequence[tuple[str, list[tuple[int, int]]]], *, metric: str = "usd",
                    lines: Sequence[tuple[str, int]] = (), force_legend: bool = False) -> None:
        """Draw one line per (label, [(bucket_ms, value)]); ``lines`` are horizontal marks (soft, hard)."""
        self._loaded = True
        self._series = [(label, list(points)) for label, points in series]
        self._legend = force_legend or len(self._series) > 1
        self._metric = metric
        self._lines = list(lines)
        self._draw()

    def _value(self, raw: int) -> float:
        return raw / NANOS_PER_USD if self._metric == "usd" else float(raw)

    def _draw(self) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        if self.size.width and self.size.height:
            plt.plotsize(self.size.width, self.size.height)  # ticks are laid out for the real size
        buckets = sorted({ts for _, pts in self._series for ts, _ in pts})
        if not buckets:
            plt.title("no data in this period" if self._loaded else "loading…")
            self.refresh()
            return
        index = {ts: i for i, ts in enumerate(buckets)}
        mono = bool(os.environ.get("NO_COLOR")) and len(self._series) > 1
        ansi = self._ansi()
        for n, (label, pts) in enumerate(self._series):
            ys = [0.0] * len(buckets)
            for ts, value in pts:
                ys[index[ts]] = self._value(value)
            plt.plot(list(range(len(buckets))), ys, label=label if self._legend else None,
                     marker=MONO_MARKERS[n % len(MONO_MARKERS)] if mono else "braille",
                     color=ANSI_SERIES[n % len(ANSI_SERIES)] if ansi else None)
        for label, value in self._lines:  # plotext's hline takes no label: the series' label names them
            plt.hline(self._value(value), self._mark_color(label))
        span = buckets[-1] - buckets[0]
        fmt = "%H:%M" if span <= 2 * 86_400_000 else "%m-%d"
        # Few enough labels that none overlap: plotext's choice among colliding labels varies.
        room = max(2, (self.size.width - 10) // 9) if self.size.width else 6
        step = max(1, -(-len(buckets) // room))
        ticks = list(range(0, len(buckets), step))
        plt.xticks(ticks, [datetime.fromtimestamp(buckets[i] / 1000, UTC).strftime(fmt) for i in ticks])
        plt.ylabel("$" if self._metric == "usd" else self._metric)
        self.refresh()

    def on_resize(self) -> None:
        self._draw()
