"""Durations as users write them, and the budget's clock (merge_engine/search/budget.py)."""
from __future__ import annotations

import pytest

from merge_engine.errors import ConfigError
from merge_engine.search.budget import MARGIN, SLACK, Budget, parse_duration, reserve_seconds


@pytest.mark.parametrize("text, seconds", [("50m", 3000), ("1h30m", 5400), ("90s", 90), ("3600", 3600), ("1.5h", 5400),
                                           (" 2m 30s ", 150), (45, 45), (0.5, 0.5)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "5d", "-3m", "0", "m", "1h-2m", True, "9" * 400 + "s", "9" * 400,
                                  float("inf"), float("nan")])
def test_bad_durations_are_refused(text):
    with pytest.raises(ConfigError, match="budget"):
        parse_duration(text)


def test_budget_counts_from_its_creation_on_its_clock():
    now = [10.0]
    budget = Budget(60, lambda: now[0])
    now[0] = 25.0
    assert budget.elapsed() == 15 and budget.left() == 45


def test_the_reserve_has_its_margin():
    assert reserve_seconds(4.0, 6.0) == MARGIN * 10.0 + SLACK
