"""The names every floor shares, spelled once: registry aliases, model-version tags, serving variants, the
smoke requests' key id and the answer's output fields.

`assets/naming.py` adds the Dagster-side names (asset keys, groups, jobs) and re-exports these.
"""

from __future__ import annotations

# --- MLflow registry aliases (stages are deprecated in MLflow 3; never use them) ------------------------------
CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous"

# --- model-version tags ---------------------------------------------------------------------------------------
# Lineage: from a version back to the exact rows it learned from.
LINEAGE_TAGS = ("dataset_hash", "splits_hash", "embeddings_version", "spec_hash", "code_revision",
                "checkpoint_sha256")
THRESHOLD_TAG = "operating_threshold"       # chosen on the validation split; the server decides at it
MANIFEST_TAG = "manifest_sha256"            # the digest of the manifest of the version's whole model folder
SIGNING_KEY_TAG = "signing_key_sha256"      # the fingerprint of the key that signed the folder (core/signing.py)
DETECTORS_TAG = "drift_detectors_sha256"    # the digest of the version's drift detector bundle manifest

# --- serving --------------------------------------------------------------------------------------------------
VARIANTS = ("champion", "canary", "shadow")  # who made a decision; shadow decisions are recorded, never answered
SERVED_VARIANTS = ("champion", "canary")     # the decisions that were answered: the traffic a drift window counts
SMOKE_KEY_ID = "deployment-smoke"            # the deployment's own smoke and latency requests: audited, not traffic
OPERATOR_KEY_ID = "deployment-operator"      # the deployment's operator key (operator.key): outcomes and read
KEY_ID_HEADER = "x-intelligentops-key-id"    # set by the gateway for the model; a client's own is stripped

# The fields of every answered decision, in the order the v2 protocol returns them as output tensors. `ood_score`
# and `ood` are the out-of-distribution detector's (core/ood.py); -1 in a v2 tensor (null in v1) when the version
# has none.
OUTPUTS: tuple[tuple[str, str], ...] = (
    ("probability", "FP64"), ("decision", "INT64"), ("decision_id", "BYTES"), ("model_version", "BYTES"),
    ("variant", "BYTES"), ("top_factors", "BYTES"), ("similar_cases", "BYTES"), ("ood_score", "FP64"),
    ("ood", "INT64"))
OUTPUT_NAMES = tuple(name for name, _ in OUTPUTS)
