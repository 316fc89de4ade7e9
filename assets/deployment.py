"""The deployment stage: the champion behind the inference server, and the audit log it writes.

`<spec>/deployment` (group deployment, after champion_model) builds the server's config from the spec and the
data stage's learned profile, starts or reloads the server through the `server` resource (a local process here,
a KServe InferenceService on Kubernetes), waits until it serves the champion, then checks it: `smoke_decision`
(one real request answered with a valid decision that is on the audit log, chain intact) and `latency_slo` (the
p99 of a short burst within `deployment.slo_p99_ms`); the client those checks use is assets/serving_client.py.
`<spec>/inference_log`, which observes the audit log the server writes, is the monitoring stage's.

The work is in the plain functions below; the asset bodies wire them to resources. `python -m
orchestration.serve <spec>` writes the config and runs the server in the foreground (what `make serve` does).
"""


import hashlib
import json
import math
import os
import secrets
import statistics
from pathlib import Path
from typing import Any

import dagster as dg

from assets import naming, rollout_state
from assets.profile import load_profile
from assets.serving_client import latency_burst, percentile, sample_rows, smoke_decision
from assets.spec import LoadedSpec, PipelineSpec
from assets.wiring import DataFrameType, Log
from core.keys import keys_dir as keys_folder
from core.lazy import pd
from core.names import OPERATOR_KEY_ID, SMOKE_KEY_ID, notice_prompt_name
from core.server_config import ServerConfig, TlsFiles, parse_server_config
from core.signing import PUBLIC_KEY
from resources.mlflow import MlflowResource
from resources.servers import OPERATOR_KEY_FILE, SMOKE_KEY_FILE, AuditResource, Deployed, ServerLauncher
from resources.storage import StorageResource, atomic_write_bytes



# --- the server's config -------------------------------------------------------------------------------------


def accepted_ranges(spec: PipelineSpec, profile: Any | None) -> tuple[dict[str, list[float] | None],
                                                                      dict[str, list[str] | None]]:
    """What the server accepts per column: declared rules win, else the learned profile widened by the data
    stage's own `range_tolerance`, else anything of the right type. Widening never crosses zero: a column never
    negative in the data (counts, amounts) stays non-negative, one never positive stays non-positive, and a
    declared bound is never widened."""
    v = spec.validation
    numeric: dict[str, list[float] | None] = {}
    for col in spec.features.numeric:
        rule = v.columns.get(col)
        learned = (profile.numeric.get(col) if profile is not None else None)
        lo = rule.min if rule is not None and rule.min is not None else None
        hi = rule.max if rule is not None and rule.max is not None else None
        if learned is not None:
            span = (learned[1] - learned[0]) or abs(learned[0]) or 1.0
            if lo is None:
                lo = learned[0] - v.range_tolerance * span
                lo = max(lo, 0.0) if learned[0] >= 0 else lo
            if hi is None:
                hi = learned[1] + v.range_tolerance * span
                hi = min(hi, 0.0) if learned[1] <= 0 else hi
        numeric[col] = None if lo is None and hi is None else [
            -math.inf if lo is None else float(lo), math.inf if hi is None else float(hi)]
        if numeric[col] is not None and not all(math.isfinite(b) for b in numeric[col]):
            numeric[col] = [b if math.isfinite(b) else (-1e308 if b < 0 else 1e308) for b in numeric[col]]
    categorical: dict[str, list[str] | None] = {}
    for col in spec.features.categorical:
        rule = v.columns.get(col)
        if rule is not None and rule.allowed is not None:
            categorical[col] = sorted({str(a) for a in rule.allowed})
        elif profile is not None and col in profile.categories and len(profile.categories[col]) < 500:
            categorical[col] = list(profile.categories[col])
        else:
            categorical[col] = None  # too many to enumerate: the model maps unseen values to "other"
    return numeric, categorical


def numeric_allowed(spec: PipelineSpec) -> dict[str, list[float]]:
    """The spec's `allowed` sets of numeric columns (term: [36, 60]): the only values the server accepts."""
    out = {}
    for col in spec.features.numeric:
        rule = spec.validation.columns.get(col)
        if rule is not None and rule.allowed is not None:
            out[col] = sorted({float(a) for a in rule.allowed if not isinstance(a, bool)})
    return out


def may_be_missing(spec: PipelineSpec, profile: Any | None) -> list[str] | None:
    """The feature columns a request may leave missing: missing in the data (learned null rate above zero) or
    allowed by the spec (`validation.columns.<col>.max_null_fraction` above zero). None without a profile:
    nothing is known, so nothing is refused for being missing."""
    if profile is None or not profile.null_rates:
        return None
    out = []
    for col in spec.features.all:
        rule = spec.validation.columns.get(col)
        declared = rule is not None and rule.max_null_fraction is not None and rule.max_null_fraction > 0
        if declared or profile.null_rates.get(col, 0.0) > 0:
            out.append(col)
    return out


def _keys_document(loaded: LoadedSpec) -> dict[str, Any] | None:
    d = loaded.spec.deployment
    if d.api_keys_file:
        path = loaded.resolve(d.api_keys_file)
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{loaded.path}: deployment.api_keys_file {path}: cannot read it as JSON ({exc})") from None
    if d.api_keys_env:
        text = os.environ.get(d.api_keys_env)
        if text is None:
            raise ValueError(f"{loaded.path}: deployment.api_keys_env names {d.api_keys_env}, which is not set")
        return json.loads(text)
    return None


def _own_key(path: Path) -> str:
    if not path.is_file():
        atomic_write_bytes(path, secrets.token_urlsafe(32).encode())
        path.chmod(0o600)
    return path.read_text().strip()


def smoke_key(folder: Path) -> str:
    """The deployment's own key for its smoke requests, kept beside the server's config (mode 0600)."""
    return _own_key(folder / SMOKE_KEY_FILE)


def operator_key(folder: Path) -> str:
    """The operator's key (scopes outcomes and read), kept beside the server's config (mode 0600): whoever can
    read that file reports outcomes, e.g. `python -m workloads.replay outcomes --api-key-file <it>`."""
    return _own_key(folder / OPERATOR_KEY_FILE)


def _tls(loaded: LoadedSpec) -> TlsFiles | None:
    """The spec's TLS files as absolute paths (relative ones are taken from the spec's folder)."""
    tls = loaded.spec.deployment.tls
    if tls is None:
        return None
    # Not checked here: on a cluster the files are a Secret mounted in the predictor (resources/servers.py); the
    # server refuses to start, naming the key, when one is missing.
    return TlsFiles(**{k: (str(loaded.resolve(v)) if v else None) for k, v in tls.model_dump().items()})


def signing_public_key(home: str, keys_dir: str | None) -> Path:
    """The model-signing public key the server trusts: in INTELLIGENTOPS_KEYS_DIR, or the home's keys folder."""
    return keys_folder(home, keys_dir) / PUBLIC_KEY


def server_config(loaded: LoadedSpec, home: str, tracking_uri: str, audit_url: str, profile: Any | None,
                  registry_uri: str | None = None, keys_dir: str | None = None) -> tuple[ServerConfig, str | None]:
    """The typed config `python -m workloads.serving` runs from (core/server_config.py), and the key the smoke
    requests use. Building it validates it; the launcher validates it again when it writes the file."""
    spec, d = loaded.spec, loaded.spec.deployment
    folder = Path(home) / spec.name / "deployment"
    folder.mkdir(parents=True, exist_ok=True)
    numeric, categorical = accepted_ranges(spec, profile)
    keys_file = None
    # The smoke requests always carry the deployment's own key: with api keys it is one of them, on an open server
    # the server still recognises it, so their decisions are marked (key id deployment-smoke) and left out of drift.
    # The operator key likewise: outcomes and read need a key on every server, and this is the local one.
    key = smoke_key(folder)
    operator = operator_key(folder)
    document = _keys_document(loaded)
    if document is not None:
        own = [{"id": SMOKE_KEY_ID, "sha256": hashlib.sha256(key.encode()).hexdigest(), "models": [spec.name],
                "scopes": ["predict", "explain", "read"]},
               {"id": OPERATOR_KEY_ID, "sha256": hashlib.sha256(operator.encode()).hexdigest(),
                "models": [spec.name], "scopes": ["outcomes", "read"]}]
        merged = {"keys": [*[k for k in document.get("keys", []) if k.get("id") not in (SMOKE_KEY_ID,
                                                                                       OPERATOR_KEY_ID)], *own]}
        keys_file = folder / "keys.json"
        atomic_write_bytes(keys_file, json.dumps(merged, indent=2).encode())
        keys_file.chmod(0o600)
    config = parse_server_config({
        "spec": spec.name, "tracking_uri": tracking_uri, "registry_uri": registry_uri, "audit_url": audit_url,
        "keys_dir": str(keys_folder(home, keys_dir)),
        "port": d.port, "mode": d.traffic.mode, "canary_share": d.traffic.canary_share,
        "numeric": numeric, "categorical": categorical, "text": list(spec.features.text),
        "max_batch_rows": d.max_batch_rows, "max_body_bytes": d.max_body_bytes,
        "rate_limit_per_minute": d.rate_limit_per_minute, "api_keys_file": str(keys_file) if keys_file else None,
        "redact": list(d.redact), "audit_fields": spec.sensitive_columns, "retention_days": d.retention_days,
        "explain_top": d.explain_top,
        "similar_cases": d.similar_cases if spec.has_text else 0,
        "vector_db": str(Path(home) / spec.name / "vector_index") if spec.has_text else None,
        "model_cache": str(folder / "models"),
        "signing_public_key": str(signing_public_key(home, keys_dir)),
        "smoke_key_sha256": hashlib.sha256(key.encode()).hexdigest(),
        "operator_key_sha256": hashlib.sha256(operator.encode()).hexdigest(),
        "host": d.host, "gateway_authenticates": d.gateway_authenticates,
        "tls": (t.model_dump() if (t := _tls(loaded)) else None),
        "nullable": may_be_missing(spec, profile), "numeric_allowed": numeric_allowed(spec),
        "min_known_fraction": d.min_known_fraction, "max_in_flight_per_client": d.max_in_flight_per_client,
        "batch_text_chars": d.batch_text_chars, "max_outcomes_per_request": d.max_outcomes_per_request,
        "notice_prompt": notice_prompt_name(spec.name) if spec.notices else None,
        "out_of_distribution": d.out_of_distribution,
        "answers": {scope: view.model_dump() for scope, view in d.answers.items()},
        "workers": d.workers, "batch_window_ms": d.batch_window_ms, "scoring_threads": d.scoring_threads,
    }, source=f"{loaded.path} (deployment)")
    return config, key


# --- the stage's Definitions -------------------------------------------------------------------------------------


def deploy(loaded: LoadedSpec, storage: StorageResource, mlflow: MlflowResource, audit: AuditResource,
           server: ServerLauncher, validated: "pd.DataFrame", log: Log | None = None
           ) -> tuple[Deployed, dict[str, str], str | None, list[dict[str, Any]]]:
    """Start or reload the server on the champion; (Deployed, expected versions, smoke key, smoke rows)."""
    spec = loaded.spec
    config, key = server_config(loaded, storage.home, mlflow.resolved_tracking_uri(), audit.resolved_url(),
                                load_profile(storage, spec), mlflow.registry_uri, audit.resolved_keys_dir())
    expect = rollout_state.expected_versions(spec, mlflow, audit.store())  # the split in force (serving chain)
    deployed = server.deploy(spec.name, config, expect, log)
    return deployed, expect, key, sample_rows(spec, validated, 20)


def definitions(loaded: LoadedSpec) -> dg.Definitions:
    """`<spec>/deployment` with its two blocking checks."""
    spec = loaded.spec
    key = naming.asset_key(spec.name, naming.DEPLOYMENT_ASSET)

    @dg.asset(
        key=key, group_name=naming.DEPLOYMENT,
        deps=[naming.asset_key(spec.name, naming.CHAMPION_MODEL)],
        ins={"validated": dg.AssetIn(key=naming.asset_key(spec.name, naming.VALIDATED_DATASET))},
        check_specs=[dg.AssetCheckSpec("smoke_decision", asset=key, blocking=True,
                                       description="A smoke request gets a valid decision from the champion and "
                                                   "leaves a verifiable record on the audit log."),
                     dg.AssetCheckSpec("latency_slo", asset=key, blocking=True,
                                       description="The p99 latency of a smoke burst is within "
                                                   "deployment.slo_p99_ms.")],
        description=f"{spec.name}'s champion served by python -m workloads.serving (KServe model server; v1 and "
                    "Open Inference Protocol v2), every decision on the hash-chained audit log.",
    )
    def deployment(context: dg.AssetExecutionContext, storage: StorageResource, mlflow: MlflowResource,
                   audit: AuditResource, server: ServerLauncher, validated: DataFrameType) -> dg.MaterializeResult:
        """Starts or reloads the inference server on the champion (a local process, or a KServe
        InferenceService on Kubernetes), waits until it serves that version, then sends a smoke decision and
        a short latency burst. Metadata: endpoint, versions served, traffic policy, where the log is."""
        store = audit.store()
        deployed, expect, smoke_key_, rows = deploy(loaded, storage, mlflow, audit, server, validated, context.log)
        smoke = smoke_decision(deployed.endpoint, spec, rows[0], smoke_key_, store, expect[naming.CHAMPION],
                               deployed.tls)
        slo = spec.deployment.slo_p99_ms
        try:
            burst = latency_burst(deployed.endpoint, spec, rows, spec.deployment.smoke_requests, smoke_key_,
                                  deployed.tls)
            p50, p99 = statistics.median(burst), percentile(burst, 99)
            latency = dg.AssetCheckResult(check_name="latency_slo", passed=p99 <= slo, metadata={
                "p50_ms": round(p50, 2), "p99_ms": round(p99, 2), "slo_p99_ms": slo, "requests": len(burst)},
                description=f"p99 {p99:.1f} ms over {len(burst)} requests (SLO {slo:g} ms)")
        except Exception as exc:
            latency = dg.AssetCheckResult(check_name="latency_slo", passed=False,
                                          description=f"the burst failed: {exc}")
        split = store.latest_serving_event(spec.name)
        traffic = spec.deployment.traffic
        policy = split.split_text() if split is not None else traffic.mode if traffic.mode != "canary" else \
            f"canary {traffic.canary_share:.0%} to challenger"
        return dg.MaterializeResult(
            metadata={
                "endpoint": dg.MetadataValue.url(deployed.endpoint), "how": deployed.how,
                "champion_version": deployed.serving.get(naming.CHAMPION, ""),
                "challenger_version": deployed.serving.get(naming.CHALLENGER, "none"),
                "traffic_policy": policy, "audit_url": store.location(),
                "pid": deployed.pid if deployed.pid is not None else "n/a",
                "log": dg.MetadataValue.path(deployed.log_path) if deployed.log_path else "n/a",
                "config": dg.MetadataValue.path(deployed.config_path) if deployed.config_path else "n/a",
                "kubernetes_resource": deployed.resource_name or "n/a",
                "try_it": dg.MetadataValue.md(
                    f"```\ncurl -s {deployed.endpoint}/v1/models/{spec.name}:predict -d "
                    f"'{json.dumps({'instances': rows[:1]})}'\n```"),
            },
            data_version=dg.DataVersion(f"{spec.name}-v{deployed.serving.get(naming.CHAMPION, '')}"),
            check_results=[dg.AssetCheckResult(check_name="smoke_decision", passed=smoke.passed,
                                               description=smoke.description,
                                               metadata={"decision_id": smoke.decision_id or "none"}), latency],
        )

    return dg.Definitions(assets=[deployment])
