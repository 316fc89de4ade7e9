"""The training loop: start the engine, resume, take the steps the budget allows, finish and export on rank 0.

Every rank runs the same steps on its own shard of each pass (the order of a pass depends on the pass alone, so a
resumed run sees the batches it would have seen). The validation split is scored every `eval_every_steps` on
every rank (same numbers everywhere); the best weights are kept on rank 0 and are the ones exported. The network
(`model`: mlp, text_finetune or a user's factory) comes from workloads/training/models.py, the engine's settings
from workloads/training/engine.py.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from core.train_config import TrainConfig
from workloads.training import engine as engine_setup
from workloads.training.calibration import calibrate, probabilities
from workloads.training.checkpoints import resume, save_checkpoint, tag_for
from workloads.training.export import export
from workloads.training.metrics import roc_auc
from workloads.training.networks import network_for
from workloads.training.reporter import Reporter
from workloads.training.schedule import lr_at, plan_budget, positive_weight
from workloads.training.session import Session

# result.json keeps the exported model's probabilities for at most this many validation rows.
VALIDATION_PROBABILITIES = 10_000


def train(cfg: TrainConfig, reporter: Reporter) -> dict[str, Any]:
    """The whole run: start the engine, resume, take the steps the budget allows, export on rank 0."""
    import torch.distributed as dist

    session = start(cfg, reporter)
    resume(session)
    params = cfg.model_dump(mode="json", exclude={"mlflow_tags"})
    params.update(world_size=session.world, backend=session.backend, network=session.network.kind,
                  n_features=session.data["x_train"].shape[1], train_rows=len(session.data["x_train"]),
                  val_rows=len(session.data["x_val"]), pos_weight=session.pos_weight,
                  **{f"budget_{k}": v for k, v in session.budget.as_dict().items()}, **session.engine_record)
    reporter.start_mlflow(cfg, params, {"resumed_from_step": str(session.resumed_from),
                                        "resumed_from_checkpoint": str(session.resumed_tag or "")})
    run_steps(session)
    result = finish(session)
    dist.barrier()
    return result


def start(cfg: TrainConfig, reporter: Reporter) -> Session:
    """Read the data, build the network (a bad one stops here), join the process group, build the engine."""
    import deepspeed
    import numpy as np
    import torch
    import torch.distributed as dist

    t_start = time.time()
    with np.load(cfg.data, allow_pickle=False) as npz:
        data = {k: npz[k].astype(np.float32) for k in ("x_train", "y_train", "x_val", "y_val")}
        data.update({k: npz[k] for k in ("t_train", "t_val") if k in npz.files})
    torch.manual_seed(cfg.seed)
    network = network_for(cfg, data)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    deepspeed.init_distributed(dist_backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    budget = plan_budget(cfg, len(data["x_train"]), world)
    pos_weight = positive_weight(data["y_train"]) if cfg.class_weighting else 1.0
    settings = engine_setup.resolve(cfg, network.module, "cuda" if torch.cuda.is_available() else "cpu", world)
    config = engine_setup.ds_config(cfg, budget.micro_batch_size, settings)
    engine = engine_setup.initialize(cfg, network.module, network.param_groups(), config, world, settings)
    ckpt_dir = Path(cfg.checkpoint_dir)
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    reporter.info(f"{len(data['x_train'])} training rows on {world} rank(s): {network.kind}, "
                  f"{settings.trainable_parameters:,} trainable parameters, ZeRO stage {settings.zero_stage}, "
                  f"{settings.precision}; micro-batch {budget.micro_batch_size}, {budget.min_steps}-{budget.max_steps} "
                  f"steps, evaluation every {budget.eval_every_steps}, warmup {budget.warmup_steps}, "
                  f"pos_weight {pos_weight:.3f}")
    return Session(cfg=cfg, reporter=reporter, engine=engine, rank=rank, world=world, backend=backend,
                   settings=settings, network=network, data=data, budget=budget, pos_weight=pos_weight,
                   ckpt_dir=ckpt_dir, t_start=t_start, engine_record=engine_setup.describe(cfg, settings, config))


def validation_metrics(s: Session) -> dict[str, float]:
    """Unweighted log loss and AUC of the current weights on the validation rows (every rank, same numbers)."""
    import torch
    import torch.nn.functional as F

    y_va, n, chunk = s.data["y_val"], s.network.rows("val"), s.network.eval_chunk()
    out: dict[str, float] = {}
    if not n:
        return out
    s.engine.eval()
    with torch.no_grad():
        logits = torch.cat([s.engine(*s.network.inputs("val", torch.arange(i, min(i + chunk, n)), s.device, s.dtype))
                            .float().reshape(-1) for i in range(0, n, chunk)]).cpu()
    s.engine.train()
    out["val_loss"] = float(F.binary_cross_entropy_with_logits(logits, torch.from_numpy(y_va)))
    out["val_auc"] = roc_auc(y_va, torch.sigmoid(logits).numpy())
    return out


def record_evaluation(s: Session, train_loss: float) -> bool:
    """Score the validation split, keep the best weights, log; True when early stopping says stop."""
    cfg, st = s.cfg, s.state
    metrics = {"train_loss": train_loss, **validation_metrics(s)}
    if cfg.monitor == "auc" and math.isfinite(metrics.get("val_auc", float("nan"))):
        score = metrics["val_auc"]
    else:
        score = -metrics.get("val_loss", train_loss)
    improved = st["best"] is None or score > st["best"]
    if improved:
        st["best"], st["best_step"], st["bad_evaluations"] = score, st["step"], 0
        snapshot = s.trained_state()  # collective under ZeRO-3, so every rank takes it
        if s.rank == 0:
            s.best_state = snapshot
    else:
        st["bad_evaluations"] += 1
    lr = lr_at(st["step"], cfg.learning_rate, s.budget.warmup_steps, s.budget.max_steps, cfg.min_lr_fraction)
    epoch = round(st["micro_steps"] / s.budget.micro_steps_per_epoch, 3)
    st["history"].append({"evaluation": len(st["history"]) + 1, "epoch": epoch, "step": st["step"], "lr": lr,
                          **metrics})
    s.reporter.log_metrics({**metrics, "epoch": epoch, "lr": lr}, st["step"])
    s.reporter.info(f"step {st['step']}/{s.budget.max_steps} (epoch {epoch:.2f}, lr {lr:.2e}): "
                    + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()) + (" (best)" if improved else ""))
    if st["step"] >= s.budget.min_steps and st["bad_evaluations"] >= cfg.early_stopping_patience:
        s.reporter.info(f"early stopping at step {st['step']}: no better {cfg.monitor} for {st['bad_evaluations']} "
                        f"evaluations (best at step {st['best_step']})")
        return True
    return False


def run_steps(s: Session) -> None:
    """Optimizer steps until the budget is spent or early stopping; checkpoints and the kill hook on the way."""
    import torch
    import torch.nn.functional as F

    cfg, st, b = s.cfg, s.state, s.budget
    micro, accum = b.micro_batch_size, cfg.gradient_accumulation_steps
    rows_per_rank = s.network.rows("train") // s.world
    y_all = torch.from_numpy(s.data["y_train"]).to(s.device)
    if s.device.type == "cuda":
        s.network.to_device(s.device, s.dtype)
    pos_weight = torch.tensor(s.pos_weight, device=s.device) if cfg.class_weighting else None
    groups = s.engine.optimizer.param_groups
    scales = [g.get("lr_scale", 1.0) for g in groups]
    clip = [p for g in groups for p in g["params"]] if s.settings.own_clipping else None
    # Where the engine's own forward and backward have nothing to do (workloads/training/engine.py), skip them.
    forward = s.engine.module if s.settings.module_forward else s.engine
    s.engine.train()
    perm_epoch, mine = -1, None
    last_loss_t = None
    last_save = time.monotonic()
    t0, c0 = time.time(), time.process_time()

    def pause() -> None:  # evaluations and checkpoints are not training time
        s.train_seconds += time.time() - t0
        s.train_cpu_seconds += time.process_time() - c0

    while not st["finished"] and st["step"] < b.max_steps:
        epoch, batch = divmod(st["micro_steps"], b.micro_steps_per_epoch)
        if epoch != perm_epoch:
            # The order of a pass depends on the pass alone, so a resumed run sees the batches it would have seen.
            perm = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
            mine, perm_epoch = perm[: rows_per_rank * s.world][s.rank::s.world].to(y_all.device), epoch
        if st["micro_steps"] % accum == 0:
            lr = lr_at(st["step"] + 1, cfg.learning_rate, b.warmup_steps, b.max_steps, cfg.min_lr_fraction)
            for group, scale in zip(groups, scales):
                group["lr"] = lr * scale
        idx = mine[batch * micro:(batch + 1) * micro]
        logits = forward(*s.network.inputs("train", idx, s.device, s.dtype)).float().reshape(-1)
        loss = F.binary_cross_entropy_with_logits(logits, y_all[idx], pos_weight=pos_weight)
        if s.settings.torch_backward:
            (loss / accum if accum > 1 else loss).backward()
        else:
            s.engine.backward(loss)
        if clip is not None and (st["micro_steps"] + 1) % accum == 0:
            # Stage 0 in fp32 leaves the (reduced) gradients on the parameters: one fused torch call clips them.
            torch.nn.utils.clip_grad_norm_(clip, cfg.gradient_clipping, foreach=True)
        s.engine.step()
        last_loss_t = loss.detach()  # read at evaluations only: a float() here would sync the GPU every step
        st["micro_steps"] += 1
        st["samples"] += len(idx) * s.world
        s.samples_now += len(idx) * s.world
        if st["micro_steps"] % accum:
            continue
        st["step"] += 1
        if cfg.step_delay_s:
            time.sleep(cfg.step_delay_s)
        stop = False
        if st["step"] % b.eval_every_steps == 0 or st["step"] == b.max_steps:
            pause()
            stop = record_evaluation(s, float(last_loss_t) if last_loss_t is not None else float("nan"))
            t0, c0 = time.time(), time.process_time()
        if st["step"] % cfg.checkpoint_every_steps == 0 and checkpoint_due(s, last_save):
            pause()
            save_checkpoint(s, tag_for(st["step"]))
            last_save = time.monotonic()
            t0, c0 = time.time(), time.process_time()
        kill_hook(s)
        if stop:
            st["stopped_early"] = True
            break
    pause()


def checkpoint_due(s: Session, last_save: float) -> bool:
    """At most one save per `checkpoint_min_seconds`; every rank agrees (a save is collective)."""
    if s.cfg.checkpoint_min_seconds <= 0:
        return True
    due = time.monotonic() - last_save >= s.cfg.checkpoint_min_seconds
    return due if s.world == 1 else s.all_ok(due)


def kill_hook(s: Session) -> None:
    """The reliability tests' hook: SIGKILL one rank right after step `kill_at_step` (not on a resumed run past it)."""
    cfg, step = s.cfg, s.state["step"]
    if cfg.kill_at_step and step == cfg.kill_at_step and s.resumed_from < cfg.kill_at_step:
        if s.rank == (cfg.kill_rank if cfg.kill_rank >= 0 else s.world - 1):
            print(f"[train rank {s.rank}] test hook: SIGKILL at step {step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def finish(s: Session) -> dict[str, Any]:
    """The final checkpoint, then on rank 0: calibrate, export (with result.json), MLflow and Pipes."""
    cfg, st = s.cfg, s.state
    if not st["finished"]:
        st["finished"] = True
        save_checkpoint(s, tag_for(st["step"], final=True))
    # Under ZeRO-3 gathering the weights is collective: every rank takes part, rank 0 keeps them.
    last_state = s.trained_state() if s.best_state is None or s.settings.zero_stage == 3 else None
    if s.rank != 0:
        return {}
    weights = s.export_state(s.best_state or last_state)
    weights, calibration = calibrate(cfg, s.network, weights, s.data["y_val"])
    s.reporter.info("calibration: " + (f"Platt a={calibration['a']:.4f} b={calibration['b']:.4f}, validation log "
                                       f"loss {calibration['val_log_loss_before']:.4f} -> "
                                       f"{calibration['val_log_loss_after']:.4f}"
                                       if calibration["method"] == "platt" else f"none ({calibration['reason']})"))
    val = [h for h in st["history"] if "val_auc" in h]
    best = max(val, key=lambda h: h["val_auc"]) if val else None
    ckpt_dir = s.ckpt_dir
    report = {
        "epochs": round(st["micro_steps"] / s.budget.micro_steps_per_epoch, 3), "evaluations": len(st["history"]),
        "steps": st["step"], "micro_steps": st["micro_steps"],
        "best_val_auc": best["val_auc"] if best else None,
        "best_val_loss": min((h["val_loss"] for h in val), default=None),
        "best_step": st["best_step"], "stopped_early": bool(st.get("stopped_early")),
        "budget": s.budget.as_dict(), "pos_weight": s.pos_weight,
        "samples_per_second": s.samples_now / s.train_seconds if s.train_seconds > 0 and s.samples_now else None,
        "samples_this_launch": s.samples_now, "train_seconds": s.train_seconds,
        "wall_seconds": time.time() - s.t_start, "resumed_from_step": s.resumed_from,
        "resumed_from_checkpoint": str(ckpt_dir / s.resumed_tag) if s.resumed_tag else None,
        "checkpoint_dir": str(ckpt_dir), "checkpoint_path": str(ckpt_dir / tag_for(st["step"], final=True)),
        "train_cpu_seconds": s.train_cpu_seconds,
        "samples_per_cpu_second": s.samples_now / s.world / s.train_cpu_seconds
        if s.train_cpu_seconds > 0 and s.samples_now else None,
        "mlflow_run_id": s.reporter.run_id, "world_size": s.world, "backend": s.backend, "network": s.network.kind,
        "zero_stage": s.settings.zero_stage, "precision": s.settings.precision,
        "engine": {k: v for k, v in s.engine_record.items() if k != "deepspeed_config"}, "history": st["history"],
        # What this run's exported model says for the validation rows: the served model must say the same.
        "validation_probabilities": probabilities(s.network, weights, calibration)[:VALIDATION_PROBABILITIES].tolist(),
    }
    result = export(cfg, s.network, weights, calibration, st["step"], st["best_step"], report)
    final_metrics = {"best_val_auc": result["best_val_auc"] or float("nan"),
                     "samples_per_second": result["samples_per_second"] or float("nan")}
    if calibration["method"] == "platt":
        final_metrics.update(calibration_a=calibration["a"], calibration_b=calibration["b"],
                             val_log_loss_calibrated=calibration["val_log_loss_after"])
    s.reporter.log_metrics(final_metrics, st["step"])
    s.reporter.end_mlflow("FINISHED")
    s.reporter.report_materialization(result, s.resumed_from)
    return result
