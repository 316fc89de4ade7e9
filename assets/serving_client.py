"""The deployment's client of its own server: the rows it sends, the smoke decision and the latency burst.

Bodies are built by core/protocol.py (one builder for every client). The checks send the deployment's own key
(`smoke.key` beside the server's config), so the decisions they leave on the audit log carry key id
`deployment-smoke` and count in no drift window (core/audit/traffic.py). Over TLS they trust the configured CA
(or certificate) and present the configured client certificate (core.server_config.TlsFiles).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from assets.spec import PipelineSpec
from core.audit import AuditStore
from core.lazy import pd
from core.server_config import TlsFiles


def v2_request(spec: PipelineSpec, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A v2 body for the spec's features."""
    from core.protocol import v2_request as build

    return build(rows, spec.features.numeric, [*spec.features.categorical, *spec.features.text])


def v1_request(spec: PipelineSpec, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A v1 body (`{"instances": [...]}`) for the spec's features."""
    from core.protocol import v1_request as build

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


def verify(tls: TlsFiles | None) -> Any:
    """httpx's `verify` for a server with `tls`: its CA (or certificate) trusted, our client certificate
    presented when it requires one; True (the system's CAs) for plain HTTP or no configured TLS."""
    return tls.client_context() if tls is not None else True


def smoke_decision(endpoint: str, spec: PipelineSpec, row: dict[str, Any], key: str | None, store: AuditStore,
                   expected_version: str, tls: TlsFiles | None = None) -> SmokeResult:
    """One v2 request; its answer must be well formed, name the champion and be on a verifiable audit log."""
    import httpx

    from core.protocol import v2_outputs

    try:
        r = httpx.post(f"{endpoint}/v2/models/{spec.name}/infer", json=v2_request(spec, [row]),
                       headers=_headers(key), timeout=30, verify=verify(tls))
    except httpx.HTTPError as exc:
        return SmokeResult(False, f"smoke request to {endpoint} failed: {exc}", None, [])
    if r.status_code != 200:
        return SmokeResult(False, f"smoke request answered HTTP {r.status_code}: {r.text[:500]}", None, [])
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
        return SmokeResult(False, f"decision {did} was answered but is not on the audit log {store.location()}",
                           did, [])
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
                  key: str | None, tls: TlsFiles | None = None) -> list[float]:
    """Milliseconds per v1 request, one applicant each, sent one after another."""
    import httpx

    out = []
    with httpx.Client(base_url=endpoint, headers=_headers(key), timeout=30, verify=verify(tls)) as client:
        for i in range(n):
            body = v1_request(spec, [rows[i % len(rows)]])
            t = time.perf_counter()
            r = client.post(f"/v1/models/{spec.name}:predict", json=body)
            out.append((time.perf_counter() - t) * 1000.0)
            if r.status_code != 200:
                raise RuntimeError(f"burst request {i} answered HTTP {r.status_code}: {r.text[:300]}")
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]
