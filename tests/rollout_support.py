"""Live traffic of a rollout step written straight to a real (keyed) audit store, as a server would write it: the
champion's answers and the challenger's canary answers or shadow scores, each with the caller's audit-only field
(`region`), a latency, and later an outcome; the serving chain's events that begin the step."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np

from core.audit import AuditKeys, AuditStore, now_iso

SPEC = "loans"


def store(folder) -> AuditStore:
    return AuditStore(f"sqlite:///{folder / 'audit.db'}", AuditKeys.load(folder / "keys"))


@dataclass(frozen=True)
class Scorer:
    """How a version scores: `skill` 0 is a coin, 1 separates the classes well; `south_bias` adds to the score of
    region south (an unfair model); `threshold` decides."""

    skill: float
    south_bias: float = 0.0
    threshold: float = 0.5

    def score(self, y: np.ndarray, south: np.ndarray, noise: np.ndarray) -> np.ndarray:
        signal = self.skill * (y - 0.5) * 1.2 + self.south_bias * south
        return np.clip(0.5 + signal + noise, 0.001, 0.999)


def begin_rollout(s: AuditStore, champion: str, challenger: str, mode: str, share: float | None = None,
                  rollout: str | None = None, step: int = 1):
    return s.record_serving_event(SPEC, "rollout" if step == 1 else "step", "test", "a test rollout", mode=mode,
                                  share=share, champion=champion, challenger=challenger,
                                  rollout=rollout or f"v{challenger}", step=step, evidence={})


def traffic(s: AuditStore, n: int, champion: tuple[str, Scorer], challenger: tuple[str, Scorer], mode: str,
            share: float = 0.5, seed: int = 0, outcomes: float = 1.0, latency_ms: float = 20.0) -> dict[str, int]:
    """`n` requests of one row each. Returns decision id -> outcome for the decisions whose outcome is reported
    (a share `outcomes` of them; the labels are also written to the store)."""
    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=n) < 0.3).astype(int)
    south = rng.uniform(size=n) < 0.5
    (cv, cs), (nv, ns) = champion, challenger
    noise = rng.normal(0, 0.2, n)  # one applicant, one noise: equal versions score alike
    p_champion, p_challenger = cs.score(y, south, noise), ns.score(y, south, noise)
    records, labels = [], {}
    for i in range(n):
        region = "south" if south[i] else "north"
        now, h = now_iso(), uuid.uuid4().hex
        answered_by_canary = mode == "canary" and rng.uniform() < share
        version, scorer, p, variant = (nv, ns, p_challenger[i], "canary") if answered_by_canary else \
            (cv, cs, p_champion[i], "champion")
        rec = _record(version, variant, p, scorer.threshold, now, h, region, latency_ms)
        records.append(rec)
        if rng.uniform() < outcomes:
            labels[rec["decision_id"]] = int(y[i])
        if mode == "shadow":
            records.append(_record(nv, "shadow", p_challenger[i], ns.threshold, now, h, region, latency_ms))
    s.append(records)
    from core.audit import OutcomeReport

    if labels:
        s.record_outcomes([OutcomeReport(d, o) for d, o in labels.items()], key_id="lender")
    return labels


def _record(version: str, variant: str, p: float, threshold: float, now: str, h: str, region: str,
            latency_ms: float) -> dict:
    return {"decision_id": uuid.uuid4().hex, "time": now, "spec": SPEC, "model_name": SPEC, "model_version": version,
            "variant": variant, "input_hash": h, "inputs": {"income": 1.0}, "probability": float(p),
            "decision": int(p >= threshold), "threshold": threshold, "latency_ms": latency_ms,
            "audit_fields": {"region": region}}
