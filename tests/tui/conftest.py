"""The dashboard's interaction tests run twice: at the default refresh (2 s, the poll running
under the keys, as an operator has it) and with the poll effectively frozen (an hour)."""

from __future__ import annotations

import pytest


@pytest.fixture(params=[2.0, 3600.0], ids=["live", "frozen"])
def refresh(request: pytest.FixtureRequest) -> float:
    return float(request.param)
