"""One drift window's report: its decisions scored against the detectors of the version that served it, and the
typed record of what the report says, which the drift sensor reads back on its next tick.

`WindowReport.to_metadata()` writes a report's metadata and `ReportRecord.from_metadata()` reads the part the sensor
acts on; both spell the keys through `ReportRecord`, so the writer and the reader cannot drift apart.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg

from assets.detectors import load_version_detectors, reference_of
from assets.spec import LoadedSpec, PipelineSpec
from assets.wiring import png_markdown
from core.audit import AuditRecord, AuditStore
from core.audit.traffic import record_features, window_bounds, window_records
from core.lazy import np, pd
from resources.mlflow import MlflowResource
from resources.storage import StorageResource


@dataclass(frozen=True)
class ReportRecord:
    """What a window's drift report tells the sensor: which window and version, whether it drifted or its live AUC
    fell under the floor, whether that asks for a retrain, and the evidence the retrain run carries in its tags."""

    window: str
    model_version: str
    drift: bool
    performance_drop: bool
    retrain_requested: bool
    evidence: str

    def to_metadata(self) -> dict[str, Any]:
        return {"window": self.window, "model_version": self.model_version, "drift": self.drift,
                "performance_drop": self.performance_drop, "retrain_requested_by_sensor": self.retrain_requested,
                "evidence": self.evidence}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], partition: str | None = None) -> ReportRecord:
        """A report's record from its materialization's metadata (values or MetadataValues); keys an older report
        lacks take their defaults, and a report without evidence offers its message."""
        v = {k: getattr(m, "value", m) for k, m in metadata.items()}
        return cls(window=str(v.get("window") or partition or ""), model_version=str(v.get("model_version", "")),
                   drift=bool(v.get("drift", False)), performance_drop=bool(v.get("performance_drop", False)),
                   retrain_requested=bool(v.get("retrain_requested_by_sensor", False)),
                   evidence=str(v.get("evidence") or v.get("message") or ""))

    @property
    def trigger(self) -> str:
        """What asked for the retrain: `drift`, or `performance` (a live AUC under the floor)."""
        return "drift" if self.drift else "performance"


@dataclass(frozen=True)
class WindowReport:
    window: str
    first_seq: int
    last_seq: int
    model_version: str
    drift: bool
    result: dict[str, Any]
    outcomes: int
    live_auc: float | None
    performance_drop: bool
    plot: str | None

    @property
    def retrain(self) -> bool:
        return self.drift or self.performance_drop

    def evidence(self) -> str:
        moved = ", ".join(self.result.get("features_moved", {}))[:200]
        parts = [f"window {self.window} served by v{self.model_version}"]
        if self.drift:
            parts.append(f"drift in {moved or 'the scores'}")
        if self.performance_drop:
            parts.append(f"live AUC {self.live_auc:.3f} on {self.outcomes} outcomes under the floor")
        return "; ".join(parts)

    def record(self) -> ReportRecord:
        return ReportRecord(window=self.window, model_version=self.model_version, drift=self.drift,
                            performance_drop=self.performance_drop, retrain_requested=self.retrain,
                            evidence=self.evidence())

    def value(self) -> dict[str, Any]:
        """The asset's value: the detectors' result with the window, version and live figures."""
        return {**self.result, "window": self.window, "model_version": self.model_version,
                "live_auc": self.live_auc, "outcomes": self.outcomes}

    def to_metadata(self) -> dict[str, Any]:
        """The record the sensor reads, and what a person reads in the UI: each detector's figures, what moved,
        the live AUC and the plot."""
        r = self.result
        rows = ["| detector | statistic | p-value | threshold | drift |", "| --- | --- | --- | --- | --- |"]
        for d in r.get("detectors", []):
            rows.append(f"| {d['name']} | {d['statistic']:.4g} | {d['p_value']:.4g} | {d['threshold']:.4g} | "
                        f"{'yes' if d['drift'] else 'no'} |")
        moved = [f"- {f}: {v['direction']}, {v['test']} effect {v['effect']:.3f} (before {_num(v['before'])}, "
                 f"after {_num(v['after'])}{', ' + str(v['category']) if v.get('category') else ''})"
                 for f, v in r.get("features_moved", {}).items()]
        meta: dict[str, Any] = {
            **self.record().to_metadata(), "first_seq": self.first_seq, "last_seq": self.last_seq,
            "decisions": r.get("window_size", 0), "status": r.get("status", ""), "outcomes": self.outcomes,
            "live_auc": self.live_auc if self.live_auc is not None else "n/a",
            "detectors": dg.MetadataValue.md("\n".join(rows)),
            "features_moved": dg.MetadataValue.md("\n".join(moved) or "none"), "message": r.get("message", ""),
        }
        if self.plot:
            meta["plot"] = png_markdown(self.plot, f"drift, window {self.window}")
            meta["plot_path"] = dg.MetadataValue.path(self.plot)
        return meta


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def window_frame(spec: PipelineSpec, records: list[AuditRecord]) -> pd.DataFrame:
    """The decisions' raw inputs as a frame in the spec's types; redacted values count as missing."""
    rows = [record_features(r, spec.features.all) for r in records]
    frame = pd.DataFrame(rows, columns=spec.features.all)
    for col in spec.features.numeric:
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("float64")
    for col in spec.features.categorical:
        frame[col] = frame[col].map(lambda v: None if v is None or v != v else str(v)).astype(object)
    return frame


def text_vectors(loaded: LoadedSpec, storage: StorageResource, frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Window texts embedded by the encoder the spec trains with, through the same content-hash cache."""
    if not loaded.spec.has_text:
        return {}
    from assets.features import clean_text
    from resources.embedder import EmbeddingCache, embed_with_cache, resolve_model

    spec = loaded.spec
    ref = resolve_model(spec.embeddings.model, spec.name, loaded.path.parent)
    cache = EmbeddingCache(storage.local_dir("embedding_cache", ref.cache_id))
    return {col: embed_with_cache(ref, [clean_text(t) for t in frame[col]], cache, spec.embeddings.batch_size).vectors
            for col in spec.features.text}


def live_metrics(records: list[AuditRecord], outcomes: dict[str, int]) -> tuple[int, float | None]:
    """How many decisions have a recorded outcome, and the window's AUC on them when both classes occur."""
    known = [(outcomes[r.decision_id], r.probability) for r in records if r.decision_id in outcomes]
    if len(known) < 30 or len({y for y, _ in known}) < 2:
        return len(known), None
    from sklearn.metrics import roc_auc_score

    y, p = zip(*known)
    return len(known), float(roc_auc_score(y, p))


def report_window(loaded: LoadedSpec, storage: StorageResource, mlflow: MlflowResource, store: AuditStore, key: str,
                  plot_dir: Path | None = None) -> WindowReport:
    """Score one window against the detectors of the version that served most of it."""
    from core.drift import drift_plot

    spec = loaded.spec
    first, last = window_bounds(key)
    records = window_records(store, spec.name, first, last)
    if not records:
        raise ValueError(f"{spec.name}: the audit log holds no served decision between seq {first} and {last}")
    version = Counter(r.model_version for r in records).most_common(1)[0][0]
    bundle = load_version_detectors(storage, mlflow, spec.name, version)
    frame = window_frame(spec, records)
    scores = np.array([r.probability for r in records], dtype=np.float64)
    result = bundle.score(frame, text_vectors(loaded, storage, frame), scores)
    labels = store.outcomes([r.decision_id for r in records], rule=spec.monitoring.outcome_rule)
    n_outcomes, auc = live_metrics(records, labels)
    plot = None
    if plot_dir is not None and result.status == "scored":
        reference, reference_scores = reference_of(storage, spec.name, version)
        plot = str(drift_plot(result, reference, frame, plot_dir / f"{key}.png", reference_scores, scores))
    return WindowReport(window=key, first_seq=first, last_seq=last, model_version=version, drift=bool(result.drift),
                        result=result.to_dict(), outcomes=n_outcomes, live_auc=auc,
                        performance_drop=auc is not None and auc < spec.compliance.min_auc, plot=plot)
