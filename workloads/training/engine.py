"""The DeepSpeed engine of a run: the settings resolved for this accelerator, its config, and what ran.

`resolve(cfg, module, device, world)` turns the config's engine settings into what runs here: the ZeRO stage ("auto":
core.train_config.resolve_zero_stage on the network's trainable parameters), the precision ("auto": bf16 on a
CUDA device that supports it, else fp32), and refuses what this accelerator cannot run
(core.train_config.accelerator_problems), naming the key. `ds_config` is the engine's config;
`describe` is what the MLflow run records.

Where DeepSpeed does not pay, its per-step work is cut rather than kept for show (benchmarks/README.md,
"Training", has the figures against a plain PyTorch loop):
- at ZeRO stage 0 in fp32 the engine's forward only registers hooks that start timers and would scale
  gradients it already scales in `backward`: the loop calls the module itself (`module_forward`);
- stage 0 in fp32 leaves the gradients on the parameters, so they are clipped by torch's fused
  `clip_grad_norm_` in the loop instead of through the engine (`own_clipping`);
- on one rank at stage 0 in fp32 there is nothing to reduce, partition or unscale: the loop calls
  `loss.backward()` itself (scaled for accumulation as the engine would, `torch_backward`), and the engine
  takes the optimizer step, keeps its counters and writes and reads the checkpoints;
- its throughput timer (a device synchronization per step on a GPU) is off;
- the loss is read only at evaluations, and checkpoints are saved at most once per `checkpoint_min_seconds`.
Every other setting (ZeRO 1-3, offload, bf16, fp16, several ranks at stage 0 for the all-reduce) goes through
the engine's own forward, backward and step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.train_config import TrainConfig, TrainConfigError, accelerator_problems, resolve_precision, resolve_zero_stage


@dataclass(frozen=True)
class EngineSettings:
    """What runs: the resolved stage and precision, and who clips the gradients."""

    zero_stage: int
    precision: str
    own_clipping: bool
    module_forward: bool
    torch_backward: bool
    trainable_parameters: int
    parameters: int

    @property
    def dtype(self) -> Any:
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]


def resolve(cfg: TrainConfig, module: Any, device_type: str, world: int) -> EngineSettings:
    """The engine settings this accelerator runs, or a TrainConfigError naming the key it cannot."""
    import torch
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    cuda = device_type == "cuda"
    problems = accelerator_problems(cfg, device_type.upper() if cuda else "CPU",
                                    fp16_supported=bool(accelerator.is_fp16_supported()),
                                    bf16_supported=bool(accelerator.is_bf16_supported()))
    if problems:
        raise TrainConfigError("deepspeed: " + "; ".join(problems))
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    stage = resolve_zero_stage(cfg.zero_stage, trainable)
    precision = resolve_precision(cfg.precision, cuda and torch.cuda.is_bf16_supported())
    plain = stage == 0 and precision == "fp32"
    return EngineSettings(zero_stage=stage, precision=precision, own_clipping=plain and cfg.gradient_clipping > 0,
                          module_forward=plain, torch_backward=plain and world == 1, trainable_parameters=trainable,
                          parameters=sum(p.numel() for p in module.parameters()))


def ds_config(cfg: TrainConfig, micro_batch_size: int, e: EngineSettings) -> dict[str, Any]:
    """DeepSpeed's config for these settings."""
    zero: dict[str, Any] = {"stage": e.zero_stage}
    if cfg.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": cfg.offload_optimizer}
    if cfg.offload_param != "none":
        zero["offload_param"] = {"device": cfg.offload_param}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "zero_optimization": zero,
        # A torch optimizer with ZeRO: DeepSpeed would otherwise insist on its own compiled CPU Adam.
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": e.precision == "bf16"},
        "fp16": {"enabled": e.precision == "fp16", "loss_scale": cfg.loss_scale,
                 "initial_scale_power": cfg.initial_scale_power},
        "gradient_clipping": 0.0 if e.own_clipping else cfg.gradient_clipping,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }


def initialize(cfg: TrainConfig, module: Any, param_groups: list[dict[str, Any]], config: dict[str, Any],
               world: int, e: EngineSettings) -> Any:
    """The engine over `module` with AdamW on `param_groups` (their `lr_scale` stays in each group)."""
    import deepspeed
    import torch

    # The schedule sets every group's rate before each step; this one is only the optimizer's initial value.
    groups = [{**g, "lr": cfg.learning_rate * g["lr_scale"]} for g in param_groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    if world == 1 and e.zero_stage == 0:
        # The all-reduce of one rank's gradients is the identity; DeepSpeed skips it the same way without a backend.
        engine.enable_backward_allreduce = False
    return engine


def describe(cfg: TrainConfig, e: EngineSettings, config: dict[str, Any]) -> dict[str, Any]:
    """What ran, for the MLflow run's params: each resolved setting next to what the spec asked for."""
    import json

    return {"zero_stage": e.zero_stage, "zero_stage_setting": cfg.zero_stage, "precision": e.precision,
            "precision_setting": cfg.precision, "offload_optimizer": cfg.offload_optimizer,
            "offload_param": cfg.offload_param, "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "activation_checkpointing": cfg.activation_checkpointing, "gradient_clipping": cfg.gradient_clipping,
            "gradient_clipping_by": "torch" if e.own_clipping else "deepspeed",
            "forward_by": "module" if e.module_forward else "deepspeed",
            "backward_by": "torch" if e.torch_backward else "deepspeed",
            "loss_scale": cfg.loss_scale if e.precision == "fp16" else "n/a",
            "trainable_parameters": e.trainable_parameters, "parameters": e.parameters,
            "deepspeed_config": json.dumps(config, sort_keys=True)}
