"""Train the tabular MLP with DeepSpeed; a plain program that Dagster launches and observes through Pipes.

It reads a prepared run folder (written by the `<spec>/model_checkpoint` asset, or by you):

    <run>/data.npz             x_train, y_train, x_val, y_val (float32; no pickle)
    <run>/preprocessing.json   how raw rows became those columns (copied next to the exported weights)
    <run>/config.json          a TrainConfig (the fields below) as JSON

Launch it by hand on CPU (two ranks, gloo):

    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 workloads/train.py --config <run>/config.json

or with DeepSpeed's own launcher, overriding any config field on the command line:

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 workloads/train.py --config <run>/config.json --max-steps 300

(`python workloads/train.py --config ...` also works: one rank, no launcher.) On GPUs leave DS_ACCELERATOR
unset; `backend: auto` picks nccl. What it does:

- The budget is counted in optimizer steps and fitted to the data (`plan_budget`): the micro-batch is at most
  `max_batch_fraction` of a rank's training rows, `max_steps` defaults to about 40 passes over the rows within
  [500, 5000] steps, the validation split is scored every `eval_every_steps`, and training stops early once
  `early_stopping_patience` evaluations in a row brought no better `monitor` (validation log loss by default:
  on a few hundred validation rows it is a steadier guide than AUC) and at least `min_steps` ran.
  `epochs`, when set, caps the passes over the training rows. The best weights are the ones exported.
- The learning rate warms up linearly over `warmup_fraction` of the budget, then decays along a cosine to
  `min_lr_fraction` of `learning_rate` at `max_steps`. It is a function of the step alone, so a resumed run
  continues on the same curve.
- With `class_weighting` (the default) the loss weighs each positive by sqrt(negatives/positives) of the
  training rows (`pos_weight`), so a 3% positive class is not drowned out.
- With `calibrate` (the default) a Platt scaling `sigmoid(a*z + b)` is fitted on the validation logits at
  export and folded into the last Linear layer (`w' = a*w`, `b' = a*b0 + b`): the exported network's sigmoid
  is the calibrated probability, so whatever loads `model.safetensors` needs no change. The fit is recorded in
  `result.json` and `manifest.json` (`calibration`).
- ZeRO stage, micro-batch, gradient accumulation and bf16 come from the config (bf16 "auto" means: on an
  accelerator that supports it). The optimizer is torch's AdamW handed to `deepspeed.initialize`.
- Every `checkpoint_every_steps` optimizer steps it calls `save_checkpoint` into `checkpoint_dir`, then rank 0
  writes `COMPLETE.json` (sha256 and size of every file) into the tag folder. On start it resumes from the
  newest checkpoint whose marker exists and whose files match it; any other is skipped with a warning that
  names it, so a checkpoint cut off mid-write is never taken as the newest.
- The result lands atomically in `output_dir`: `model.safetensors`, `preprocessing.json`, `manifest.json`
  (sha256 of each file, the architecture and the calibration) and `result.json` (metrics, steps, budget,
  calibration, throughput).
- Only global rank 0 opens Dagster Pipes (when launched by Dagster) and MLflow: it reports logs, metrics per
  evaluation, the checkpoint path, the weights digest as data version and the MLflow run id, and logs params
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
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    # The budget, in optimizer steps; None: fitted to the number of training rows (see plan_budget).
    max_steps: int | None = None
    min_steps: int | None = None
    eval_every_steps: int | None = None
    epochs: int | None = None               # optional cap on passes over the training rows
    early_stopping_patience: int = 10       # evaluations without a better `monitor`
    monitor: str = "loss"                   # "loss" (validation log loss) or "auc" (higher is better)
    warmup_fraction: float = 0.05           # of max_steps, linear from 0 to learning_rate
    min_lr_fraction: float = 0.05           # the cosine ends at learning_rate * min_lr_fraction
    max_batch_fraction: float = 0.05        # micro-batch at most this share of one rank's training rows
    class_weighting: bool = True            # pos_weight = sqrt(negatives / positives) in the loss
    calibrate: bool = True                  # Platt scaling on the validation split, folded into the last layer
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
        for name in ("max_steps", "min_steps", "eval_every_steps", "epochs"):
            value = getattr(cfg, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise SystemExit(f"train.py: {name} must be a whole number of at least 1 or null, not {value!r}")
        for name, low, high in (("warmup_fraction", 0.0, 1.0), ("min_lr_fraction", 0.0, 1.0),
                                ("max_batch_fraction", 1e-9, 1.0)):
            if not low <= float(getattr(cfg, name)) <= high:
                raise SystemExit(f"train.py: {name} must lie in [{low:g}, {high:g}], not {getattr(cfg, name)!r}")
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


# --- the budget, the schedule, class weights and calibration (plain functions, tested on their own) ----------

# Bounds of the automatic budget: enough updates for a few hundred rows, bounded time for a few hundred thousand.
AUTO_PASSES = 40
AUTO_MIN_MAX_STEPS, AUTO_MAX_MAX_STEPS = 500, 5000
AUTO_EVALUATIONS = 50
MIN_MICRO_BATCH = 8


@dataclass(frozen=True)
class Budget:
    """What a run will do, resolved from the config and the number of training rows."""

    micro_batch_size: int                   # rows per rank per micro-step
    micro_steps_per_epoch: int              # micro-steps per rank for one pass over the training rows
    max_steps: int
    min_steps: int
    eval_every_steps: int
    warmup_steps: int

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def plan_budget(cfg: TrainConfig, train_rows: int, world: int = 1) -> Budget:
    """Steps scale with rows within bounds; every setting the config names wins over the automatic one."""
    rows_per_rank = train_rows // world
    if rows_per_rank < 1:
        raise ValueError(f"{cfg.data}: {train_rows} training rows cannot be shared by {world} ranks")
    # Small data gets small batches, so that one pass is still many updates rather than two or three.
    cap = max(MIN_MICRO_BATCH, int(rows_per_rank * cfg.max_batch_fraction))
    micro = max(1, min(cfg.micro_batch_size, cap, rows_per_rank))
    micro_per_epoch = math.ceil(rows_per_rank / micro)
    steps_per_epoch = max(1, micro_per_epoch // cfg.gradient_accumulation_steps)
    if cfg.max_steps is not None:
        max_steps = cfg.max_steps
    else:
        max_steps = min(max(AUTO_PASSES * steps_per_epoch, AUTO_MIN_MAX_STEPS), AUTO_MAX_MAX_STEPS)
    if cfg.epochs is not None:
        max_steps = min(max_steps, max(1, (cfg.epochs * micro_per_epoch) // cfg.gradient_accumulation_steps))
    if cfg.min_steps is not None:
        min_steps = min(cfg.min_steps, max_steps)
    else:
        min_steps = min(max_steps, max(max_steps // 5, 3 * steps_per_epoch))
    if cfg.eval_every_steps is not None:
        eval_every = cfg.eval_every_steps
    else:
        eval_every = max(5, min(steps_per_epoch, max_steps // AUTO_EVALUATIONS))
    eval_every = max(1, min(eval_every, max_steps))
    warmup = int(round(cfg.warmup_fraction * max_steps))
    return Budget(micro_batch_size=micro, micro_steps_per_epoch=micro_per_epoch, max_steps=max_steps,
                  min_steps=min_steps, eval_every_steps=eval_every, warmup_steps=warmup)


def lr_at(step: int, base_lr: float, warmup_steps: int, max_steps: int, min_lr_fraction: float) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warmup, then cosine down to the floor."""
    if warmup_steps > 0 and step <= warmup_steps:
        return base_lr * step / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    floor = base_lr * min_lr_fraction
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def positive_weight(y: Any) -> float:
    """sqrt(negatives / positives) of the labels (1.0 where a class is absent: nothing to balance).

    The square root goes half way to balancing the classes (on a log scale): a 3% positive class weighs
    5.7 times a negative rather than 32 times. Full balancing cost test AUC on the rare-positive benchmark
    tables (HMDA: 0.801 against 0.805), and calibration undoes the shift in probabilities either way.
    """
    import numpy as np

    y = np.asarray(y)
    n_pos = float((y > 0.5).sum())
    n_neg = float(len(y) - n_pos)
    return math.sqrt(n_neg / n_pos) if n_pos > 0 and n_neg > 0 else 1.0


def fit_platt(logits: Any, y: Any, iterations: int = 100) -> tuple[float, float]:
    """(a, b) minimizing the log loss of sigmoid(a * logit + b) on the labels (Newton's method).

    Labels are Platt's smoothed targets ((n+ + 1)/(n+ + 2) and 1/(n- + 2)), which keep a separable validation
    split from driving `a` to infinity.
    """
    import numpy as np

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64) > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("Platt scaling needs both classes in the validation split")
    t = np.where(y, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    a, b = 1.0, float(np.log((n_pos + 1.0) / (n_neg + 1.0)))
    x = np.stack([z, np.ones_like(z)], axis=1)

    def loss(a_: float, b_: float) -> float:
        s = a_ * z + b_
        return float(np.sum(np.logaddexp(0.0, s) - t * s))

    current = loss(a, b)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(a * z + b)))
        grad = x.T @ (p - t)
        hess = (x * (p * (1 - p))[:, None]).T @ x + 1e-9 * np.eye(2)
        da, db = np.linalg.solve(hess, grad)
        step = 1.0
        while step > 1e-8:  # backtracking keeps every Newton step a descent step
            na, nb = a - step * da, b - step * db
            new = loss(na, nb)
            if new <= current:
                break
            step /= 2
        else:
            break
        converged = abs(current - new) < 1e-12 * max(1.0, abs(current))
        a, b, current = na, nb, new
        if converged:
            break
    return float(a), float(b)


def last_linear(hidden: list[int]) -> str:
    """State-dict prefix of build_mlp's output layer (Linear, ReLU, Dropout per hidden layer, then Linear)."""
    return str(3 * len(hidden))


def fold_platt(weights: dict[str, Any], hidden: list[int], a: float, b: float) -> dict[str, Any]:
    """Weights whose logit is a * logit + b: the output layer scaled by a, its bias moved by b."""
    name = last_linear(hidden)
    folded = dict(weights)
    w, b0 = weights[f"{name}.weight"], weights[f"{name}.bias"]
    folded[f"{name}.weight"] = (w.double() * a).to(w.dtype).contiguous()
    folded[f"{name}.bias"] = (b0.double() * a + b).to(b0.dtype).contiguous()
    return folded


def network_logits(weights: dict[str, Any], in_features: int, hidden: list[int], x: Any) -> Any:
    """The network's logits for the rows of x (numpy), on CPU in float32, in eval mode (no dropout)."""
    import numpy as np
    import torch

    from tabular_mlp import build_mlp

    net = build_mlp(in_features, hidden, 0.0)
    net.load_state_dict(weights)
    net.eval()
    with torch.inference_mode():
        out = [net(torch.from_numpy(np.ascontiguousarray(x[i:i + 8192], dtype=np.float32))).squeeze(-1).double()
               for i in range(0, len(x), 8192)]
    return torch.cat(out).numpy() if out else np.zeros(0)


def log_loss(y: Any, p: Any) -> float:
    import numpy as np

    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    y = np.asarray(y, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def calibrate(cfg: TrainConfig, weights: dict[str, Any], in_features: int, x_val: Any,
              y_val: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Platt-scaled weights and the record of the fit (or the unchanged weights and why not)."""
    import numpy as np

    if not cfg.calibrate:
        return weights, {"method": "none", "reason": "calibrate is off"}
    y = np.asarray(y_val)
    if len(y) == 0 or y.min() == y.max():
        return weights, {"method": "none", "reason": "the validation split lacks one of the classes"}
    z = network_logits(weights, in_features, cfg.hidden, x_val)
    a, b = fit_platt(z, y)
    if a <= 0:
        # Folding a negative slope would turn the network's ranking upside down on the strength of the
        # validation rows alone; a network that ranks backwards is left as it is, for the gates to see.
        return weights, {"method": "none", "reason": f"the fitted slope a={a:.4f} is not positive: the network's "
                         "scores do not rise with the positive rate on the validation split", "a": a, "b": b}
    before = 1.0 / (1.0 + np.exp(-z))
    after = 1.0 / (1.0 + np.exp(-(a * z + b)))
    record = {"method": "platt", "fitted_on": "validation", "rows": int(len(y)), "a": a, "b": b,
              "folded_into": f"{last_linear(cfg.hidden)} (the output Linear layer)",
              "val_log_loss_before": log_loss(y, before), "val_log_loss_after": log_loss(y, after),
              "val_mean_probability_before": float(before.mean()),
              "val_mean_probability_after": float(after.mean()), "val_positive_rate": float(y.mean())}
    return fold_platt(weights, cfg.hidden, a, b), record


# --- training: start, resume, steps, finish -------------------------------------------------------------------


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
    bf16: bool
    data: dict[str, Any]                    # x_train, y_train, x_val, y_val as numpy arrays
    budget: Budget
    pos_weight: float
    ckpt_dir: Path
    state: dict[str, Any] = field(default_factory=fresh_state)
    best_state: dict[str, Any] | None = None  # rank 0 only: weights of the best evaluation so far
    resumed_from: int = 0
    resumed_tag: str | None = None
    t_start: float = field(default_factory=time.time)
    train_seconds: float = 0.0
    samples_now: int = 0

    @property
    def device(self) -> Any:
        return self.engine.device

    @property
    def dtype(self) -> Any:
        import torch

        return torch.bfloat16 if self.bf16 else torch.float32

    def all_ok(self, flag: bool) -> bool:
        """True on every rank only when it is true on every rank."""
        import torch
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def full_state(self) -> dict[str, Any]:
        """Every parameter, gathered (collective under ZeRO-3, so every rank calls it), on the CPU in fp32."""
        import deepspeed

        module = self.engine.module
        ctx = (deepspeed.zero.GatheredParameters(list(module.parameters())) if self.cfg.zero_stage == 3
               else contextlib.nullcontext())
        with ctx:
            return {k: v.detach().float().cpu().clone().contiguous() for k, v in module.state_dict().items()}


def train(cfg: TrainConfig, reporter: Reporter) -> dict[str, Any]:
    """The whole run: start the engine, resume, take the steps the budget allows, export on rank 0."""
    import torch.distributed as dist

    session = start(cfg, reporter)
    resume(session)
    params = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("mlflow_tags",)}
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

    from tabular_mlp import build_mlp

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

    use_bf16 = cfg.bf16 == "true" or cfg.bf16 is True or (
        cfg.bf16 == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
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


def resume(s: Session) -> None:
    """Load the newest checkpoint that every rank can load; any other is named in a warning and skipped."""
    import torch.distributed as dist
    from safetensors.torch import load_file

    candidates = [complete_checkpoints(s.ckpt_dir, s.world, s.reporter.warning) if s.rank == 0 else None]
    dist.broadcast_object_list(candidates, src=0)
    initial = {k: v.detach().clone() for k, v in s.engine.module.state_dict().items()}
    for tag in candidates[0]:
        err = None
        try:
            path, client = s.engine.load_checkpoint(str(s.ckpt_dir), tag=tag)
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
        s.engine.module.load_state_dict(initial)
    if s.resumed_tag:
        s.reporter.info(f"resuming from checkpoint {s.ckpt_dir / s.resumed_tag} at step {s.resumed_from}"
                        + (" (training had finished; exporting it again)" if s.state["finished"] else ""))
    else:
        s.reporter.info(f"starting fresh; checkpoints go to {s.ckpt_dir}")


def save_checkpoint(s: Session, tag: str) -> None:
    """DeepSpeed's checkpoint plus the best weights, then (rank 0) the COMPLETE.json marker that vouches for them."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    if s.rank == 0 and (s.ckpt_dir / tag).exists():
        shutil.rmtree(s.ckpt_dir / tag)  # an older save under this name is replaced, never half-mixed
    dist.barrier()
    s.engine.save_checkpoint(str(s.ckpt_dir), tag=tag, client_state={"intelligentops": s.state}, save_latest=False)
    dist.barrier()
    if s.rank == 0:
        d = s.ckpt_dir / tag
        if s.best_state is not None:
            save_file(s.best_state, str(d / BEST))
        files = {p.relative_to(d).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
                 for p in sorted(d.rglob("*")) if p.is_file() and p.name != MARKER}
        write_json_atomic(d / MARKER, {"step": s.state["step"], "world_size": s.world, "files": files,
                                       "finished": s.state["finished"], "time": time.time()})
        prune(s.ckpt_dir, s.cfg.keep_checkpoints, s.world)
        s.reporter.info(f"checkpoint {d} saved at step {s.state['step']}")
    dist.barrier()


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
        if cfg.kill_at_step and st["step"] == cfg.kill_at_step and s.resumed_from < cfg.kill_at_step:
            if s.rank == (cfg.kill_rank if cfg.kill_rank >= 0 else s.world - 1):
                print(f"[train rank {s.rank}] test hook: SIGKILL at step {st['step']}", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        if stop:
            st["stopped_early"] = True
            break
    s.train_seconds += time.time() - t0


def finish(s: Session) -> dict[str, Any]:
    """The final checkpoint, then on rank 0: calibrate, export, result.json, MLflow and Pipes."""
    from safetensors.torch import save_file

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
    result = export(cfg, st, weights, in_features, save_file, calibration)
    val = [h for h in st["history"] if "val_auc" in h]
    best = max(val, key=lambda h: h["val_auc"]) if val else None
    ckpt_dir = s.ckpt_dir
    result.update({
        "epochs": round(st["micro_steps"] / s.budget.micro_steps_per_epoch, 3), "evaluations": len(st["history"]),
        "steps": st["step"], "micro_steps": st["micro_steps"],
        "best_val_auc": best["val_auc"] if best else None,
        "best_val_loss": min((h["val_loss"] for h in val), default=None),
        "best_step": st["best_step"], "stopped_early": bool(st.get("stopped_early")),
        "budget": s.budget.as_dict(), "pos_weight": s.pos_weight, "calibration": calibration,
        "samples_per_second": s.samples_now / s.train_seconds if s.train_seconds > 0 and s.samples_now else None,
        "samples_this_launch": s.samples_now, "train_seconds": s.train_seconds,
        "wall_seconds": time.time() - s.t_start, "resumed_from_step": s.resumed_from,
        "resumed_from_checkpoint": str(ckpt_dir / s.resumed_tag) if s.resumed_tag else None,
        "checkpoint_dir": str(ckpt_dir), "checkpoint_path": str(ckpt_dir / tag_for(st["step"], final=True)),
        "mlflow_run_id": s.reporter.run_id, "world_size": s.world, "backend": s.backend, "bf16": s.bf16,
        "zero_stage": cfg.zero_stage, "history": st["history"],
    })
    write_json_atomic(Path(cfg.output_dir) / "result.json", result)
    final_metrics = {"best_val_auc": result["best_val_auc"] or float("nan"),
                     "samples_per_second": result["samples_per_second"] or float("nan")}
    if calibration["method"] == "platt":
        final_metrics.update(calibration_a=calibration["a"], calibration_b=calibration["b"],
                             val_log_loss_calibrated=calibration["val_log_loss_after"])
    s.reporter.log_metrics(final_metrics, st["step"])
    s.reporter.end_mlflow("FINISHED")
    if s.reporter.pipes is not None:
        s.reporter.pipes.report_asset_materialization(
            data_version=result["weights_sha256"][:16],
            metadata={
                "epochs": result["epochs"], "steps": result["steps"], "evaluations": result["evaluations"],
                "best_val_auc": result["best_val_auc"] if result["best_val_auc"] is not None else "n/a",
                "samples_per_second": round(result["samples_per_second"] or 0.0, 1),
                "resumed_from_step": s.resumed_from,
                "checkpoint_path": {"raw_value": result["checkpoint_path"], "type": "path"},
                "weights_sha256": result["weights_sha256"],
                "calibration": calibration["method"],
                "mlflow_run_id": s.reporter.run_id or "none",
            })
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
           save_file, calibration: dict[str, Any] | None = None) -> dict[str, Any]:
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
                "best_step": state["best_step"], "format": "safetensors",
                "calibration": calibration or {"method": "none", "reason": "not requested"}}
    write_json_atomic(tmp / "manifest.json", manifest)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return {"output_dir": str(out), "weights_path": str(out / "model.safetensors"),
            "weights_sha256": files["model.safetensors"], "manifest_sha256": sha256_file(out / "manifest.json")}


if __name__ == "__main__":
    sys.exit(main())
