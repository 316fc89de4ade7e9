"""Jobs that are no single stage's own: `<spec>__data`, `<spec>__pipeline`, `<spec>__rollback`.

No `from __future__ import annotations`: Dagster reads the op's config annotation at definition time.
"""

import dagster as dg

from assets import naming
from assets.compliance import rollback_champion
from assets.spec import LoadedSpec
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


def spec_jobs(loaded: LoadedSpec) -> list:
    name = loaded.name
    in_spec = dg.AssetSelection.key_prefixes([name])
    return [
        dg.define_asset_job(name=naming.job_name(name, "data"), selection=dg.AssetSelection.groups(naming.DATA) & in_spec,
                            description=f"Snapshot, validate and split {name}'s data.", tags={naming.SPEC_TAG: name}),
        dg.define_asset_job(name=naming.job_name(name, "pipeline"), selection=in_spec, tags={naming.SPEC_TAG: name},
                            description=f"{name} end to end: data, training, evaluation, gates and promotion."),
        rollback_job(loaded),
    ]
