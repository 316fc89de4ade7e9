"""The rollout stage: a version that passed its gates earns its traffic step by step, on live evidence.

```
champion_model --(gates pass, deployment.rollout has steps)--> rollout event: step 1 (shadow)
    <spec>__rollout_sensor: the step's decisions counted on the audit log --> <spec>/rollout_analysis[<step>]
        advance  --> <spec>__rollout_step (next step; after the last, promotion)
        hold     --> nothing yet (more decisions, more outcomes, a person)
        rollback --> <spec>__rollback (the challenger leaves the split)
```

- `<spec>/rollout_analysis` (group monitoring, like the drift reports), one dynamic partition per step (`<rollout>-<step>-<label>`, e.g.
  `v3-2-canary10`): the challenger against the champion on that step's decisions (assets/rollout_analysis.py), with
  five blocking checks (`decisions`, `errors`, `latency`, `fairness`, `live_auc`). A check that fails at severity
  ERROR is evidence of harm (roll back); one that fails at WARN waits for evidence (hold).
- `<spec>__rollout_sensor` (on) reads the serving chain and the audit log: it opens the step's partition, asks for
  an analysis as the step's challenger decisions pass 1/4, 1/2, 1, 2, 4, ... times what the step needs and as its
  outcomes pass 30, 100, 300, ... (run key `analysis:<partition>:<decisions>:<outcomes>`), and acts on each
  analysis once: `advance:<partition>:<event>` starts `<spec>__rollout_step` (not while a person holds the
  rollout), `rollback:<partition>:<event>` starts `<spec>__rollback`, the same jobs a person runs, with the
  analysis run and its verdicts as evidence. It keeps no cursor: the serving chain says where the rollout is,
  and the run keys stop a request from being made twice.

No `from __future__ import annotations`: Dagster reads the context annotation at definition time.
"""



from dataclasses import dataclass

import dagster as dg

from assets import naming
from assets.naming import asset_key
from assets.rollout_analysis import (ADVANCE, CHECKS, AnalysisRecord, analyse_step, analysis_evidence,
                                     approved_over_fairness)
from assets.rollout_state import current_rollout, policy_of
from assets.spec import LoadedSpec, PipelineSpec
from assets.wiring import Log
from core.audit import AuditStore
from core.audit.traffic import NOT_TRAFFIC_KEY_IDS
from core.rollout import parse_partition, step_window
from core.rollout_stats import ROLLBACK
from resources.mlflow import MlflowResource
from resources.servers import AuditResource

TAG = naming.TAG_PREFIX
SENSOR_ACTOR = "rollout sensor"
OUTCOME_MILESTONES = (30, 100, 300, 1000, 3000, 10000, 30000, 100000)


@dataclass(frozen=True)
class RolloutJobs:
    """The jobs the rollout sensor starts (orchestration/jobs.py): the same ones a person runs."""

    step: dg.JobDefinition
    rollback: dg.JobDefinition


def steps_partitions(spec_name: str) -> dg.DynamicPartitionsDefinition:
    return dg.DynamicPartitionsDefinition(name=f"{spec_name}__rollout_steps")


def decision_milestone(n: int, needed: int) -> int:
    """The largest of needed/4, needed/2, needed, 2x, 4x, ... that `n` has reached (0: none)."""
    marks = [m for m in (needed // 4, needed // 2) if m >= 10] + [needed * 2 ** i for i in range(20)]
    return max((m for m in marks if m <= n), default=0)


def _latest_analysis(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str
                     ) -> tuple[AnalysisRecord, int, str, dict] | None:
    found = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]),
                                            limit=1, ascending=False).records
    if not found:
        return None
    r = found[0]
    meta = r.asset_materialization.metadata
    verdicts = getattr(meta.get("check_verdicts"), "value", None) or {}
    return AnalysisRecord.from_metadata(meta, partition), r.storage_id, r.run_id, verdicts


def _move(job: dg.JobDefinition, op: str, run_key: str, record: AnalysisRecord, run_id: str, verdicts: dict,
          reason: str) -> dg.RunRequest:
    evidence = analysis_evidence(record, run_id, verdicts)
    return dg.RunRequest(run_key=run_key, job_name=job.name,
                         run_config={"ops": {op: {"config": {"actor": SENSOR_ACTOR, "reason": reason[:3900],
                                                             "evidence": evidence}}}},
                         tags={f"{TAG}rollout": record.rollout, f"{TAG}analysis": record.partition,
                               f"{TAG}verdict": record.verdict})


def evaluate_rollout_sensor(spec: PipelineSpec, instance: dg.DagsterInstance, store: AuditStore, jobs: RolloutJobs,
                            log: Log) -> dg.SensorResult | dg.SkipReason:
    """Where the rollout under way stands, what analysis it needs next, and the move its latest analysis asks for."""
    state = current_rollout(store, spec.name)
    if state is None:
        return dg.SkipReason(f"{spec.name}: no rollout under way")
    policy = policy_of(spec)
    if policy is None or state.step > len(policy.steps):
        return dg.SkipReason(f"{spec.name}: rollout {state.rollout} is under way but deployment.rollout no longer "
                             "has its step; promote or roll back by hand (python -m orchestration.rollout)")
    partition = state.partition(policy)
    parts = steps_partitions(spec.name)
    adds = [] if instance.has_dynamic_partition(parts.name, partition) else [parts.build_add_request([partition])]
    definition = policy.steps[state.step - 1]
    window = step_window(store.serving_events(spec.name), state.rollout, state.step)
    variant = "shadow" if state.mode == "shadow" else "canary"
    n, labelled = store.step_counts(spec.name, window.after_seq + 1, window.last_seq, variant, state.challenger,
                                    NOT_TRAFFIC_KEY_IDS)
    if variant == "shadow":  # outcomes come back on the champion's answers, which the shadow decisions pair with
        labelled = store.step_counts(spec.name, window.after_seq + 1, window.last_seq, "champion", state.champion,
                                     NOT_TRAFFIC_KEY_IDS)[1]
    requests: list[dg.RunRequest] = []
    d = decision_milestone(n, definition.decisions)
    if d:
        o = max((m for m in OUTCOME_MILESTONES if m <= labelled), default=0)
        requests.append(dg.RunRequest(run_key=f"analysis:{partition}:{d}:{o}", partition_key=partition,
                                      job_name=naming.job_name(spec.name, "analyse_rollout"),
                                      tags={f"{TAG}rollout": state.rollout, f"{TAG}decisions": str(n),
                                            f"{TAG}outcomes": str(labelled)}))
    latest = _latest_analysis(instance, asset_key(spec.name, naming.ROLLOUT_ANALYSIS), partition)
    if latest is not None:
        record, event_id, run_id, verdicts = latest
        if record.verdict == ROLLBACK:
            requests.append(_move(jobs.rollback, f"{spec.name}__rollback_champion",
                                  f"rollback:{partition}:{event_id}", record, run_id, verdicts,
                                  f"the analysis of {partition} found harm: {record.reason}"))
        elif record.verdict == ADVANCE and not state.held:
            requests.append(_move(jobs.step, f"{spec.name}__advance_rollout", f"advance:{partition}:{event_id}", record,
                                  run_id, verdicts, f"the analysis of {partition} passed: {record.reason}"))
        elif record.verdict == ADVANCE:
            log.info(f"{spec.name}: {partition} passed its analysis, but {state.event.actor} holds the rollout: "
                     f"{state.event.reason}")
    return dg.SensorResult(run_requests=requests, dynamic_partitions_requests=adds)


def definitions(loaded: LoadedSpec, jobs: RolloutJobs) -> dg.Definitions:
    """`<spec>/rollout_analysis` with its checks, its job and `<spec>__rollout_sensor`."""
    spec = loaded.spec
    key = asset_key(spec.name, naming.ROLLOUT_ANALYSIS)
    partitions = steps_partitions(spec.name)

    @dg.asset(key=key, group_name=naming.MONITORING, partitions_def=partitions,
              deps=[asset_key(spec.name, naming.DEPLOYMENT_ASSET)],
              check_specs=[dg.AssetCheckSpec(name, asset=key, blocking=True, description=doc)
                           for name, doc in CHECKS.items()],
              description=f"One step of a {spec.name} rollout: the challenger against the champion on the decisions "
                          "each answered (or, in shadow, scored) in that step; advance, hold or roll back.")
    def rollout_analysis(context: dg.AssetExecutionContext, mlflow: MlflowResource,
                         audit: AuditResource) -> dg.MaterializeResult:
        """The step's figures from the audit log, each with its sample size and what a test of that size can tell:
        decisions, failed rows, latency against the SLO, the flag rate per sensitive group (the fairness gate's
        metric, on live requests), the live AUC with DeLong's test once outcomes arrive, and the score
        distributions. The verdict (advance, hold, roll back) is what the rollout sensor acts on."""
        policy = policy_of(spec)
        if policy is None:
            raise dg.Failure(f"{spec.name}: deployment.rollout is 'direct'; there are no rollout steps to analyse")
        store = audit.store()
        rollout, step = parse_partition(context.partition_key)
        window = step_window(store.serving_events(spec.name), rollout, step)
        approved = window is not None and approved_over_fairness(mlflow, spec.name, window.challenger)
        analysis = analyse_step(spec, policy, store, context.partition_key, approved)
        checks = analysis.check_results(key)
        verdicts = {c.check_name: c.metadata["verdict"].value if hasattr(c.metadata["verdict"], "value")
                    else c.metadata["verdict"] for c in checks}
        context.log.info(analysis.reason())
        return dg.MaterializeResult(metadata={**analysis.to_metadata(), "check_verdicts": dg.MetadataValue.json(
            verdicts)}, check_results=checks)

    analyse = dg.define_asset_job(naming.job_name(spec.name, "analyse_rollout"), selection=[key],
                                  partitions_def=partitions, tags={naming.SPEC_TAG: spec.name},
                                  description=f"Analyse one step of a {spec.name} rollout.")

    @dg.sensor(name=naming.rollout_sensor_name(spec.name), jobs=[analyse, jobs.step, jobs.rollback],
               minimum_interval_seconds=spec.monitoring.sensor_interval_seconds,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description=f"Drives {spec.name}'s rollouts: an analysis per step as its decisions and outcomes grow, "
                           "then the move its verdict asks for (next step, promotion, or rollback), through the jobs "
                           "a person uses.")
    def sensor(context: dg.SensorEvaluationContext, audit: AuditResource):
        return evaluate_rollout_sensor(spec, context.instance, audit.store(), jobs, context.log)

    return dg.Definitions(assets=[rollout_analysis], jobs=[analyse], sensors=[sensor])
