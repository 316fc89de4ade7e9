"""The audit chain heads that `<spec>/inference_log` materializations recorded (metadata `audit_anchor`): checkpoints
kept in Dagster's storage, outside the audit store. `inference_log` verifies the store against the ones before
it, and `python -m orchestration.decisions --verify` against all of them (core/audit/checkpoints.py)."""

from __future__ import annotations

from typing import Any

import dagster as dg

from assets import naming
from core.audit import ANCHOR_METADATA, Checkpoint


def inference_log_anchors(instance: dg.DagsterInstance | None, limit: int = 1000) -> list[Checkpoint]:
    """Every chain head the newest `limit` materializations of each `<spec>/inference_log` recorded."""
    if instance is None:
        return []
    out: list[Checkpoint] = []
    for key in instance.get_asset_keys():
        if key.path[-1] != naming.INFERENCE_LOG:
            continue
        records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key), limit=limit).records
        for r in records:
            m = r.asset_materialization
            anchor = _value(m.metadata.get(ANCHOR_METADATA)) if m is not None else None
            if not isinstance(anchor, dict):
                continue
            source = f"{key.to_user_string()} materialization (run {r.run_id[:8]})"
            out += [c for c in (Checkpoint.parse(v, source) for v in anchor.values()) if c is not None]
    return out


def _value(v: Any) -> Any:
    return getattr(v, "value", v)
