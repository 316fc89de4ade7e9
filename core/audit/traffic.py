"""Served traffic: the decisions that were answered to real callers, and the windows drift is judged on.

One definition for every reader (the drift sensor and report, `inference_log`, learning from outcomes, the
demo): a decision is traffic when its variant answered the caller (`SERVED_VARIANTS`: champion or canary, not
shadow) and it was not one of the deployment's own smoke requests (`SMOKE_KEY_ID`). Those stay on the audit
log; they are just not traffic.

A drift window is `size` consecutive traffic decisions, keyed `<first seq>-<last seq>` (zero-padded).
"""

from __future__ import annotations

from typing import Any

from core.audit.records import REDACTED, AuditRecord
from core.names import SERVED_VARIANTS, SMOKE_KEY_ID

NOT_TRAFFIC_KEY_IDS = (SMOKE_KEY_ID,)


def window_key(first_seq: int, last_seq: int) -> str:
    return f"{first_seq:010d}-{last_seq:010d}"


def window_bounds(key: str) -> tuple[int, int]:
    """(first, last) seq of a window key; a key of another shape is a ValueError naming it."""
    try:
        first, last = (int(p) for p in key.split("-"))
    except ValueError:
        raise ValueError(f"{key!r} is not a drift window key (<first seq>-<last seq>)") from None
    return first, last


def traffic_after(store: Any, spec: str, after: int, limit: int) -> list[AuditRecord]:
    """Up to `limit` traffic decisions of `spec` with seq > `after`, oldest first."""
    return store.read_after(after, limit=limit, spec=spec, variants=SERVED_VARIANTS,
                            exclude_key_ids=NOT_TRAFFIC_KEY_IDS)


def all_traffic(store: Any, spec: str, after: int = 0, page: int = 5000) -> list[AuditRecord]:
    """Every traffic decision of `spec` after seq `after`, read in pages."""
    out: list[AuditRecord] = []
    while True:
        batch = traffic_after(store, spec, after, page)
        if not batch:
            return out
        out += batch
        after = batch[-1].seq


def traffic_count(store: Any, spec: str) -> int:
    """How many traffic decisions of `spec` are on the log."""
    per_variant = store.count(spec, exclude_key_ids=NOT_TRAFFIC_KEY_IDS)
    return sum(per_variant.get(v, 0) for v in SERVED_VARIANTS)


def window_records(store: Any, spec: str, first: int, last: int) -> list[AuditRecord]:
    """The traffic decisions of one window, in log order."""
    out: list[AuditRecord] = []
    after = first - 1
    while True:
        batch = traffic_after(store, spec, after, 1000)
        out += [r for r in batch if r.seq <= last]
        if not batch or batch[-1].seq >= last:
            return out
        after = batch[-1].seq


def full_windows(store: Any, spec: str, after: int, size: int, most: int = 20) -> list[tuple[int, int]]:
    """(first, last) seq of each complete window of `size` traffic decisions after seq `after`."""
    windows: list[tuple[int, int]] = []
    while len(windows) < most:
        batch = traffic_after(store, spec, after, size)
        if len(batch) < size:
            return windows
        windows.append((batch[0].seq, batch[-1].seq))
        after = batch[-1].seq
    return windows


def traffic_outcome_count(store: Any, spec: str, first: int, last: int) -> int:
    """How many traffic decisions with seq in [first, last] have an outcome."""
    return store.outcome_count(spec, first, last, variants=SERVED_VARIANTS, exclude_key_ids=NOT_TRAFFIC_KEY_IDS)


def record_features(record: AuditRecord, features: list[str]) -> dict[str, Any]:
    """A decision's inputs for `features`, with redacted values as missing (None)."""
    return {c: (None if record.inputs.get(c) == REDACTED else record.inputs.get(c)) for c in features}
