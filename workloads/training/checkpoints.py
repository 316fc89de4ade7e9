"""Checkpoints: DeepSpeed's save plus the best weights, vouched for by a manifest; the resume choice; pruning.

Every `checkpoint_every_steps` optimizer steps every rank calls DeepSpeed's `save_checkpoint` into
`checkpoint_dir/global_step<N>`; then rank 0 saves the best weights so far (`best.safetensors`) and writes the tag
folder's `manifest.json` (core.manifest: sha256 of every file, plus `world_size` and `step`). The manifest is
written last, so it is the completion marker. On start the newest tag whose manifest exists, matches its files
strictly (a missing, changed or extra file is named) and was written by this many ranks is resumed; every
other tag is skipped with a warning that names it, so a checkpoint cut off mid-write is never taken as the newest.

Nothing is unpickled from a checkpoint that fails that check: every rank checks the tag again right before the
collective load and the load happens only when all ranks found it intact. And DeepSpeed's own loader, which calls
`torch.load(..., weights_only=False)`, is replaced for the resume by one that unpickles with `weights_only=True`
(tensors, plain containers and the three DeepSpeed value types its ZeRO optimizer states hold, allowlisted by
name), so even a checkpoint whose manifest was rewritten with its files cannot run code when it loads: such a
file fails to load and is skipped like any other.

Under ZeRO-2/3 and with offload the tag holds each rank's shard of the optimizer (and, at stage 3, of the
parameters); resume loads the shards back on the same number of ranks. Weights a network keeps frozen (the
encoder layers text_finetune does not train) are left out of the save and restored from where they came from.
The registry never sees a shard: export writes one consolidated safetensors file (workloads/training/export.py).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

from core.manifest import MANIFEST, manifest_problems, read_manifest, write_manifest
from workloads.training.session import Session, fresh_state

TAG_PATTERN = re.compile(r"^global_step(\d+)(\.final)?$")
BEST = "best.safetensors"


def tag_for(step: int, final: bool = False) -> str:
    return f"global_step{step}" + (".final" if final else "")


def _tags(checkpoint_dir: Path) -> list[tuple[tuple[int, bool], Path]]:
    """((step, final), folder) of every tag folder, newest first (a final tag after the plain one of its step)."""
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for d in checkpoint_dir.iterdir():
        m = TAG_PATTERN.match(d.name)
        if d.is_dir() and m:
            found.append(((int(m.group(1)), bool(m.group(2))), d))
    return sorted(found, key=lambda t: t[0], reverse=True)


def checkpoint_problem(d: Path, world_size: int) -> str | None:
    """Why the tag folder `d` cannot be resumed by `world_size` ranks, or None when it can."""
    if not (d / MANIFEST).is_file():
        return f"no {MANIFEST} (the save was cut off before it finished)"
    problems = manifest_problems(d)
    if problems:
        return problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
    written_by = read_manifest(d).get("world_size")
    if written_by != world_size:
        return f"it was written by {written_by} ranks and this run has {world_size}"
    return None


def complete_checkpoints(checkpoint_dir: Path, world_size: int, warn: Callable[[str], None]) -> list[str]:
    """Tags of usable checkpoints, newest first; every other tag folder is named in a warning."""
    usable = []
    for _, d in _tags(checkpoint_dir):
        problem = checkpoint_problem(d, world_size)
        if problem:
            warn(f"skipping checkpoint {d}: {problem}")
        else:
            usable.append(d.name)
    return usable


def mark_complete(d: Path, step: int, world_size: int) -> None:
    """The tag folder's manifest: written after every file of the save, so it vouches for all of them."""
    write_manifest(d, world_size=world_size, step=step)


def prune(checkpoint_dir: Path, keep: int) -> None:
    """Keep the `keep` newest complete checkpoints; drop older ones (complete or not)."""
    tags = _tags(checkpoint_dir)
    complete = [k for k, d in tags if (d / MANIFEST).is_file()]
    if len(complete) <= keep:
        return
    cutoff = complete[keep - 1]
    for k, d in tags:
        if k < cutoff:
            shutil.rmtree(d, ignore_errors=True)


def save_checkpoint(s: Session, tag: str) -> None:
    """DeepSpeed's checkpoint plus the best weights, then (rank 0) the manifest that vouches for them."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    if s.rank == 0 and (s.ckpt_dir / tag).exists():
        shutil.rmtree(s.ckpt_dir / tag)  # an older save under this name is replaced, never half-mixed
    dist.barrier()
    s.engine.save_checkpoint(str(s.ckpt_dir), tag=tag, client_state={"intelligentops": s.state}, save_latest=False,
                             exclude_frozen_parameters=s.network.has_frozen)
    dist.barrier()
    if s.rank == 0:
        d = s.ckpt_dir / tag
        if s.best_state is not None:
            save_file(s.best_state, str(d / BEST))
        mark_complete(d, s.state["step"], s.world)
        prune(s.ckpt_dir, s.cfg.keep_checkpoints)
        s.reporter.info(f"checkpoint {d} saved at step {s.state['step']}")
    dist.barrier()


# What DeepSpeed's ZeRO optimizer states pickle besides tensors and containers (found with
# torch.serialization.get_unsafe_globals_in_checkpoint over every checkpoint of tests/stage/test_deepspeed_settings.py's
# matrix: stages 0-3, fp32, bf16 and fp16 with loss scaling, offloads, a factory and text_finetune): value types
# whose state is numbers, no code.
SAFE_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address")


def _safe_globals() -> list:
    import importlib

    found = []
    for name in SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # another DeepSpeed release: that type is simply not allowed
            continue
    return found


class WeightsOnlyLoads:
    """DeepSpeed's checkpoint engine, but `load` unpickles with weights_only=True (see the module docstring)."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def load(self, path: str, map_location=None):
        import torch

        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)


def resume(s: Session) -> None:
    """Load the newest checkpoint that every rank can load; any other is named in a warning and skipped."""
    import torch.distributed as dist

    candidates = [complete_checkpoints(s.ckpt_dir, s.world, s.reporter.warning) if s.rank == 0 else None]
    dist.broadcast_object_list(candidates, src=0)
    # What a failed load must be undone to (ZeRO-3 holds only shards here; a later complete load replaces them).
    keys = s.network.trained_keys()
    initial = ({k: v.detach().clone() for k, v in s.engine.module.state_dict().items() if k in keys}
               if s.settings.zero_stage < 3 else None)
    saving_engine = s.engine.checkpoint_engine
    s.engine.checkpoint_engine = WeightsOnlyLoads(saving_engine)
    try:
        _resume_newest(s, candidates[0], initial)
    finally:
        s.engine.checkpoint_engine = saving_engine
    if s.resumed_tag:
        s.reporter.info(f"resuming from checkpoint {s.ckpt_dir / s.resumed_tag} at step {s.resumed_from}"
                        + (" (training had finished; exporting it again)" if s.state["finished"] else ""))
    else:
        s.reporter.info(f"starting fresh; checkpoints go to {s.ckpt_dir}")


def _resume_newest(s: Session, tags: list[str], initial: dict | None) -> None:
    from safetensors.torch import load_file

    for tag in tags:
        # Checked again by every rank, right before the load: a file changed since rank 0 listed the tags (or one
        # only this rank sees) is never unpickled, and all ranks skip the tag together.
        problem = checkpoint_problem(s.ckpt_dir / tag, s.world)
        if not s.all_ok(problem is None):
            s.reporter.warning(f"skipping checkpoint {s.ckpt_dir / tag}: "
                               f"{problem or 'it failed its manifest check on another rank'}; not loaded")
            continue
        err = None
        client = None
        try:
            path, client = s.engine.load_checkpoint(str(s.ckpt_dir), tag=tag,
                                                    load_module_strict=not s.network.has_frozen)
            ok = path is not None and "intelligentops" in (client or {})
            err = None if ok else "DeepSpeed found nothing to load"
        except Exception as exc:  # a file that hashes right but does not load is still skipped, not fatal
            ok, err = False, f"{type(exc).__name__}: {exc}"
        if s.all_ok(ok):
            s.state = {**fresh_state(), **client["intelligentops"]}
            s.resumed_from, s.resumed_tag = s.state["step"], tag
            if s.rank == 0 and (s.ckpt_dir / tag / BEST).exists():
                s.best_state = load_file(str(s.ckpt_dir / tag / BEST))
            break
        s.reporter.warning(f"skipping checkpoint {s.ckpt_dir / tag}: it failed to load ({err or 'on another rank'})")
        if initial is not None:
            s.engine.module.load_state_dict(initial, strict=False)
