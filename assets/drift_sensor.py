"""The drift sensor: `<spec>__drift_sensor` reads the audit log and the drift reports after its cursor.

- Each new full window of traffic (core/audit/traffic.py) becomes a dynamic partition and one drift_report run
  (run_key `report:<window>`).
- Outcomes usually come back long after a window was reported. The sensor follows the audit log's outcome events
  and reports a window again each time its labelled decisions pass 30, 100, 300, ... (run_key
  `outcomes:<window>:<n>`), so the live AUC is computed where outcomes exist.
- A report that found drift, or a live AUC under `compliance.min_auc`, asks for one `<spec>__retrain` run per
  window (run_key `retrain:<window>`, the report's evidence in its tags), within `monitoring.retrain_cooldown_hours`.
- When a retrain the sensor asked for finishes, its outcome (promoted, and which version; its rollout started, under
  a spec's `deployment.rollout` steps, which the rollout sensor then drives; or refused, and by which gates with
  their numbers) is written back once onto the window's drift report as an observation.

- A spec with partitions: a new month arriving (a validated_dataset month materialized, newer than or as new as the
  last one checked) is compared with the serving version's reference (job `<spec>__month_drift`, run_key
  `month:<month>:<content hash>`), which records a MonthReport as an observation on that month; one that found drift
  asks for one retrain (run_key `retrain:month:<month>`), within the same cooldown. Every retrain of a partitioned
  spec snapshots the newest month again and trains on the window ending there.

Its cursor moves only with the requests, in the same tick result, so a daemon killed mid-tick re-reads the same
windows next tick and the run keys stop duplicates.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dagster as dg

from assets import naming
from assets.naming import asset_key
from assets.partitions import newest_month
from assets.spec import LoadedSpec, PipelineSpec
from assets.window_report import ReportRecord
from assets.windows import windows_partitions
from assets.wiring import AssetJob, Log
from core.audit import AuditStore
from core.audit.traffic import full_windows, traffic_outcome_count, window_bounds, window_key
from resources.servers import AuditResource

TAG = naming.TAG_PREFIX
MONTH_TAG = f"{TAG}month_drift"  # on a month's drift check and the retrain it asked for: the month

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
    A partitioned spec's sensor also keeps month_event_id (the last validated_dataset materialization read),
    month (the newest month compared with the reference) and month_report_id (the last MonthReport read); a cursor
    without them parses, and an unpartitioned spec's cursor never writes them.
    """

    seq: int = 0
    event_id: int = 0
    last_retrain: float = 0.0
    outcome_id: int = 0
    retrains_until: float = 0.0
    month_event_id: int = 0
    month: str = ""
    month_report_id: int = 0

    @classmethod
    def parse(cls, raw: str | None) -> SensorCursor:
        return cls(**json.loads(raw)) if raw else cls()

    def dump(self) -> str:
        fields = {"seq": self.seq, "event_id": self.event_id, "last_retrain": self.last_retrain,
                  "outcome_id": self.outcome_id, "retrains_until": self.retrains_until}
        if self.month_event_id or self.month or self.month_report_id:
            fields.update(month_event_id=self.month_event_id, month=self.month, month_report_id=self.month_report_id)
        return json.dumps(fields)


@dataclass(frozen=True)
class MonthReport:
    """A month of a partitioned spec compared with the reference of the version serving when it arrived, as the
    observation on that validated_dataset month records it and the sensor reads it back."""

    month: str
    model_version: str
    drift: bool
    status: str
    evidence: str

    KIND = "month_drift"

    @property
    def retrain_requested(self) -> bool:
        return self.drift

    def to_metadata(self) -> dict[str, Any]:
        return {"report": self.KIND, "month": self.month, "model_version": self.model_version, "drift": self.drift,
                "status": self.status, "retrain_requested_by_sensor": self.retrain_requested,
                "evidence": self.evidence}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> MonthReport | None:
        """The report an observation carries, or None for one that is not a month's drift report."""
        v = {k: getattr(m, "value", m) for k, m in metadata.items()}
        if v.get("report") != cls.KIND:
            return None
        return cls(month=str(v.get("month", "")), model_version=str(v.get("model_version", "")),
                   drift=bool(v.get("drift", False)), status=str(v.get("status", "")),
                   evidence=str(v.get("evidence", "")))


@dataclass(frozen=True)
class RetrainOutcome:
    """What became of a retrain the sensor asked for, as written back onto its window's drift report."""

    run_id: str
    outcome: str  # promoted | rollout started | not changed | refused | failed | canceled
    reason: str
    champion_version: str  # the champion after the run, or "unchanged"

    def to_metadata(self) -> dict[str, str]:
        return {"retrain_run": self.run_id, "retrain_outcome": self.outcome, "retrain_reason": self.reason,
                "champion_version": self.champion_version}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> RetrainOutcome | None:
        """The outcome an observation carries, or None for metadata that is not one."""
        v = {k: getattr(m, "value", m) for k, m in metadata.items()}
        if not v.get("retrain_run"):
            return None
        return cls(run_id=str(v["retrain_run"]), outcome=str(v.get("retrain_outcome", "")),
                   reason=str(v.get("retrain_reason", "")), champion_version=str(v.get("champion_version", "")))


def _run_exists(instance: dg.DagsterInstance, job: str, run_key: str) -> bool:
    runs = instance.get_run_records(dg.RunsFilter(job_name=job, tags={"dagster/run_key": run_key}), limit=1)
    return bool(runs)


def outcome_rechecks(spec: PipelineSpec, instance: dg.DagsterInstance, store: AuditStore, after_event: int,
                     skip: set[str]) -> tuple[list[dg.RunRequest], int]:
    """Windows whose outcomes came back since `after_event` are reported again as their labelled share grows
    (run_key `outcomes:<window>:<milestone>`), so the live AUC, and a drop under the floor, is seen."""
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


def retrain_outcome(instance: dg.DagsterInstance, run: dg.DagsterRun) -> RetrainOutcome:
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
        started = not champion.get("changed") and str(champion.get("rollout", "none")) != "none"
        outcome = "promoted" if champion.get("changed") else "rollout started" if started else "not changed"
        reason = f"champion v{champion.get('champion_version')}: {champion.get('decision', '')}"
    elif run.status == dg.DagsterRunStatus.CANCELED:
        outcome, reason = "canceled", "the run was canceled; the champion keeps serving"
    elif refused:
        outcome, reason = "refused", "; ".join(refused)
    else:
        outcome = "failed"
        reason = "; ".join(failures) or f"run ended {run.status.value} without promoting"
    return RetrainOutcome(run_id=run.run_id, outcome=outcome, reason=reason[:2000],
                          champion_version=str(champion.get("champion_version")) if champion else "unchanged")


def _written_back(instance: dg.DagsterInstance, report_key: dg.AssetKey, window: str, run_id: str) -> bool:
    """Whether the outcome of retrain `run_id` is already written onto partition `window` of `report_key`."""
    found = instance.fetch_observations(dg.AssetRecordsFilter(asset_key=report_key, asset_partitions=[window]),
                                        limit=20)
    for r in found.records:
        written = RetrainOutcome.from_metadata(r.asset_observation.metadata)
        if written is not None and written.run_id == run_id:
            return True
    return False


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
    for record in records:
        after = max(after, record.update_timestamp.timestamp())
        tags = record.dagster_run.tags
        # A window's retrain answers on its drift report; a month's on that validated_dataset month.
        if tags.get(f"{TAG}window"):
            report_key, window = asset_key(spec.name, naming.DRIFT_REPORT), tags[f"{TAG}window"]
        elif tags.get(MONTH_TAG):
            report_key, window = asset_key(spec.name, naming.VALIDATED_DATASET), tags[MONTH_TAG]
        else:
            continue  # a retrain started by hand or by the weekly schedule answers to no window
        if _written_back(instance, report_key, window, record.dagster_run.run_id):
            continue  # a daemon that died after storing the observation but before its cursor: not twice
        done = retrain_outcome(instance, record.dagster_run)
        observations.append(dg.AssetObservation(
            asset_key=report_key, partition=window, description=f"retrain {done.outcome}: {done.reason[:300]}",
            metadata=done.to_metadata()))
    return observations, after


def month_checks(spec: PipelineSpec, instance: dg.DagsterInstance, cursor: SensorCursor
                 ) -> tuple[list[dg.RunRequest], int, str]:
    """New validated months since the cursor: the newest of them, when it is as new as the newest month already
    checked, is compared with the serving version's reference (a backfill of history asks for one check, not one
    per month). A month materialized again with other rows is checked again: its content hash is in the run key."""
    found = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset_key(spec.name, naming.VALIDATED_DATASET),
                              after_storage_id=cursor.month_event_id), limit=1000, ascending=True)
    event_id, newest = cursor.month_event_id, None
    for record in found.records:
        event_id = max(event_id, record.storage_id)
        month = record.asset_materialization.partition
        if month and month >= cursor.month and (newest is None or month >= newest[0]):
            digest = getattr(record.asset_materialization.metadata.get("content_hash"), "value", "")
            newest = (month, str(digest)[:12])
    if newest is None:
        return [], event_id, cursor.month
    month, digest = newest
    return [dg.RunRequest(run_key=f"month:{month}:{digest}", job_name=naming.job_name(spec.name, "month_drift"),
                          partition_key=month, tags={MONTH_TAG: month})], event_id, month


def month_retrains(spec: PipelineSpec, instance: dg.DagsterInstance, cursor: SensorCursor, last_retrain: float,
                   now: float, log: Log) -> tuple[list[dg.RunRequest], int, float]:
    """Month reports since the cursor that found drift: one retrain per month (run_key `retrain:month:<month>`),
    within the cooldown the window retrains share."""
    found = instance.fetch_observations(
        dg.AssetRecordsFilter(asset_key=asset_key(spec.name, naming.VALIDATED_DATASET),
                              after_storage_id=cursor.month_report_id), limit=100, ascending=True)
    retrain_job = naming.job_name(spec.name, "retrain")
    event_id, requests = cursor.month_report_id, []
    for record in found.records:
        event_id = max(event_id, record.storage_id)
        report = MonthReport.from_metadata(record.asset_observation.metadata)
        if report is None or not report.retrain_requested:
            continue
        run_key = f"retrain:month:{report.month}"
        if _run_exists(instance, retrain_job, run_key):
            continue
        if now - last_retrain < spec.monitoring.retrain_cooldown_hours * 3600:
            log.info(f"{spec.name}: month {report.month} asks for a retrain, but one was requested "
                     f"{(now - last_retrain) / 3600:.1f} h ago (cooldown {spec.monitoring.retrain_cooldown_hours} h)")
            continue
        request = retrain_request(spec, instance, run_key, {
            MONTH_TAG: report.month, f"{TAG}trigger": "drift", f"{TAG}served_version": report.model_version,
            f"{TAG}evidence": report.evidence[:250]})
        if request is not None:
            last_retrain = now
            requests.append(request)
    return requests, event_id, last_retrain


def retrain_request(spec: PipelineSpec, instance: dg.DagsterInstance, run_key: str, tags: dict[str, str]
                    ) -> dg.RunRequest | None:
    """A `<spec>__retrain` run; a partitioned spec's names the newest month (snapshotted again; training reads the
    window ending there), and none is asked for before any month exists."""
    job = naming.job_name(spec.name, "retrain")
    if not spec.partitioned:
        return dg.RunRequest(run_key=run_key, job_name=job, tags=tags)
    month = newest_month(instance, spec)
    return None if month is None else dg.RunRequest(run_key=run_key, job_name=job, partition_key=month, tags=tags)


def evaluate_drift_sensor(spec: PipelineSpec, instance: dg.DagsterInstance, store: AuditStore, cursor: SensorCursor,
                          now: float, log: Log) -> dg.SensorResult:
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
        report = ReportRecord.from_metadata(record.asset_materialization.metadata,
                                            record.asset_materialization.partition)
        if not report.retrain_requested:
            continue
        run_key = f"retrain:{report.window}"
        if _run_exists(instance, retrain_job, run_key):
            continue  # this window already has its retrain (a re-report after outcomes came back, or a replay)
        if now - last_retrain < m.retrain_cooldown_hours * 3600:
            log.info(f"{spec.name}: window {report.window} asks for a retrain, but one was requested "
                     f"{(now - last_retrain) / 3600:.1f} h ago (cooldown {m.retrain_cooldown_hours} h)")
            continue
        request = retrain_request(spec, instance, run_key, {
            f"{TAG}window": report.window, f"{TAG}trigger": report.trigger,
            f"{TAG}served_version": report.model_version, f"{TAG}evidence": report.evidence[:250]})
        if request is not None:
            last_retrain = now
            requests.append(request)
    month_event_id, month, month_report_id = cursor.month_event_id, cursor.month, cursor.month_report_id
    if spec.partitioned:
        checks, month_event_id, month = month_checks(spec, instance, cursor)
        retrains, month_report_id, last_retrain = month_retrains(spec, instance, cursor, last_retrain, now, log)
        requests += checks + retrains
    observations, retrains_until = retrain_outcomes(spec, instance, cursor.retrains_until)
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[partitions.build_add_request(keys)] if keys else [],
        asset_events=observations,
        cursor=SensorCursor(seq=seq, event_id=event_id, last_retrain=last_retrain, outcome_id=outcome_id,
                            retrains_until=retrains_until, month_event_id=month_event_id, month=month,
                            month_report_id=month_report_id).dump())


def drift_sensor(loaded: LoadedSpec, report_job: AssetJob, retrain: AssetJob,
                 month_job: dg.JobDefinition | None = None) -> dg.SensorDefinition:
    """`<spec>__drift_sensor`, on by default: starts `report_job` per window, `month_job` per new month of a
    partitioned spec, and `retrain` on drift."""
    spec = loaded.spec

    jobs = [report_job, retrain, *([month_job] if month_job else [])]

    @dg.sensor(name=naming.drift_sensor_name(spec.name), jobs=jobs,
               minimum_interval_seconds=spec.monitoring.sensor_interval_seconds,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description=f"Reads {spec.name}'s audit log after its cursor: a drift report per window of "
                           f"{spec.monitoring.window} decisions, again as outcomes come back, a retrain when one finds "
                           f"drift or a live AUC under the floor, and each retrain's outcome written back.")
    def sensor(context: dg.SensorEvaluationContext, audit: AuditResource) -> dg.SensorResult:
        import time

        return evaluate_drift_sensor(spec, context.instance, audit.store(),
                                     SensorCursor.parse(context.cursor), time.time(), context.log)

    return sensor
