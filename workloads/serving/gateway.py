"""The gateway in front of KServe's app: every request is decided before any handler runs (ASGI middleware).

For each request, in order: the route is resolved against the live route table (workloads/serving/routes.py;
no route: 404, wrong method: 405, never reaching the app); an open route (liveness, readiness) passes; any
other needs a key whose scopes include the route's (401 without a key, 403 with the wrong scope or model),
except predict and explain on an open server (no keys configured, which is only allowed on loopback); each
caller (its key id, or its address when it has no key) has a rate limit (429) and a bound on requests in flight
(429); the body is read under the size limit (413); a binary-extension body is checked and turned into JSON
(workloads/serving/binary.py), any other must be strict JSON (400). Every refusal, here or from a handler, is
counted on /metrics and logged as one structured line (workloads/serving/logs.py).

Keys are stored as sha256 digests (`load_keys`); the model hears only the key's id, in the header KEY_ID_HEADER,
the caller's identity for fair scheduling in CLIENT_HEADER and whether the key has the `similar_cases` scope in
SIMILAR_HEADER; a client can set none of them. The deployment's own
keys (smoke: predict, explain, read; operator: outcomes, read) are known by their digests in the server config,
keys file or not.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.names import KEY_ID_HEADER, OPERATOR_KEY_ID, SMOKE_KEY_ID
from core.server_config import ServerConfig
from workloads.serving.binary import BinaryRequestError, json_body
from workloads.serving.limits import CallerLimits
from workloads.serving.logs import log_refusal
from workloads.serving.metrics import Metrics
from workloads.serving.routes import (
    DEFAULT_SCOPES,
    OPEN,
    REMOVED,
    SCOPES,
    SCORING_SCOPES,
    SIMILAR_SCOPE,
    LiveRoute,
    Resolved,
    resolve,
)

CLIENT_HEADER = "x-intelligentops-client"  # who a request counts against: key:<id> or addr:<address>
BINARY_HEADER = b"inference-header-content-length"
SIMILAR_HEADER = "x-intelligentops-similar-cases"  # "1" when the caller's key has the similar_cases scope
WORKER_HEADER = "x-intelligentops-worker"  # on answers to keys with the read scope: the worker's index
INTERNAL_HEADERS = (KEY_ID_HEADER.encode(), CLIENT_HEADER.encode(), SIMILAR_HEADER.encode())
SMOKE_SCOPES = ("predict", "explain", "read")
OPERATOR_SCOPES = ("outcomes", "read")


class ApiKeysError(ValueError):
    """The API keys document cannot be read or is malformed; the message names the file or variable."""


@dataclass(frozen=True)
class ApiKey:
    id: str
    models: tuple[str, ...]
    rate_limit_per_minute: int
    scopes: tuple[str, ...] = DEFAULT_SCOPES


def _entry(i: int, e: Any, cfg: ServerConfig) -> tuple[str, ApiKey]:
    if not isinstance(e, dict):
        raise ValueError(f"keys[{i}] is not an object")
    digest = str(e["sha256"]).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"keys[{i}].sha256 is not a hex sha256 digest")
    scopes = e.get("scopes", list(DEFAULT_SCOPES))
    if not isinstance(scopes, list) or not all(s in SCOPES for s in scopes):
        raise ValueError(f"keys[{i}].scopes must be a list of {list(SCOPES)}, not {scopes!r}")
    return digest, ApiKey(id=str(e["id"]), models=tuple(e.get("models", ["*"])),
                          rate_limit_per_minute=int(e.get("rate_limit_per_minute", cfg.rate_limit_per_minute)),
                          scopes=tuple(scopes))


def load_keys(cfg: ServerConfig) -> dict[str, ApiKey]:
    """sha256(key) -> ApiKey, from the keys file or the environment variable; empty means an open server.

    Format: {"keys": [{"id": "ops", "sha256": "<hex digest of the key>", "models": ["credit_risk"],
    "scopes": ["predict", "explain"], "rate_limit_per_minute": 600}]}. `models` ["*"] (the default) allows every
    model; `scopes` defaults to predict and explain; the rate limit defaults to the spec's.
    """
    text, where = None, None
    if cfg.api_keys_file:
        where = cfg.api_keys_file
        try:
            text = Path(cfg.api_keys_file).read_text()
        except OSError as exc:
            raise ApiKeysError(f"api_keys_file {where}: cannot read it ({exc.strerror or exc})") from None
    elif cfg.api_keys_env:
        where = f"${cfg.api_keys_env}"
        text = os.environ.get(cfg.api_keys_env)
        if text is None:
            raise ApiKeysError(f"deployment.api_keys_env names {cfg.api_keys_env}, which is not set: export it with "
                               'the keys JSON ({"keys": [{"id": ..., "sha256": ..., "scopes": [...]}]})')
    if text is None:
        return {}
    try:
        entries = json.loads(text)["keys"]
        if not isinstance(entries, list):
            raise ValueError('"keys" is not a list')
        return dict(_entry(i, e, cfg) for i, e in enumerate(entries))
    except (ValueError, KeyError, TypeError) as exc:
        problem = str(exc) if isinstance(exc, ValueError) else f"missing or wrong field {exc}"
        raise ApiKeysError(f"{where}: not a keys document ({problem}); expected "
                           '{"keys": [{"id": "ops", "sha256": "<sha256 of the key>", "models": ["<spec>"], '
                           '"scopes": ["predict", "explain"]}]}') from None


def builtin_keys(cfg: ServerConfig) -> dict[str, ApiKey]:
    """The deployment's own keys, known by digest whether or not a keys file exists."""
    out = {}
    if cfg.smoke_key_sha256:
        out[cfg.smoke_key_sha256] = ApiKey(SMOKE_KEY_ID, (cfg.spec,), cfg.rate_limit_per_minute, SMOKE_SCOPES)
    if cfg.operator_key_sha256:
        out[cfg.operator_key_sha256] = ApiKey(OPERATOR_KEY_ID, (cfg.spec,), cfg.rate_limit_per_minute,
                                              OPERATOR_SCOPES)
    return out


class Refused(Exception):
    def __init__(self, status: int, message: str, headers: list | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or []


def _protocol(path: str) -> str:
    return "v1" if path.startswith("/v1/") else "v2" if path.startswith("/v2/") else "other"


class Gateway:
    """ASGI middleware in front of KServe's app; see the module docstring for what it decides, in order."""

    def __init__(self, app, cfg: ServerConfig, keys: dict[str, ApiKey], metrics: Metrics, routes: list[LiveRoute],
                 limits: CallerLimits | None = None, worker: int = 0):
        self.app, self.cfg, self.metrics = app, cfg, metrics
        self.routes = routes  # the live app's routes with their decisions (routes.live_routes)
        self.open = not keys  # no keys configured: predict and explain need none (loopback only)
        self.keys = {**keys, **builtin_keys(cfg)}
        # Rate limits and in-flight counts, shared by every worker of the server (workloads/serving/limits.py).
        self.limits = limits or CallerLimits()
        self.worker_header = (WORKER_HEADER.encode(), str(worker).encode())

    async def _reply(self, send, status: int, message: str, headers: list | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), *(headers or [])]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        path, method = scope.get("path", ""), scope.get("method", "")
        client = (scope.get("client") or ("unknown", 0))[0]
        seen: dict[str, Any] = {"code": 500, "error": b"", "key_id": None, "read": False}

        async def send_seen(message):
            if message["type"] == "http.response.start":
                seen["code"] = message["status"]
                if seen["read"]:  # which worker answered: for callers that may read the server's status only
                    message = {**message, "headers": [*message.get("headers", []), self.worker_header]}
            elif message["type"] == "http.response.body" and 400 <= seen["code"] < 500 and len(seen["error"]) < 2048:
                seen["error"] += message.get("body", b"")[:2048]
            await send(message)

        resolved = resolve(self.routes, method, path)
        try:
            if not isinstance(resolved, Resolved) or resolved.decision == REMOVED:
                code = resolved if isinstance(resolved, int) else 404
                raise Refused(code, "no such route" if code == 404 else "method not allowed on this route")
            if resolved.decision == OPEN:
                return await self.app(scope, receive, send_seen)
            await self._guarded(scope, receive, send_seen, resolved, client, seen)
        except Refused as refusal:
            await self._reply(send_seen, refusal.status, refusal.message, refusal.headers)
        finally:
            code = seen["code"]
            if 400 <= code < 500:
                reason = seen["error"].decode("utf-8", "replace")
                try:
                    reason = str(json.loads(reason).get("error", reason))
                except (ValueError, AttributeError):
                    pass
                decision = resolved.decision if isinstance(resolved, Resolved) else "none"
                self.metrics.refusals.labels(route=decision, code=str(code)).inc()
                log_refusal(client, seen["key_id"], method, path, code, reason)
            if isinstance(resolved, Resolved) and resolved.decision in ("predict", "explain"):
                protocol = _protocol(path)
                self.metrics.requests.labels(protocol=protocol, code=str(code)).inc()
                self.metrics.latency.labels(protocol=protocol).observe(time.perf_counter() - started)

    def _key(self, headers: dict[bytes, bytes]) -> str | None:
        auth = headers.get(b"authorization", b"").decode("latin-1")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        return key or headers.get(b"x-api-key", b"").decode("latin-1").strip() or None

    def _authorize(self, key: str | None, resolved: Resolved, client: str) -> tuple[ApiKey | None, str]:
        """(the key, the caller's identity) if the route's scope is allowed; else Refused (401/403)."""
        scope = resolved.decision
        if key is None:
            if self.open and scope in SCORING_SCOPES:
                return None, f"addr:{client}"
            raise Refused(401, f"this route needs an API key with scope '{scope}': send 'Authorization: Bearer "
                               "<key>' or 'X-API-Key: <key>'", [(b"www-authenticate", b"Bearer")])
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
        entry = next((v for k, v in self.keys.items() if hmac.compare_digest(k, digest)), None)
        if entry is None:
            raise Refused(401, "unknown API key", [(b"www-authenticate", b"Bearer")])
        if scope not in entry.scopes:
            raise Refused(403, f"key {entry.id!r} does not have scope '{scope}' (it has {list(entry.scopes)})")
        model = resolved.params.get("model_name", resolved.params.get("name"))
        if model is not None and "*" not in entry.models and model not in entry.models:
            raise Refused(403, f"key {entry.id!r} is not allowed to call this model")
        return entry, f"key:{entry.id}"

    def _limit(self, caller: str, per_minute: int) -> None:
        wait = self.limits.take(caller, per_minute)
        if wait:
            raise Refused(429, f"over the limit of {per_minute} requests per minute for this caller",
                          [(b"retry-after", str(max(1, math.ceil(wait))).encode())])

    async def _guarded(self, scope, receive, send, resolved: Resolved, client: str, seen: dict) -> None:
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in INTERNAL_HEADERS]
        lookup = {k.lower(): v for k, v in headers}
        entry, caller = self._authorize(self._key(lookup), resolved, client)
        seen["key_id"] = entry.id if entry else None
        seen["read"] = entry is not None and "read" in entry.scopes
        self._limit(caller, entry.rate_limit_per_minute if entry else self.cfg.rate_limit_per_minute)
        if not self.limits.enter(caller, self.cfg.max_in_flight_per_client):
            raise Refused(429, f"{self.cfg.max_in_flight_per_client} requests of this caller are in flight "
                               "(deployment.max_in_flight_per_client); wait for an answer first",
                          [(b"retry-after", b"1")])
        if entry is not None:
            headers.append((KEY_ID_HEADER.encode(), entry.id.encode()))
            if SIMILAR_SCOPE in entry.scopes:
                headers.append((SIMILAR_HEADER.encode(), b"1"))
        headers.append((CLIENT_HEADER.encode(), caller.encode("utf-8", "replace")))
        try:
            await self._forward(scope, receive, send, headers, lookup)
        finally:
            self.limits.leave(caller)

    async def _read_body(self, receive, lookup: dict[bytes, bytes]) -> bytes | None:
        limit = self.cfg.max_body_bytes
        length = lookup.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise Refused(413, f"body of {int(length)} bytes; at most {limit} (deployment.max_body_bytes)")
        chunks, size = [], 0
        while True:  # bounded, so a chunked upload cannot exceed the limit either
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise Refused(413, f"body over {limit} bytes (deployment.max_body_bytes)")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    async def _forward(self, scope, receive, send, headers: list, lookup: dict[bytes, bytes]) -> None:
        import orjson

        if scope.get("method") in ("GET", "HEAD"):
            return await self.app({**scope, "headers": headers}, receive, send)
        body = await self._read_body(receive, lookup)
        if body is None:
            return
        if BINARY_HEADER in lookup:
            try:
                body = orjson.dumps(json_body(body, lookup[BINARY_HEADER], self.cfg.max_batch_rows))
            except BinaryRequestError as exc:
                raise Refused(400, str(exc)) from None
            headers = [(k, v) for k, v in headers if k.lower() != BINARY_HEADER]
        else:
            # Strict JSON here (orjson refuses NaN and Infinity), so every malformed body is a 400 that says where.
            try:
                orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise Refused(400, f"the body is not valid JSON ({exc})") from None
        # The protocol allows JSON without a Content-Type (and curl -d says form-urlencoded); KServe would answer 400.
        headers = [(k, v) for k, v in headers if k.lower() not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app({**scope, "headers": headers}, replay, send)
