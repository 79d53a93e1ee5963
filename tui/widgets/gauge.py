"""A budget gauge as text: consumed, then held, against the soft and hard marks.

Colours come from the theme's success / warning / error variables; a budget over its
hard limit is never green. Marks are drawn so the bar reads without colour (NO_COLOR).
"""

from __future__ import annotations

from collections.abc import Mapping

from rich.text import Text

from engine.money import percent_of

# What a gauge is drawn in when no theme is at hand; every theme, ansi-dark and ansi-light
# included, renders these names legibly.
DEFAULT_COLORS: Mapping[str, str] = {"ok": "green", "warn": "yellow", "over": "red"}


def theme_colors(variables: Mapping[str, str]) -> dict[str, str]:
    """Rich colours for ok / warn / over from a Textual theme's success / warning / error
    (``App.theme_variables``); an ANSI theme yields ANSI colours, so the terminal's palette rules."""
    from textual.color import Color, ColorParseError

    colors = dict(DEFAULT_COLORS)
    for level, variable in (("ok", "success"), ("warn", "warning"), ("over", "error")):
        try:
            colors[level] = Color.parse(variables[variable]).rich_color.name
        except (KeyError, ColorParseError):
            pass
    return colors


def gauge(consumed: int, held: int, hard: int, soft: int | None, width: int = 24,
          colors: Mapping[str, str] = DEFAULT_COLORS) -> Text:
    """``█`` consumed, ``▒`` held, ``·`` free; ``│`` the soft mark, ending at the hard limit."""
    width = max(8, width)
    scale = max(hard, 1)
    used_cells = min(width, consumed * width // scale)
    held_cells = min(width - used_cells, (consumed + held) * width // scale - used_cells)
    soft_cell = None if soft is None else min(width - 1, soft * width // scale)
    level = state(consumed + held, hard, soft)
    style = colors[level]
    text = Text()
    for i in range(width):
        if i < used_cells:
            char = "█"
        elif i < used_cells + held_cells:
            char = "▒"
        else:
            char = "│" if i == soft_cell else "·"
        text.append(char, style=style if char in "█▒" else "dim")
    pct = percent_of(consumed + held, hard)  # the command line's rule (engine.money)
    text.append(f" {pct:>3}%", style=style)
    if level == "over":
        text.append(" OVER", style=colors["over"] + " bold")
    return text


def state(used: int, hard: int, soft: int | None) -> str:
    if used > hard:
        return "over"
    if (soft is not None and used > soft) or used * 100 >= hard * 80:
        return "warn"
    return "ok"

