"""Drift window keys."""

from __future__ import annotations

import pytest

from core.audit.traffic import window_bounds, window_key


def test_window_keys_round_trip_and_bad_keys_say_what_they_expect():
    assert window_bounds(window_key(1, 1000)) == (1, 1000)
    with pytest.raises(ValueError, match="not a drift window key"):
        window_bounds("yesterday")
