"""Jobs that are no single stage's own: `<spec>__data`, `<spec>__pipeline`, `<spec>__rollback`, `<spec>__retrain`,
and the weekly retrain schedule (shipped off). A spec with partitions also gets `<spec>__ingest` (one month through
validation, embeddings and the vector index) and its `<spec>__monthly_ingest` schedule (shipped off).

A partitioned spec's `__data`, `__pipeline` and `__retrain` runs name a month (or a range, as a single-run
backfill): its monthly assets snapshot that month, and training reads the training window. The weekly retrain
snapshots the newest month again and trains on the window ending there.

No `from __future__ import annotations`: Dagster reads the op's config annotation at definition time.
"""

from dataclasses import dataclass

import dagster as dg

from assets import naming
from assets.compliance import rollback_champion
from assets.partitions import newest_month, partitions_def
from assets.spec import LoadedSpec
from assets.wiring import AssetJob
from resources.mlflow import MlflowResource


class RollbackConfig(dg.Config):
    """Who rolls back and why; both go on the run and on the model version rolled back from."""

    actor: str
    reason: str


def rollback_job(loaded: LoadedSpec) -> dg.JobDefinition:
    spec_name = loaded.name
    champion_key = naming.asset_key(spec_name, naming.CHAMPION_MODEL)

    @dg.op(name=f"{spec_name}__rollback_champion", tags={naming.SPEC_TAG: spec_name})
    def rollback_champion_op(context: dg.OpExecutionContext, config: RollbackConfig, mlflow: MlflowResource):
        """Moves `champion` back to `previous`, and records who and why on the run and the model version."""
        done = rollback_champion(mlflow, spec_name, config.actor, config.reason)
        context.instance.add_run_tags(context.run_id, {f"{naming.TAG_PREFIX}rollback_actor": config.actor,
                                                       f"{naming.TAG_PREFIX}rollback_reason": config.reason[:200]})
        context.log.info(f"{spec_name}: champion {done.from_version or 'none'} -> {done.to_version}")
        yield dg.AssetMaterialization(asset_key=champion_key, metadata={
            "champion_version": done.to_version, "rolled_back_from": done.from_version or "",
            "decision": f"rollback by {config.actor}: {config.reason}", "changed": True})
        yield dg.Output(None)

    @dg.job(name=naming.job_name(spec_name, "rollback"), tags={naming.SPEC_TAG: spec_name},
            description=f"Move {spec_name}'s champion alias back to the previous version (config: actor, reason).")
    def rollback():
        rollback_champion_op()

    return rollback


@dataclass(frozen=True)
class SpecJobs:
    data: AssetJob
    pipeline: AssetJob
    rollback: dg.JobDefinition
    retrain: AssetJob
    ingest: AssetJob | None = None

    @property
    def all(self) -> list[AssetJob | dg.JobDefinition]:
        return [self.data, self.pipeline, self.rollback, self.retrain, *([self.ingest] if self.ingest else [])]


def spec_jobs(loaded: LoadedSpec) -> SpecJobs:
    name = loaded.name
    in_spec = dg.AssetSelection.key_prefixes([name])
    # Drift reports are per window (partitioned) and made on the sensor's request, never as part of a pipeline run.
    reports = dg.AssetSelection.from_string(f'key:"{name}/{naming.DRIFT_REPORT}"')
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
            selection=in_spec & dg.AssetSelection.groups(naming.DATA, naming.EMBEDDINGS, naming.TRAINING,
                                                         naming.EVALUATION, naming.DEPLOYMENT),
            description=f"Retrain {name} from fresh data through every blocking gate; the champion moves (and the "
                        "server reloads) only when they pass. Requested by the drift sensor with the evidence in "
                        "its tags."),
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
