"""Training throughput: the DeepSpeed workload against a plain PyTorch loop on the same model and data, and
the wall time of one full `credit_scoring/model_checkpoint` materialization.

    DS_ACCELERATOR=cpu .venv/bin/python -m benchmarks.training_throughput [--rows 20000] [--epochs 3]

(from the repository root).

Prints a JSON summary; benchmarks/README.md (section Training) records a run. Samples per second count training
steps only (no start-up, validation or checkpoint writes); every rank runs with one intra-op thread, as
torchrun sets by default, and the plain loop does too, so one process is compared with one process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from core.train_config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def make_data(folder: Path, rows: int, features: int) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    w = rng.normal(size=features)
    y = (x @ w + rng.normal(size=rows) > 0).astype(np.float32)
    n_val = rows // 10
    path = folder / "data.npz"
    np.savez(path, x_train=x[n_val:], y_train=y[n_val:], x_val=x[:n_val], y_val=y[:n_val])
    return path


def plain_loop(data: Path, epochs: int, micro: int, hidden: list[int]) -> float:
    import torch
    import torch.nn.functional as F

    from workloads.tabular_mlp import build_mlp

    torch.set_num_threads(1)
    torch.manual_seed(7)
    with np.load(data) as npz:
        x, y = torch.from_numpy(npz["x_train"]), torch.from_numpy(npz["y_train"])
    model = build_mlp(x.shape[1], hidden, 0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    model.train()
    seconds, samples = 0.0, 0
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(7000 + epoch))
        t0 = time.perf_counter()
        for i in range(0, len(x), micro):
            idx = perm[i:i + micro]
            loss = F.binary_cross_entropy_with_logits(model(x[idx]).squeeze(-1), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # DeepSpeed's config clips at 1.0 too
            opt.step()
            samples += len(idx)
        seconds += time.perf_counter() - t0
    return samples / seconds


def deepspeed_run(data: Path, folder: Path, nproc: int, epochs: int, micro: int, hidden: list[int]) -> dict:
    out = folder / f"ds{nproc}"
    cfg = TrainConfig(data=str(data), output_dir=str(out / "model"), checkpoint_dir=str(out / "ckpt"),
                      epochs=epochs, micro_batch_size=micro, hidden=hidden, checkpoint_every_steps=10**9,
                      early_stopping_patience=epochs + 1, backend="gloo")
    out.mkdir(parents=True)
    cfg.write(out / "config.json")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                    "-m", "workloads.training", "--config", str(out / "config.json")],
                   env=env, cwd=REPO, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    result = json.loads((out / "model" / "result.json").read_text())
    return {"samples_per_second": result["samples_per_second"], "launch_wall_seconds": wall,
            "train_seconds": result["train_seconds"], "best_val_auc": result["best_val_auc"]}


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
    return {"seconds": seconds, "epochs": meta["epochs"], "steps": meta["steps"],
            "best_val_auc": meta["best_val_auc"], "samples_per_second": meta["samples_per_second"],
            "train_rows": meta["train_rows"], "world_size": meta["world_size"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--features", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--micro-batch-size", type=int, default=128)
    parser.add_argument("--skip-materialization", action="store_true")
    args = parser.parse_args()
    hidden = [64, 32]
    summary: dict = {"rows": args.rows, "features": args.features, "epochs": args.epochs,
                     "micro_batch_size": args.micro_batch_size, "hidden": hidden, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp), args.rows, args.features)
        summary["plain_pytorch_1_process"] = plain_loop(data, args.epochs, args.micro_batch_size, hidden)
        summary["deepspeed_1_rank"] = deepspeed_run(data, Path(tmp), 1, args.epochs, args.micro_batch_size, hidden)
        summary["deepspeed_2_ranks"] = deepspeed_run(data, Path(tmp), 2, args.epochs, args.micro_batch_size, hidden)
    if not args.skip_materialization:
        summary["model_checkpoint_materialization"] = materialization_seconds()
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
