"""The gateway stand-in in front of KServe's app: API keys, a per-key rate limit, a body limit, JSON without a
Content-Type, and request metrics, as ASGI middleware (`Gateway`), so no part of it lives inside `predict`.

On a cluster a real gateway does the first three; here they keep a local server safe by default. Keys are
stored as sha256 digests (`load_keys`), and the model hears only the key's id, in the header KEY_ID_HEADER,
which a client cannot set itself; the audit log records that id, never the key. The deployment's own smoke
requests are recognised by their key's digest even on an open server, so monitoring can leave them out.
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

from core.names import KEY_ID_HEADER, SMOKE_KEY_ID
from core.server_config import ServerConfig
from workloads.serving.metrics import Metrics


class ApiKeysError(ValueError):
    """The API keys document cannot be read or is malformed; the message names the file or variable."""


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
            raise ApiKeysError(f"api_keys_file {where}: cannot read it ({exc.strerror or exc})") from None
    elif cfg.api_keys_env:
        where = f"${cfg.api_keys_env}"
        text = os.environ.get(cfg.api_keys_env)
        if text is None:
            raise ApiKeysError(f"deployment.api_keys_env names {cfg.api_keys_env}, which is not set: export it with "
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
        raise ApiKeysError(f"{where}: not a keys document ({type(exc).__name__}: {exc}); expected "
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
        if not self.keys and key and self.cfg.smoke_key_sha256 and \
                hmac.compare_digest(hashlib.sha256(key.encode()).hexdigest(), self.cfg.smoke_key_sha256):
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
