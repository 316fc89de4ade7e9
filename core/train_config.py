"""The training workload's config: one typed model with one set of defaults, for both sides of the process boundary.

`TrainSettings` holds what a spec's `training:` section and a `TrainConfig` share (the network, the optimizer,
the step budget and schedule, class weighting, calibration, checkpoint cadence); `DeepSpeedSettings` the engine's
settings. `assets/spec.py`'s `Training` inherits both from here, so a default is written once. `TrainConfig` adds
where the run reads and writes and how it reports; the `model_checkpoint` asset validates it when it writes
`<run>/config.json` (`TrainConfig.write`) and the workload validates it again when it reads it
(`TrainConfig.read`), with this one schema. Every problem is a `TrainConfigError` that names the file and key.

Test hooks (fields too, so `--kill-at-step` works as well): the workload takes `kill_at_step`, `kill_rank` and
`step_delay_s` from the environment variables below (workloads/training/config.py), and with
`INTELLIGENTOPS_CHECKPOINT_DIR` set (a pod's mounted volume) checkpoints go to
`$INTELLIGENTOPS_CHECKPOINT_DIR/<checkpoint_subdir>`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from core.files import atomic_write_json_local

CHECKPOINT_DIR_ENV = "INTELLIGENTOPS_CHECKPOINT_DIR"
KILL_AT_STEP_ENV = "INTELLIGENTOPS_TRAIN_KILL_AT_STEP"
KILL_RANK_ENV = "INTELLIGENTOPS_TRAIN_KILL_RANK"
STEP_DELAY_ENV = "INTELLIGENTOPS_TRAIN_STEP_DELAY_S"


class TrainConfigError(ValueError):
    """A training config that cannot be used; the message names the file (or the spec) and the key."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeepSpeedSettings(_Frozen):
    """The DeepSpeed engine: ZeRO stage, rows per rank per micro-step, accumulation and bf16 ("auto": where the
    accelerator supports it)."""

    zero_stage: Literal[0, 1, 2, 3] = 1
    micro_batch_size: int = Field(128, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    bf16: Literal["auto", True, False] = "auto"


class TrainSettings(_Frozen):
    """What the network learns and how; workloads/training/schedule.py says how the budget is fitted.

    The budget is counted in optimizer steps; left null, `max_steps`, `min_steps` and `eval_every_steps` are
    fitted to the number of training rows, which works from a few hundred rows to a few hundred thousand.
    """

    hidden: list[PositiveInt] = [64, 32]
    dropout: float = Field(0.1, ge=0, lt=1)
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

    @model_validator(mode="after")
    def _budget_consistent(self) -> TrainSettings:
        if self.min_steps is not None and self.max_steps is not None and self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) is above max_steps ({self.max_steps}); lower min_steps "
                             "or raise max_steps")
        return self


class TrainConfig(DeepSpeedSettings, TrainSettings):
    """Everything one launch of workloads/training reads: the shared settings plus where and how it runs."""

    data: str = Field(min_length=1)         # the .npz with x_train, y_train, x_val, y_val
    output_dir: str = Field(min_length=1)   # where the exported model goes (replaced atomically)
    checkpoint_dir: str = Field(min_length=1)  # persists across launches of the same inputs
    checkpoint_subdir: str = ""             # below $INTELLIGENTOPS_CHECKPOINT_DIR when that is set
    preprocessing: str = ""                 # JSON copied beside the weights
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
