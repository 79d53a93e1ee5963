"""Budgets, by one name: the pure rules (``engine.rules``: policies, scopes, windows, the
evaluation of a call), the stateful book that applies them in the ledger's transactions
(``engine.book``: counters, holds, settlement, alerts) and forecasts and backtests
(``engine.forecasts``). Code outside those three imports budgets' names from here.
"""

from __future__ import annotations

from engine.book import (
    ALERTED_KEPT,
    CONTEXT_COLUMNS,
    DEFAULT_HOLD_TTL_MS,
    EXPIRY_CHECK_MS,
    Authorization,
    BudgetBook,
    HoldError,
    Overshoot,
)
from engine.forecasts import Backtest, Forecast, backtest, consumption_series, forecast
from engine.rules import (
    ACTIONS,
    CALENDAR_UNITS,
    DEFAULT_MAX_OUTPUT_TOKENS,
    DEFAULT_THRESHOLDS,
    METRICS,
    MODES,
    SCOPE_KINDS,
    Action,
    CallCost,
    Decision,
    Evaluation,
    Metric,
    Mode,
    Outcome,
    Policy,
    Scope,
    Status,
    Window,
    applicable,
    build_policy,
    decide,
    outcome,
    parse_amount,
    parse_scope,
    parse_window,
    window_bounds,
    zone,
)

__all__ = [
    "ACTIONS", "ALERTED_KEPT", "CALENDAR_UNITS", "CONTEXT_COLUMNS", "DEFAULT_HOLD_TTL_MS", "DEFAULT_MAX_OUTPUT_TOKENS",
    "DEFAULT_THRESHOLDS", "EXPIRY_CHECK_MS", "METRICS", "MODES", "SCOPE_KINDS", "Action", "Authorization", "Backtest",
    "BudgetBook", "CallCost", "Decision", "Evaluation", "Forecast", "HoldError", "Metric", "Mode", "Outcome",
    "Overshoot", "Policy", "Scope", "Status", "Window", "applicable", "backtest", "build_policy",
    "consumption_series", "decide", "forecast", "outcome", "parse_amount", "parse_scope", "parse_window",
    "window_bounds", "zone",
]
