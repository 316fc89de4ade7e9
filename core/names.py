"""The names every floor shares, spelled once: registry aliases, model-version tags, serving variants, the
smoke requests' key id, the answer's output fields and the notice template's names in the prompt registry.

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
NOTICE_TEMPLATE_TAG = "notice_template_version"  # the notice template version the champion was checked with
NOTICE_TEMPLATE_SHA_TAG = "notice_template_sha256"  # ... and that version's content digest

# --- the notice template in MLflow's prompt registry (core/notices/) -----------------------------------------
# Prompt version tags: the content digest (template and context) and the context the template renders with.
NOTICE_SHA_TAG = "intelligentops.notice_sha256"
NOTICE_CONTEXT_TAG = "intelligentops.notice_context"


def notice_prompt_name(spec: str) -> str:
    """The prompt holding a spec's notice template. MLflow refuses a prompt named like a registered model, and a
    spec name cannot hold a dot, so no spec's model can take this name."""
    return f"{spec}.notice"

# --- serving --------------------------------------------------------------------------------------------------
VARIANTS = ("champion", "canary", "shadow")  # who made a decision; shadow decisions are recorded, never answered
SERVED_VARIANTS = ("champion", "canary")     # the decisions that were answered: the traffic a drift window counts
SMOKE_KEY_ID = "deployment-smoke"            # the deployment's own smoke and latency requests: audited, not traffic
OPERATOR_KEY_ID = "deployment-operator"      # the deployment's operator key (operator.key): outcomes and read
KEY_ID_HEADER = "x-intelligentops-key-id"    # set by the gateway for the model; a client's own is stripped

# The fields of every answered decision, in the order the v2 protocol returns them as output tensors. `notice` is
# the notice to the applicant for a decision the spec's `notices.adverse` names (null in v1, "" in v2 otherwise).
# `ood_score` and `ood` are the out-of-distribution detector's (core/ood.py); -1 in a v2 tensor (null in v1) when
# the version has none.
OUTPUTS: tuple[tuple[str, str], ...] = (
    ("probability", "FP64"), ("decision", "INT64"), ("decision_id", "BYTES"), ("model_version", "BYTES"),
    ("variant", "BYTES"), ("top_factors", "BYTES"), ("similar_cases", "BYTES"), ("notice", "BYTES"),
    ("ood_score", "FP64"), ("ood", "INT64"))
OUTPUT_NAMES = tuple(name for name, _ in OUTPUTS)
