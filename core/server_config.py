"""The inference server's config: one typed schema, validated when the deployment asset writes it and again when
the server reads it (the way alibi-detect's `saving/` validates a detector's config on both sides).

`assets/deployment.py` builds a `ServerConfig` from the spec and the learned data profile; the launcher
(`resources/servers.py`) writes it with `write_server_config` as `<home>/<spec>/deployment/server.json` (or a
ConfigMap on Kubernetes); `python -m workloads.serving --config server.json` reads it with `read_server_config`.

The spec's `deployment:` section (`assets/spec.py`) takes the defaults and bounds of the keys the two share from
the annotated types below, so each default is written once. A key nobody knows, or a value out of bounds, is a
`ServerConfigError` that names the file and the key. `tracking_uri`, `registry_uri` and `audit_url` may be
`env:VAR`, so a secret (a database URL with its password) stays out of the file: the server reads VAR.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.files import atomic_write_local

# --- what the spec's `deployment:` section shares with the server (the one place their defaults live) ---------
Mode = Annotated[Literal["champion", "canary", "shadow"], Field(
    "champion", description="champion: the champion answers; canary: canary_share of requests go to @challenger; "
                            "shadow: the challenger scores every request too, recorded, never answered")]
CanaryShare = Annotated[float, Field(0.1, ge=0, le=1, description="share of requests @challenger answers (canary)")]
Port = Annotated[int | None, Field(None, ge=1, le=65535,
                                   description="None: a free port locally, 8080 in a KServe predictor")]
MaxBatchRows = Annotated[int, Field(256, ge=1, description="rows in one request, at most")]
MaxBodyBytes = Annotated[int, Field(1_048_576, ge=1024, description="request body size, at most (413 above)")]
RateLimitPerMinute = Annotated[int, Field(6000, ge=1, description="requests per API key per minute (429 above)")]
RetentionDays = Annotated[int, Field(183, ge=1, description="decisions older than this leave the audit log")]
ExplainTop = Annotated[int, Field(3, ge=0, le=20, description="top factors per decision (0: none)")]
SimilarCases = Annotated[int, Field(3, ge=0, le=50, description="nearest training cases by text per decision")]

DEFAULT_PORT = 8080  # where the server listens when the config leaves `port` to it (a KServe predictor's port)
ENV_PREFIX = "env:"
SECRET_KEYS = ("tracking_uri", "registry_uri", "audit_url")  # may be "env:VAR"


class ServerConfigError(ValueError):
    """A server config that cannot be used; the message names the file (or who built it) and the key."""


class ServerConfig(BaseModel):
    """What the server runs from: the spec's model, where the registry and the audit log are, what it accepts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spec: str = Field(min_length=1, description="the spec's name: the registered model and the served model name")
    tracking_uri: str = Field(min_length=1)
    registry_uri: str | None = None
    audit_url: str = Field(min_length=1)
    port: Port
    mode: Mode
    canary_share: CanaryShare
    numeric: dict[str, tuple[float, float] | None] = Field(
        default_factory=dict, description="column -> [min, max] accepted (None: any finite number)")
    categorical: dict[str, list[str] | None] = Field(
        default_factory=dict, description="column -> the categories accepted (None: any)")
    text: list[str] = Field(default_factory=list)
    max_text_chars: int = Field(2000, ge=1)
    max_batch_rows: MaxBatchRows
    max_body_bytes: MaxBodyBytes
    rate_limit_per_minute: RateLimitPerMinute
    api_keys_file: str | None = None
    api_keys_env: str | None = None
    redact: list[str] = Field(default_factory=list)
    retention_days: RetentionDays
    explain_top: ExplainTop
    similar_cases: SimilarCases
    vector_db: str | None = Field(None, description="<home>/<spec>/vector_index, for similar cases")
    model_cache: str | None = Field(None, description="where verified model files are downloaded")
    signing_public_key: str | None = Field(None, description="the model-signing public key file (model-signing.pub); "
                                                             "a version not signed by its private key is refused")
    poll_seconds: float = Field(5.0, gt=0, description="how often the aliases are polled")
    smoke_key_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$",
                                         description="the deployment's smoke requests' key; recognised even on an "
                                                     "open server, so their decisions are marked and not traffic")

    @model_validator(mode="after")
    def _consistent(self) -> ServerConfig:
        seen: dict[str, str] = {}
        for kind in ("numeric", "categorical", "text"):
            for col in getattr(self, kind):
                if col in seen:
                    raise ValueError(f"column {col!r} is listed as both {seen[col]} and {kind}")
                seen[col] = kind
        if not seen:
            raise ValueError("no feature columns: numeric, categorical and text are all empty")
        for col, bounds in self.numeric.items():
            if bounds is not None and not bounds[0] <= bounds[1]:
                raise ValueError(f"numeric.{col}: the accepted range {list(bounds)} has its minimum above its maximum")
        unknown = [c for c in self.redact if c not in seen]
        if unknown:
            raise ValueError(f"redact: {unknown} are not feature columns")
        return self

    @property
    def features(self) -> list[str]:
        return [*self.numeric, *self.categorical, *self.text]

    def replace(self, **changes: Any) -> ServerConfig:
        """A copy with `changes`, validated like any other config."""
        return parse_server_config({**self.to_json(), **changes}, source="ServerConfig.replace")

    def to_json(self) -> dict[str, Any]:
        """The config as the JSON object the file holds."""
        return self.model_dump(mode="json")

    def resolve_env(self, source: str = "the config") -> ServerConfig:
        """A copy whose `env:VAR` values are read from the environment; an unset VAR is named."""
        changes = {}
        for key in SECRET_KEYS:
            value = getattr(self, key)
            if isinstance(value, str) and value.startswith(ENV_PREFIX):
                var = value[len(ENV_PREFIX):]
                if var not in os.environ:
                    raise ServerConfigError(f"{source}: {key} is {value!r} but the environment variable {var} is "
                                            f"not set; set {var} to the value, or write it in the config")
                changes[key] = os.environ[var]
        return self.model_copy(update=changes) if changes else self


def _problem(err: Mapping[str, Any]) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()))
    if err.get("type") == "extra_forbidden":
        return f"unknown key '{loc}' (known keys: {', '.join(ServerConfig.model_fields)})"
    if err.get("type") == "missing":
        return f"key '{loc}' is required"
    message = str(err.get("msg", "")).replace("Value error, ", "")
    return f"'{loc}': {message} (got {err.get('input')!r})" if loc else message


def parse_server_config(raw: Any, source: str) -> ServerConfig:
    """Validate a config object; every problem names `source` (a file path, say) and the key."""
    if not isinstance(raw, Mapping):
        raise ServerConfigError(f"{source}: a server config is a JSON object of settings, not {type(raw).__name__}")
    try:
        return ServerConfig.model_validate(dict(raw))
    except ValidationError as exc:
        raise ServerConfigError(f"{source}: " + "; ".join(_problem(e) for e in exc.errors())) from None


def server_config_json(config: ServerConfig) -> str:
    """The file's text. Keys keep their order: the order of the feature columns is the model's input order."""
    return json.dumps(config.to_json(), indent=2)


def write_server_config(path: Path | str, config: ServerConfig | Mapping[str, Any]) -> ServerConfig:
    """Validate `config` and write it atomically as JSON (mode 0600: it names the registry and the audit log)."""
    checked = parse_server_config(config.to_json() if isinstance(config, ServerConfig) else config, source=str(path))
    atomic_write_local(path, server_config_json(checked).encode(), mode=0o600)
    return checked


def read_server_config(path: Path | str, **overrides: Any) -> ServerConfig:
    """Read, validate and resolve a config file; `overrides` that are not None replace its keys first."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise ServerConfigError(f"{path}: cannot read the server config ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ServerConfigError(f"{path}: not JSON ({exc})") from None
    if isinstance(raw, dict):
        raw.update({k: v for k, v in overrides.items() if v is not None})
    return parse_server_config(raw, source=str(path)).resolve_env(source=str(path))
