"""Train the tabular MLP with DeepSpeed; a plain program that Dagster launches and observes through Pipes.

It reads a prepared run folder (written by the `<spec>/model_checkpoint` asset, or by you):

    <run>/data.npz             x_train, y_train, x_val, y_val (float32; no pickle)
    <run>/preprocessing.json   how raw rows became those columns (copied next to the exported weights)
    <run>/config.json          a TrainConfig (the fields below) as JSON

Launch it by hand on CPU (two ranks, gloo):

    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 workloads/train.py --config <run>/config.json

or with DeepSpeed's own launcher, overriding any config field on the command line:

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 workloads/train.py --config <run>/config.json --epochs 3

(`python workloads/train.py --config ...` also works: one rank, no launcher.) On GPUs leave DS_ACCELERATOR
unset; `backend: auto` picks nccl. What it does:

- ZeRO stage, micro-batch, gradient accumulation and bf16 come from the config (bf16 "auto" means: on an
  accelerator that supports it). The optimizer is torch's AdamW handed to `deepspeed.initialize`.
- Every `checkpoint_every_steps` optimizer steps it calls `save_checkpoint` into `checkpoint_dir`, then rank 0
  writes `COMPLETE.json` (sha256 and size of every file) into the tag folder. On start it resumes from the
  newest checkpoint whose marker exists and whose files match it; any other is skipped with a warning that
  names it, so a checkpoint cut off mid-write is never taken as the newest.
- Validation AUC and loss after every epoch; early stopping on `monitor` after `early_stopping_patience`
  epochs without improvement; the best weights are the ones exported.
- The result lands atomically in `output_dir`: `model.safetensors`, `preprocessing.json`, `manifest.json`
  (sha256 of each file and the architecture) and `result.json` (metrics, steps, throughput).
- Only global rank 0 opens Dagster Pipes (when launched by Dagster) and MLflow: it reports logs, per-epoch
  metrics, the checkpoint path, the weights digest as data version and the MLflow run id, and logs params
  and metrics with `MlflowClient.log_batch`.

Test hook (documented, used by the reliability tests): `INTELLIGENTOPS_TRAIN_KILL_AT_STEP=K` makes rank
`INTELLIGENTOPS_TRAIN_KILL_RANK` (default: the last rank) SIGKILL itself right after optimizer step K, unless
the run resumed from a step at or beyond K. `INTELLIGENTOPS_TRAIN_STEP_DELAY_S` sleeps after each step.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

TAG_PATTERN = re.compile(r"^global_step(\d+)(\.final)?$")
MARKER = "COMPLETE.json"
BEST = "best.safetensors"


@dataclass
class TrainConfig:
    data: str = ""                          # the .npz with x_train, y_train, x_val, y_val
    output_dir: str = ""                    # where the exported model goes (replaced atomically)
    checkpoint_dir: str = ""                # persists across launches of the same inputs
    checkpoint_subdir: str = ""             # with $INTELLIGENTOPS_CHECKPOINT_DIR set (a pod's mounted volume),
                                            # checkpoints go to $INTELLIGENTOPS_CHECKPOINT_DIR/<checkpoint_subdir>
    preprocessing: str = ""                 # JSON copied beside the weights
    hidden: list[int] = field(default_factory=lambda: [64, 32])
    dropout: float = 0.1
    epochs: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    early_stopping_patience: int = 3
    monitor: str = "auc"                    # "auc" (higher is better) or "loss"
    checkpoint_every_steps: int = 50
    keep_checkpoints: int = 3
    zero_stage: int = 1
    micro_batch_size: int = 128
    gradient_accumulation_steps: int = 1
    bf16: str = "auto"                      # "auto", "true" or "false"
    backend: str = "auto"                   # "gloo", "nccl" or "auto"
    seed: int = 7
    run_name: str = "train"
    mlflow_tracking_uri: str = ""           # empty: no MLflow
    mlflow_experiment_id: str = ""
    mlflow_tags: dict[str, str] = field(default_factory=dict)
    step_delay_s: float = 0.0
    kill_at_step: int = 0                   # test hook, see the module docstring
    kill_rank: int = -1

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> TrainConfig:
        parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
        parser.add_argument("--config", help="JSON file holding TrainConfig fields")
        parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
        for f in dataclasses.fields(cls):
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None,
                                help="JSON value" if f.type not in ("str", str) else None)
        ns = parser.parse_args(argv)
        values: dict[str, Any] = json.loads(Path(ns.config).read_text()) if ns.config else {}
        for f in dataclasses.fields(cls):
            raw = getattr(ns, f.name)
            if raw is not None:
                try:
                    values[f.name] = raw if f.type in ("str", str) else json.loads(raw)
                except json.JSONDecodeError:
                    values[f.name] = raw
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise SystemExit(f"train.py: unknown config key(s) {sorted(unknown)} in {ns.config or 'arguments'}")
        env = os.environ
        values.setdefault("kill_at_step", int(env.get("INTELLIGENTOPS_TRAIN_KILL_AT_STEP", "0") or 0))
        values.setdefault("kill_rank", int(env.get("INTELLIGENTOPS_TRAIN_KILL_RANK", "-1") or -1))
        values.setdefault("step_delay_s", float(env.get("INTELLIGENTOPS_TRAIN_STEP_DELAY_S", "0") or 0))
        cfg = cls(**values)
        if env.get("INTELLIGENTOPS_CHECKPOINT_DIR") and cfg.checkpoint_subdir:
            cfg.checkpoint_dir = str(Path(env["INTELLIGENTOPS_CHECKPOINT_DIR"]) / cfg.checkpoint_subdir)
        for name in ("data", "output_dir", "checkpoint_dir"):
            if not getattr(cfg, name):
                raise SystemExit(f"train.py: config field {name!r} is required (--{name.replace('_', '-')} or --config)")
        if cfg.monitor not in ("auc", "loss"):
            raise SystemExit(f"train.py: monitor must be 'auc' or 'loss', not {cfg.monitor!r}")
        return cfg


# --- small helpers (no torch) ---------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def roc_auc(y: Any, p: Any) -> float:
    """Area under the ROC curve with tied scores averaged (NaN when only one class is present)."""
    import numpy as np

    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    _, inverse, counts = np.unique(p[order], return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = np.empty(len(p))
    ranks[order] = average_rank[inverse]
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def tag_for(step: int, final: bool = False) -> str:
    return f"global_step{step}" + (".final" if final else "")


def complete_checkpoints(checkpoint_dir: Path, world_size: int, warn) -> list[str]:
    """Tags of usable checkpoints, newest first; every other tag folder is named in a warning.

    Usable means: COMPLETE.json exists, parses, was written for this world size, and every file it lists
    is present with the recorded size and sha256.
    """
    if not checkpoint_dir.is_dir():
        return []
    tags = []
    for d in checkpoint_dir.iterdir():
        m = TAG_PATTERN.match(d.name)
        if d.is_dir() and m:
            tags.append((int(m.group(1)), bool(m.group(2)), d))
    usable = []
    for _, _, d in sorted(tags, key=lambda t: (t[0], t[1]), reverse=True):
        problem = checkpoint_problem(d, world_size)
        if problem:
            warn(f"skipping checkpoint {d}: {problem}")
        else:
            usable.append(d.name)
    return usable


def checkpoint_problem(d: Path, world_size: int) -> str | None:
    marker = d / MARKER
    if not marker.exists():
        return f"no {MARKER} (the save was cut off before it finished)"
    try:
        info = json.loads(marker.read_text())
        files = info["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"{MARKER} is unreadable ({exc})"
    if info.get("world_size") != world_size:
        return f"it was written by {info.get('world_size')} ranks and this run has {world_size}"
    for rel, rec in sorted(files.items()):
        p = d / rel
        if not p.is_file():
            return f"file {rel} is missing"
        size = p.stat().st_size
        if size != rec["size"]:
            return f"file {rel} is truncated or altered ({size} bytes, {rec['size']} expected)"
        if sha256_file(p) != rec["sha256"]:
            return f"file {rel} is corrupted (sha256 differs from {MARKER})"
    return None


class Reporter:
    """Logs to stderr on every rank; on global rank 0 also to Dagster Pipes and MLflow."""

    def __init__(self, rank: int, pipes: Any | None) -> None:
        self.rank = rank
        self.pipes = pipes
        self.mlflow = None
        self.run_id: str | None = None

    def _emit(self, level: str, msg: str) -> None:
        print(f"[train rank {self.rank}] {level.upper()}: {msg}", file=sys.stderr, flush=True)
        if self.pipes is not None:
            getattr(self.pipes.log, level)(msg)

    def info(self, msg: str) -> None:
        if self.rank == 0:
            self._emit("info", msg)

    def warning(self, msg: str) -> None:
        if self.rank == 0:
            self._emit("warning", msg)

    def start_mlflow(self, cfg: TrainConfig, params: dict[str, Any], tags: dict[str, str]) -> None:
        if self.rank != 0 or not cfg.mlflow_tracking_uri or not cfg.mlflow_experiment_id:
            return
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunTag

        self.mlflow = MlflowClient(tracking_uri=cfg.mlflow_tracking_uri)
        run = self.mlflow.create_run(cfg.mlflow_experiment_id, run_name=cfg.run_name)
        self.run_id = run.info.run_id
        self.mlflow.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())],
                              tags=[RunTag(k, str(v)) for k, v in sorted({**cfg.mlflow_tags, **tags}.items())])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.mlflow is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and math.isfinite(v)]
        if batch:
            self.mlflow.log_batch(self.run_id, metrics=batch)

    def end_mlflow(self, status: str) -> None:
        if self.mlflow is not None and self.run_id:
            with contextlib.suppress(Exception):
                self.mlflow.set_terminated(self.run_id, status)


# --- training -------------------------------------------------------------------------------------------------


def _setup_single_process_env() -> None:
    """`python train.py` without a launcher: one rank on a free local port."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


def main(argv: list[str] | None = None) -> int:
    cfg = TrainConfig.from_args(argv)
    _setup_single_process_env()
    rank = int(os.environ["RANK"])
    if rank == 0:
        from dagster_pipes import open_dagster_pipes

        pipes_cm: Any = open_dagster_pipes()
    else:
        # Every rank inherits the Pipes environment; only rank 0 may speak, or messages would interleave.
        pipes_cm = contextlib.nullcontext(None)
    with pipes_cm as pipes:
        reporter = Reporter(rank, pipes)
        try:
            train(cfg, reporter)
        except BaseException:
            reporter.end_mlflow("FAILED")
            raise
    return 0


def train(cfg: TrainConfig, reporter: Reporter) -> dict[str, Any]:
    import deepspeed
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from safetensors.torch import load_file, save_file

    from tabular_mlp import build_mlp

    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    deepspeed.init_distributed(dist_backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.seed)
    t_start = time.time()

    with np.load(cfg.data, allow_pickle=False) as npz:
        x_tr, y_tr = npz["x_train"].astype(np.float32), npz["y_train"].astype(np.float32)
        x_va, y_va = npz["x_val"].astype(np.float32), npz["y_val"].astype(np.float32)
    n_rank = len(x_tr) // world
    if n_rank == 0:
        raise ValueError(f"{cfg.data}: {len(x_tr)} training rows cannot be shared by {world} ranks")

    use_bf16 = cfg.bf16 == "true" or cfg.bf16 is True or (
        cfg.bf16 == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    model = build_mlp(x_tr.shape[1], cfg.hidden, cfg.dropout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    ds_config = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "zero_optimization": {"stage": cfg.zero_stage},
        # A torch optimizer with ZeRO: DeepSpeed would otherwise insist on its own compiled CPU Adam.
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": bool(use_bf16)},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    device = engine.device
    dtype = torch.bfloat16 if use_bf16 else torch.float32

    ckpt_dir = Path(cfg.checkpoint_dir)
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)

    def all_ok(flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    # --- resume ---------------------------------------------------------------------------------------------
    candidates = [complete_checkpoints(ckpt_dir, world, reporter.warning) if rank == 0 else None]
    dist.broadcast_object_list(candidates, src=0)
    state: dict[str, Any] = {"micro_steps": 0, "step": 0, "history": [], "best": None, "best_step": 0,
                             "bad_epochs": 0, "finished": False, "samples": 0}
    best_state: dict[str, Any] | None = None
    resumed_from, resumed_tag = 0, None
    initial = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    for tag in candidates[0]:
        err = None
        try:
            path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
            ok = path is not None and "intelligentops" in (client or {})
            err = None if ok else "DeepSpeed found nothing to load"
        except Exception as exc:  # a file that hashes right but does not load is still skipped, not fatal
            ok, err = False, f"{type(exc).__name__}: {exc}"
        if all_ok(ok):
            state = client["intelligentops"]
            resumed_from, resumed_tag = state["step"], tag
            if rank == 0 and (ckpt_dir / tag / BEST).exists():
                best_state = load_file(str(ckpt_dir / tag / BEST))
            break
        reporter.warning(f"skipping checkpoint {ckpt_dir / tag}: it failed to load ({err or 'on another rank'})")
        engine.module.load_state_dict(initial)
    if resumed_tag:
        reporter.info(f"resuming from checkpoint {ckpt_dir / resumed_tag} at step {resumed_from}"
                      + (" (training had finished; exporting it again)" if state["finished"] else ""))
    else:
        reporter.info(f"starting fresh; checkpoints go to {ckpt_dir}")

    params = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("mlflow_tags",)}
    params.update(world_size=world, backend=backend, bf16_enabled=use_bf16, n_features=x_tr.shape[1],
                  train_rows=len(x_tr), val_rows=len(x_va))
    reporter.start_mlflow(cfg, params, {"resumed_from_step": str(resumed_from),
                                        "resumed_from_checkpoint": str(resumed_tag or "")})

    def full_state() -> dict[str, Any]:
        params_ = list(engine.module.parameters())
        ctx = deepspeed.zero.GatheredParameters(params_) if cfg.zero_stage == 3 else contextlib.nullcontext()
        with ctx:
            return {k: v.detach().float().cpu().clone().contiguous() for k, v in engine.module.state_dict().items()}

    def save(tag: str) -> None:
        if rank == 0 and (ckpt_dir / tag).exists():
            shutil.rmtree(ckpt_dir / tag)  # an older save under this name is replaced, never half-mixed
        dist.barrier()
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"intelligentops": state}, save_latest=False)
        dist.barrier()
        if rank == 0:
            d = ckpt_dir / tag
            if best_state is not None:
                save_file(best_state, str(d / BEST))
            files = {p.relative_to(d).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
                     for p in sorted(d.rglob("*")) if p.is_file() and p.name != MARKER}
            write_json_atomic(d / MARKER, {"step": state["step"], "world_size": world, "files": files,
                                           "finished": state["finished"], "time": time.time()})
            prune(ckpt_dir, cfg.keep_checkpoints, world)
            reporter.info(f"checkpoint {d} saved at step {state['step']}")
        dist.barrier()

    def evaluate() -> dict[str, float]:
        engine.eval()
        out: dict[str, float] = {}
        with torch.no_grad():
            if len(x_va):
                logits = torch.cat([engine(torch.from_numpy(x_va[i:i + 8192]).to(device, dtype)).float().squeeze(-1)
                                    for i in range(0, len(x_va), 8192)]).cpu()
                yv = torch.from_numpy(y_va)
                out["val_loss"] = float(F.binary_cross_entropy_with_logits(logits, yv))
                out["val_auc"] = roc_auc(y_va, torch.sigmoid(logits).numpy())
        engine.train()
        return out

    # --- the loop -------------------------------------------------------------------------------------------
    micro, accum = cfg.micro_batch_size, cfg.gradient_accumulation_steps
    micro_per_epoch = math.ceil(n_rank / micro)
    x_all, y_all = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    if device.type == "cuda":
        # The whole shard lives on the GPU: gathering a batch on the host and copying it every step costs
        # more than the step itself for a network this size.
        x_all, y_all = x_all.to(device, dtype), y_all.to(device)
    engine.train()
    train_seconds, samples_now = 0.0, 0
    stopped_early = False
    last_loss = float("nan")
    last_loss_t = None
    while not state["finished"] and len(state["history"]) < cfg.epochs:
        epoch = len(state["history"])
        perm = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        mine = perm[: n_rank * world][rank::world].to(x_all.device)
        t0 = time.time()
        for b in range(state["micro_steps"] - epoch * micro_per_epoch, micro_per_epoch):
            idx = mine[b * micro:(b + 1) * micro]
            logits = engine(x_all[idx].to(device, dtype)).float().squeeze(-1)
            loss = F.binary_cross_entropy_with_logits(logits, y_all[idx].to(device))
            engine.backward(loss)
            engine.step()
            last_loss_t = loss.detach()  # read once per epoch: a float() here would sync the GPU every step
            state["micro_steps"] += 1
            state["samples"] += len(idx) * world
            samples_now += len(idx) * world
            if state["micro_steps"] % accum:
                continue
            state["step"] += 1
            if cfg.step_delay_s:
                time.sleep(cfg.step_delay_s)
            if state["step"] % cfg.checkpoint_every_steps == 0:
                train_seconds += time.time() - t0
                save(tag_for(state["step"]))
                t0 = time.time()
            if cfg.kill_at_step and state["step"] == cfg.kill_at_step and resumed_from < cfg.kill_at_step:
                if rank == (cfg.kill_rank if cfg.kill_rank >= 0 else world - 1):
                    print(f"[train rank {rank}] test hook: SIGKILL at step {state['step']}", file=sys.stderr,
                          flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
        train_seconds += time.time() - t0
        last_loss = float(last_loss_t) if last_loss_t is not None else float("nan")
        metrics = {"train_loss": last_loss, **evaluate()}
        if cfg.monitor == "auc" and math.isfinite(metrics.get("val_auc", float("nan"))):
            score = metrics["val_auc"]
        else:
            score = -metrics.get("val_loss", last_loss)
        improved = state["best"] is None or score > state["best"]
        if improved:
            state["best"], state["best_step"], state["bad_epochs"] = score, state["step"], 0
            snapshot = full_state()  # collective under ZeRO-3, so every rank takes it
            if rank == 0:
                best_state = snapshot
        else:
            state["bad_epochs"] += 1
        state["history"].append({"epoch": epoch + 1, "step": state["step"], **metrics})
        reporter.log_metrics({**metrics, "epoch": epoch + 1}, state["step"])
        reporter.info(f"epoch {epoch + 1}/{cfg.epochs} step {state['step']}: " +
                      ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()) + (" (best)" if improved else ""))
        if state["bad_epochs"] >= cfg.early_stopping_patience:
            stopped_early = True
            reporter.info(f"early stopping: no better {cfg.monitor} for {state['bad_epochs']} epochs")
            break
    if not state["finished"]:
        state["finished"] = True
        state["stopped_early"] = stopped_early
        save(tag_for(state["step"], final=True))

    result: dict[str, Any] = {}
    last_state = full_state() if best_state is None or cfg.zero_stage == 3 else None
    if rank == 0:
        result = export(cfg, state, best_state or last_state, x_tr.shape[1], save_file)
        val = [h for h in state["history"] if "val_auc" in h]
        best_epoch = max(val, key=lambda h: h["val_auc"]) if val else None
        result.update({
            "epochs": len(state["history"]), "steps": state["step"], "micro_steps": state["micro_steps"],
            "best_val_auc": best_epoch["val_auc"] if best_epoch else None,
            "best_val_loss": min((h["val_loss"] for h in val), default=None),
            "best_step": state["best_step"], "stopped_early": bool(state.get("stopped_early")),
            "samples_per_second": samples_now / train_seconds if train_seconds > 0 and samples_now else None,
            "samples_this_launch": samples_now, "train_seconds": train_seconds,
            "wall_seconds": time.time() - t_start, "resumed_from_step": resumed_from,
            "resumed_from_checkpoint": str(ckpt_dir / resumed_tag) if resumed_tag else None,
            "checkpoint_dir": str(ckpt_dir), "checkpoint_path": str(ckpt_dir / tag_for(state["step"], final=True)),
            "mlflow_run_id": reporter.run_id, "world_size": world, "backend": backend, "bf16": use_bf16,
            "zero_stage": cfg.zero_stage, "history": state["history"],
        })
        write_json_atomic(Path(cfg.output_dir) / "result.json", result)
        reporter.log_metrics({"best_val_auc": result["best_val_auc"] or float("nan"),
                              "samples_per_second": result["samples_per_second"] or float("nan")}, state["step"])
        reporter.end_mlflow("FINISHED")
        if reporter.pipes is not None:
            reporter.pipes.report_asset_materialization(
                data_version=result["weights_sha256"][:16],
                metadata={
                    "epochs": result["epochs"], "steps": result["steps"],
                    "best_val_auc": result["best_val_auc"] if result["best_val_auc"] is not None else "n/a",
                    "samples_per_second": round(result["samples_per_second"] or 0.0, 1),
                    "resumed_from_step": resumed_from,
                    "checkpoint_path": {"raw_value": result["checkpoint_path"], "type": "path"},
                    "weights_sha256": result["weights_sha256"],
                    "mlflow_run_id": reporter.run_id or "none",
                })
    dist.barrier()
    return result


def prune(ckpt_dir: Path, keep: int, world: int) -> None:
    """Keep the `keep` newest complete checkpoints; drop older ones (complete or not)."""
    tags = []
    for d in ckpt_dir.iterdir():
        m = TAG_PATTERN.match(d.name)
        if d.is_dir() and m:
            tags.append(((int(m.group(1)), bool(m.group(2))), d))
    complete = [k for k, d in tags if (d / MARKER).exists()]
    if len(complete) <= keep:
        return
    cutoff = sorted(complete, reverse=True)[keep - 1]
    for k, d in tags:
        if k < cutoff:
            shutil.rmtree(d, ignore_errors=True)


def export(cfg: TrainConfig, state: dict[str, Any], weights: dict[str, Any], in_features: int,
           save_file) -> dict[str, Any]:
    """model.safetensors, preprocessing.json and manifest.json, swapped into output_dir in one rename."""
    out = Path(cfg.output_dir)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    architecture = {"kind": "mlp", "in_features": in_features, "hidden": list(cfg.hidden), "dropout": cfg.dropout}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"architecture": json.dumps(architecture)})
    if cfg.preprocessing:
        shutil.copyfile(cfg.preprocessing, tmp / "preprocessing.json")
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
    manifest = {"files": files, "architecture": architecture, "steps": state["step"],
                "best_step": state["best_step"], "format": "safetensors"}
    write_json_atomic(tmp / "manifest.json", manifest)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return {"output_dir": str(out), "weights_path": str(out / "model.safetensors"),
            "weights_sha256": files["model.safetensors"], "manifest_sha256": sha256_file(out / "manifest.json")}


if __name__ == "__main__":
    sys.exit(main())
