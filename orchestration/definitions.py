"""The composition root: reads the pipeline specs and binds every asset, check, job and resource.

Loading this module reads YAML and nothing else: no network, no ML libraries. Dagster loads it as the code
location `intelligentops` (workspace.yaml, pyproject's [tool.dagster]).
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from assets.compliance import build_compliance_assets, build_rollback_job
from assets.data import build_data_assets
from assets.embeddings import build_embedding_assets
from assets.evaluation import build_evaluation_asset
from assets.spec import LoadedSpec, load_specs
from assets.training import build_training_assets
from resources import resources_for


def build_assets(spec: LoadedSpec) -> list:
    """Every asset and check one spec contributes to the graph."""
    out = build_data_assets(spec)
    if spec.spec.has_text:
        out += build_embedding_assets(spec)
    out += build_training_assets(spec)
    out.append(build_evaluation_asset(spec))
    out += build_compliance_assets(spec)
    return out


def build_definitions(pipelines: Path | str | None = None, deployment: str | None = None) -> dg.Definitions:
    specs = load_specs(pipelines)
    defs: list = []
    jobs = []
    for spec in specs:
        defs.extend(build_assets(spec))
        jobs.append(dg.define_asset_job(
            name=f"{spec.name}__data",
            selection=dg.AssetSelection.groups("data") & dg.AssetSelection.key_prefixes([spec.name]),
            description=f"Snapshot, validate and split {spec.name}'s data.",
        ))
        jobs.append(dg.define_asset_job(
            name=f"{spec.name}__pipeline",
            selection=dg.AssetSelection.key_prefixes([spec.name]),
            description=f"{spec.name} end to end: data, training, evaluation, gates and promotion.",
        ))
        jobs.append(build_rollback_job(spec))
    checks = [d for d in defs if isinstance(d, dg.AssetChecksDefinition)]
    assets = [d for d in defs if not isinstance(d, dg.AssetChecksDefinition)]
    return dg.Definitions(assets=assets, asset_checks=checks, jobs=jobs, resources=resources_for(deployment))


defs = build_definitions()
