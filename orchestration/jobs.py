"""Jobs that are no single stage's own: `<spec>__data`, `<spec>__pipeline`, `<spec>__rollback`, `<spec>__retrain`,
the rollout's moves (`<spec>__rollout_step`, `<spec>__promote`, `<spec>__hold`) and the weekly retrain schedule
(shipped off). A spec with partitions also gets `<spec>__ingest` (one month through validation,
embeddings and the vector index) and its `<spec>__monthly_ingest` schedule (shipped off).

The rollback and rollout jobs are what a person runs (the UI's Launchpad, or `python -m orchestration.rollout`) and
what the rollout sensor runs on an analysis's verdict: one path for both. Each takes an actor and a reason (both
required) and optional evidence, and records the move on the audit store's serving chain
(assets/rollout_state.py).

A partitioned spec's `__data`, `__pipeline` and `__retrain` runs name a month (or a range, as a single-run
backfill): its monthly assets snapshot that month, and training reads the training window. The weekly retrain
snapshots the newest month again and trains on the window ending there.

No `from __future__ import annotations`: Dagster reads the op's config annotation at definition time.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass

import dagster as dg

from assets import naming, rollout_state
from assets.partitions import newest_month, partitions_def
from assets.spec import LoadedSpec
from assets.wiring import AssetJob
from resources.mlflow import MlflowResource
from resources.servers import AuditResource
from resources.storage import StorageResource


class MoveConfig(dg.Config):
    """Who moves the split and why (both required; they go on the run, the serving chain and the version's report),
    and the evidence it rests on: free text, or JSON (the rollout sensor's: the analysis run and its checks)."""

    actor: str
    reason: str
    evidence: str = ""


class RollbackConfig(MoveConfig):
    """Who rolls back and why; both go on the run, the model version rolled back and the serving chain."""


class StepConfig(MoveConfig):
    """`resume: true` carries on a held rollout at the step it holds instead of advancing it."""

    resume: bool = False


def _evidence(context: dg.OpExecutionContext, config: MoveConfig) -> dict:
    out: dict = {"run_id": context.run_id, "job": context.job_name}
    if config.evidence.strip():
        try:
            parsed = json.loads(config.evidence)
        except ValueError:
            parsed = None
        out.update(parsed if isinstance(parsed, dict) else {"note": config.evidence[:2000]})
    return out


def _move_job(loaded: LoadedSpec, kind: str, op_name: str, config_type: type, description: str,
              move: Callable[..., rollout_state.Move]) -> dg.JobDefinition:
    spec = loaded.spec
    champion_key = naming.asset_key(spec.name, naming.CHAMPION_MODEL)
    deployment_key = naming.asset_key(spec.name, naming.DEPLOYMENT_ASSET)

    @dg.op(name=f"{spec.name}__{op_name}", tags={naming.SPEC_TAG: spec.name}, description=description)
    def move_op(context: dg.OpExecutionContext, config: config_type, mlflow: MlflowResource,  # type: ignore[valid-type]
                storage: StorageResource, audit: AuditResource):
        store = audit.store()
        if not config.actor.strip() or not config.reason.strip():
            raise dg.Failure(f"{spec.name}: {kind} needs an actor and a reason (run config: actor, reason)")
        done = move(spec, mlflow, store, config.actor, config.reason, _evidence(context, config),
                    **({"resume": config.resume} if isinstance(config, StepConfig) else {}))
        rollout_state.record_history(storage, spec.name, store, done.event.champion, done.event.challenger,
                                     done.previous_champion, done.event.evidence.get("rolled_back"))
        context.instance.add_run_tags(context.run_id, {f"{naming.TAG_PREFIX}{kind}_actor": config.actor[:200],
                                                       f"{naming.TAG_PREFIX}{kind}_reason": config.reason[:200],
                                                       f"{naming.TAG_PREFIX}serving_event": str(done.event.id)})
        context.log.info(f"{spec.name}: {done.text} (serving event {done.event.id})")
        metadata = {"move": done.kind, "what": done.text, "split": done.event.split_text(),
                    "actor": config.actor, "reason": config.reason, "serving_event": done.event.id,
                    "rollout": done.event.rollout or "none"}
        if done.changed_champion:
            yield dg.AssetMaterialization(asset_key=champion_key, metadata={
                **metadata, "champion_version": done.champion or "none",
                "rolled_back_from": (done.previous_champion or "") if kind == "rollback" else "",
                "decision": f"{done.kind} by {config.actor}: {config.reason}", "changed": done.changed_champion})
        yield dg.AssetObservation(asset_key=deployment_key, metadata=metadata)
        yield dg.Output(None)

    @dg.job(name=naming.job_name(spec.name, kind), tags={naming.SPEC_TAG: spec.name}, description=description)
    def job():
        move_op()

    return job


def rollback_job(loaded: LoadedSpec) -> dg.JobDefinition:
    return _move_job(loaded, "rollback", "rollback_champion", RollbackConfig,
                     f"Roll back {loaded.name}: during a rollout its challenger leaves the split; otherwise the "
                     "champion alias goes back to the previous version (config: actor, reason, evidence).",
                     rollout_state.rollback)


def rollout_jobs(loaded: LoadedSpec) -> list[dg.JobDefinition]:
    """`<spec>__rollout_step`, `<spec>__promote`, `<spec>__hold`."""
    return [
        _move_job(loaded, "rollout_step", "advance_rollout", StepConfig,
                  f"Advance {loaded.name}'s rollout to its next step, or promote its challenger after the last "
                  "(config: actor, reason, evidence; resume: carry on a held rollout at its step). The rollout "
                  "sensor runs it when a step's analysis passes.", rollout_state.advance),
        _move_job(loaded, "promote", "promote_challenger", MoveConfig,
                  f"Promote the challenger of {loaded.name}'s rollout now, skipping the steps left (config: "
                  "actor, reason).", rollout_state.promote_now),
        _move_job(loaded, "hold", "hold_rollout", MoveConfig,
                  f"Hold {loaded.name}'s rollout at its step: nothing advances it until a person does; a rollback "
                  "on evidence of harm still happens (config: actor, reason).", rollout_state.hold),
    ]


@dataclass(frozen=True)
class SpecJobs:
    data: AssetJob
    pipeline: AssetJob
    rollback: dg.JobDefinition
    retrain: AssetJob
    rollout: list[dg.JobDefinition]
    ingest: AssetJob | None = None

    @property
    def all(self) -> list[AssetJob | dg.JobDefinition]:
        return [self.data, self.pipeline, self.rollback, self.retrain, *self.rollout,
                *([self.ingest] if self.ingest else [])]


def spec_jobs(loaded: LoadedSpec) -> SpecJobs:
    name = loaded.name
    in_spec = dg.AssetSelection.key_prefixes([name])
    # Drift reports are per window and rollout analyses per step (partitioned), made on a sensor's request, never
    # as part of a pipeline run.
    reports = dg.AssetSelection.from_string(f'key:"{name}/{naming.DRIFT_REPORT}" or '
                                            f'key:"{name}/{naming.ROLLOUT_ANALYSIS}"')
    tags = {naming.SPEC_TAG: name}
    pdef = partitions_def(loaded.spec)
    return SpecJobs(
        data=dg.define_asset_job(naming.job_name(name, "data"), selection=dg.AssetSelection.groups(naming.DATA) & in_spec,
                                 description=f"Snapshot, validate and split {name}'s data.", tags=tags),
        pipeline=dg.define_asset_job(naming.job_name(name, "pipeline"), selection=in_spec - reports, tags=tags,
                                     description=f"{name} end to end: data, training, evaluation, gates, promotion "
                                                 "and the deployment."),
        rollback=rollback_job(loaded),
        retrain=dg.define_asset_job(
            naming.job_name(name, "retrain"), tags={**tags, f"{naming.TAG_PREFIX}retrain": "true"},
            selection=(in_spec & dg.AssetSelection.groups(naming.DATA, naming.EMBEDDINGS, naming.TRAINING,
                                                          naming.EVALUATION, naming.DEPLOYMENT)) - reports,
            description=f"Retrain {name} from fresh data through every blocking gate; the champion moves (and the "
                        "server reloads) only when they pass, at once or through the spec's rollout. Requested by "
                        "the drift sensor with the evidence in its tags."),
        rollout=rollout_jobs(loaded),
        ingest=None if pdef is None else dg.define_asset_job(
            naming.job_name(name, "ingest"), tags=tags, partitions_def=pdef,
            selection=in_spec & dg.AssetSelection.groups(naming.DATA, naming.EMBEDDINGS)
            - dg.AssetSelection.assets(naming.asset_key(name, naming.TRAINING_SPLITS)),
            description=f"One month of {name} (or a range, in one run): snapshot, checks, validation, embeddings and "
                        "the vector index, each month on its own; nothing is trained."),
    )


WEEKLY_RETRAIN = "Retrain every Monday whatever the drift says; shipped off: turn it on where fresh data arrives on a " \
                 "schedule."


def weekly_retrain(loaded: LoadedSpec, retrain: AssetJob) -> dg.ScheduleDefinition:
    if not loaded.spec.partitioned:
        return dg.ScheduleDefinition(name=f"{loaded.name}__weekly_retrain", job=retrain, cron_schedule="0 3 * * 1",
                                     default_status=dg.DefaultScheduleStatus.STOPPED, description=WEEKLY_RETRAIN)
    spec = loaded.spec

    @dg.schedule(name=f"{loaded.name}__weekly_retrain", job=retrain, cron_schedule="0 3 * * 1",
                 default_status=dg.DefaultScheduleStatus.STOPPED,
                 description=WEEKLY_RETRAIN + " The newest month is snapshotted again and training reads the window "
                                              "ending there.")
    def weekly(context: dg.ScheduleEvaluationContext):
        month = newest_month(context.instance, spec)
        if month is None:
            return dg.SkipReason(f"{spec.name}: no month materialized yet; backfill raw_dataset first")
        return dg.RunRequest(partition_key=month, tags={f"{naming.TAG_PREFIX}month": month})

    return weekly


def monthly_ingest(loaded: LoadedSpec, ingest: AssetJob) -> dg.ScheduleDefinition:
    """`<spec>__monthly_ingest` (shipped off): each month's partition once the month is over, through validation,
    embeddings and the vector index; the drift sensor then compares it with the serving version's reference."""
    return dg.build_schedule_from_partitioned_job(ingest, name=f"{loaded.name}__monthly_ingest", hour_of_day=4,
                                                  default_status=dg.DefaultScheduleStatus.STOPPED,
                                                  description="Ingest each month once it is over (shipped off: "
                                                              "turn it on where the source fills month by month).")
