"""Drift window keys."""

from __future__ import annotations

import pytest

from core.audit.traffic import window_bounds, window_key


def test_window_keys_round_trip_and_bad_keys_say_what_they_expect():
    assert window_bounds(window_key(1, 1000)) == (1, 1000)
    with pytest.raises(ValueError, match="not a drift window key"):
        window_bounds("yesterday")


def _traffic(store, n: int, key_id: str | None = None) -> list:
    import uuid

    return store.append([{"decision_id": uuid.uuid4().hex, "spec": "loans", "model_name": "loans", "model_version": "1",
                          "variant": "champion", "inputs": {"x": i}, "probability": 0.2, "decision": 0,
                          "threshold": 0.5, "key_id": key_id} for i in range(n)])


def test_complete_windows_are_the_sensors_and_never_a_nightly_partial_one(tmp_path):
    """The sensor's windows follow one another; nightly partial windows (a chain of them after the last full one,
    or one overlapping a full one opened later) are not complete windows, however they lie."""
    from assets.windows import complete_windows
    from core.audit import AuditStore
    from core.audit.traffic import full_windows

    store = AuditStore(f"sqlite:///{tmp_path / 'audit.db'}")
    _traffic(store, 5, key_id="deployment-smoke")
    _traffic(store, 25)
    first, second = (window_key(a, b) for a, b in full_windows(store, "loans", 0, 10))
    assert complete_windows(store, "loans", [], 10) == [first, second]  # pending: the sensor's next tick opens them
    assert window_bounds(first) == (6, 15)  # the smoke decisions are in no window
    # Two quiet nights open the 5 decisions left, then 3 more, as partial windows one after the other.
    p1 = window_key(26, 30)
    _traffic(store, 3)
    p2 = window_key(31, 33)
    assert complete_windows(store, "loans", [first, second, p1, p2], 10) == [first, second]
    # Two more fill the third window, which the sensor opens over both partial ones.
    _traffic(store, 2)
    third = window_key(26, 35)
    assert complete_windows(store, "loans", [first, second, p1, p2], 10) == [first, second, third]
    assert complete_windows(store, "loans", [p1, second, third, first, p2], 10) == [first, second, third]
