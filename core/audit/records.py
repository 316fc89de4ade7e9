"""What one audit record is: its fields, its canonical JSON and the hash that chains it (Dagster-free)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from core.names import VARIANTS

__all__ = ["OOD_FLAGGED", "OOD_IN", "OOD_REFUSED", "VARIANTS", "AuditError", "AuditRecord", "ChainVerification", "canonical_json", "input_hash", "now_iso",
           "redact", "row_hash"]

GENESIS = "0" * 64
DEFAULT_RETENTION_DAYS = 183  # six months, the AI Act's floor for deployers' logs (Art. 26(6))
REDACTED = "<redacted>"


class AuditError(RuntimeError):
    """A record that cannot be written, or a store that cannot be opened; the message says which and why."""


@dataclass(frozen=True)
class AuditRecord:
    """One decision as stored: what came in, what was answered, by which model version, for whom."""

    seq: int
    decision_id: str
    time: str
    spec: str
    model_name: str
    model_version: str
    variant: str
    input_hash: str
    inputs: dict
    probability: float
    decision: int
    threshold: float
    top_factors: list
    similar_cases: list
    latency_ms: float
    key_id: str | None
    prev_hash: str
    record_hash: str
    # The notice sent with an adverse decision (core/notices/): the template version it was rendered from, its
    # sha256 (keyed under the keyed rule, like the input hash) and its text (sealed with the inputs).
    notice_template_version: str | None = None
    notice_sha256: str | None = None
    notice: str | None = None
    # The caller's audit-only fields (the spec's sensitive columns; never model inputs), sealed with the inputs.
    audit_fields: dict = field(default_factory=dict)
    # The out-of-distribution detector's score of the row and its verdict (core/ood.py): OOD_IN, OOD_FLAGGED
    # (answered, flagged) or OOD_REFUSED (refused for human review: never answered). None: not scored (a version
    # without the detector, or a record written before it existed).
    ood_score: float | None = None
    ood: int | None = None


@dataclass(frozen=True)
class ChainVerification:
    """The result of walking the chains: `problems` names the seq and decision id of each row that breaks it,
    first bad seq first; `rules` says which rule each part of the log was verified under."""

    ok: bool
    checked: int
    problems: list[str]
    first_bad_seq: int | None = None  # the first decision seq that is not what was written (None: none named)
    outcome_events_checked: int = 0
    first_bad_outcome_event: int | None = None
    checkpoints_checked: int = 0
    rules: list[str] = field(default_factory=list)
    serving_events_checked: int = 0  # the serving chain (core/audit/serving_events.py)


# the stored columns; audit_fields ride inside the sealed inputs (core/audit/store.py)
FIELDS = [f.name for f in fields(AuditRecord) if f.name != "audit_fields"]
OOD_IN, OOD_FLAGGED, OOD_REFUSED = 0, 1, 2
# Fields added after records were first written: hashed only when set, so the rows written before them (and the
# decisions that have no notice, or were not scored for out-of-distribution) keep the hash they were written with.
OPTIONAL_FIELDS = ("notice_template_version", "notice_sha256", "notice", "ood_score", "ood")
JSON_FIELDS = ("inputs", "top_factors", "similar_cases")
REQUIRED = ("decision_id", "spec", "model_name", "model_version", "variant", "inputs", "probability", "decision",
             "threshold")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _plain(value: Any) -> Any:
    """A JSON-stable copy: NaN and infinities become None, numpy scalars plain Python."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces, NaN and infinities as null, numpy scalars as plain numbers. Values that are plain
    JSON already (the usual case) skip the copy: json refuses NaN and numpy integers, and those take the slow path,
    so both paths give the same text."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        return json.dumps(_plain(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def input_hash(inputs: dict) -> str:
    """sha256 of the raw inputs (before redaction), so a caller can prove which inputs were decided on."""
    return hashlib.sha256(canonical_json(inputs).encode()).hexdigest()


def redact(inputs: dict, fields_to_redact: list[str] | tuple[str, ...]) -> dict:
    return {k: (REDACTED if k in fields_to_redact and v is not None else v) for k, v in inputs.items()}


def row_hash(row: dict[str, Any]) -> str:
    """Hash over every stored field but record_hash (an optional field only when set); JSON fields are hashed as
    the exact text stored."""
    payload = {k: row[k] for k in FIELDS if k != "record_hash" and k not in OPTIONAL_FIELDS}
    payload.update({k: row[k] for k in OPTIONAL_FIELDS if row.get(k) is not None})
    if payload.get("ood_score") is not None:
        payload["ood_score"] = repr(float(payload["ood_score"]))
    payload["probability"] = repr(float(payload["probability"]))
    payload["threshold"] = repr(float(payload["threshold"]))
    payload["latency_ms"] = repr(float(payload["latency_ms"]))
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


