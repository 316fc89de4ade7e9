"""Drift windows as Dagster sees them: one dynamic partition per window, and which windows are complete.

A window is `monitoring.window` consecutive traffic decisions of the audit log (core/audit/traffic.py says what
traffic is: the deployment's smoke requests and shadow decisions are not), keyed `<first seq>-<last seq>`. The
drift sensor opens each full window as a partition; the nightly check may open a partial one (fewer decisions,
so a quiet deployment is checked too), which the sensor's next full window then overlaps or follows.
"""

from __future__ import annotations

from collections.abc import Iterable

import dagster as dg

from core.audit import AuditStore
from core.audit.traffic import full_windows, traffic_after, window_bounds, window_key


def windows_partitions(spec_name: str) -> dg.DynamicPartitionsDefinition:
    return dg.DynamicPartitionsDefinition(name=f"{spec_name}__drift_windows")


def complete_windows(store: AuditStore, spec: str, opened: Iterable[str], size: int) -> list[str]:
    """Every full window of traffic as the drift sensor counts it: those it opened, then those its next tick opens.

    The sensor's windows follow one another without overlapping. A partial window the nightly check opened either
    comes after the last full one or overlaps a full one the sensor opened later; only the latest windows and
    overlapping ones are read from the log to tell them apart.
    """
    bounds = sorted({window_bounds(k) for k in opened})
    overlapping: set[tuple[int, int]] = set()
    reach: tuple[int, int] | None = None  # of the windows seen so far, the one that reaches furthest
    for b in bounds:
        if reach is not None and b[0] <= reach[1]:
            overlapping |= {b, reach}
        if reach is None or b[1] > reach[1]:
            reach = b
    known: dict[tuple[int, int], bool] = {}

    def full(b: tuple[int, int]) -> bool:
        if b not in known:
            batch = traffic_after(store, spec, b[0] - 1, size)
            known[b] = len(batch) == size and batch[0].seq == b[0] and batch[-1].seq == b[1]
        return known[b]

    last = next((i for i in reversed(range(len(bounds))) if full(bounds[i])), -1)
    counted = [b for b in bounds[:last + 1] if b not in overlapping or full(b)]
    after = max((b[1] for b in counted), default=0)
    pending = full_windows(store, spec, after, size, most=10 ** 9)
    return [window_key(a, b) for a, b in [*counted, *pending]]
