"""The composition root: one Definitions per spec and stage, merged, with the cross-cutting policy stamped once.

Dagster loads `defs` as the code location `intelligentops` (workspace.yaml, pyproject's [tool.dagster]). It is
lazy: the environment is read (resources/settings.py) and the specs parsed when Dagster loads the location, not
at import, and `build_definitions` builds the same thing for any pipelines folder and deployment in-process.
No network and no ML library is touched here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import dagster as dg

from assets import (compliance, data, deployment, embeddings, evaluation, monitoring, naming, notices, rollout,
                    training)
from assets.spec import LoadedSpec, load_specs
from orchestration.jobs import monthly_ingest, spec_jobs, weekly_retrain
from resources import resources_for
from resources.settings import Settings

# Loading the code location imports none of these (tests/unit/test_definitions.py and benchmarks/ check it): they are
# imported inside the functions that use them, so a UI reload or a sensor tick never pays for them.
HEAVY_MODULES = ("torch", "mlflow", "great_expectations", "deepspeed", "alibi_detect", "sentence_transformers",
                 "transformers", "lancedb", "sklearn", "kserve")

# Each stage contributes one Definitions per spec: its assets, checks, jobs, sensors and schedules.
STAGES: tuple[Callable[[LoadedSpec], dg.Definitions], ...] = (
    data.definitions, embeddings.definitions, training.definitions, evaluation.definitions, notices.definitions,
    compliance.definitions, deployment.definitions,
)

# What each asset is made of, as the UI's kind badges show it (at most three each).
KINDS: dict[str, set[str]] = {
    naming.RAW_DATASET: {"pandas", "parquet"},
    naming.VALIDATED_DATASET: {"pandas", "parquet"},
    naming.TRAINING_SPLITS: {"pandas", "parquet"},
    naming.TEXT_EMBEDDINGS: {"pytorch", "parquet"},
    naming.VECTOR_INDEX: {"lancedb"},
    naming.MODEL_CHECKPOINT: {"pytorch", "deepspeed", "mlflow"},
    naming.REGISTERED_MODEL: {"mlflow", "pytorch"},
    naming.MODEL_EVALUATION: {"mlflow", "fairlearn"},
    naming.NOTICE_TEMPLATE: {"jinja", "mlflow"},
    naming.NOTICES: {"jinja", "textstat"},
    naming.COMPLIANCE_REPORT: {"markdown", "html", "mlflow"},
    naming.CHAMPION_MODEL: {"mlflow"},
    naming.DEPLOYMENT_ASSET: {"kserve", "sqlite"},
    naming.INFERENCE_LOG: {"sqlite"},
    naming.DRIFT_REPORT: {"alibi-detect"},
    naming.ROLLOUT_ANALYSIS: {"alibi-detect", "scipy"},
}


def spec_definitions(loaded: LoadedSpec) -> dg.Definitions:
    """Everything one spec contributes, with its owner, tags and kinds stamped on every asset."""
    spec = loaded.spec
    jobs = spec_jobs(loaded)
    merged = dg.Definitions.merge(
        *(stage(loaded) for stage in STAGES),
        # Monitoring's sensor starts the retrain job, the rollout's the step and rollback jobs: no single stage's own.
        monitoring.definitions(loaded, retrain=jobs.retrain),
        rollout.definitions(loaded, rollout.RolloutJobs(step=jobs.rollout[0], rollback=jobs.rollback)),
        dg.Definitions(jobs=jobs.all, schedules=[weekly_retrain(loaded, jobs.retrain),
                                                 *([monthly_ingest(loaded, jobs.ingest)] if jobs.ingest else [])]))

    def stamp(asset: dg.AssetSpec) -> dg.AssetSpec:
        return asset.merge_attributes(
            owners=[spec.owner] if spec.owner else [],
            tags={naming.SPEC_TAG: spec.name, "stage": asset.group_name or ""},
            kinds=KINDS.get(asset.key.path[-1], set()),
        )

    return dg.Definitions(assets=dg.map_asset_specs(stamp, merged.assets or []), asset_checks=merged.asset_checks,
                          jobs=merged.jobs, sensors=merged.sensors, schedules=merged.schedules)


def build_definitions(pipelines: Path | str | None = None, deployment: str | None = None,
                      settings: Settings | None = None) -> dg.Definitions:
    """The whole code location for the specs in `pipelines` (default: $INTELLIGENTOPS_PIPELINES)."""
    settings = settings or Settings.from_env()
    if pipelines is not None:
        settings = replace(settings, pipelines=Path(pipelines))
    if deployment is not None:
        settings = replace(settings, deployment=deployment)
    specs = load_specs(settings.pipelines)
    return dg.Definitions.merge(*(spec_definitions(s) for s in specs),
                                dg.Definitions(resources=resources_for(settings)))


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions()
