"""Whose outcome reports to trust: the per-key burst check (core/audit/outcomes.py `key_bursts`) against the
serving versions' measured error. `inference_log` shows it and flags the keys; the data stage leaves a flagged
key's reports out of the labels a retrain learns from (`monitoring.exclude_flagged_outcome_keys`).

The measured error of a version is `1 - test_accuracy` from its `model_evaluation` materialization (the test
split, at the operating threshold); a version the instance has no evaluation for is judged on its calibrated
probabilities alone.
"""

from __future__ import annotations

from typing import Any

import dagster as dg

from assets import naming
from core.audit import AuditStore
from core.audit.outcomes import KeyBurst, key_bursts


def version_errors(instance: dg.DagsterInstance | None, spec_name: str, limit: int = 100) -> dict[str, float]:
    """model version -> its test-split error, from the newest model_evaluation materialization of each."""
    if instance is None:
        return {}
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=naming.asset_key(spec_name, naming.MODEL_EVALUATION)), limit=limit).records
    out: dict[str, float] = {}
    for r in records:  # newest first
        m = r.asset_materialization
        meta = m.metadata if m is not None else {}
        version, accuracy = _value(meta.get("model_version")), _value(meta.get("test_accuracy"))
        if version is not None and accuracy is not None and str(version) not in out:
            out[str(version)] = 1.0 - float(accuracy)
    return out


def _value(v: Any) -> Any:
    return getattr(v, "value", v)


def outcome_key_bursts(instance: dg.DagsterInstance | None, store: AuditStore, spec_name: str) -> list[KeyBurst]:
    """Each key that reported outcomes of `spec_name`, tested against the model's measured error."""
    return key_bursts(store.outcome_evidence(spec_name), version_errors(instance, spec_name))


def flagged(bursts: list[KeyBurst]) -> list[str]:
    return [b.key_id for b in bursts if b.flagged]


def bursts_markdown(bursts: list[KeyBurst]) -> str:
    if not bursts:
        return "no outcomes reported"
    rows = ["| key | outcomes | on confident decisions | contradicting | share | expected | p-value | flagged |",
            "|---|---|---|---|---|---|---|---|"]
    rows += [f"| {b.key_id} | {b.outcomes} | {b.confident} | {b.contradicting} | {b.share:.1%} | "
             f"{b.expected_share:.1%} | {b.p_value:.2g} | {'**yes**' if b.flagged else 'no'} |" for b in bursts]
    return "\n".join(rows)
