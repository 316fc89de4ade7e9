"""The training loop: start the engine, resume, take the steps the budget allows, finish and export on rank 0.

Every rank runs the same steps on its own shard of each pass (the order of a pass depends on the pass alone, so a
resumed run sees the batches it would have seen). The validation split is scored every `eval_every_steps` on
every rank (same numbers everywhere); the best weights are kept on rank 0 and are the ones exported.
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
from workloads.training.calibration import calibrate
from workloads.training.checkpoints import resume, save_checkpoint, tag_for
from workloads.training.export import export
from workloads.training.metrics import roc_auc
from workloads.training.reporter import Reporter
from workloads.training.schedule import lr_at, plan_budget, positive_weight
from workloads.training.session import Session


def train(cfg: TrainConfig, reporter: Reporter) -> dict[str, Any]:
    """The whole run: start the engine, resume, take the steps the budget allows, export on rank 0."""
    import torch.distributed as dist

    session = start(cfg, reporter)
    resume(session)
    params = cfg.model_dump(mode="json", exclude={"mlflow_tags"})
    params.update(world_size=session.world, backend=session.backend, bf16_enabled=session.bf16,
                  n_features=session.data["x_train"].shape[1], train_rows=len(session.data["x_train"]),
                  val_rows=len(session.data["x_val"]), pos_weight=session.pos_weight,
                  **{f"budget_{k}": v for k, v in session.budget.as_dict().items()})
    reporter.start_mlflow(cfg, params, {"resumed_from_step": str(session.resumed_from),
                                        "resumed_from_checkpoint": str(session.resumed_tag or "")})
    run_steps(session)
    result = finish(session)
    dist.barrier()
    return result


def start(cfg: TrainConfig, reporter: Reporter) -> Session:
    """Join the process group, read the data, plan the budget and build the DeepSpeed engine."""
    import deepspeed
    import numpy as np
    import torch
    import torch.distributed as dist

    from workloads.tabular_mlp import build_mlp

    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    deepspeed.init_distributed(dist_backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.seed)
    t_start = time.time()
    with np.load(cfg.data, allow_pickle=False) as npz:
        data = {"x_train": npz["x_train"].astype(np.float32), "y_train": npz["y_train"].astype(np.float32),
                "x_val": npz["x_val"].astype(np.float32), "y_val": npz["y_val"].astype(np.float32)}
    budget = plan_budget(cfg, len(data["x_train"]), world)
    pos_weight = positive_weight(data["y_train"]) if cfg.class_weighting else 1.0

    use_bf16 = cfg.bf16 is True or (cfg.bf16 == "auto" and torch.cuda.is_available()
                                    and torch.cuda.is_bf16_supported())
    model = build_mlp(data["x_train"].shape[1], cfg.hidden, cfg.dropout)
    # The schedule sets the rate before every step; this one is only the optimizer's initial value.
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    ds_config = {
        "train_micro_batch_size_per_gpu": budget.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "zero_optimization": {"stage": cfg.zero_stage},
        # A torch optimizer with ZeRO: DeepSpeed would otherwise insist on its own compiled CPU Adam.
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": bool(use_bf16)},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    ckpt_dir = Path(cfg.checkpoint_dir)
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    reporter.info(f"{len(data['x_train'])} training rows on {world} rank(s): micro-batch {budget.micro_batch_size}, "
                  f"{budget.min_steps}-{budget.max_steps} steps, evaluation every {budget.eval_every_steps}, "
                  f"warmup {budget.warmup_steps}, pos_weight {pos_weight:.3f}")
    return Session(cfg=cfg, reporter=reporter, engine=engine, rank=rank, world=world, backend=backend,
                   bf16=bool(use_bf16), data=data, budget=budget, pos_weight=pos_weight, ckpt_dir=ckpt_dir,
                   t_start=t_start)


def validation_metrics(s: Session) -> dict[str, float]:
    """Unweighted log loss and AUC of the current weights on the validation rows (every rank, same numbers)."""
    import torch
    import torch.nn.functional as F

    x_va, y_va = s.data["x_val"], s.data["y_val"]
    out: dict[str, float] = {}
    if not len(x_va):
        return out
    s.engine.eval()
    with torch.no_grad():
        logits = torch.cat([s.engine(torch.from_numpy(x_va[i:i + 8192]).to(s.device, s.dtype)).float().squeeze(-1)
                            for i in range(0, len(x_va), 8192)]).cpu()
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
        snapshot = s.full_state()  # collective under ZeRO-3, so every rank takes it
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
    rows_per_rank = len(s.data["x_train"]) // s.world
    x_all, y_all = torch.from_numpy(s.data["x_train"]), torch.from_numpy(s.data["y_train"])
    if s.device.type == "cuda":
        # The whole shard lives on the GPU: gathering a batch on the host and copying it every step costs
        # more than the step itself for a network this size.
        x_all, y_all = x_all.to(s.device, s.dtype), y_all.to(s.device)
    pos_weight = torch.tensor(s.pos_weight, device=s.device) if cfg.class_weighting else None
    s.engine.train()
    perm_epoch, mine = -1, None
    last_loss_t = None
    t0 = time.time()
    while not st["finished"] and st["step"] < b.max_steps:
        epoch, batch = divmod(st["micro_steps"], b.micro_steps_per_epoch)
        if epoch != perm_epoch:
            # The order of a pass depends on the pass alone, so a resumed run sees the batches it would have seen.
            perm = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
            mine, perm_epoch = perm[: rows_per_rank * s.world][s.rank::s.world].to(x_all.device), epoch
        if st["micro_steps"] % accum == 0:
            lr = lr_at(st["step"] + 1, cfg.learning_rate, b.warmup_steps, b.max_steps, cfg.min_lr_fraction)
            for group in s.engine.optimizer.param_groups:
                group["lr"] = lr
        idx = mine[batch * micro:(batch + 1) * micro]
        logits = s.engine(x_all[idx].to(s.device, s.dtype)).float().squeeze(-1)
        loss = F.binary_cross_entropy_with_logits(logits, y_all[idx].to(s.device), pos_weight=pos_weight)
        s.engine.backward(loss)
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
            s.train_seconds += time.time() - t0
            stop = record_evaluation(s, float(last_loss_t) if last_loss_t is not None else float("nan"))
            t0 = time.time()
        if st["step"] % cfg.checkpoint_every_steps == 0:
            s.train_seconds += time.time() - t0
            save_checkpoint(s, tag_for(st["step"]))
            t0 = time.time()
        kill_hook(s)
        if stop:
            st["stopped_early"] = True
            break
    s.train_seconds += time.time() - t0


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
    last_state = s.full_state() if s.best_state is None or cfg.zero_stage == 3 else None
    if s.rank != 0:
        return {}
    in_features = s.data["x_train"].shape[1]
    weights, calibration = calibrate(cfg, s.best_state or last_state, in_features, s.data["x_val"], s.data["y_val"])
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
        "mlflow_run_id": s.reporter.run_id, "world_size": s.world, "backend": s.backend, "bf16": s.bf16,
        "zero_stage": cfg.zero_stage, "history": st["history"],
    }
    result = export(cfg, weights, in_features, calibration, st["step"], st["best_step"], report)
    final_metrics = {"best_val_auc": result["best_val_auc"] or float("nan"),
                     "samples_per_second": result["samples_per_second"] or float("nan")}
    if calibration["method"] == "platt":
        final_metrics.update(calibration_a=calibration["a"], calibration_b=calibration["b"],
                             val_log_loss_calibrated=calibration["val_log_loss_after"])
    s.reporter.log_metrics(final_metrics, st["step"])
    s.reporter.end_mlflow("FINISHED")
    s.reporter.report_materialization(result, s.resumed_from)
    return result
