"""The training workload's config: one typed model with one set of defaults, for both sides of the process boundary.

`TrainSettings` holds what a spec's `training:` section and a `TrainConfig` share (the network, the optimizer,
the step budget and schedule, class weighting, calibration, checkpoint cadence); `DeepSpeedSettings` the engine's
settings (ZeRO stage, offload, precision, accumulation, activation checkpointing, clipping). `assets/spec.py`'s
`Training` inherits both from here, so a default is written once. `TrainConfig` adds where the run reads and writes and how it reports; the `model_checkpoint` asset validates it when it writes
`<run>/config.json` (`TrainConfig.write`) and the workload validates it again when it reads it
(`TrainConfig.read`), with this one schema. Every problem is a `TrainConfigError` that names the file and key.

Test hooks (fields too, so `--kill-at-step` works as well): the workload takes `kill_at_step`, `kill_rank` and
`step_delay_s` from the environment variables below (workloads/training/config.py), and with
`INTELLIGENTOPS_CHECKPOINT_DIR` set (a pod's mounted volume) checkpoints go to
`$INTELLIGENTOPS_CHECKPOINT_DIR/<checkpoint_subdir>`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from core.files import atomic_write_json_local

CHECKPOINT_DIR_ENV = "INTELLIGENTOPS_CHECKPOINT_DIR"
KILL_AT_STEP_ENV = "INTELLIGENTOPS_TRAIN_KILL_AT_STEP"
KILL_RANK_ENV = "INTELLIGENTOPS_TRAIN_KILL_RANK"
STEP_DELAY_ENV = "INTELLIGENTOPS_TRAIN_STEP_DELAY_S"


class TrainConfigError(ValueError):
    """A training config that cannot be used; the message names the file (or the spec) and the key."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# `training.model`: one of these, or "module.path:factory" (a user's own torch.nn.Module, docs/byo-model.md).
MLP, TEXT_FINETUNE = "mlp", "text_finetune"
FACTORY_PATTERN = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*)$")
# zero_stage "auto": ZeRO-2 from this many trainable parameters, else stage 0. Below it the fp32 weights,
# gradients and Adam moments of a rank take under 800 MB, and partitioning them costs more than it saves.
AUTO_ZERO_MIN_PARAMS = 50_000_000


class DeepSpeedSettings(_Frozen):
    """The DeepSpeed engine, validated here so a combination it would refuse is an error naming the key.

    - `zero_stage`: 0-3, or "auto" (0 for a model under AUTO_ZERO_MIN_PARAMS trainable parameters, else 2);
      `offload_optimizer: cpu` needs stage 1-3 and `offload_param: cpu` stage 3, both named explicitly.
    - `precision`: fp32, bf16, fp16 (with loss scaling: `loss_scale` 0 is dynamic, starting at
      2**`initial_scale_power`), or "auto" (bf16 where the accelerator supports it, else fp32). The exported
      weights are fp32 whatever trained them.
    - `gradient_accumulation_steps` micro-steps per optimizer step of `micro_batch_size` rows per rank.
    - `activation_checkpointing`: recompute activations in the backward pass instead of keeping them.
    - `gradient_clipping`: the global gradient norm's bound (0: none).
    """

    zero_stage: Literal["auto", 0, 1, 2, 3] = "auto"
    micro_batch_size: int = Field(128, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    loss_scale: float = Field(0.0, ge=0)
    initial_scale_power: int = Field(16, ge=0, le=32)
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_param: Literal["none", "cpu"] = "none"
    activation_checkpointing: bool = False
    gradient_clipping: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _engine_consistent(self) -> DeepSpeedSettings:
        if self.offload_param != "none" and self.zero_stage != 3:
            raise ValueError(f"offload_param: {self.offload_param} partitions parameters, which only ZeRO stage 3 "
                             f"does; set zero_stage: 3 (it is {self.zero_stage!r}) or offload_param: none")
        if self.offload_optimizer != "none" and self.zero_stage not in (1, 2, 3):
            raise ValueError(f"offload_optimizer: {self.offload_optimizer} needs ZeRO stage 1, 2 or 3 named in "
                             f"zero_stage (it is {self.zero_stage!r}); set one or offload_optimizer: none")
        if self.precision != "fp16" and (self.loss_scale != 0.0 or self.initial_scale_power != 16):
            raise ValueError(f"loss_scale and initial_scale_power scale fp16 losses, but precision is "
                             f"{self.precision!r}; set precision: fp16 or remove them")
        return self


class TrainSettings(_Frozen):
    """What the network learns and how; workloads/training/schedule.py says how the budget is fitted.

    The budget is counted in optimizer steps; left null, `max_steps`, `min_steps` and `eval_every_steps` are
    fitted to the number of training rows, which works from a few hundred rows to a few hundred thousand.
    """

    model: str = MLP                                  # mlp | text_finetune | "module.path:factory"
    model_settings: dict[str, Any] = {}               # passed to a factory as its `settings`
    hidden: list[PositiveInt] = [64, 32]              # the MLP, and text_finetune's head
    dropout: float = Field(0.1, ge=0, lt=1)
    encoder_trainable_layers: int = Field(2, ge=1)    # text_finetune: the encoder's top layers that train
    encoder_learning_rate: float = Field(5e-5, gt=0)  # text_finetune: their peak rate (the head takes learning_rate)
    encoder_max_tokens: int = Field(32, ge=4, le=512)  # text_finetune: tokens per text, in training and serving
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    max_steps: int | None = Field(None, ge=1)
    min_steps: int | None = Field(None, ge=1)
    eval_every_steps: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)            # an optional cap on passes over the training rows
    early_stopping_patience: int = Field(10, ge=1)    # evaluations without a better `monitor`
    monitor: Literal["auc", "loss"] = "loss"          # validation log loss, or AUC (higher is better)
    warmup_fraction: float = Field(0.05, ge=0, le=1)  # of max_steps, linear from 0 to learning_rate
    min_lr_fraction: float = Field(0.05, ge=0, le=1)  # the cosine ends at learning_rate * min_lr_fraction
    max_batch_fraction: float = Field(0.05, gt=0, le=1)  # micro-batch at most this share of a rank's rows
    class_weighting: bool = True                      # pos_weight = sqrt(negatives / positives) in the loss
    calibrate: bool = True                            # Platt scaling on validation, folded into the last layer
    checkpoint_every_steps: int = Field(50, ge=1)
    checkpoint_min_seconds: float = Field(30.0, ge=0)  # and at most one save per this many seconds of training

    @field_validator("model")
    @classmethod
    def _model_known(cls, value: str) -> str:
        if value not in (MLP, TEXT_FINETUNE) and not FACTORY_PATTERN.match(value):
            raise ValueError(f"{value!r} is not a model: use mlp, text_finetune, or \"module.path:factory\" naming "
                             "a function that returns a torch.nn.Module (docs/byo-model.md)")
        return value

    @model_validator(mode="after")
    def _budget_consistent(self) -> TrainSettings:
        if self.min_steps is not None and self.max_steps is not None and self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) is above max_steps ({self.max_steps}); lower min_steps "
                             "or raise max_steps")
        if self.model_settings and not FACTORY_PATTERN.match(self.model):
            raise ValueError(f"model_settings are passed to a model factory (\"module.path:factory\"), but model is "
                             f"{self.model!r}; remove model_settings or name a factory")
        if self.model != TEXT_FINETUNE:
            for key in ("encoder_trainable_layers", "encoder_learning_rate", "encoder_max_tokens"):
                if getattr(self, key) != TrainSettings.model_fields[key].default:
                    raise ValueError(f"{key} applies to model: text_finetune only, and model is {self.model!r}")
        return self

    @property
    def factory(self) -> tuple[str, str] | None:
        """(module, function) of a "module.path:factory" model, else None."""
        m = FACTORY_PATTERN.match(self.model)
        return (m.group(1), m.group(2)) if m else None


class TrainConfig(DeepSpeedSettings, TrainSettings):
    """Everything one launch of workloads/training reads: the shared settings plus where and how it runs."""

    data: str = Field(min_length=1)         # the .npz with x_train, y_train, x_val, y_val
    output_dir: str = Field(min_length=1)   # where the exported model goes (replaced atomically)
    checkpoint_dir: str = Field(min_length=1)  # persists across launches of the same inputs
    checkpoint_subdir: str = ""             # below $INTELLIGENTOPS_CHECKPOINT_DIR when that is set
    preprocessing: str = ""                 # JSON copied beside the weights
    model_file: str = ""                    # a factory's module source (copied into the run folder by the asset)
    encoder_dir: str = ""                   # text_finetune: the sentence encoder; "" is the shipped all-MiniLM-L6-v2
    keep_checkpoints: int = Field(3, ge=1)
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl where CUDA is available, else gloo
    seed: int = 7
    run_name: str = "train"
    mlflow_tracking_uri: str = ""           # empty: no MLflow
    mlflow_experiment_id: str = ""
    mlflow_tags: dict[str, str] = {}
    step_delay_s: float = Field(0.0, ge=0)  # test hooks: see the module docstring
    kill_at_step: int = Field(0, ge=0)
    kill_rank: int = Field(-1, ge=-1)       # -1: the last rank

    @classmethod
    def build(cls, values: dict[str, Any], source: str) -> TrainConfig:
        """Validate `values`; a problem is a TrainConfigError naming `source` (a file, a spec) and the key."""
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise TrainConfigError(f"{source}: " + "; ".join(_problem(e) for e in exc.errors())) from None

    @classmethod
    def read(cls, path: Path | str, overrides: dict[str, Any] | None = None, source: str | None = None) -> TrainConfig:
        """The config in the JSON file `path`, with `overrides` on top, validated."""
        values = read_values(path)
        return cls.build({**values, **(overrides or {})}, source or str(path))

    def write(self, path: Path | str) -> None:
        """Write the config as JSON, atomically (it was validated when it was built)."""
        atomic_write_json_local(path, self.model_dump(mode="json"))

    @classmethod
    def from_settings(cls, settings: TrainSettings, deepspeed: DeepSpeedSettings, source: str,
                      **run: Any) -> TrainConfig:
        """A spec's training section (any TrainSettings, e.g. assets.spec.Training) and its engine settings,
        plus the run's own fields (`data`, `output_dir`, ...), as one validated config."""
        shared = settings.model_dump(include=set(TrainSettings.model_fields))
        return cls.build({**shared, **deepspeed.model_dump(), **run}, source)


def resolve_zero_stage(setting: str | int, trainable_params: int) -> int:
    """The ZeRO stage that runs: the one named, or for "auto" 0 under AUTO_ZERO_MIN_PARAMS parameters, else 2."""
    if setting != "auto":
        return int(setting)
    return 2 if trainable_params >= AUTO_ZERO_MIN_PARAMS else 0


def resolve_precision(setting: str, bf16_supported: bool) -> str:
    """The precision that runs: the one named, or for "auto" bf16 where the accelerator supports it, else fp32."""
    if setting != "auto":
        return setting
    return "bf16" if bf16_supported else "fp32"


def accelerator_problems(settings: DeepSpeedSettings, device: str, fp16_supported: bool,
                         bf16_supported: bool) -> list[str]:
    """Why these engine settings cannot run on this accelerator (empty when they can), each naming the key.

    On a CPU, DeepSpeed's CPU accelerator runs every ZeRO stage, both offloads and bf16; fp16 only where the
    processor computes in it (the accelerator's own answer, `is_fp16_supported()`).
    """
    problems = []
    if settings.precision == "fp16" and not fp16_supported:
        problems.append(f"precision: fp16 cannot run on this {device} (DeepSpeed's {device} accelerator reports no "
                        "fp16 support); use precision: bf16 or fp32 here, or train on a GPU")
    if settings.precision == "bf16" and not bf16_supported:
        problems.append(f"precision: bf16 cannot run on this {device} (no bf16 support); use precision: fp32 or fp16")
    return problems


def read_values(path: Path | str) -> dict[str, Any]:
    """The JSON object in a config file, unvalidated; a TrainConfigError names the file when it is not one."""
    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except OSError as exc:
        raise TrainConfigError(f"{path}: cannot read the training config ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise TrainConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(values, dict):
        raise TrainConfigError(f"{path}: a training config is a JSON object of TrainConfig fields")
    return values


def _problem(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()))
    kind = err.get("type")
    if kind == "extra_forbidden":
        return f"unknown key '{loc}'"
    if kind == "missing":
        return f"key '{loc}' is required (set it in the config file or pass --{loc.replace('_', '-')})"
    msg = str(err.get("msg", "")).replace("Value error, ", "")
    if not loc:
        return msg
    return f"key '{loc}' = {err.get('input')!r}: {msg}"
