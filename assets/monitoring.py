"""The monitoring stage: the audit log observed, drift reports per window of served decisions, the nightly check.

```
deployment -> inference_log -> drift_report (one partition per window)  --drift-->  <spec>__retrain
                                    ^ requested by <spec>__drift_sensor reading the audit log after its cursor
```

- `inference_log` observes the audit store: decisions per variant, the complete windows the drift sensor counts
  (assets/windows.py), the latest seq, whether the hash chains verify (against the checkpoints too), the
  chains' heads signed under the audit key (`audit_anchor`: a checkpoint outside the store, which
  `python -m orchestration.decisions --verify` reads back), and each reporting key's outcomes against the model's
  measured error, with the keys whose reports contradict it far beyond that error flagged
  (assets/outcome_trust.py). Its check `abuse_by_key` names each API key whose recent queries look like probing
  (a few applicants varied feature by feature) or like sampling the input space (assets/abuse_check.py).
- Windows are dynamic partitions: a window is a count of traffic decisions (default 1,000), not a span of time,
  so it closes when traffic fills it. The key is `<first seq>-<last seq>` of the audit log. The deployment's own
  smoke requests (key id `deployment-smoke`) are on the audit log but are not traffic: no window counts them.
- `drift_report` scores one window against the detectors of the version that served it (assets/window_report.py,
  assets/detectors.py); the sensor that asks for it and for retrains is assets/drift_sensor.py.
- The nightly check reports the decisions since the last window, so a quiet deployment is checked too.
- A spec with partitions also gets `<spec>__month_drift`: one month's validated rows (a sample of `monitoring.window`
  of them) against the detectors of the version serving, recorded as a MonthReport observation on that month; the
  sensor asks for it when a new month arrives and for a retrain when it finds drift.
"""

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from assets import naming
from assets.abuse_check import CHECK_NAME, abuse_check_result, abuse_verdicts
from assets.audit_anchors import inference_log_anchors
from assets.detectors import load_version_detectors
from assets.drift_sensor import MonthReport, drift_sensor
from assets.naming import CHAMPION, asset_key
from assets.outcome_trust import bursts_markdown, flagged, outcome_key_bursts
from assets.partitions import partitions_def
from assets.spec import LoadedSpec
from assets.window_report import WindowReport, report_window, text_vectors
from assets.windows import complete_windows, windows_partitions
from assets.wiring import AssetJob
from core.audit import ANCHOR_METADATA, AuditStore
from core.audit.checkpoints import DECISIONS
from core.audit.outcomes import FLAGGED_KEYS_METADATA, KeyBurst
from core.audit.traffic import traffic_after, window_bounds, window_key
from resources.mlflow import MlflowResource
from resources.servers import AuditResource
from resources.storage import ParquetIOManager, StorageResource

TAG = naming.TAG_PREFIX


# --- the audit log as an observation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class InferenceLogObservation:
    decisions: int
    per_variant: dict[str, int]
    latest_seq: int
    complete_windows: int
    window_size: int
    chain_ok: bool
    chain_checked: int
    problems: list[str]
    rules: list[str] = field(default_factory=list)
    anchor: dict[str, dict] = field(default_factory=dict)  # chain -> its signed head (verified chains only)
    bursts: list[KeyBurst] = field(default_factory=list)

    def metadata(self, location: str) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "decisions": self.decisions, "latest_seq": self.latest_seq, "complete_windows": self.complete_windows,
            "window_size": self.window_size, "chain_verified": self.chain_ok, "records_checked": self.chain_checked,
            "per_variant": dg.MetadataValue.json(self.per_variant),
            "chain_problems": dg.MetadataValue.md("\n".join(f"- {p}" for p in self.problems) or "none"),
            "chain_rules": dg.MetadataValue.md("\n".join(f"- {r}" for r in self.rules) or "none"),
            "outcome_keys": dg.MetadataValue.md(bursts_markdown(self.bursts)),
            FLAGGED_KEYS_METADATA: dg.MetadataValue.json(flagged(self.bursts)),
            "audit_url": location}
        if self.anchor:
            meta[ANCHOR_METADATA] = dg.MetadataValue.json(self.anchor)
            meta["chain_head_seq"] = self.anchor.get(DECISIONS, {}).get("seq", 0)
        return meta


def observe_inference_log(store: AuditStore, spec_name: str, window_size: int, opened: Iterable[str] = (),
                          instance: dg.DagsterInstance | None = None) -> InferenceLogObservation:
    """Decisions per variant (smoke requests included: they are on the log), and the complete windows of traffic
    as the drift sensor counts them: the windows `opened` so far and the full ones its next tick opens. The
    chains' signed heads are recorded only when they verify: a checkpoint of a broken chain would vouch for it."""
    per_variant = store.count(spec_name)
    anchor = store.anchor()  # read before verifying: a head written after the walk began is not vouched for
    chain = store.verify(anchors=inference_log_anchors(instance, limit=200))
    windows = complete_windows(store, spec_name, opened, window_size)
    return InferenceLogObservation(decisions=sum(per_variant.values()), per_variant=per_variant,
                                   latest_seq=store.latest_seq(spec_name), complete_windows=len(windows),
                                   window_size=window_size, chain_ok=chain.ok, chain_checked=chain.checked,
                                   problems=chain.problems[:20], rules=chain.rules,
                                   anchor={c.chain: c.to_json() for c in anchor} if chain.ok else {},
                                   bursts=outcome_key_bursts(instance, store, spec_name))


# --- a new month against the reference ----------------------------------------------------------------------


def report_month(loaded: LoadedSpec, storage: StorageResource, mlflow: MlflowResource, io_manager: ParquetIOManager,
                 month: str) -> tuple[MonthReport, dict]:
    """One month's validated rows against the detectors of the version serving now (a seeded sample of
    `monitoring.window` rows, the size the detectors' false-alarm rate is set for), scored by that version; the
    report and its metadata (each detector's figures, what moved). Without a champion there is nothing to compare."""
    spec = loaded.spec
    served = mlflow.alias_version(spec.name, CHAMPION)
    if served is None:
        report = MonthReport(month=month, model_version="", drift=False, status="no champion",
                             evidence=f"month {month}: no champion serves yet, nothing to compare it with")
        return report, report.to_metadata()
    version = str(served.version)
    rows = io_manager.load_partition(asset_key(spec.name, naming.VALIDATED_DATASET), month)
    size = spec.monitoring.window
    sample = rows.sample(n=size, random_state=spec.split.seed) if len(rows) > size else rows
    frame = sample[spec.features.all].reset_index(drop=True)
    bundle = load_version_detectors(storage, mlflow, spec.name, version)
    scores = mlflow.load_model(spec.name, version=version).predict(frame)["probability"].to_numpy()
    result = bundle.score(frame, text_vectors(loaded, storage, frame), scores)
    shown = WindowReport(window=f"month {month}", first_seq=0, last_seq=0, model_version=version,
                         drift=bool(result.drift), result=result.to_dict(), outcomes=0, live_auc=None,
                         performance_drop=False, plot=None)
    moved = ", ".join(result.to_dict().get("features_moved", {}))[:200]
    evidence = (f"month {month} against v{version}'s reference: " +
                (f"drift in {moved or 'the scores'}" if result.drift else "no drift"))
    report = MonthReport(month=month, model_version=version, drift=bool(result.drift), status=result.status,
                         evidence=evidence)
    keep = ("detectors", "features_moved", "message", "decisions")
    metadata = {**{k: v for k, v in shown.to_metadata().items() if k in keep}, **report.to_metadata(),
                "rows_in_month": len(rows), "rows_scored": len(frame)}
    return report, metadata


def month_drift_job(loaded: LoadedSpec) -> dg.JobDefinition | None:
    """`<spec>__month_drift` for a partitioned spec (None otherwise): one month against the serving version's
    reference, recorded on that validated_dataset month."""
    spec = loaded.spec
    pdef = partitions_def(spec)
    if pdef is None:
        return None
    validated_key = asset_key(spec.name, naming.VALIDATED_DATASET)

    @dg.op(name=f"{spec.name}__month_drift_report", required_resource_keys={"storage", "mlflow", "io_manager"},
           tags={naming.SPEC_TAG: spec.name})
    def month_drift_report(context: dg.OpExecutionContext):
        """Compares one month's validated rows with the serving version's reference (its drift detectors)."""
        r = context.resources
        report, metadata = report_month(loaded, r.storage, r.mlflow, r.io_manager, context.partition_key)
        context.log.info(report.evidence)
        yield dg.AssetObservation(asset_key=validated_key, partition=context.partition_key,
                                  description=report.evidence[:300], metadata=metadata)
        yield dg.Output(None)

    @dg.job(name=naming.job_name(spec.name, "month_drift"), partitions_def=pdef, tags={naming.SPEC_TAG: spec.name},
            description=f"Compare one month of {spec.name}'s data with the serving version's reference; the drift "
                        "sensor asks for it when a new month arrives.")
    def month_drift():
        month_drift_report()

    return month_drift


# --- wiring ---------------------------------------------------------------------------------------------------


def definitions(loaded: LoadedSpec, retrain: AssetJob) -> dg.Definitions:
    """inference_log, drift_report, its job, the drift sensor (which starts `retrain`) and the nightly drift check."""
    spec = loaded.spec
    key = asset_key(spec.name, naming.DRIFT_REPORT)
    log_key = asset_key(spec.name, naming.INFERENCE_LOG)
    partitions = windows_partitions(spec.name)

    @dg.asset(key=log_key, group_name=naming.MONITORING, deps=[asset_key(spec.name, naming.DEPLOYMENT_ASSET)],
              description=f"What {spec.name}'s server has decided: the audit log's decisions per variant, complete "
                          f"windows of {spec.monitoring.window}, the latest seq, whether the hash chains verify, "
                          "their signed heads (a checkpoint outside the store) and the outcome keys flagged.")
    def inference_log(context: dg.AssetExecutionContext, audit: AuditResource) -> dg.MaterializeResult:
        """An observation of the decision audit log, the input of drift monitoring: how many decisions per
        variant, how many complete windows, the latest seq (the drift sensor's cursor reads after it) and
        whether every record still matches its hash chain."""
        store = audit.store()
        opened = context.instance.get_dynamic_partitions(partitions.name)
        obs = observe_inference_log(store, spec.name, spec.monitoring.window, opened, context.instance)
        if not obs.chain_ok:
            context.log.error(f"{spec.name}: the audit chain does not verify: {obs.problems}")
        for burst in obs.bursts:
            if burst.flagged:
                context.log.warning(f"{spec.name}: outcome reports of {burst.describe()}"
                                    + ("; left out of training" if spec.monitoring.exclude_flagged_outcome_keys
                                       else ""))
        return dg.MaterializeResult(metadata=obs.metadata(store.location()),
                                    data_version=dg.DataVersion(f"seq-{obs.latest_seq}"))

    @dg.asset_check(asset=log_key, name=CHECK_NAME, blocking=True,
                    description="Names each API key whose recent queries look like probing (PRADA: the distances "
                                "between a key's queries; one-feature variants) or like sampling the input space "
                                "(out-of-distribution share); core/abuse.py.")
    def abuse_by_key(storage: StorageResource, audit: AuditResource) -> dg.AssetCheckResult:
        return abuse_check_result(abuse_verdicts(spec, storage, audit.store()))

    @dg.asset(key=key, group_name=naming.MONITORING, partitions_def=partitions, deps=[log_key])
    def drift_report(context: dg.AssetExecutionContext, storage: StorageResource, mlflow: MlflowResource,
                     audit: AuditResource) -> dg.Output[dict]:
        """One window of served decisions against the detectors of the version that served it: per-detector
        statistic, p-value and threshold, the features that moved and by how much, live AUC where outcomes
        came back, and a plot. Drift (or a live AUC under the spec's floor) makes the sensor ask for a retrain."""
        report = report_window(loaded, storage, mlflow, audit.store(), context.partition_key,
                               storage.local_dir(spec.name, "drift", "reports"))
        return dg.Output(report.value(), metadata=report.to_metadata())

    report_job = dg.define_asset_job(naming.job_name(spec.name, "report_drift"), selection=[key],
                                     partitions_def=partitions, tags={naming.SPEC_TAG: spec.name},
                                     description=f"Report drift for one window of {spec.name}'s served decisions.")

    @dg.schedule(name=f"{spec.name}__nightly_drift_check", cron_schedule="0 2 * * *", job=report_job,
                 default_status=dg.DefaultScheduleStatus.RUNNING,
                 description="Reports the decisions since the last full window, so a quiet deployment is checked too.")
    def nightly_drift_check(context: dg.ScheduleEvaluationContext, audit: AuditResource):
        done = [window_bounds(k)[1] for k in context.instance.get_dynamic_partitions(partitions.name)]
        after = max(done, default=0)
        pending = traffic_after(audit.store(), spec.name, after, spec.monitoring.window)
        if not pending:
            return dg.SkipReason(f"no served decision after seq {after}")
        k = window_key(pending[0].seq, pending[-1].seq)
        context.instance.add_dynamic_partitions(partitions.name, [k])
        return dg.RunRequest(run_key=f"report:{k}", partition_key=k, tags={f"{TAG}window": k, f"{TAG}partial": "true"})

    month_job = month_drift_job(loaded)
    return dg.Definitions(assets=[inference_log, drift_report], asset_checks=[abuse_by_key],
                          jobs=[report_job, *([month_job] if month_job else [])],
                          sensors=[drift_sensor(loaded, report_job, retrain, month_job)],
                          schedules=[nightly_drift_check])
