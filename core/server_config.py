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
Host = Annotated[str, Field("127.0.0.1", min_length=1,
                            description="the address the server binds; anything but loopback needs API keys (or "
                                        "gateway_authenticates)")]
GatewayAuthenticates = Annotated[bool, Field(False, description="a gateway in front authenticates every caller, so "
                                                                "a non-loopback bind without keys is allowed")]
MaxInFlightPerClient = Annotated[int, Field(16, ge=1, description="requests one key (or client address) may have "
                                                                  "in flight at once (429 above)")]
BatchTextChars = Annotated[int, Field(400, ge=100, description="cost bound of one scoring batch: characters of "
                                                                "text plus 20 per row; larger requests are split "
                                                                "and interleaved with others")]
MinKnownFraction = Annotated[float, Field(0.5, ge=0, le=1, description="share of a row's features that must be "
                                                                       "known (not null), or the row is refused")]
OutOfDistribution = Annotated[Literal["answer_flagged", "refuse_for_review"], Field(
    "answer_flagged", description="what a row the version's out-of-distribution detector flags gets (core/ood.py): "
                                  "answer_flagged: answered, with ood 1 on the answer and the audit record; "
                                  "refuse_for_review: its request is refused (400 naming the rows) and the flagged "
                                  "rows are recorded with ood 2 for a person to review")]
MaxOutcomesPerRequest = Annotated[int, Field(1000, ge=1, le=100_000, description="outcome items in one request")]
# How the server uses the machine (defaults measured on a 2-core machine: benchmarks/README.md "Serving").
MAX_WORKERS = 32
Workers = Annotated[int, Field(1, ge=1, le=MAX_WORKERS, description=(
    "server processes behind the one port, each with its own model and scoring thread, all appending to the one "
    "audit chain; a supervisor restarts one that dies (1: a single process, no supervisor)"))]
BatchWindowMs = Annotated[float, Field(0.0, ge=0, le=50, description=(
    "how long an idle scorer waits for more requests before it scores a batch (0: it scores what is queued)"))]
ScoringThreads = Annotated[int, Field(1, ge=1, le=64, description="intra-op threads of each worker's scoring "
                                                                   "(torch, ONNX Runtime)")]

class AnswerView(BaseModel):
    """What an answer of one route scope carries beside the decision: the probability to `probability_decimals`
    (None: full precision), the operating threshold (v1), the top factors. The audit record keeps everything."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    probability_decimals: int | None = Field(None, ge=0, le=17)
    threshold: bool = True
    top_factors: bool = True


Answers = Annotated[dict[Literal["predict", "explain"], AnswerView], Field(
    default_factory=dict, description="per route scope (predict: :predict and v2 infer; explain: :explain), what "
                                      "an answer carries; a scope not listed gets everything at full precision")]

DEFAULT_PORT = 8080  # where the server listens when the config leaves `port` to it (a KServe predictor's port)
ENV_PREFIX = "env:"
SECRET_KEYS = ("tracking_uri", "registry_uri", "audit_url")  # may be "env:VAR"


class TlsFiles(BaseModel):
    """TLS for the server: its certificate and key (PEM); with `client_ca_file`, every client must present a
    certificate signed by that CA (mutual TLS). `ca_file` is what the deployment's own client trusts (default:
    `cert_file`, which suits a self-signed certificate); `client_cert_file`/`client_key_file` are the certificate
    it presents when client certificates are required."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cert_file: str = Field(min_length=1)
    key_file: str = Field(min_length=1)
    client_ca_file: str | None = None
    ca_file: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None

    def client_context(self):
        """An ssl.SSLContext for a client of this server: trusts `ca_file` (or `cert_file`) and presents the
        client certificate when one is configured."""
        import ssl

        context = ssl.create_default_context(cafile=self.ca_file or self.cert_file)
        if self.client_cert_file:
            context.load_cert_chain(self.client_cert_file, self.client_key_file)
        return context


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server reachable from this machine only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServerConfigError(ValueError):
    """A server config that cannot be used; the message names the file (or who built it) and the key."""


class ServerConfig(BaseModel):
    """What the server runs from: the spec's model, where the registry and the audit log are, what it accepts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spec: str = Field(min_length=1, description="the spec's name: the registered model and the served model name")
    tracking_uri: str = Field(min_length=1)
    registry_uri: str | None = None
    audit_url: str = Field(min_length=1)
    keys_dir: str | None = Field(None, description="the keys folder (audit-mac.key, audit-enc.key; core/keys.py); "
                                                   "None only in configs written before keys: an unkeyed audit log")
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
    audit_fields: list[str] = Field(default_factory=list, max_length=20, description=(
        "audit-only fields a caller may send beside the features (the spec's sensitive columns): stored encrypted "
        "on the decision's audit record for the live fairness analysis, never passed to the model"))
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
    operator_key_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$",
                                            description="the deployment's operator key (operator.key beside the "
                                                        "config): scopes outcomes and read, keys or not")
    host: Host
    gateway_authenticates: GatewayAuthenticates
    tls: TlsFiles | None = None
    nullable: list[str] | None = Field(None, description="columns that may be missing (null, or NaN in a binary "
                                                         "tensor); None: every column")
    numeric_allowed: dict[str, list[float]] = Field(default_factory=dict,
                                                    description="numeric column -> the only values accepted")
    min_known_fraction: MinKnownFraction
    max_in_flight_per_client: MaxInFlightPerClient
    batch_text_chars: BatchTextChars
    max_outcomes_per_request: MaxOutcomesPerRequest
    out_of_distribution: OutOfDistribution
    answers: Answers
    workers: Workers
    batch_window_ms: BatchWindowMs
    scoring_threads: ScoringThreads
    log_file: str | None = Field(None, description="the server's own log, rotated by size (None: stderr only)")
    log_max_bytes: int = Field(10_000_000, ge=10_000, description="rotate the log file past this size")
    log_backups: int = Field(3, ge=1, le=100, description="rotated log files kept")
    notice_prompt: str | None = Field(None, description="the prompt holding the spec's notice template "
                                                        "(core/names.notice_prompt_name); the server renders its "
                                                        "@champion for adverse decisions. None: no notices")

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
        clash = [c for c in self.audit_fields if c in seen]
        if clash:
            raise ValueError(f"audit_fields: {clash} are feature columns; an audit-only field is never a model input")
        if self.audit_fields and not self.keys_dir:
            raise ValueError("audit_fields are stored only encrypted, and this config names no keys_dir: give the "
                             "server the audit log's keys folder, or leave audit_fields empty")
        unknown = [c for c in (self.nullable or []) if c not in seen]
        if unknown:
            raise ValueError(f"nullable: {unknown} are not feature columns")
        unknown = [c for c in self.numeric_allowed if c not in self.numeric]
        if unknown:
            raise ValueError(f"numeric_allowed: {unknown} are not numeric feature columns")
        if not is_loopback(self.host) and not self.gateway_authenticates and not (self.api_keys_file or
                                                                                 self.api_keys_env):
            raise ValueError(f"host {self.host!r} is reachable from other machines, but no API keys are configured "
                             "(api_keys_file or api_keys_env): anyone there could call the model. Configure keys, "
                             "bind 127.0.0.1, or set gateway_authenticates when a gateway in front authenticates "
                             "every caller")
        return self

    def may_be_missing(self, column: str) -> bool:
        return self.nullable is None or column in self.nullable

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
