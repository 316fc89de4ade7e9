"""The inference server: a spec's champion behind KServe's model server, every decision on the audit log.

Run it from the repository root with the config file the deployment asset writes:

    python workloads/serve.py --config $INTELLIGENTOPS_HOME/credit_risk/deployment/server.json [--port 8080]

(`make serve` writes the config for the default pipeline and runs this in the foreground.) The same program is
the predictor container of a KServe InferenceService on a cluster (resources/servers.py renders it).

What it speaks (the model name is the spec's name):
    GET  /v2/health/live, /v2/health/ready, /v2/models/<spec>, /v2/models/<spec>/ready     Open Inference Protocol
    POST /v2/models/<spec>/infer        pandas-codec inputs: one named tensor per feature column, one row each
    POST /v1/models/<spec>:predict      {"instances": [{"income": 52000, "purpose": "car", ...}, ...]}
    POST /v1/models/<spec>:explain      the same, with each decision's top factors always filled in
    GET  /metrics                       Prometheus: requests, latency, decisions per variant and version
    GET  /intelligentops/status         which versions serve, the traffic policy, the audit log

Every answered row carries probability, decision (at the version's `operating_threshold` tag), top factors,
model version, variant and a decision id; the decision is committed to the hash-chained audit log
(core/audit/) before the response leaves. Concurrent requests are scored and committed together
(micro-batching and group commit), which is what keeps a durable write per decision cheap.

The model is loaded by alias (`models:/<spec>@champion`, and `@challenger` for a canary or shadow policy) with
pickle refused, after its files are checked against the version's manifest. A background thread polls the
aliases (and SIGHUP polls at once); a moved alias is loaded and verified beside the serving one and swapped in
by reference, so a request in flight finishes on the version it started with.

API keys and the per-key rate limit are the local stand-in for a cluster gateway's authentication: keys are
stored as sha256 digests, the audit log holds the key's id, never the key.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import hashlib
import hmac
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Refuse pickle before mlflow is imported anywhere in this process.
os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from core.audit import AuditStore, input_hash, now_iso, redact  # noqa: E402  (Dagster-free)
from core.manifest import ManifestError, verify_manifest  # noqa: E402
from core.names import CHALLENGER, CHAMPION, KEY_ID_HEADER, MANIFEST_TAG, OUTPUTS, SMOKE_KEY_ID, THRESHOLD_TAG  # noqa: E402

log = logging.getLogger("intelligentops.serve")


# --- configuration ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    """What the deployment asset writes to `<home>/<spec>/deployment/server.json`."""

    spec: str
    tracking_uri: str
    audit_url: str
    registry_uri: str | None = None
    port: int = 8080
    mode: str = "champion"  # champion | canary | shadow
    canary_share: float = 0.0
    numeric: dict[str, list[float] | None] = field(default_factory=dict)  # column -> [min, max] accepted
    categorical: dict[str, list[str] | None] = field(default_factory=dict)  # column -> allowed values
    text: list[str] = field(default_factory=list)
    max_text_chars: int = 2000
    max_batch_rows: int = 256
    max_body_bytes: int = 1_048_576
    rate_limit_per_minute: int = 6000
    api_keys_file: str | None = None
    api_keys_env: str | None = None
    redact: list[str] = field(default_factory=list)
    retention_days: int = 183
    explain_top: int = 3
    similar_cases: int = 3
    vector_db: str | None = None  # <home>/<spec>/vector_index
    model_cache: str | None = None  # where verified model files are downloaded
    poll_seconds: float = 5.0
    probe_key_sha256: str | None = None  # sha256 of the smoke requests' key; recognised even without api keys

    @staticmethod
    def load(path: str | Path, **overrides: Any) -> ServerConfig:
        raw = json.loads(Path(path).read_text())
        raw.update({k: v for k, v in overrides.items() if v is not None})
        for k in ("tracking_uri", "registry_uri", "audit_url"):
            # Secrets stay out of the file on a cluster: "env:VAR" reads the value from the environment.
            if isinstance(raw.get(k), str) and raw[k].startswith("env:"):
                var = raw[k][4:]
                if var not in os.environ:
                    raise SystemExit(f"{path}: {k} is {raw[k]!r} but {var} is not set")
                raw[k] = os.environ[var]
        raw["port"] = raw.get("port") or 8080
        known = set(ServerConfig.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise SystemExit(f"{path}: unknown settings {unknown}; known: {sorted(known)}")
        cfg = ServerConfig(**raw)
        if cfg.mode not in ("champion", "canary", "shadow"):
            raise SystemExit(f"{path}: mode {cfg.mode!r}; expected champion, canary or shadow")
        return cfg

    @property
    def features(self) -> list[str]:
        return [*self.numeric, *self.categorical, *self.text]


class InvalidRequest(ValueError):
    """Bad input: answered with a 4xx whose message names the field."""


class ServeError(RuntimeError):
    """The server cannot serve this version; the message says why and what to do."""


# --- the model versions ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServedVersion:
    """One loaded, verified model version."""

    version: str
    threshold: float
    python_model: Any
    run_id: str | None
    manifest_sha256: str

    def score(self, frame, explain: int):
        """(probabilities, top factors per row) for a frame of raw feature values."""
        import torch

        # The pyfunc may have been loaded on another thread; autograd state is per thread.
        with torch.inference_mode():
            out = self.python_model.predict(None, frame, params={"explain": explain} if explain else None)
        probability = out["probability"].to_numpy(dtype="float64")
        factors = [json.loads(v) for v in out["top_factors"]] if explain and "top_factors" in out else None
        return probability, factors


def verify_model_files(model_root: Path, expected_manifest_sha: str | None, label: str) -> str:
    """Check the version's artifacts strictly against their manifest, and the manifest against the version's tag."""
    artifacts = model_root / "artifacts"
    if not expected_manifest_sha:
        raise ServeError(f"{label} has no tag {MANIFEST_TAG}, so its files cannot be checked: refusing to serve")
    try:
        verify_manifest(artifacts, expected_sha256=expected_manifest_sha)
    except ManifestError as exc:
        raise ServeError(f"{label}: {exc}: refusing to serve") from None
    return expected_manifest_sha


def load_version(client, cfg: ServerConfig, version: str) -> ServedVersion:
    """Download, verify and load one version of the spec's model; refuse one without an operating threshold."""
    import mlflow

    label = f"model {cfg.spec!r} version {version}"
    mv = client.get_model_version(cfg.spec, version)
    tags = dict(mv.tags or {})
    raw_threshold = tags.get(THRESHOLD_TAG)
    if raw_threshold is None:
        raise ServeError(f"{label} has no tag 'operating_threshold', so no decision can be made from its scores: "
                         f"materialize {cfg.spec}/model_evaluation for it (it sets the tag), or set it by hand with "
                         f"MlflowClient().set_model_version_tag({cfg.spec!r}, {version!r}, 'operating_threshold', "
                         "'0.5')")
    try:
        threshold = float(raw_threshold)
    except ValueError:
        raise ServeError(f"{label}: tag operating_threshold = {raw_threshold!r} is not a number") from None
    if not 0.0 <= threshold <= 1.0:
        raise ServeError(f"{label}: tag operating_threshold = {threshold} is outside [0, 1]")
    cache = Path(cfg.model_cache or Path.home() / ".cache" / "intelligentops" / cfg.spec) / f"v{version}"
    if not (cache / ".complete").is_file():
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        # Resolved through this client, never mlflow's process-wide default store.
        uri = client.get_model_version_download_uri(cfg.spec, version)
        if uri.startswith("models:/m-"):  # MLflow 3: the version points at a logged model
            uri = client.get_logged_model(uri.split("/", 1)[1]).artifact_location
        mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp))
        (tmp / ".complete").write_text(version)
        try:
            os.replace(tmp, cache)
        except OSError:  # another server process finished the same download first
            shutil.rmtree(tmp, ignore_errors=True)
            if not (cache / ".complete").is_file():
                raise
    model_root = next((p.parent for p in cache.rglob("MLmodel")), None)
    if model_root is None:
        raise ServeError(f"{label}: no MLmodel file in {cache}")
    try:
        digest = verify_model_files(model_root, tags.get(MANIFEST_TAG), label)
    except ServeError as exc:
        raise ServeError(f"{exc} (files cached at {cache}; if the registry's copy is intact, delete that folder "
                         "to fetch it again)") from None
    pyfunc = mlflow.pyfunc.load_model(str(model_root))
    return ServedVersion(version=str(version), threshold=threshold, python_model=pyfunc.unwrap_python_model(),
                         run_id=mv.run_id, manifest_sha256=digest)


# --- validation ------------------------------------------------------------------------------------------------


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_columns(columns: dict[str, list], cfg: ServerConfig) -> list[dict[str, Any]]:
    """Rows of typed, checked feature values; the first problem found is raised naming the field and row."""
    missing = [c for c in cfg.features if c not in columns]
    if missing:
        raise InvalidRequest(f"missing feature field(s) {missing}; every request row needs {cfg.features}")
    unknown = sorted(set(columns) - set(cfg.features))
    if unknown:
        raise InvalidRequest(f"unknown field(s) {unknown}; the features of {cfg.spec} are {cfg.features}")
    lengths = {c: len(columns[c]) for c in cfg.features}
    n = next(iter(lengths.values()), 0)
    if any(v != n for v in lengths.values()):
        raise InvalidRequest(f"feature fields have different numbers of rows: {lengths}")
    if n == 0:
        raise InvalidRequest("the request has no rows")
    if n > cfg.max_batch_rows:
        raise InvalidRequest(f"{n} rows in one request; at most {cfg.max_batch_rows} (deployment.max_batch_rows)")
    for col, bounds in cfg.numeric.items():
        values = columns[col]
        for i, v in enumerate(values):
            if v is None:
                continue
            if isinstance(v, str):
                try:
                    v = float(v)
                except ValueError:
                    raise InvalidRequest(f"field {col!r} row {i}: {v!r} is not a number") from None
                values[i] = v
            if not _is_number(v):
                raise InvalidRequest(f"field {col!r} row {i}: expected a number or null, got {type(v).__name__}")
            if not math.isfinite(v):
                raise InvalidRequest(f"field {col!r} row {i}: {v} is not a finite number")
            if bounds is not None and not bounds[0] <= v <= bounds[1]:
                raise InvalidRequest(f"field {col!r} row {i}: {v} is outside the accepted range "
                                     f"[{bounds[0]:g}, {bounds[1]:g}] learned from the training data")
            values[i] = float(v)
    for col, allowed in cfg.categorical.items():
        allowed_set = set(allowed) if allowed is not None else None
        values = columns[col]
        for i, v in enumerate(values):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                raise InvalidRequest(f"field {col!r} row {i}: expected a category (string) or null, "
                                     f"got {type(v).__name__}")
            if isinstance(v, float) and not math.isfinite(v):
                raise InvalidRequest(f"field {col!r} row {i}: {v} is not a category")
            # A category learned from a numeric column may be spelled "36" or "36.0"; use the learned spelling.
            spellings = [str(v)]
            if isinstance(v, float) and v.is_integer():
                spellings.append(str(int(v)))
            elif isinstance(v, int):
                spellings.append(str(float(v)))
            if allowed_set is None:
                values[i] = spellings[0]
                continue
            known = next((s for s in spellings if s in allowed_set), None)
            if known is None:
                shown = sorted(allowed_set)[:20]
                raise InvalidRequest(f"field {col!r} row {i}: {spellings[0]!r} is not a known category; expected "
                                     f"one of {shown}{' ...' if len(allowed_set) > 20 else ''}")
            values[i] = known
    for col in cfg.text:
        values = columns[col]
        for i, v in enumerate(values):
            if v is None:
                continue
            if not isinstance(v, str):
                raise InvalidRequest(f"field {col!r} row {i}: expected text (string) or null, got {type(v).__name__}")
            if len(v) > cfg.max_text_chars:
                raise InvalidRequest(f"field {col!r} row {i}: {len(v)} characters; at most {cfg.max_text_chars}")
    return [{c: columns[c][i] for c in cfg.features} for i in range(n)]


def columns_from_v1(body: Any, cfg: ServerConfig) -> dict[str, list]:
    """KServe v1: {"instances": [{feature: value, ...}, ...]} (or "inputs" with the same rows)."""
    if not isinstance(body, dict):
        raise InvalidRequest('a v1 body is a JSON object {"instances": [{"<feature>": <value>, ...}, ...]}')
    rows = body.get("instances", body.get("inputs"))
    if not isinstance(rows, list):
        raise InvalidRequest('field "instances": expected a list of objects, one per applicant')
    if len(rows) > cfg.max_batch_rows:
        raise InvalidRequest(f"{len(rows)} rows in one request; at most {cfg.max_batch_rows} "
                             "(deployment.max_batch_rows)")
    columns: dict[str, list] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InvalidRequest(f"instances[{i}]: expected an object of feature values, got {type(row).__name__}")
        for k in row:
            if k not in columns:
                if i:
                    raise InvalidRequest(f"instances[{i}]: field {k!r} is not in the earlier rows")
                columns[k] = []
        for k in columns:
            if k not in row:
                raise InvalidRequest(f"instances[{i}]: missing field {k!r}")
            columns[k].append(row[k])
    return columns


_V2_TYPES = {"FP64", "FP32", "FP16", "INT64", "INT32", "INT16", "INT8", "UINT64", "UINT32", "UINT16", "UINT8",
             "BOOL", "BYTES"}


def columns_from_v2(request: Any, cfg: ServerConfig) -> dict[str, list]:
    """Open Inference Protocol v2, pandas codec: one named tensor per feature column, one element per row."""
    columns: dict[str, list] = {}
    for inp in request.inputs:
        name, datatype, shape = inp.name, inp.datatype, list(inp.shape or [])
        if name in columns:
            raise InvalidRequest(f"input {name!r} appears twice")
        if datatype not in _V2_TYPES:
            raise InvalidRequest(f"input {name!r}: datatype {datatype!r} is not an Open Inference Protocol type")
        data = inp.data
        if hasattr(data, "tolist"):
            data = data.tolist()
        if not isinstance(data, list):
            raise InvalidRequest(f"input {name!r}: data must be a list")
        flat: list = []
        stack = [data]
        while stack:  # a [n, 1] tensor may arrive nested
            item = stack.pop()
            if isinstance(item, list):
                stack.extend(reversed(item))
            else:
                flat.append(item)
        if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
            raise InvalidRequest(f"input {name!r}: shape {shape} must be non-negative integers")
        if math.prod(shape) != len(flat) or (len(shape) > 1 and math.prod(shape[1:]) != 1):
            raise InvalidRequest(f"input {name!r}: shape {shape} does not match {len(flat)} values; a feature "
                                 "column is [rows] or [rows, 1]")
        if len(flat) > cfg.max_batch_rows:
            raise InvalidRequest(f"input {name!r}: {len(flat)} rows in one request; at most {cfg.max_batch_rows}")
        if datatype == "BYTES":
            out = []
            for v in flat:
                if isinstance(v, bytes):
                    try:
                        v = v.decode("utf-8")
                    except UnicodeDecodeError:
                        raise InvalidRequest(f"input {name!r}: bytes that are not UTF-8") from None
                out.append(v)
            flat = out
        if name in cfg.numeric and datatype == "BOOL":
            raise InvalidRequest(f"input {name!r}: datatype BOOL for a numeric feature; use FP64 or INT64")
        if name in cfg.numeric and datatype == "BYTES":
            raise InvalidRequest(f"input {name!r}: datatype BYTES for a numeric feature; use FP64 or INT64")
        if name in cfg.text and datatype != "BYTES":
            raise InvalidRequest(f"input {name!r}: text goes as datatype BYTES, not {datatype}")
        columns[name] = flat
    return columns


# --- the gateway stand-in: keys, rate limits, body size --------------------------------------------------------


@dataclass(frozen=True)
class ApiKey:
    id: str
    models: tuple[str, ...]
    rate_limit_per_minute: int


def load_keys(cfg: ServerConfig) -> dict[str, ApiKey]:
    """sha256(key) -> ApiKey, from the keys file or the environment variable; empty means no auth.

    Format: {"keys": [{"id": "ops", "sha256": "<hex digest of the key>", "models": ["credit_risk"],
    "rate_limit_per_minute": 600}]}. `models` ["*"] allows every model; the rate limit defaults to the spec's.
    """
    text, where = None, None
    if cfg.api_keys_file:
        where = cfg.api_keys_file
        try:
            text = Path(cfg.api_keys_file).read_text()
        except OSError as exc:
            raise ServeError(f"api_keys_file {where}: cannot read it ({exc.strerror or exc})") from None
    elif cfg.api_keys_env:
        where = f"${cfg.api_keys_env}"
        text = os.environ.get(cfg.api_keys_env)
        if text is None:
            raise ServeError(f"deployment.api_keys_env names {cfg.api_keys_env}, which is not set: export it with "
                             'the keys JSON ({"keys": [{"id": ..., "sha256": ..., "models": [...]}]})')
    if text is None:
        return {}
    try:
        entries = json.loads(text)["keys"]
        keys = {}
        for i, e in enumerate(entries):
            digest = str(e["sha256"]).lower()
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"keys[{i}].sha256 is not a hex sha256 digest")
            keys[digest] = ApiKey(id=str(e["id"]), models=tuple(e.get("models", ["*"])),
                                  rate_limit_per_minute=int(e.get("rate_limit_per_minute",
                                                                  cfg.rate_limit_per_minute)))
        return keys
    except (ValueError, KeyError, TypeError) as exc:
        raise ServeError(f"{where}: not a keys document ({type(exc).__name__}: {exc}); expected "
                         '{"keys": [{"id": "ops", "sha256": "<sha256 of the key>", "models": ["<spec>"]}]}') from None


class TokenBucket:
    def __init__(self, per_minute: int):
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self.tokens = float(per_minute)
        self.at = time.monotonic()

    def take(self) -> float:
        """0 when allowed, else seconds until a token is back."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


_INFER_PATH = re.compile(r"^/v1/models/([^/:]+):(predict|explain)$|^/v2/models/([^/]+)(?:/versions/[^/]+)?/infer$"
                         r"|^/v2/models/([^/]+)/outcomes$")


class Gateway:
    """ASGI middleware in front of KServe's app: API keys (401/403), per-key rate limit (429), body size (413),
    JSON without a Content-Type, and request metrics. Only the inference routes are guarded."""

    def __init__(self, app, cfg: ServerConfig, keys: dict[str, ApiKey], metrics: Metrics):
        self.app, self.cfg, self.keys, self.metrics = app, cfg, keys, metrics
        self.buckets: dict[str, TokenBucket] = {}

    async def _reply(self, send, status: int, message: str, headers: list | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), *(headers or [])]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        match = _INFER_PATH.match(scope.get("path", ""))
        if match is None:
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        protocol = "v1" if match.group(1) else "v2"
        model = match.group(1) or match.group(3) or match.group(4)
        status_seen = {"code": 500}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status_seen["code"] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_counted, model)
        finally:
            self.metrics.requests.labels(protocol=protocol, code=str(status_seen["code"])).inc()
            self.metrics.latency.labels(protocol=protocol).observe(time.perf_counter() - started)

    async def _guarded(self, scope, receive, send, model: str):
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != KEY_ID_HEADER.encode()]
        lookup = {k.lower(): v for k, v in headers}
        key = None
        auth = lookup.get(b"authorization", b"").decode("latin-1")
        if auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        key = key or lookup.get(b"x-api-key", b"").decode("latin-1").strip() or None
        if not self.keys and key and self.cfg.probe_key_sha256 and \
                hmac.compare_digest(hashlib.sha256(key.encode()).hexdigest(), self.cfg.probe_key_sha256):
            # An open server still tells the deployment's own smoke requests apart, so monitoring can leave them out.
            headers.append((KEY_ID_HEADER.encode(), SMOKE_KEY_ID.encode()))
        if self.keys:
            if not key:
                return await self._reply(send, 401, "missing API key: send 'Authorization: Bearer <key>' or "
                                                    "'X-API-Key: <key>'", [(b"www-authenticate", b"Bearer")])
            entry = self.keys.get(hashlib.sha256(key.encode()).hexdigest())
            if entry is None:
                return await self._reply(send, 401, "unknown API key", [(b"www-authenticate", b"Bearer")])
            if "*" not in entry.models and model not in entry.models:
                return await self._reply(send, 403, f"key {entry.id!r} is not allowed to call model {model!r}")
            bucket = self.buckets.setdefault(entry.id, TokenBucket(entry.rate_limit_per_minute))
            wait = bucket.take()
            if wait:
                return await self._reply(send, 429, f"key {entry.id!r} is over its limit of "
                                                    f"{entry.rate_limit_per_minute} requests per minute",
                                         [(b"retry-after", str(max(1, math.ceil(wait))).encode())])
            headers.append((KEY_ID_HEADER.encode(), entry.id.encode()))
        length = lookup.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.cfg.max_body_bytes:
            return await self._reply(send, 413, f"body of {int(length)} bytes; at most {self.cfg.max_body_bytes} "
                                                "(deployment.max_body_bytes)")
        # Read the body here (bounded), so a chunked upload cannot exceed the limit either.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.cfg.max_body_bytes:
                return await self._reply(send, 413, f"body over {self.cfg.max_body_bytes} bytes "
                                                    "(deployment.max_body_bytes)")
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        # The protocol allows JSON without a Content-Type (and curl -d says form-urlencoded); KServe would answer
        # 400. A body that is not v2's binary extension and starts like JSON is taken as JSON.
        if b"inference-header-content-length" not in lookup:
            # Strict JSON here (orjson refuses NaN and Infinity), so every malformed body is a 400 that says where,
            # never a 500 from an error page that cannot render what it was sent.
            import orjson

            try:
                orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                return await self._reply(send, 400, f"the body is not valid JSON: {exc}")
            headers = [(k, v) for k, v in headers if k.lower() != b"content-type"]
            headers.append((b"content-type", b"application/json"))
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app({**scope, "headers": headers}, replay, send)


# --- metrics ---------------------------------------------------------------------------------------------------


class Metrics:
    def __init__(self):
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = Counter("intelligentops_requests_total", "Inference requests by protocol and HTTP status",
                                ["protocol", "code"])
        self.latency = Histogram("intelligentops_request_latency_seconds", "Inference request latency",
                                 ["protocol"], buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
        self.decisions = Counter("intelligentops_decisions_total", "Audited decisions",
                                 ["model", "variant", "version", "decision"])
        self.batch_rows = Histogram("intelligentops_batch_rows", "Rows scored and committed together",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
        self.serving = Gauge("intelligentops_serving_version", "Model version serving per alias", ["alias"])
        self.swap_failures = Counter("intelligentops_swap_failures_total", "Alias moves that could not be loaded")


# --- the batcher: score and commit concurrent requests together ------------------------------------------------


@dataclass
class Pending:
    rows: list[dict[str, Any]]
    variant: str  # champion | canary
    explain: int
    key_id: str | None
    arrived: float
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class Engine:
    """Owns the served versions, the audit store and the batch worker."""

    def __init__(self, cfg: ServerConfig, metrics: Metrics):
        import random

        import mlflow

        import torch

        # A model this small is matrix-vector work: torch's intra-op thread pool costs more in hand-offs than it
        # saves (measured: 17 ms -> 3.6 ms per 16-row batch with one thread on two busy cores).
        torch.set_num_threads(int(os.environ.get("INTELLIGENTOPS_SERVE_THREADS", "1")))
        mlflow.set_tracking_uri(cfg.tracking_uri)
        mlflow.set_registry_uri(cfg.registry_uri or cfg.tracking_uri)
        self.cfg, self.metrics = cfg, metrics
        self.client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.registry_uri or None)
        self.audit = AuditStore(cfg.audit_url)
        self.versions: dict[str, ServedVersion] = {}
        self.alias_versions: dict[str, str | None] = {}
        self.last_error: str | None = None
        self.rng = random.Random()
        self.queue: asyncio.Queue | None = None
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="score")
        self.similar_cache: OrderedDict[str, list[str]] = OrderedDict()
        self._vector_tables: dict[str, Any] | None = None
        self._poll_now = threading.Event()
        self._stop = threading.Event()

    # versions -------------------------------------------------------------------------------------------------
    def _alias_version(self, alias: str) -> str | None:
        try:
            return str(self.client.get_model_version_by_alias(self.cfg.spec, alias).version)
        except Exception:
            return None

    def refresh(self) -> bool:
        """Load whatever the aliases point to now; keep serving the old version if a new one fails to load."""
        wanted = {CHAMPION: self._alias_version(CHAMPION)}
        if self.cfg.mode != "champion":
            wanted[CHALLENGER] = self._alias_version(CHALLENGER)
        if wanted[CHAMPION] is None:
            raise ServeError(f"model {self.cfg.spec!r} has no '{CHAMPION}' alias in {self.cfg.tracking_uri}: "
                             f"materialize {self.cfg.spec}/champion_model first")
        changed = False
        new = dict(self.versions)
        for alias, version in wanted.items():
            if version is None:
                new.pop(alias, None)
                continue
            current = new.get(alias)
            if current is not None and current.version == version:
                continue
            reuse = next((v for v in new.values() if v.version == version), None)
            loaded = reuse or load_version(self.client, self.cfg, version)
            self._warm(loaded)
            new[alias] = loaded
            changed = True
            log.info("%s: alias %s -> version %s (threshold %.4f)", self.cfg.spec, alias, version, loaded.threshold)
        if changed or set(new) != set(self.versions):
            self.versions = new  # one reference swap: a batch in flight keeps the dict it started with
            for alias, v in new.items():
                self.metrics.serving.labels(alias=alias).set(float(v.version))
        self.alias_versions = {a: (v.version if v else None) for a, v in new.items()}
        return changed

    def _warm(self, version: ServedVersion) -> None:
        """Score one typical row so the first real request pays no lazy loading (e.g. the text encoder)."""
        import pandas as pd

        row = {}
        for col, bounds in self.cfg.numeric.items():
            row[col] = (bounds[0] + bounds[1]) / 2 if bounds else 0.0
        for col, allowed in self.cfg.categorical.items():
            row[col] = allowed[0] if allowed else None
        for col in self.cfg.text:
            row[col] = ""
        version.score(pd.DataFrame([row], columns=self.cfg.features), self.cfg.explain_top or 1)

    def watch(self) -> None:
        while not self._stop.is_set():
            self._poll_now.wait(self.cfg.poll_seconds)
            self._poll_now.clear()
            try:
                self.refresh()
                self.last_error = None
            except Exception as exc:  # keep serving what we have; say why on /intelligentops/status
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.metrics.swap_failures.inc()
                log.error("%s: alias refresh failed, still serving %s: %s", self.cfg.spec, self.alias_versions,
                          self.last_error)

    def prune_daily(self) -> None:
        """Retention: remove decisions older than `retention_days` now and once a day."""
        while True:
            try:
                removed = self.audit.prune(self.cfg.retention_days)
                if removed:
                    log.info("audit retention: removed %d decisions older than %d days", removed,
                             self.cfg.retention_days)
            except Exception as exc:
                log.error("audit retention failed: %s", exc)
            if self._stop.wait(86400):
                return

    # similar cases ----------------------------------------------------------------------------------------------
    # Up to this many rows the index's vectors are held in memory and searched with one matrix product per
    # batch (exact cosine, milliseconds); above it, each text is an ANN query to LanceDB.
    IN_MEMORY_ROWS = 200_000

    def _index(self) -> dict[str, Any]:
        """The spec's vector index for its first text column (layout of resources/vectors.py), re-read when its
        table version changes (checked at most every 30 s)."""
        now = time.monotonic()
        cached = self._vector_tables
        if cached is not None and now - cached.get("checked", 0) < 30:
            return cached
        manifest = Path(self.cfg.vector_db or "") / "manifest.json"
        if not (self.cfg.text and self.cfg.similar_cases and manifest.is_file()):
            if self.cfg.text and self.cfg.similar_cases and cached is None:
                log.warning("%s: no vector index at %s; decisions carry no similar cases", self.cfg.spec, manifest)
            self._vector_tables = {"checked": now}
            return self._vector_tables
        import lancedb
        import numpy as np

        columns = json.loads(manifest.read_text()).get("columns", {})
        col = next((c for c in self.cfg.text if c in columns), None)
        if col is None:
            self._vector_tables = {"checked": now}
            return self._vector_tables
        table = lancedb.connect(str(manifest.parent)).open_table(columns[col])
        if cached is not None and cached.get("version") == table.version and cached.get("column") == col:
            cached["checked"] = now
            return cached
        index: dict[str, Any] = {"checked": now, "version": table.version, "column": col, "table": table}
        if table.count_rows() <= self.IN_MEMORY_ROWS:
            data = table.to_arrow().select(["row_id", "vector"])
            vectors = np.asarray(data.column("vector").combine_chunks().flatten(), dtype=np.float32)
            vectors = vectors.reshape(data.num_rows, -1)
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            index["matrix"] = vectors / np.where(norms > 0, norms, 1.0)
            index["row_ids"] = np.asarray(data.column("row_id").to_pylist(), dtype=object)
        self.similar_cache.clear()
        self._vector_tables = index
        return index

    def similar(self, version: ServedVersion, rows: list[dict[str, Any]]) -> list[list[str]]:
        """Row ids of the training cases whose text is nearest each row's, cached by text."""
        import numpy as np

        index = self._index()
        embed = getattr(version.python_model, "_embed", None)
        if "column" not in index or embed is None:
            return [[] for _ in rows]
        col, k = index["column"], self.cfg.similar_cases
        texts = ["" if r.get(col) is None else str(r[col]).strip() for r in rows]
        todo = sorted({t for t in texts if t and t not in self.similar_cache})
        if todo:
            vectors = np.asarray(embed(todo), dtype=np.float32)  # the model caches these for its own use too
            if "matrix" in index:
                norms = np.linalg.norm(vectors, axis=1, keepdims=True)
                scores = (vectors / np.where(norms > 0, norms, 1.0)) @ index["matrix"].T
                top = np.argsort(-scores, axis=1)[:, :k]
                found = [[str(r) for r in index["row_ids"][t]] for t in top]
            else:
                found = [[str(f["row_id"]) for f in index["table"].search(list(map(float, v)),
                                                                           vector_column_name="vector")
                          .distance_type("cosine").limit(k).select(["row_id"]).to_list()] for v in vectors]
            for text, ids in zip(todo, found):
                self.similar_cache[text] = ids
            while len(self.similar_cache) > 100_000:
                self.similar_cache.popitem(last=False)
        return [self.similar_cache.get(t, []) if t else [] for t in texts]

    # batching -----------------------------------------------------------------------------------------------
    async def submit(self, rows: list[dict[str, Any]], explain: int, key_id: str | None) -> list[dict[str, Any]]:
        if self.queue is None:
            self.queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._drain())
        variant = CHAMPION
        if (self.cfg.mode == "canary" and CHALLENGER in self.versions
                and self.versions[CHALLENGER].version != self.versions[CHAMPION].version
                and self.rng.random() < self.cfg.canary_share):
            variant = "canary"
        loop = asyncio.get_running_loop()
        pending = Pending(rows=rows, variant=variant, explain=explain, key_id=key_id, arrived=time.perf_counter(),
                          future=loop.create_future(), loop=loop)
        await self.queue.put(pending)
        return await pending.future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            rows = len(batch[0].rows)
            while not self.queue.empty() and rows < 4 * self.cfg.max_batch_rows:
                item = self.queue.get_nowait()
                batch.append(item)
                rows += len(item.rows)
            try:
                results = await loop.run_in_executor(self.executor, self._run_isolated, batch)
                for p, r in zip(batch, results):
                    if not p.future.done():
                        p.future.set_result(r) if not isinstance(r, BaseException) else p.future.set_exception(r)
            except BaseException as exc:  # the commit failed: nobody gets an unaudited answer
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)

    def _run_isolated(self, batch: list[Pending]) -> list[Any]:
        """The batch together; if it fails, each request alone, so one request's failure is only its own.

        Nothing of a failed batch was committed (an append is one transaction), so scoring again is safe.
        """
        try:
            return self._run_batch(batch)
        except Exception as exc:
            if len(batch) == 1:
                return [exc]
            out: list[Any] = []
            for p in batch:
                try:
                    out.extend(self._run_batch([p]))
                except Exception as one:
                    out.append(one)
            return out

    def _run_batch(self, batch: list[Pending]) -> list[Any]:
        import pandas as pd

        versions = self.versions  # this batch finishes on these versions even if an alias moves now
        champion = versions[CHAMPION]
        challenger = versions.get(CHALLENGER)
        if challenger is not None and challenger.version == champion.version:
            challenger = None
        groups: dict[tuple[str, int], list[int]] = {}
        for i, p in enumerate(batch):
            target = "challenger" if p.variant == "canary" and challenger is not None else CHAMPION
            groups.setdefault((target, p.explain), []).append(i)
        answers: dict[int, list[dict[str, Any]]] = {}
        records: list[dict[str, Any]] = []
        now = now_iso()

        def decide(version: ServedVersion, items: list[int], explain: int, variant_of) -> dict[int, list[dict]]:
            rows = [r for i in items for r in batch[i].rows]
            frame = pd.DataFrame(rows, columns=self.cfg.features)
            prob, factors = version.score(frame, explain)
            similar = self.similar(version, rows)
            out: dict[int, list[dict]] = {}
            j = 0
            for i in items:
                p = batch[i]
                bad = [k for k in range(len(p.rows)) if not math.isfinite(float(prob[j + k]))]
                if bad:
                    # Values inside the accepted ranges can still overflow the network: refuse this request only.
                    raise InvalidRequest(f"row {bad[0]}: these feature values give no finite score; check the "
                                         "magnitude of the numeric fields")
                for row in p.rows:
                    probability = float(prob[j])
                    rec = {
                        "decision_id": uuid.uuid4().hex, "time": now, "spec": self.cfg.spec,
                        "model_name": self.cfg.spec, "model_version": version.version, "variant": variant_of(p),
                        "input_hash": input_hash(row), "inputs": redact(row, self.cfg.redact),
                        "probability": probability, "decision": int(probability >= version.threshold),
                        "threshold": version.threshold, "top_factors": factors[j] if factors else [],
                        "similar_cases": similar[j],
                        "latency_ms": (time.perf_counter() - p.arrived) * 1000.0, "key_id": p.key_id,
                    }
                    records.append(rec)
                    out.setdefault(i, []).append(rec)
                    j += 1
            return out

        for (target, explain), items in groups.items():
            version = challenger if target == "challenger" else champion
            answers.update(decide(version, items, explain, lambda p: p.variant if target == "challenger"
                                  else CHAMPION))
        if self.cfg.mode == "shadow" and challenger is not None:
            # The challenger scores the same rows; its decisions are recorded, never answered.
            decide(challenger, list(range(len(batch))), max(p.explain for p in batch), lambda p: "shadow")
        self.audit.append(records)  # committed (group commit) before any answer leaves
        self.metrics.batch_rows.observe(len(records))
        for r in records:
            self.metrics.decisions.labels(model=self.cfg.spec, variant=r["variant"], version=r["model_version"],
                                          decision=str(r["decision"])).inc()
        return [answers[i] for i in range(len(batch))]

    def status(self) -> dict[str, Any]:
        return {"spec": self.cfg.spec, "pid": os.getpid(), "mode": self.cfg.mode,
                "canary_share": self.cfg.canary_share,
                "versions": {a: {"version": v.version, "operating_threshold": v.threshold,
                                 "manifest_sha256": v.manifest_sha256, "run_id": v.run_id}
                             for a, v in self.versions.items()},
                "audit_url": self.audit.location(), "audit_latest_seq": self.audit.latest_seq(),
                "last_error": self.last_error}


# --- the KServe model --------------------------------------------------------------------------------------------


def _answer(rec: dict[str, Any]) -> dict[str, Any]:
    return {"decision_id": rec["decision_id"], "probability": rec["probability"], "decision": rec["decision"],
            "threshold": rec["threshold"], "model_version": rec["model_version"], "variant": rec["variant"],
            "top_factors": rec["top_factors"], "similar_cases": rec["similar_cases"]}


def make_model(engine: Engine):
    import kserve
    from kserve import InferOutput, InferRequest, InferResponse
    from kserve.errors import InvalidInput

    cfg = engine.cfg

    class DecisionModel(kserve.Model):
        """The spec's champion (and challenger) behind KServe's v1 and v2 protocols."""

        def load(self) -> bool:
            engine.refresh()
            self.ready = True
            return True

        def get_input_types(self) -> list[dict]:
            types = [{"name": c, "datatype": "FP64", "shape": [-1]} for c in cfg.numeric]
            return types + [{"name": c, "datatype": "BYTES", "shape": [-1]} for c in [*cfg.categorical, *cfg.text]]

        def get_output_types(self) -> list[dict]:
            return [{"name": n, "datatype": t, "shape": [-1]} for n, t in OUTPUTS]

        async def _decide(self, payload, headers, explain: int):
            key_id = (headers or {}).get(KEY_ID_HEADER)
            try:
                if isinstance(payload, InferRequest):
                    columns = columns_from_v2(payload, cfg)
                else:
                    columns = columns_from_v1(payload, cfg)
                rows = validate_columns(columns, cfg)
                return await engine.submit(rows, explain, key_id)
            except InvalidRequest as exc:
                raise InvalidInput(str(exc)) from None

        async def predict(self, payload, headers=None, response_headers=None):
            records = await self._decide(payload, headers, cfg.explain_top)
            if isinstance(payload, InferRequest):
                return self._v2(payload, records)
            return {"predictions": [_answer(r) for r in records]}

        async def explain(self, payload, headers=None):
            records = await self._decide(payload, headers, max(cfg.explain_top, 3))
            if isinstance(payload, InferRequest):
                return self._v2(payload, records)
            return {"explanations": [_answer(r) for r in records]}

        def _v2(self, request, records):
            n = len(records)

            def out(name, datatype, values):
                return InferOutput(name=name, shape=[n], datatype=datatype, data=values)

            outputs = [
                out("probability", "FP64", [r["probability"] for r in records]),
                out("decision", "INT64", [r["decision"] for r in records]),
                out("decision_id", "BYTES", [r["decision_id"] for r in records]),
                out("model_version", "BYTES", [r["model_version"] for r in records]),
                out("variant", "BYTES", [r["variant"] for r in records]),
                out("top_factors", "BYTES", [json.dumps(r["top_factors"]) for r in records]),
                out("similar_cases", "BYTES", [json.dumps(r["similar_cases"]) for r in records]),
            ]
            return InferResponse(response_id=request.id or uuid.uuid4().hex, model_name=cfg.spec,
                                 model_version=records[0]["model_version"] if records else None,
                                 infer_outputs=outputs)

    return DecisionModel(cfg.spec)


class OutcomeError(ValueError):
    """An outcome report that cannot be recorded; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def record_outcomes(store: Any, spec: str, model: str, body: bytes) -> int:
    """Validate and record a batch of outcomes; every problem names the item. Returns how many were recorded."""
    if model != spec:
        raise OutcomeError(f"this server serves model {spec!r}, not {model!r}", status=404)
    try:
        items = json.loads(body or b"{}").get("outcomes")
    except (ValueError, AttributeError):
        raise OutcomeError('body must be JSON {"outcomes": [{"decision_id": ..., "outcome": 0 or 1}]}', status=400)
    if not isinstance(items, list) or not items:
        raise OutcomeError('"outcomes" must be a non-empty list of {"decision_id", "outcome"}', status=400)
    checked = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("decision_id"), str):
            raise OutcomeError(f"outcomes[{i}]: decision_id (a string) is required", status=400)
        if item.get("outcome") not in (0, 1) or isinstance(item.get("outcome"), bool):
            raise OutcomeError(f"outcomes[{i}].outcome must be 0 or 1, not {item.get('outcome')!r}", status=400)
        record = store.get(item["decision_id"])
        if record is None or record.spec != spec:
            raise OutcomeError(f"outcomes[{i}]: no decision {item['decision_id']!r} of model {spec!r} on the audit log",
                             status=404)
        checked.append((item["decision_id"], int(item["outcome"])))
    for decision_id, outcome in checked:
        store.record_outcome(decision_id, outcome)
    return len(checked)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="server.json written by the deployment asset")
    parser.add_argument("--port", type=int, default=None, help="overrides the config's port")
    parser.add_argument("--audit-url", default=None, help="overrides the config's audit_url")
    ns, _ = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = ServerConfig.load(ns.config, port=ns.port, audit_url=ns.audit_url)

    # kserve parses sys.argv when imported; hand it only what it understands.
    sys.argv = sys.argv[:1]
    import kserve
    from fastapi.responses import JSONResponse
    from kserve.model_server import app

    metrics = Metrics()
    try:
        keys = load_keys(cfg)
        engine = Engine(cfg, metrics)
        model = make_model(engine)
        model.load()
    except ServeError as exc:
        log.error("%s", exc)
        print(f"serve: {exc}", file=sys.stderr)
        return 2
    threading.Thread(target=engine.watch, name="alias-watch", daemon=True).start()
    threading.Thread(target=engine.prune_daily, name="audit-retention", daemon=True).start()
    signal.signal(signal.SIGHUP, lambda *_: engine._poll_now.set())

    async def status():
        return JSONResponse(engine.status())

    async def outcomes(request):
        """What really happened for earlier decisions: {"outcomes": [{"decision_id": ..., "outcome": 0|1}]}."""
        try:
            recorded = record_outcomes(engine.audit, cfg.spec, request.path_params["name"], await request.body())
        except OutcomeError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        return JSONResponse({"recorded": recorded})

    app.add_api_route("/intelligentops/status", status, methods=["GET"])
    # A plain Starlette route: the handler takes the request as it is, no FastAPI parameter inference.
    app.add_route("/v2/models/{name}/outcomes", outcomes, methods=["POST"])
    app.add_middleware(Gateway, cfg=cfg, keys=keys, metrics=metrics)
    log.info("%s: serving versions %s on port %d (%s policy), audit log %s", cfg.spec, engine.alias_versions,
             cfg.port, cfg.mode, engine.audit.location())
    # One line per request would cost more than scoring it; /metrics has the counts and latencies.
    for name in ("kserve.trace", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.WARNING)
    kserve.ModelServer(http_port=cfg.port, enable_grpc=False, workers=1,
                       enable_latency_logging=False).start([model])
    return 0


if __name__ == "__main__":
    sys.exit(main())
