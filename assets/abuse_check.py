"""The abuse check on `<spec>/inference_log`: each API key's recent traffic judged for probing and for sampling the
input space (core/abuse.py), failing with the keys it names.

Distances between queries are measured against the serving version's training sample (the reference its drift
detectors were fitted on, assets/detectors.py); a version evaluated elsewhere has none here, and the traffic
itself is the reference. Like every check it blocks (what follows inference_log in the same run waits): a named
key is for an operator to look at, and to revoke or rate-limit in the keys file.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import dagster as dg

from assets.detectors import detectors_dir
from assets.spec import PipelineSpec
from core.audit import AuditStore
from resources.storage import StorageResource

CHECK_NAME = "abuse_by_key"


def serving_reference(storage: StorageResource, spec_name: str, version: str | None) -> list[dict] | None:
    """The reference rows of `version`'s detectors, or None when they are not in this home."""
    import pandas as pd

    if version is None:
        return None
    path = detectors_dir(storage, spec_name, version) / "reference.parquet"
    return pd.read_parquet(path).to_dict("records") if path.is_file() else None


def abuse_verdicts(spec: PipelineSpec, storage: StorageResource, store: AuditStore) -> list[Any]:
    """Every key's verdict (core.abuse.AbuseVerdict) over its recent traffic, under the spec's limits."""
    from core.abuse import judge_store
    from core.audit.traffic import traffic_after

    limits = spec.monitoring.abuse
    latest = traffic_after(store, spec.name, max(0, store.latest_seq(spec.name) - 1000), 1000)
    serving = Counter(r.model_version for r in latest).most_common(1)
    reference = serving_reference(storage, spec.name, serving[0][0] if serving else None)
    f = spec.features
    return judge_store(store, spec.name, list(f.numeric), list(f.categorical), list(f.text), reference,
                       recent=limits.recent_queries, min_queries=limits.min_queries,
                       min_shapiro_w=limits.min_shapiro_w, max_variant_share=limits.max_variant_share,
                       max_ood_rate=limits.max_ood_rate)


def abuse_check_result(verdicts: list[Any]) -> dg.AssetCheckResult:
    from core.abuse import verdicts_markdown

    named = [v for v in verdicts if v.named]
    return dg.AssetCheckResult(
        check_name=CHECK_NAME, passed=not named, severity=dg.AssetCheckSeverity.ERROR,
        description=("; ".join(v.describe() for v in named) if named
                     else f"{len(verdicts)} key(s) judged; none looks like probing or sampling"),
        metadata={"keys": dg.MetadataValue.md(verdicts_markdown(verdicts)),
                  "named_keys": dg.MetadataValue.json([v.key_id for v in named]),
                  "verdicts": dg.MetadataValue.json([v.to_json() for v in verdicts])})
