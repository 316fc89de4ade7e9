"""Every name users, tests and later stages rely on: asset keys, groups, jobs, sensors, aliases, tag names.

A name used in more than one module lives here or, when the Dagster-free floor needs it too, in core/names.py
(re-exported below) and nowhere else.
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
NOTICE_TEMPLATE = "notice_template"  # specs with notices: the template in the prompt registry
NOTICES = "notices"                  # ... and the notices of the test split's adverse decisions, checked
CHAMPION_MODEL = "champion_model"
DEPLOYMENT_ASSET = "deployment"
INFERENCE_LOG = "inference_log"
DRIFT_REPORT = "drift_report"
ROLLOUT_ANALYSIS = "rollout_analysis"

# --- the columns every stage after the data shares ------------------------------------------------------------
ROW_ID = "row_id"
LABEL = "label"
SPLIT = "split"

# --- aliases, version tags and serving names: core/names.py spells them (the workloads read them too) --------
from core.names import (CHALLENGER, CHAMPION, DETECTORS_TAG, LINEAGE_TAGS, MANIFEST_TAG, PREVIOUS,  # noqa: E402,F401
                        SERVED_VARIANTS, SMOKE_KEY_ID, THRESHOLD_TAG)

# --- Dagster run tags -----------------------------------------------------------------------------------------
TAG_PREFIX = "intelligentops/"
SPEC_TAG = "spec"


def asset_key(spec_name: str, asset: str) -> dg.AssetKey:
    """`<spec>/<asset>`, the key every stage uses for a spec's asset."""
    import dagster as dg

    return dg.AssetKey([spec_name, asset])


def job_name(spec_name: str, kind: str) -> str:
    """`<spec>__data`, `<spec>__pipeline`, `<spec>__rollback`, `<spec>__retrain`, `<spec>__rollout_step`, ..."""
    return f"{spec_name}__{kind}"


def drift_sensor_name(spec_name: str) -> str:
    return f"{spec_name}__drift_sensor"


def rollout_sensor_name(spec_name: str) -> str:
    return f"{spec_name}__rollout_sensor"
