"""The deployment stage: the champion behind the inference server, and the audit log it writes.

`<spec>/deployment` (group deployment, after champion_model) builds the server's config from the spec and the
data stage's learned profile, starts or reloads the server through the `server` resource (a local process here,
a KServe InferenceService on Kubernetes), waits until it serves the champion, then checks it: `smoke_decision`
(one real request answered with a valid decision that is on the audit log, chain intact) and `latency_slo` (the
p99 of a short burst within `deployment.slo_p99_ms`). `<spec>/inference_log` (group monitoring) observes the
audit store: decisions per variant, complete windows, the latest seq, whether the chain verifies.

The work is in the plain functions below; the asset bodies wire them to resources. `python -m assets.deployment
<spec>` writes the config and runs the server in the foreground (what `make serve` does).
"""


import hashlib
import json
import math
import os
import secrets
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from assets import naming
from assets.spec import LoadedSpec, PipelineSpec
from core.names import SMOKE_KEY_ID
from core.server_config import ServerConfig, parse_server_config, write_server_config
from resources.storage import atomic_write_bytes



# --- the server's config -------------------------------------------------------------------------------------


def accepted_ranges(spec: PipelineSpec, profile: Any | None) -> tuple[dict[str, list[float] | None],
                                                                      dict[str, list[str] | None]]:
    """What the server accepts per column: declared rules win, else the learned profile widened by the data
    stage's own `range_tolerance`, else anything of the right type."""
    v = spec.validation
    numeric: dict[str, list[float] | None] = {}
    for col in spec.features.numeric:
        rule = v.columns.get(col)
        learned = (profile.numeric.get(col) if profile is not None else None)
        lo = rule.min if rule is not None and rule.min is not None else None
        hi = rule.max if rule is not None and rule.max is not None else None
        if learned is not None:
            span = (learned[1] - learned[0]) or abs(learned[0]) or 1.0
            lo = lo if lo is not None else learned[0] - v.range_tolerance * span
            hi = hi if hi is not None else learned[1] + v.range_tolerance * span
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


def smoke_key(folder: Path) -> str:
    """The deployment's own key for its smoke requests, kept beside the server's config (mode 0600)."""
    path = folder / "smoke.key"
    if not path.is_file():
        atomic_write_bytes(path, secrets.token_urlsafe(32).encode())
        path.chmod(0o600)
    return path.read_text().strip()


def server_config(loaded: LoadedSpec, home: str, tracking_uri: str, audit_url: str, profile: Any | None,
                  registry_uri: str | None = None) -> tuple[ServerConfig, str | None]:
    """The typed config `python -m workloads.serving` runs from (core/server_config.py), and the key the smoke
    requests use. Building it validates it; the launcher validates it again when it writes the file."""
    spec, d = loaded.spec, loaded.spec.deployment
    folder = Path(home) / spec.name / "deployment"
    folder.mkdir(parents=True, exist_ok=True)
    numeric, categorical = accepted_ranges(spec, profile)
    keys_file = None
    # The smoke requests always carry the deployment's own key: with api keys it is one of them, on an open server
    # the server still recognises it, so their decisions are marked (key id deployment-smoke) and left out of drift.
    key = smoke_key(folder)
    document = _keys_document(loaded)
    if document is not None:
        own = {"id": SMOKE_KEY_ID, "sha256": hashlib.sha256(key.encode()).hexdigest(), "models": [spec.name]}
        merged = {"keys": [*[k for k in document.get("keys", []) if k.get("id") != SMOKE_KEY_ID], own]}
        keys_file = folder / "keys.json"
        atomic_write_bytes(keys_file, json.dumps(merged, indent=2).encode())
        keys_file.chmod(0o600)
    config = parse_server_config({
        "spec": spec.name, "tracking_uri": tracking_uri, "registry_uri": registry_uri, "audit_url": audit_url,
        "port": d.port, "mode": d.traffic.mode, "canary_share": d.traffic.canary_share,
        "numeric": numeric, "categorical": categorical, "text": list(spec.features.text),
        "max_batch_rows": d.max_batch_rows, "max_body_bytes": d.max_body_bytes,
        "rate_limit_per_minute": d.rate_limit_per_minute, "api_keys_file": str(keys_file) if keys_file else None,
        "redact": list(d.redact), "retention_days": d.retention_days, "explain_top": d.explain_top,
        "similar_cases": d.similar_cases if spec.has_text else 0,
        "vector_db": str(Path(home) / spec.name / "vector_index") if spec.has_text else None,
        "model_cache": str(folder / "models"),
        "smoke_key_sha256": hashlib.sha256(key.encode()).hexdigest(),
    }, source=f"{loaded.path} (deployment)")
    return config, key


# --- talking to the server --------------------------------------------------------------------------------------


def v2_request(spec: PipelineSpec, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A v2 body for the spec's features (core/protocol.py builds every client's)."""
    from core.protocol import v2_request as build

    return build(rows, spec.features.numeric, [*spec.features.categorical, *spec.features.text])


def sample_rows(spec: PipelineSpec, frame: pd.DataFrame, n: int) -> list[dict[str, Any]]:
    """`n` feature rows of real data, as JSON values (NaN becomes null)."""
    picked = frame[spec.features.all].head(max(1, n))
    rows = []
    for rec in picked.to_dict(orient="records"):
        rows.append({k: (None if isinstance(v, float) and math.isnan(v) else
                         (v.item() if hasattr(v, "item") else v)) for k, v in rec.items()})
    return rows


@dataclass(frozen=True)
class SmokeResult:
    passed: bool
    description: str
    decision_id: str | None
    latencies_ms: list[float]


def _headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def smoke_decision(endpoint: str, spec: PipelineSpec, row: dict[str, Any], key: str | None, store: Any,
                   expected_version: str) -> SmokeResult:
    """One v2 request; its answer must be well formed, name the champion and be on a verifiable audit log."""
    import httpx

    try:
        r = httpx.post(f"{endpoint}/v2/models/{spec.name}/infer", json=v2_request(spec, [row]),
                       headers=_headers(key), timeout=30)
    except httpx.HTTPError as exc:
        return SmokeResult(False, f"smoke request to {endpoint} failed: {exc}", None, [])
    if r.status_code != 200:
        return SmokeResult(False, f"smoke request answered HTTP {r.status_code}: {r.text[:500]}", None, [])
    from core.protocol import v2_outputs

    try:
        outputs = v2_outputs(r.json())
    except ValueError as exc:
        return SmokeResult(False, f"smoke answer: {exc}", None, [])
    p, decision, did = outputs["probability"][0], outputs["decision"][0], outputs["decision_id"][0]
    if not (0.0 <= float(p) <= 1.0) or decision not in (0, 1):
        return SmokeResult(False, f"smoke answer has probability {p} and decision {decision}", did, [])
    if outputs["model_version"][0] != expected_version:
        return SmokeResult(False, f"smoke answer came from version {outputs['model_version'][0]}, the champion is "
                                  f"{expected_version}", did, [])
    record = store.get(did)
    if record is None:
        return SmokeResult(False, f"decision {did} was answered but is not on the audit log {store.url}", did, [])
    if abs(record.probability - float(p)) > 1e-12 or record.decision != decision:
        return SmokeResult(False, f"decision {did}: the audit record ({record.probability}, {record.decision}) "
                                  f"differs from the answer ({p}, {decision})", did, [])
    chain = store.verify()
    if not chain.ok:
        return SmokeResult(False, f"the audit chain does not verify: {'; '.join(chain.problems[:5])}", did, [])
    return SmokeResult(True, f"decision {did}: probability {float(p):.3f}, decision {decision} by version "
                             f"{expected_version}; on the audit log as seq {record.seq}; chain of "
                             f"{chain.checked} records verifies", did, [])


def latency_burst(endpoint: str, spec: PipelineSpec, rows: list[dict[str, Any]], n: int,
                  key: str | None) -> list[float]:
    """Milliseconds per v1 request, one applicant each, sent one after another."""
    import httpx

    out = []
    with httpx.Client(base_url=endpoint, headers=_headers(key), timeout=30) as client:
        for i in range(n):
            t = time.perf_counter()
            r = client.post(f"/v1/models/{spec.name}:predict", json={"instances": [rows[i % len(rows)]]})
            out.append((time.perf_counter() - t) * 1000.0)
            if r.status_code != 200:
                raise RuntimeError(f"burst request {i} answered HTTP {r.status_code}: {r.text[:300]}")
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


# --- the audit log as an observation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class InferenceLogObservation:
    decisions: int
    per_variant: dict[str, int]
    latest_seq: int
    complete_windows: int
    window_size: int
    chain_ok: bool
    chain_checked: int
    problems: list[str]


def observe_inference_log(store: Any, spec_name: str, window_size: int) -> InferenceLogObservation:
    per_variant = store.count(spec_name)
    total = sum(per_variant.values())
    chain = store.verify()
    served = per_variant.get("champion", 0) + per_variant.get("canary", 0)
    return InferenceLogObservation(decisions=total, per_variant=per_variant, latest_seq=store.latest_seq(spec_name),
                                   complete_windows=served // window_size, window_size=window_size,
                                   chain_ok=chain.ok, chain_checked=chain.checked, problems=chain.problems[:20])


# --- the stage's Definitions -------------------------------------------------------------------------------------


def _versions(mlflow: Any, spec: PipelineSpec) -> dict[str, str]:
    expect = {naming.CHAMPION: str(mlflow.get_version(spec.name, naming.CHAMPION).version)}
    if spec.deployment.traffic.mode != "champion":
        try:
            expect[naming.CHALLENGER] = str(mlflow.get_version(spec.name, naming.CHALLENGER).version)
        except Exception:
            pass  # no challenger: the server answers with the champion alone
    return expect


def deploy(loaded: LoadedSpec, home: str, mlflow: Any, audit: Any, server: Any, validated: pd.DataFrame,
           log: Any = None) -> tuple[Any, dict[str, str], str | None, list[dict[str, Any]]]:
    """Start or reload the server on the champion; (Deployed, expected versions, smoke key, smoke rows)."""
    from assets.data import load_profile
    from resources.storage import StorageResource

    spec = loaded.spec
    profile = load_profile(StorageResource(home=home), spec)
    config, key = server_config(loaded, home, mlflow.resolved_tracking_uri(), audit.resolved_url(), profile,
                                mlflow.registry_uri)
    expect = _versions(mlflow, spec)
    deployed = server.deploy(spec.name, config, expect, log)
    return deployed, expect, key, sample_rows(spec, validated, 20)


def definitions(loaded: LoadedSpec) -> dg.Definitions:
    """`<spec>/deployment` with its two blocking checks, and `<spec>/inference_log`."""
    spec = loaded.spec
    key = naming.asset_key(spec.name, naming.DEPLOYMENT_ASSET)
    log_key = naming.asset_key(spec.name, naming.INFERENCE_LOG)

    @dg.asset(
        key=key, group_name=naming.DEPLOYMENT,
        deps=[naming.asset_key(spec.name, naming.CHAMPION_MODEL)],
        ins={"validated": dg.AssetIn(key=naming.asset_key(spec.name, naming.VALIDATED_DATASET))},
        required_resource_keys={"storage", "mlflow", "audit", "server"},
        check_specs=[dg.AssetCheckSpec("smoke_decision", asset=key, blocking=True,
                                       description="A smoke request gets a valid decision from the champion and "
                                                   "leaves a verifiable record on the audit log."),
                     dg.AssetCheckSpec("latency_slo", asset=key, blocking=True,
                                       description="The p99 latency of a smoke burst is within "
                                                   "deployment.slo_p99_ms.")],
        description=f"{spec.name}'s champion served by python -m workloads.serving (KServe model server; v1 and "
                    "Open Inference Protocol v2), every decision on the hash-chained audit log.",
    )
    def deployment(context: dg.AssetExecutionContext, validated: pd.DataFrame) -> dg.MaterializeResult:
        """Starts or reloads the inference server on the champion (a local process, or a KServe
        InferenceService on Kubernetes), waits until it serves that version, then sends a smoke decision and
        a short latency burst. Metadata: endpoint, versions served, traffic policy, where the log is."""
        r = context.resources
        store = r.audit.store()
        deployed, expect, smoke_key_, rows = deploy(loaded, r.storage.home, r.mlflow, r.audit, r.server, validated,
                                                    context.log)
        smoke = smoke_decision(deployed.endpoint, spec, rows[0], smoke_key_, store, expect[naming.CHAMPION])
        slo = spec.deployment.slo_p99_ms
        try:
            burst = latency_burst(deployed.endpoint, spec, rows, spec.deployment.smoke_requests, smoke_key_)
            p50, p99 = statistics.median(burst), percentile(burst, 99)
            latency = dg.AssetCheckResult(check_name="latency_slo", passed=p99 <= slo, metadata={
                "p50_ms": round(p50, 2), "p99_ms": round(p99, 2), "slo_p99_ms": slo, "requests": len(burst)},
                description=f"p99 {p99:.1f} ms over {len(burst)} requests (SLO {slo:g} ms)")
        except Exception as exc:
            latency = dg.AssetCheckResult(check_name="latency_slo", passed=False,
                                          description=f"the burst failed: {exc}")
        traffic = spec.deployment.traffic
        policy = traffic.mode if traffic.mode != "canary" else f"canary {traffic.canary_share:.0%} to challenger"
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

    @dg.asset(key=log_key, group_name=naming.MONITORING, deps=[key],
              required_resource_keys={"audit"},
              description=f"What {spec.name}'s server has decided: the audit log's decisions per variant, complete "
                          f"windows of {spec.monitoring.window}, the latest seq, and whether the hash chain verifies.")
    def inference_log(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """An observation of the decision audit log, the input of drift monitoring: how many decisions per
        variant, how many complete windows, the latest seq (the drift sensor's cursor reads after it) and
        whether every record still matches its hash chain."""
        store = context.resources.audit.store()
        obs = observe_inference_log(store, spec.name, spec.monitoring.window)
        if not obs.chain_ok:
            context.log.error(f"{spec.name}: the audit chain does not verify: {obs.problems}")
        return dg.MaterializeResult(
            metadata={"decisions": obs.decisions, "latest_seq": obs.latest_seq,
                      "complete_windows": obs.complete_windows, "window_size": obs.window_size,
                      "chain_verified": obs.chain_ok, "records_checked": obs.chain_checked,
                      "per_variant": dg.MetadataValue.json(obs.per_variant),
                      "chain_problems": dg.MetadataValue.md("\n".join(f"- {p}" for p in obs.problems) or "none"),
                      "audit_url": store.location()},
            data_version=dg.DataVersion(f"seq-{obs.latest_seq}"))

    return dg.Definitions(assets=[deployment, inference_log])


# --- `make serve` ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Write the server config for a spec and run the server in the foreground."""
    import argparse

    from dataclasses import replace

    from assets.data import load_profile
    from assets.spec import load_specs
    from resources import resources_for
    from resources.settings import Settings

    parser = argparse.ArgumentParser(description="Serve a spec's champion in the foreground.")
    parser.add_argument("spec", help="the spec's name, e.g. credit_risk")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    settings = replace(Settings.from_env(), deployment="local")
    specs = {s.name: s for s in load_specs(settings.pipelines)}
    if args.spec not in specs:
        print(f"no spec named {args.spec!r}; specs: {', '.join(specs)}", file=sys.stderr)
        return 2
    loaded = specs[args.spec]
    res = resources_for(settings)
    home = res["storage"].home
    profile = load_profile(res["storage"], loaded.spec)
    config, _ = server_config(loaded, home, res["mlflow"].resolved_tracking_uri(), res["audit"].resolved_url(),
                              profile, res["mlflow"].registry_uri)
    path = Path(home) / loaded.name / "deployment" / "serve-foreground.json"
    write_server_config(path, config.replace(port=args.port))
    os.chdir(Path(__file__).resolve().parents[1])  # `-m workloads.serving` resolves from the repository root
    os.execv(sys.executable, [sys.executable, "-m", "workloads.serving", "--config", str(path)])
    return 0


if __name__ == "__main__":
    sys.exit(main())

