"""Jobs that are no single stage's own: `<spec>__data`, `<spec>__pipeline`, `<spec>__rollback`, `<spec>__retrain`,
and the weekly retrain schedule (shipped off).

No `from __future__ import annotations`: Dagster reads the op's config annotation at definition time.
"""

from dataclasses import dataclass

import dagster as dg

from assets import naming
from assets.compliance import rollback_champion
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

    @property
    def all(self) -> list[AssetJob | dg.JobDefinition]:
        return [self.data, self.pipeline, self.rollback, self.retrain]


def spec_jobs(loaded: LoadedSpec) -> SpecJobs:
    name = loaded.name
    in_spec = dg.AssetSelection.key_prefixes([name])
    # Drift reports are per window (partitioned) and made on the sensor's request, never as part of a pipeline run.
    reports = dg.AssetSelection.from_string(f'key:"{name}/{naming.DRIFT_REPORT}"')
    tags = {naming.SPEC_TAG: name}
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
    )


def weekly_retrain(loaded: LoadedSpec, retrain: AssetJob) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(name=f"{loaded.name}__weekly_retrain", job=retrain, cron_schedule="0 3 * * 1",
                                 default_status=dg.DefaultScheduleStatus.STOPPED,
                                 description="Retrain every Monday whatever the drift says; shipped off: turn it on "
                                             "where fresh data arrives on a schedule.")
