"""Training throughput: the DeepSpeed workload against a plain PyTorch loop of the same model and batches.

    DS_ACCELERATOR=cpu PYTHONPATH=. .venv/bin/python -m benchmarks.training_throughput [--repeats 3]
        [--skip-text] [--skip-materialization]

(from the repository root). Side by side, in one run, each side in a fresh process with one intra-op thread (as
torchrun gives every rank), alternating plain / workload `--repeats` times:

- `mlp`: MLP 40 -> 64 -> 32 -> 1 on 18,000 synthetic rows, micro-batch 128, 3 passes; the workload with its
  defaults (zero_stage and precision "auto": stage 0, fp32 here) and, for the record, with the old default
  ZeRO-1;
- `text_finetune`: all-MiniLM-L6-v2 with its top 2 layers training plus an MLP head, on 2,400 synthetic job titles,
  micro-batch 32, one pass; the plain loop builds the very module, tokenization and batches the workload uses
  (workloads/training/text.py) and steps it with the same AdamW groups and clipping;
- one full `credit_scoring/model_checkpoint` materialization (wall time).

Samples per second count training steps only (no start-up, evaluation or checkpoint writes), two ways: per
second of wall time, and per second of the process's CPU time, which is what to compare on a shared machine
(other processes take wall time, not CPU time). benchmarks/README.md (section Training) records a run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from core.train_config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
HIDDEN = [64, 32]
ROLES = ["truck driver", "welder", "bank teller", "night guard", "line cook", "software engineer", "registered nurse",
         "pharmacist", "accountant", "school teacher", "sales manager", "electrician", "warehouse associate"]
LEVELS = ["senior", "junior", "lead", "assistant", "head of", "deputy", "regional", "", "", ""]


def make_mlp_data(folder: Path, rows: int, features: int) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    w = rng.normal(size=features)
    y = (x @ w + rng.normal(size=rows) > 0).astype(np.float32)
    n_val = rows // 10
    path = folder / "mlp.npz"
    np.savez(path, x_train=x[n_val:], y_train=y[n_val:], x_val=x[:n_val], y_val=y[:n_val])
    return path


def make_text_data(folder: Path, rows: int) -> Path:
    rng = np.random.default_rng(1)
    roles = rng.choice(ROLES, rows)
    titles = np.array([f"{rng.choice(LEVELS)} {r}".strip() for r in roles])
    x = rng.normal(size=(rows, 6)).astype(np.float32)
    y = ((np.isin(roles, ROLES[:5]) + 0.5 * x[:, 0] + rng.normal(0, 0.5, rows)) > 0.7).astype(np.float32)
    n_val = rows // 10
    path = folder / "text.npz"
    np.savez(path, x_train=x[n_val:], y_train=y[n_val:], x_val=x[:n_val], y_val=y[:n_val],
             t_train=titles[n_val:, None], t_val=titles[:n_val, None])
    return path


def config(data: Path, out: Path, model: str, epochs: int, micro: int, **extra) -> TrainConfig:
    """The workload's config, and the plain loop's: steps and batches as the workload plans them."""
    return TrainConfig(data=str(data), output_dir=str(out / "model"), checkpoint_dir=str(out / "ckpt"), model=model,
                       epochs=epochs, micro_batch_size=micro, max_batch_fraction=1.0, hidden=HIDDEN,
                       checkpoint_every_steps=10**9, early_stopping_patience=10**6, backend="gloo", **extra)


# --- the plain loop (run as `python -m benchmarks.training_throughput --plain <config.json>`) -------------------


def plain_loop(cfg: TrainConfig, device: str = "cpu", bf16: bool = False) -> dict:
    """The same network, batches, AdamW groups, class weight, schedule and clipping, in bare PyTorch.

    On a GPU (benchmarks/gpu_smoke.py) the rows live on the device and `bf16` runs the forward pass under
    torch.autocast, the usual way to train in bf16 without a framework.
    """
    import contextlib

    import torch
    import torch.nn.functional as F

    from workloads.training.networks import network_for
    from workloads.training.schedule import lr_at, plan_budget, positive_weight

    if device == "cpu":
        torch.set_num_threads(1)
    with np.load(cfg.data, allow_pickle=False) as npz:
        data = {k: (npz[k].astype(np.float32) if k[0] in "xy" else npz[k]) for k in npz.files}
    torch.manual_seed(cfg.seed)
    network = network_for(cfg, data)
    module = network.module.to(device)
    if device != "cpu":
        network.to_device(torch.device(device), torch.float32)
    budget = plan_budget(cfg, len(data["x_train"]), 1)
    groups = network.param_groups()
    optimizer = torch.optim.AdamW([{**g, "lr": cfg.learning_rate * g["lr_scale"]} for g in groups],
                                  lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    y_all = torch.from_numpy(data["y_train"]).to(device)
    pos_weight = torch.tensor(positive_weight(data["y_train"]), device=device)
    autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if bf16 and device != "cpu"
                else contextlib.nullcontext())
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    module.train()
    wall = cpu = 0.0
    samples = step = 0
    epoch = 0
    while step < budget.max_steps:
        perm = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        perm = perm.to(y_all.device)
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        for b in range(budget.micro_steps_per_epoch):
            if step >= budget.max_steps:
                break
            lr = lr_at(step + 1, cfg.learning_rate, budget.warmup_steps, budget.max_steps, cfg.min_lr_fraction)
            for group, g in zip(optimizer.param_groups, groups):
                group["lr"] = lr * g["lr_scale"]
            idx = perm[b * budget.micro_batch_size:(b + 1) * budget.micro_batch_size]
            with autocast:
                logits = module(*network.inputs("train", idx, device, torch.float32)).float().reshape(-1)
            loss = F.binary_cross_entropy_with_logits(logits, y_all[idx], pos_weight=pos_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.gradient_clipping, foreach=True)
            optimizer.step()
            samples += len(idx)
            step += 1
        sync()
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        epoch += 1
    return {"samples_per_second": samples / wall, "samples_per_cpu_second": samples / cpu, "steps": step}


# --- the two sides, each in its own process ------------------------------------------------------------------


def run_plain(cfg_path: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "benchmarks.training_throughput", "--plain", str(cfg_path)],
                         env=env, cwd=REPO, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_workload(cfg: TrainConfig, folder: Path, nproc: int = 1) -> dict:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    cfg = cfg.model_copy(update={"output_dir": str(folder / "model"), "checkpoint_dir": str(folder / "ckpt")})
    cfg.write(folder / "config.json")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("DAGSTER_PIPES_CONTEXT", None)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                    "-m", "workloads.training", "--config", str(folder / "config.json")],
                   env=env, cwd=REPO, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    result = json.loads((folder / "model" / "result.json").read_text())
    return {"samples_per_second": result["samples_per_second"], "samples_per_cpu_second":
            result["samples_per_cpu_second"], "steps": result["steps"], "launch_wall_seconds": round(wall, 1),
            "zero_stage": result["zero_stage"], "precision": result["precision"],
            "clipping_by": result["engine"]["gradient_clipping_by"], "forward_by": result["engine"]["forward_by"],
            "backward_by": result["engine"]["backward_by"]}


def side_by_side(cfg: TrainConfig, folder: Path, repeats: int, variants: dict[str, dict]) -> dict:
    """Plain loop and workload alternately, `repeats` times; medians, ratios, and every run."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg.write(folder / "plain.json")
    runs: dict[str, list[dict]] = {"plain": [], **{name: [] for name in variants}}
    for _ in range(repeats):
        runs["plain"].append(run_plain(folder / "plain.json"))
        for name, update in variants.items():
            runs[name].append(run_workload(cfg.model_copy(update=update), folder / name))
    summary: dict = {"runs": runs}
    for name, rs in runs.items():
        summary[name] = {k: statistics.median(r[k] for r in rs) for k in ("samples_per_second",
                                                                          "samples_per_cpu_second")}
    for name in variants:
        summary[f"{name}_over_plain"] = {
            "by_cpu_time": round(summary[name]["samples_per_cpu_second"] / summary["plain"]["samples_per_cpu_second"], 3),
            "by_wall_time": round(summary[name]["samples_per_second"] / summary["plain"]["samples_per_second"], 3)}
    return summary


def materialization_seconds() -> dict:
    """credit_scoring (4,454 rows, no text) with its shipped training settings: data first, then timed."""
    import dagster as dg

    with tempfile.TemporaryDirectory() as tmp:
        pipelines = Path(tmp) / "pipelines"
        pipelines.mkdir()
        (pipelines / "credit_scoring.yaml").write_text((REPO / "pipelines" / "credit_scoring.yaml").read_text())
        os.environ["INTELLIGENTOPS_HOME"] = str(Path(tmp) / "home")
        os.environ["INTELLIGENTOPS_PIPELINES"] = str(pipelines)
        (Path(tmp) / "dagster").mkdir()
        from orchestration.definitions import build_definitions

        defs = build_definitions()
        everything = [*defs.assets, *(defs.asset_checks or [])]
        ck = dg.AssetKey(["credit_scoring", "model_checkpoint"])
        with dg.instance_for_test(temp_dir=str(Path(tmp) / "dagster")) as instance:
            dg.materialize(everything, selection=dg.AssetSelection.keys(ck).upstream() - dg.AssetSelection.keys(ck),
                           resources=defs.resources, instance=instance)
            t0 = time.perf_counter()
            result = dg.materialize(everything, selection=dg.AssetSelection.keys(ck), resources=defs.resources,
                                    instance=instance)
            seconds = time.perf_counter() - t0
            [event] = result.get_asset_materialization_events()
            meta = {k: getattr(v, "value", v) for k, v in event.materialization.metadata.items()}
    return {"seconds": round(seconds, 1), "epochs": meta["epochs"], "steps": meta["steps"],
            "best_val_auc": meta["best_val_auc"], "samples_per_second": meta["samples_per_second"],
            "train_rows": meta["train_rows"], "world_size": meta["world_size"], "zero_stage": meta["zero_stage"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plain", help=argparse.SUPPRESS)  # one plain loop, in this process: prints its JSON
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--text-rows", type=int, default=2400)
    parser.add_argument("--text-epochs", type=int, default=1)
    parser.add_argument("--skip-mlp", action="store_true")
    parser.add_argument("--skip-text", action="store_true")
    parser.add_argument("--skip-materialization", action="store_true")
    args = parser.parse_args()
    if args.plain:
        print(json.dumps(plain_loop(TrainConfig.read(args.plain))))
        return
    summary: dict = {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(), "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if not args.skip_mlp:
            mlp = config(make_mlp_data(folder, args.rows, 40), folder / "mlp", "mlp", epochs=3, micro=128)
            summary["mlp"] = side_by_side(mlp, folder / "mlp", args.repeats, {
                "workload_defaults": {}, "workload_zero1": {"zero_stage": 1}})
            summary["mlp"]["workload_2_ranks"] = run_workload(mlp, folder / "mlp2", nproc=2)
        if not args.skip_text:
            text = config(make_text_data(folder, args.text_rows), folder / "text", "text_finetune",
                          epochs=args.text_epochs, micro=32, encoder_trainable_layers=2)
            summary["text_finetune"] = side_by_side(text, folder / "text", args.repeats, {"workload_defaults": {}})
    summary["load_average_at_end"] = os.getloadavg()
    if not args.skip_materialization:
        summary["model_checkpoint_materialization"] = materialization_seconds()
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
