"""The monitoring stage: drift reports per window of served decisions, the drift sensor, and the schedules.

```
deployment -> inference_log -> drift_report (one partition per window)  --drift-->  <spec>__retrain
                                    ^ requested by <spec>__drift_sensor reading the audit log after its cursor
```

- Detectors are fitted when a version is evaluated, on its training split (tabular KS/Chi-squared, MMD on the
  text embeddings, KS and a mean test on the held-out validation and test scores; core/drift/), saved
  under `<home>/<spec>/drift/v<version>/` with a sha256 manifest, logged to the version's MLflow run and named by
  the version tag `drift_detectors_sha256`.
- Windows are dynamic partitions: a window is a count of decisions (default 1,000), not a span of time, so it
  closes when traffic fills it. The key is `<first seq>-<last seq>` of the audit log. The deployment's own
  smoke requests (key id `deployment-smoke`) are on the audit log but are not traffic: no window counts them.
- The sensor requests one drift_report run per full window (run_key `report:<window>`), then, for every drift
  report that found drift (or a live AUC under the spec's floor), one `<spec>__retrain` run (run_key
  `retrain:<window>`) with the evidence in its tags. Its cursor moves only with the requests, in the same tick
  result, so a daemon killed mid-tick re-reads the same windows next tick and the run keys stop duplicates.
- Outcomes usually come back long after a window was reported. The sensor follows the audit log's outcome
  events and reports a window again each time its labelled decisions pass 30, 100, 300, ... (run_key
  `outcomes:<window>:<n>`), so the live AUC is computed where outcomes exist and a drop under
  `compliance.min_auc` asks for the window's retrain (still one per window).
- When a retrain the sensor asked for finishes, its outcome (promoted, and which version; or refused, and by
  which gates with their numbers) is written back onto the window's drift report as an observation, so the
  report's history in the UI says what became of the alarm.
"""

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd

from assets import naming
from assets.naming import asset_key
from assets.spec import LoadedSpec, PipelineSpec
from assets.wiring import png_markdown
from core.audit.traffic import (full_windows, record_features, traffic_after, traffic_outcome_count, window_bounds,
                                window_key, window_records)
from core.names import DETECTORS_TAG
from resources.servers import AuditResource
from resources.storage import StorageResource, atomic_write_bytes

TAG = naming.TAG_PREFIX


# --- windows --------------------------------------------------------------------------------------------------


def windows_partitions(spec_name: str) -> dg.DynamicPartitionsDefinition:
    return dg.DynamicPartitionsDefinition(name=f"{spec_name}__drift_windows")


# --- detectors versioned with the model ------------------------------------------------------------------------


def detectors_dir(storage: StorageResource, spec_name: str, version: str) -> Path:
    return storage.local_dir(spec_name, "drift", f"v{version}")


def fit_version_detectors(spec: PipelineSpec, storage: StorageResource, mlflow: Any, version: str,
                          run_id: str | None, reference: pd.DataFrame, text_vectors: dict[str, np.ndarray],
                          held_out_scores: np.ndarray | None) -> str:
    """Fit the version's detectors on its training split, keep the reference beside them, log both to the run.

    Returns the sha256 of the detectors' manifest, also set as the version tag `drift_detectors_sha256`.
    """
    from core.drift import fit_detectors
    from core.files import sha256_file
    from resources.storage import frame_to_parquet_bytes

    m = spec.monitoring
    folder = detectors_dir(storage, spec.name, version)
    bundle_dir = folder / "detectors"
    fit_detectors(reference, list(spec.features.numeric), list(spec.features.categorical), text_vectors,
                  held_out_scores, bundle_dir, p_val=m.p_val, seed=spec.split.seed, min_window=m.min_window,
                  n_permutations=m.permutations)
    atomic_write_bytes(folder / "reference.parquet", frame_to_parquet_bytes(reference.reset_index(drop=True)))
    np.save(folder / "reference_scores.npy", np.asarray([] if held_out_scores is None else held_out_scores,
                                                        dtype=np.float64))
    digest = sha256_file(bundle_dir / "manifest.json")
    client = mlflow.client()
    if run_id:
        client.log_artifacts(run_id, str(bundle_dir), "drift_detectors")
    client.set_model_version_tag(spec.name, version, DETECTORS_TAG, digest)
    return digest


def load_version_detectors(storage: StorageResource, mlflow: Any, spec_name: str, version: str):
    """The version's detectors, refused unless their manifest is the one the version's tag names."""
    from core.drift import DriftDetectorError, load_detectors
    from core.files import sha256_file

    folder = detectors_dir(storage, spec_name, version) / "detectors"
    expected = (mlflow.client().get_model_version(spec_name, version).tags or {}).get(DETECTORS_TAG)
    if not expected:
        raise DriftDetectorError(f"{spec_name} v{version} has no {DETECTORS_TAG} tag: its detectors were never "
                                 f"fitted; materialize {spec_name}/model_evaluation for it")
    if not (folder / "manifest.json").is_file() or sha256_file(folder / "manifest.json") != expected:
        raise DriftDetectorError(f"{folder}/manifest.json is not the manifest {expected[:16]}... that {spec_name} "
                                 f"v{version} was evaluated with; re-evaluate that version")
    return load_detectors(folder)


# --- one window's report --------------------------------------------------------------------------------------


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


def window_frame(spec: PipelineSpec, records: list[Any]) -> pd.DataFrame:
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


def live_metrics(records: list[Any], outcomes: dict[str, int]) -> tuple[int, float | None]:
    """How many decisions have a recorded outcome, and the window's AUC on them when both classes occur."""
    known = [(outcomes[r.decision_id], r.probability) for r in records if r.decision_id in outcomes]
    if len(known) < 30 or len({y for y, _ in known}) < 2:
        return len(known), None
    from sklearn.metrics import roc_auc_score

    y, p = zip(*known)
    return len(known), float(roc_auc_score(y, p))


def report_window(loaded: LoadedSpec, storage: StorageResource, mlflow: Any, store: Any, key: str,
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
    n_outcomes, auc = live_metrics(records, store.outcomes([r.decision_id for r in records]))
    plot = None
    if plot_dir is not None and result.status == "scored":
        folder = detectors_dir(storage, spec.name, version)
        reference = pd.read_parquet(folder / "reference.parquet")
        plot = str(drift_plot(result, reference, frame, plot_dir / f"{key}.png",
                              np.load(folder / "reference_scores.npy"), scores))
    return WindowReport(window=key, first_seq=first, last_seq=last, model_version=version, drift=bool(result.drift),
                        result=result.to_dict(), outcomes=n_outcomes, live_auc=auc,
                        performance_drop=auc is not None and auc < spec.compliance.min_auc, plot=plot)


def _num(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def report_metadata(report: WindowReport) -> dict[str, Any]:
    r = report.result
    rows = ["| detector | statistic | p-value | threshold | drift |", "| --- | --- | --- | --- | --- |"]
    for d in r.get("detectors", []):
        rows.append(f"| {d['name']} | {d['statistic']:.4g} | {d['p_value']:.4g} | {d['threshold']:.4g} | "
                    f"{'yes' if d['drift'] else 'no'} |")
    moved = [f"- {f}: {v['direction']}, {v['test']} effect {v['effect']:.3f} (before {_num(v['before'])}, after "
             f"{_num(v['after'])}{', ' + str(v['category']) if v.get('category') else ''})"
             for f, v in r.get("features_moved", {}).items()]
    meta: dict[str, Any] = {
        "window": report.window, "first_seq": report.first_seq, "last_seq": report.last_seq,
        "decisions": r.get("window_size", 0), "status": r.get("status", ""), "drift": report.drift,
        "model_version": report.model_version, "outcomes": report.outcomes,
        "live_auc": report.live_auc if report.live_auc is not None else "n/a",
        "performance_drop": report.performance_drop, "retrain_requested_by_sensor": report.retrain,
        "detectors": dg.MetadataValue.md("\n".join(rows)),
        "features_moved": dg.MetadataValue.md("\n".join(moved) or "none"),
        "message": r.get("message", ""), "evidence": report.evidence(),
    }
    if report.plot:
        meta["plot"] = png_markdown(report.plot, f"drift, window {report.window}")
        meta["plot_path"] = dg.MetadataValue.path(report.plot)
    return meta


# --- the sensor -----------------------------------------------------------------------------------------------


# Outcome counts at which a window is judged again: live AUC needs 30 labelled decisions, and each step
# roughly triples the evidence, so a window is re-reported a handful of times, not once per outcome.
OUTCOME_MILESTONES = (30, 100, 300, 1000, 3000, 10000, 30000, 100000)
FINISHED = (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)


@dataclass(frozen=True)
class SensorCursor:
    """Where the drift sensor has read to, in each of the four feeds it follows.

    seq: the last audit seq turned into a window; event_id: the last drift_report event read; last_retrain: when
    a retrain was last asked for (the cooldown); outcome_id: the last outcome event read; retrains_until: the
    update time of the last finished retrain whose outcome was written back to its window's report.
    """

    seq: int = 0
    event_id: int = 0
    last_retrain: float = 0.0
    outcome_id: int = 0
    retrains_until: float = 0.0

    @classmethod
    def parse(cls, raw: str | None) -> "SensorCursor":
        return cls(**json.loads(raw)) if raw else cls()

    def dump(self) -> str:
        return json.dumps({"seq": self.seq, "event_id": self.event_id, "last_retrain": self.last_retrain,
                           "outcome_id": self.outcome_id, "retrains_until": self.retrains_until})


def _run_exists(instance: dg.DagsterInstance, job: str, run_key: str) -> bool:
    runs = instance.get_run_records(dg.RunsFilter(job_name=job, tags={"dagster/run_key": run_key}), limit=1)
    return bool(runs)


def outcome_rechecks(spec: PipelineSpec, instance: dg.DagsterInstance, store: Any, after_event: int,
                     skip: set[str]) -> tuple[list[dg.RunRequest], int]:
    """Windows whose outcomes came back since `after_event` are reported again as their labelled share grows
    (run_key `outcomes:<window>:<milestone>`), so the live AUC, and a drop under the floor, is seen."""
    import bisect

    events = store.outcome_events_after(after_event, spec.name)
    if not events:
        return [], after_event
    seqs = sorted({seq for _, seq in events})
    requests = []
    for key in instance.get_dynamic_partitions(windows_partitions(spec.name).name):
        first, last = window_bounds(key)
        i = bisect.bisect_left(seqs, first)
        if key in skip or i == len(seqs) or seqs[i] > last:
            continue
        n = traffic_outcome_count(store, spec.name, first, last)
        milestone = max((m for m in OUTCOME_MILESTONES if m <= n), default=0)
        if milestone:
            requests.append(dg.RunRequest(run_key=f"outcomes:{key}:{milestone}", partition_key=key,
                                          job_name=naming.job_name(spec.name, "report_drift"),
                                          tags={f"{TAG}window": key, f"{TAG}outcomes": str(n)}))
    return requests, events[-1][0]


def retrain_outcome(instance: dg.DagsterInstance, run: Any) -> dict[str, Any]:
    """What a finished retrain did, from its own events: the version promoted, or the gates that refused it."""
    events = instance.all_logs(run.run_id, of_type={dg.DagsterEventType.ASSET_CHECK_EVALUATION,
                                                    dg.DagsterEventType.ASSET_MATERIALIZATION,
                                                    dg.DagsterEventType.STEP_FAILURE})
    refused, failures, champion = [], [], None
    for e in events:
        data = e.dagster_event.event_specific_data
        kind = e.dagster_event.event_type
        if kind == dg.DagsterEventType.ASSET_CHECK_EVALUATION and not data.passed:
            refused.append(f"{data.check_name}: {data.description or 'failed'}")
        elif kind == dg.DagsterEventType.ASSET_MATERIALIZATION and \
                data.materialization.asset_key.path[-1] == naming.CHAMPION_MODEL:
            champion = {k: v.value for k, v in data.materialization.metadata.items()}
        elif kind == dg.DagsterEventType.STEP_FAILURE:
            failures.append(f"{e.step_key}: {(data.error.message if data.error else e.user_message).strip()}")
    if run.status == dg.DagsterRunStatus.SUCCESS and champion is not None:
        outcome = "promoted" if champion.get("changed") else "not changed"
        reason = f"champion v{champion.get('champion_version')}: {champion.get('decision', '')}"
    elif run.status == dg.DagsterRunStatus.CANCELED:
        outcome, reason = "canceled", "the run was canceled; the champion keeps serving"
    elif refused:
        outcome, reason = "refused", "; ".join(refused)
    else:
        outcome = "failed"
        reason = "; ".join(failures) or f"run ended {run.status.value} without promoting"
    return {"retrain_run": run.run_id, "retrain_outcome": outcome, "retrain_reason": reason[:2000],
            "champion_version": str(champion.get("champion_version")) if champion else "unchanged"}


def _written_back(instance: dg.DagsterInstance, report_key: dg.AssetKey, window: str, run_id: str) -> bool:
    found = instance.fetch_observations(dg.AssetRecordsFilter(asset_key=report_key, asset_partitions=[window]),
                                        limit=20)
    return any(str(getattr(r.asset_observation.metadata.get("retrain_run"), "value", "")) == run_id
               for r in found.records)


def retrain_outcomes(spec: PipelineSpec, instance: dg.DagsterInstance, after: float
                     ) -> tuple[list[dg.AssetObservation], float]:
    """Each retrain that finished since `after` is written back, as an observation, onto the drift report of the
    window that asked for it: promoted (and which version) or refused (and by which gates)."""
    from datetime import UTC, datetime

    records = instance.get_run_records(
        dg.RunsFilter(job_name=naming.job_name(spec.name, "retrain"), statuses=list(FINISHED),
                      updated_after=datetime.fromtimestamp(after, UTC)),
        limit=50, order_by="update_timestamp", ascending=True)
    observations = []
    report_key = asset_key(spec.name, naming.DRIFT_REPORT)
    for record in records:
        after = max(after, record.update_timestamp.timestamp())
        window = record.dagster_run.tags.get(f"{TAG}window")
        if not window:
            continue  # a retrain started by hand or by the weekly schedule answers to no window
        if _written_back(instance, report_key, window, record.dagster_run.run_id):
            continue  # a daemon that died after storing the observation but before its cursor: not twice
        meta = retrain_outcome(instance, record.dagster_run)
        observations.append(dg.AssetObservation(
            asset_key=asset_key(spec.name, naming.DRIFT_REPORT), partition=window,
            description=f"retrain {meta['retrain_outcome']}: {meta['retrain_reason'][:300]}", metadata=meta))
    return observations, after


def evaluate_drift_sensor(spec: PipelineSpec, instance: dg.DagsterInstance, store: Any, cursor: SensorCursor,
                          now: float, log: Any) -> dg.SensorResult:
    """New full windows become drift_report runs; windows whose outcomes came back are reported again; drift
    (or a live AUC under the floor) found in a report becomes one retrain run; a finished retrain's outcome is
    written back onto its window's report."""
    m = spec.monitoring
    report_key = asset_key(spec.name, naming.DRIFT_REPORT)
    retrain_job = naming.job_name(spec.name, "retrain")
    partitions = windows_partitions(spec.name)
    windows = full_windows(store, spec.name, cursor.seq, m.window)
    keys = [window_key(a, b) for a, b in windows]
    requests = [dg.RunRequest(run_key=f"report:{k}", job_name=naming.job_name(spec.name, "report_drift"),
                              partition_key=k, tags={f"{TAG}window": k}) for k in keys]
    seq = windows[-1][1] if windows else cursor.seq
    rechecks, outcome_id = outcome_rechecks(spec, instance, store, cursor.outcome_id, set(keys))
    requests += rechecks

    event_id, last_retrain = cursor.event_id, cursor.last_retrain
    found = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=report_key, after_storage_id=event_id),
                                            limit=100, ascending=True)
    for record in found.records:
        event_id = max(event_id, record.storage_id)
        meta = {k: v.value for k, v in record.asset_materialization.metadata.items()}
        if not meta.get("retrain_requested_by_sensor"):
            continue
        window = str(meta.get("window", record.asset_materialization.partition))
        run_key = f"retrain:{window}"
        if _run_exists(instance, retrain_job, run_key):
            continue  # this window already has its retrain (a re-report after outcomes came back, or a replay)
        if now - last_retrain < m.retrain_cooldown_hours * 3600:
            log.info(f"{spec.name}: window {window} asks for a retrain, but one was requested "
                     f"{(now - last_retrain) / 3600:.1f} h ago (cooldown {m.retrain_cooldown_hours} h)")
            continue
        last_retrain = now
        requests.append(dg.RunRequest(
            run_key=run_key, job_name=retrain_job,
            tags={f"{TAG}window": window, f"{TAG}trigger": "drift" if meta.get("drift") else "performance",
                  f"{TAG}served_version": str(meta.get("model_version", "")),
                  f"{TAG}evidence": str(meta.get("evidence") or meta.get("message", ""))[:250]}))
    observations, retrains_until = retrain_outcomes(spec, instance, cursor.retrains_until)
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[partitions.build_add_request(keys)] if keys else [],
        asset_events=observations,
        cursor=SensorCursor(seq=seq, event_id=event_id, last_retrain=last_retrain, outcome_id=outcome_id,
                            retrains_until=retrains_until).dump())


# --- wiring ---------------------------------------------------------------------------------------------------


def definitions(loaded: LoadedSpec, retrain: Any) -> dg.Definitions:
    """drift_report, its job, the drift sensor (which starts `retrain`) and the nightly drift check."""
    spec = loaded.spec
    key = asset_key(spec.name, naming.DRIFT_REPORT)
    partitions = windows_partitions(spec.name)

    @dg.asset(key=key, group_name=naming.MONITORING, partitions_def=partitions,
              deps=[asset_key(spec.name, naming.INFERENCE_LOG)], required_resource_keys={"storage", "mlflow", "audit"})
    def drift_report(context: dg.AssetExecutionContext) -> dg.Output[dict]:
        """One window of served decisions against the detectors of the version that served it: per-detector
        statistic, p-value and threshold, the features that moved and by how much, live AUC where outcomes
        came back, and a plot. Drift (or a live AUC under the spec's floor) makes the sensor ask for a retrain."""
        r = context.resources
        report = report_window(loaded, r.storage, r.mlflow, r.audit.store(), context.partition_key,
                               r.storage.local_dir(spec.name, "drift", "reports"))
        return dg.Output({**report.result, "window": report.window, "model_version": report.model_version,
                          "live_auc": report.live_auc, "outcomes": report.outcomes}, metadata=report_metadata(report))

    report_job = dg.define_asset_job(naming.job_name(spec.name, "report_drift"), selection=[key],
                                     partitions_def=partitions, tags={naming.SPEC_TAG: spec.name},
                                     description=f"Report drift for one window of {spec.name}'s served decisions.")

    @dg.sensor(name=naming.drift_sensor_name(spec.name), jobs=[report_job, retrain],
               minimum_interval_seconds=spec.monitoring.sensor_interval_seconds,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description=f"Reads {spec.name}'s audit log after its cursor: a drift report per window of "
                           f"{spec.monitoring.window} decisions, again as outcomes come back, a retrain when one finds "
                           f"drift or a live AUC under the floor, and each retrain's outcome written back.")
    def drift_sensor(context: dg.SensorEvaluationContext, audit: AuditResource) -> dg.SensorResult:
        import time

        return evaluate_drift_sensor(spec, context.instance, audit.store(),
                                     SensorCursor.parse(context.cursor), time.time(), context.log)

    @dg.schedule(name=f"{spec.name}__nightly_drift_check", cron_schedule="0 2 * * *", job=report_job,
                 default_status=dg.DefaultScheduleStatus.RUNNING,
                 description="Reports the decisions since the last full window, so a quiet deployment is checked too.")
    def nightly_drift_check(context: dg.ScheduleEvaluationContext, audit: AuditResource):
        done = [window_bounds(k)[1] for k in context.instance.get_dynamic_partitions(partitions.name)]
        after = max(done, default=0)
        store = audit.store()
        pending = traffic_after(store, spec.name, after, spec.monitoring.window)
        if not pending:
            return dg.SkipReason(f"no served decision after seq {after}")
        k = window_key(pending[0].seq, pending[-1].seq)
        context.instance.add_dynamic_partitions(partitions.name, [k])
        return dg.RunRequest(run_key=f"report:{k}", partition_key=k, tags={f"{TAG}window": k, f"{TAG}partial": "true"})

    return dg.Definitions(assets=[drift_report], jobs=[report_job], sensors=[drift_sensor],
                          schedules=[nightly_drift_check])
