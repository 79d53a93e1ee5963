"""A plotext timeline of spend, tokens or requests, with optional soft and hard budget lines,
and its legend: a Textual widget beside the plot, never drawn over the data.

The x-axis covers the period asked (to now, for a period that is running), one point per
bucket, empty buckets as zero; the y-axis reads ``780k`` and ``$1.2k``; the bucket and unit
are printed under the axis (``$ per 15 min``). Each series has its own colour and marker.

Floats appear here and only here: plotting needs them, the ledger never sees them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime

from rich.markup import escape
from textual.widgets import Static
from textual_plotext import PlotextPlot

from engine.clock import DAY_MS, HOUR_MS, MINUTE_MS
from engine.money import NANOS_PER_USD, format_usd, format_usd_compact

# Markers: series n gets MARKERS[n]; with colour they make each series' pair unique, and
# without colour (NO_COLOR) the marker alone tells them apart.
MARKERS = ("braille", "•", "x", "+", "o", "*", "#", "@", "%", "=")
# Ten hues apart from each other (Tableau 10): no two reds, on dark and light backgrounds.
RGB_SERIES: tuple[tuple[int, int, int], ...] = (
    (78, 121, 167), (242, 142, 43), (225, 87, 89), (118, 183, 178), (89, 161, 79),
    (237, 201, 72), (176, 122, 161), (255, 157, 167), (156, 117, 95), (186, 176, 172))
# Series colours under an ANSI (16-colour) theme: the hues that read on a dark and on a light
# terminal (no white, no yellow, no black, and never a bright twin of one already used), the
# terminal's own foreground last; past six series the marker tells them apart.
ANSI_SERIES = ("blue", "green", "red", "magenta", "cyan", "default")
_RICH_ANSI = {"default": "default"}
_LEGEND_SAMPLE = {"braille": "⣿⣿"}
MAX_SERIES = len(MARKERS)


def style_of(n: int, ansi: bool) -> tuple[str | tuple[int, int, int], str]:
    """(colour, marker) of the n-th series: no two of the first MAX_SERIES ** 2 share both."""
    colors: Sequence[str | tuple[int, int, int]] = ANSI_SERIES if ansi else RGB_SERIES
    return colors[n % len(colors)], MARKERS[(n + n // len(MARKERS)) % len(MARKERS)]


def short_count(value: float) -> str:
    """An axis count: ``950``, ``1.5k``, ``780k``, ``2.4M``."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            scaled = value / size
            return f"{scaled:.1f}".rstrip("0").rstrip(".") + suffix if abs(scaled) < 10 else f"{scaled:.0f}{suffix}"
    return f"{value:.0f}" if value == int(value) else f"{value:.2g}"


def bucket_words(bucket_ms: int) -> str:
    """``min``, ``15 min``, ``hour``, ``6 hours``, ``day``."""
    for size, one, many in ((DAY_MS, "day", "days"), (HOUR_MS, "hour", "hours"), (MINUTE_MS, "min", "min")):
        if bucket_ms % size == 0:
            count = bucket_ms // size
            return one if count == 1 else f"{count} {many}"
    return f"{bucket_ms // 1000} s"


def _nice_step(top: float, count: int) -> float:
    """A step of 1, 2, 2.5 or 5 times a power of ten that covers ``top`` in about ``count`` steps."""
    raw = top / max(1, count)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    return next(magnitude * f for f in (1, 2, 2.5, 5, 10) if magnitude * f >= raw * 0.999999)


class Timeline(PlotextPlot):
    def __init__(self, *, id: str | None = None, legend: str | None = None) -> None:
        """``legend``: the id of a Static beside the plot that lists the series (none: no legend)."""
        super().__init__(id=id)
        self.legend_id = legend
        self._series: list[tuple[str, list[tuple[int, int]]]] = []
        self._metric = "usd"
        self._lines: list[tuple[str, int]] = []
        self._span: tuple[int, int] | None = None
        self._bucket = 0
        self._styles: list[int] = []
        #: what the last draw showed: the bucket starts on the x-axis, the tick labels, the
        #: y tick labels, the unit, and per series (label, colour, marker)
        self.buckets: list[int] = []
        self.x_labels: list[str] = []
        self.y_labels: list[str] = []
        self.unit = ""
        self.legend_entries: list[tuple[str, str | tuple[int, int, int], str]] = []
        self._running = False  # values are a window's running total (a budget), not per bucket
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

    def show_points(self, points: Sequence[tuple[int, int]], *, metric: str = "usd", bucket_ms: int = 0,
                    span: tuple[int, int] | None = None, lines: Sequence[tuple[str, int]] = ()) -> None:
        self.show_series([("total", list(points))], metric=metric, bucket_ms=bucket_ms, span=span, lines=lines)

    def show_series(self, series: Sequence[tuple[str, list[tuple[int, int]]]], *, metric: str = "usd",
                    bucket_ms: int = 0, span: tuple[int, int] | None = None,
                    lines: Sequence[tuple[str, int]] = (), styles: Sequence[int] | None = None,
                    running: bool = False) -> None:
        """Draw one line per (label, [(bucket_ms, value)]) over ``span`` [start, end) in buckets
        of ``bucket_ms`` (the axis ends at the bucket holding end - 1: now, for a running period);
        ``lines`` are horizontal marks (soft, hard); ``styles`` the n of each series' colour and
        marker (default: its position), so a series keeps its look when others are filtered out.
        ``running``: each value is a budget window's total so far, not the bucket's own amount."""
        self._loaded = True
        self._running = running
        self._series = [(label, list(points)) for label, points in series]
        self._styles = list(styles) if styles is not None else list(range(len(self._series)))
        self._metric = metric
        self._lines = list(lines)
        self._span = span
        self._bucket = bucket_ms
        self._draw()

    def _value(self, raw: int) -> float:
        return raw / NANOS_PER_USD if self._metric == "usd" else float(raw)

    def _axis_buckets(self) -> list[int]:
        seen = sorted({ts for _, pts in self._series for ts, _ in pts})
        if self._span is None or self._bucket <= 0:
            return seen
        start, end = self._span
        first, last = start - start % self._bucket, (end - 1) - (end - 1) % self._bucket
        return list(range(first, last + 1, self._bucket))

    def _x_ticks(self, buckets: list[int]) -> tuple[list[int], list[str]]:
        """Ticks where the label changes (one per day on a week of hours: never ``11-26 11-26``),
        as many as fit, counted back from the last bucket so the axis's end is always named."""
        span = buckets[-1] - buckets[0]
        fmt = "%H:%M" if span <= 2 * DAY_MS else "%m-%d"
        labels = [datetime.fromtimestamp(b / 1000, UTC).strftime(fmt) for b in buckets]
        candidates = [i for i in range(len(buckets)) if i == 0 or labels[i] != labels[i - 1]]
        if candidates[-1] != len(buckets) - 1 and fmt == "%H:%M":
            candidates.append(len(buckets) - 1)
        room = max(2, (self.size.width - 10) // 8) if self.size.width else 6
        step = max(1, -(-len(candidates) // room))
        ticks = candidates[::-1][::step][::-1]
        return ticks, [labels[i] for i in ticks]

    def _y_ticks(self, top: float) -> tuple[list[float], list[str]]:
        rows = max(3, (self.size.height or 12) - 4)
        step = _nice_step(top if top > 0 else 1.0, max(2, min(5, rows // 3)))
        if self._metric != "usd":
            step = max(1.0, step)  # no half a request
        values = [step * i for i in range(max(1, math.ceil(top / step - 1e-9)) + 1)]
        if self._metric == "usd":
            labels = [format_usd_compact(round(v * NANOS_PER_USD)) if v >= 1 else format_usd(round(v * NANOS_PER_USD))
                      for v in values]
        else:
            labels = [short_count(v) for v in values]
        return values, labels

    def _draw(self) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        if self.size.width and self.size.height:
            plt.plotsize(self.size.width, self.size.height)  # ticks are laid out for the real size
        buckets = self._axis_buckets()
        has_data = any(pts for _, pts in self._series)
        unit = "$" if self._metric == "usd" else self._metric
        if self._running:
            every = f", every {bucket_words(self._bucket)}" if self._bucket else ""
            self.unit = f"{unit} in the window so far{every}"
        else:
            self.unit = f"{unit} per {bucket_words(self._bucket)}" if self._bucket else unit
        self.buckets, self.x_labels, self.y_labels, self.legend_entries = buckets, [], [], []
        if not buckets or not has_data:
            plt.title("no data in this period" if self._loaded else "loading…")
            self._update_legend()
            self.refresh()
            return
        index = {ts: i for i, ts in enumerate(buckets)}
        ansi = self._ansi()
        top = 0.0
        for n, (label, pts) in enumerate(self._series):
            ys = [0.0] * len(buckets)
            for ts, value in pts:
                if ts in index:
                    ys[index[ts]] = self._value(value)
            top = max(top, *ys)
            color, marker = style_of(self._styles[n], ansi)
            self.legend_entries.append((label, color, marker))
            plt.plot(list(range(len(buckets))), ys, marker=marker, color=color)
        for label, value in self._lines:  # plotext's hline takes no label: the legend names them
            plt.hline(self._value(value), self._mark_color(label))
            top = max(top, self._value(value))
        ticks, self.x_labels = self._x_ticks(buckets)
        plt.xticks(ticks, self.x_labels)
        yvalues, self.y_labels = self._y_ticks(top)
        plt.yticks(yvalues, self.y_labels)
        plt.ylim(0, yvalues[-1])
        plt.xlim(0, max(1, len(buckets) - 1))
        plt.ylabel(self.unit)
        self._update_legend()
        self.refresh()

    def _update_legend(self) -> None:
        if self.legend_id is None or not self.is_attached:
            return
        legend = self.screen.query(f"#{self.legend_id}").first(Static)
        lines = []
        for label, color, marker in self.legend_entries:
            style = f"rgb({color[0]},{color[1]},{color[2]})" if isinstance(color, tuple) else _RICH_ANSI.get(
                color, color)
            sample = _LEGEND_SAMPLE.get(marker, marker * 2)
            lines.append(f"[{style}]{escape(sample)}[/] {escape(label)}")
        for label, value in self._lines:
            color = self._mark_color(label)
            style = f"rgb({color[0]},{color[1]},{color[2]})" if isinstance(color, tuple) else color
            amount = format_usd(value) if self._metric == "usd" else short_count(value)
            lines.append(f"[{style}]──[/] {label} {amount}")
        legend.update("\n".join(lines))

    def on_resize(self) -> None:
        self._draw()
