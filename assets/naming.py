"""Every name users, tests and later stages rely on: asset keys, groups, jobs, sensors, aliases, tag names.

A name used in more than one module lives here and nowhere else. Dagster-free on purpose, apart from
`asset_key`, so that a workload running in the project's image may read the alias and tag names too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import dagster as dg

# --- groups: one per stage ------------------------------------------------------------------------------------
DATA = "data"
EMBEDDINGS = "embeddings"
TRAINING = "training"
EVALUATION = "evaluation"
DEPLOYMENT = "deployment"
MONITORING = "monitoring"
STAGES = (DATA, EMBEDDINGS, TRAINING, EVALUATION, DEPLOYMENT, MONITORING)

# --- assets (keys are <spec>/<asset>) -------------------------------------------------------------------------
RAW_DATASET = "raw_dataset"
VALIDATED_DATASET = "validated_dataset"
TRAINING_SPLITS = "training_splits"
TEXT_EMBEDDINGS = "text_embeddings"
VECTOR_INDEX = "vector_index"
MODEL_CHECKPOINT = "model_checkpoint"
REGISTERED_MODEL = "registered_model"
MODEL_EVALUATION = "model_evaluation"
COMPLIANCE_REPORT = "compliance_report"
CHAMPION_MODEL = "champion_model"
DEPLOYMENT_ASSET = "deployment"
INFERENCE_LOG = "inference_log"
DRIFT_REPORT = "drift_report"

# --- the columns every stage after the data shares ------------------------------------------------------------
ROW_ID = "row_id"
LABEL = "label"
SPLIT = "split"

# --- MLflow registry aliases (stages are deprecated in MLflow 3; never use them) ------------------------------
CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous"

# --- model-version tags: lineage from a version back to the exact rows it learned from ------------------------
LINEAGE_TAGS = ("dataset_hash", "splits_hash", "embeddings_version", "spec_hash", "code_revision",
                "checkpoint_sha256")

# --- Dagster run tags -----------------------------------------------------------------------------------------
TAG_PREFIX = "intelligentops/"
SPEC_TAG = "spec"


def asset_key(spec_name: str, asset: str) -> dg.AssetKey:
    """`<spec>/<asset>`, the key every stage uses for a spec's asset."""
    import dagster as dg

    return dg.AssetKey([spec_name, asset])


def job_name(spec_name: str, kind: str) -> str:
    """`<spec>__data`, `<spec>__pipeline`, `<spec>__rollback`, `<spec>__retrain`."""
    return f"{spec_name}__{kind}"


def drift_sensor_name(spec_name: str) -> str:
    return f"{spec_name}__drift_sensor"
