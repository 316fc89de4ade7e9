"""One launch on one rank: the DeepSpeed engine, its data, the budget and where the loop stands."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.train_config import TrainConfig
from workloads.training.engine import EngineSettings
from workloads.training.models import Network
from workloads.training.reporter import Reporter
from workloads.training.schedule import Budget


def fresh_state() -> dict[str, Any]:
    """The loop's position and early-stopping record; it travels inside every checkpoint."""
    return {"micro_steps": 0, "step": 0, "samples": 0, "history": [], "best": None, "best_step": 0,
            "bad_evaluations": 0, "finished": False, "stopped_early": False}


@dataclass
class Session:
    """One launch on one rank: the engine, its data shard and where the loop stands."""

    cfg: TrainConfig
    reporter: Reporter
    engine: Any
    rank: int
    world: int
    backend: str
    settings: EngineSettings                # the ZeRO stage and precision that run
    network: Network                        # what trains, and how it is fed and exported
    data: dict[str, Any]                    # x_train, y_train, x_val, y_val as numpy arrays (t_* for texts)
    budget: Budget
    pos_weight: float
    ckpt_dir: Path
    state: dict[str, Any] = field(default_factory=fresh_state)
    best_state: dict[str, Any] | None = None  # rank 0 only: the trained weights of the best evaluation so far
    resumed_from: int = 0
    resumed_tag: str | None = None
    t_start: float = field(default_factory=time.time)
    train_seconds: float = 0.0
    train_cpu_seconds: float = 0.0          # this process's CPU time in the same spans: steady on a busy machine
    samples_now: int = 0
    engine_record: dict[str, Any] = field(default_factory=dict)  # what ran, for MLflow (engine.describe)

    @property
    def device(self) -> Any:
        return self.engine.device

    @property
    def dtype(self) -> Any:
        return self.settings.dtype

    def all_ok(self, flag: bool) -> bool:
        """True on every rank only when it is true on every rank."""
        import torch
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def trained_state(self) -> dict[str, Any]:
        """The weights training changes (network.trained_keys), gathered, on the CPU in fp32.

        Under ZeRO-3 each rank holds a shard of every parameter: they are gathered for the copy, a collective,
        so every rank calls this. The result is one consolidated state, whatever the stage or offload.
        """
        import deepspeed

        module, keys = self.engine.module, self.network.trained_keys()
        params = [p for name, p in module.named_parameters() if name in keys]
        ctx = (deepspeed.zero.GatheredParameters(params) if self.settings.zero_stage == 3
               else contextlib.nullcontext())
        with ctx:
            return {k: v.detach().float().cpu().clone().contiguous() for k, v in module.state_dict().items()
                    if k in keys}

    def export_state(self, trained: dict[str, Any]) -> dict[str, Any]:
        """A complete state dict for export: `trained` over the network's untrained (frozen) weights."""
        return {**self.network.base_state(), **trained}
