"""GPU check of the training workload: `-m workloads.training` on one GPU with NCCL, next to a plain PyTorch loop
on the same GPU, model and data. Run by benchmarks/gpu_smoke.sh (`python -m benchmarks.gpu_smoke` from the
repository root); writes $OUT/gpu_smoke.json.

The data is synthetic and shaped like credit_risk's feature matrix (about 420 columns once the 384-wide
text embedding is appended); the network is wider than the shipped default so the GPU has work to do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from core.train_config import TrainConfig

REPO = Path(__file__).resolve().parents[1]

ROWS = int(os.environ.get("ROWS", 409_600))
FEATURES = int(os.environ.get("FEATURES", 420))
BATCH = int(os.environ.get("BATCH", 4096))
EPOCHS = int(os.environ.get("EPOCHS", 3))
HIDDEN = [int(h) for h in os.environ.get("HIDDEN", "512,256").split(",")]


def make_run(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, FEATURES)).astype(np.float32)
    w = rng.normal(size=FEATURES) / np.sqrt(FEATURES)
    y = (x @ w + 0.5 * rng.normal(size=ROWS) > 0).astype(np.float32)
    n_val = ROWS // 10
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "data.npz", x_train=x[n_val:], y_train=y[n_val:], x_val=x[:n_val], y_val=y[:n_val])
    (folder / "preprocessing.json").write_text(json.dumps({"synthetic": True, "n_features": FEATURES}))
    TrainConfig(data=str(folder / "data.npz"), preprocessing=str(folder / "preprocessing.json"),
                output_dir=str(folder / "model"), checkpoint_dir=str(folder / "ckpt"), epochs=EPOCHS,
                micro_batch_size=BATCH, hidden=HIDDEN, checkpoint_every_steps=100,
                early_stopping_patience=EPOCHS + 1, backend="nccl", bf16="auto").write(folder / "config.json")
    return folder


def plain_loop(folder: Path) -> dict:
    """The same network and batches in a bare PyTorch loop on the GPU (fp32, AdamW): the baseline."""
    import torch
    import torch.nn.functional as F

    from workloads.tabular_mlp import build_mlp

    torch.manual_seed(7)
    with np.load(folder / "data.npz") as npz:
        x = torch.from_numpy(npz["x_train"]).cuda()
        y = torch.from_numpy(npz["y_train"]).cuda()
    model = build_mlp(x.shape[1], HIDDEN, 0.1).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    samples, seconds = 0, 0.0
    for epoch in range(EPOCHS):
        perm = torch.randperm(len(x), device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(0, len(x), BATCH):
            idx = perm[i:i + BATCH]
            loss = F.binary_cross_entropy_with_logits(model(x[idx]).squeeze(-1), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            samples += len(idx)
        torch.cuda.synchronize()
        if epoch > 0:  # the first epoch warms up kernels and the allocator
            seconds += time.perf_counter() - t0
        else:
            samples = 0
    return {"samples_per_second": samples / seconds, "epochs_timed": EPOCHS - 1}


def workload(folder: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                           "-m", "workloads.training", "--config", str(folder / "config.json")],
                          env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (folder / "train.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"ok": False, "exit": proc.returncode, "tail": (proc.stdout + proc.stderr)[-3000:]}
    result = json.loads((folder / "model" / "result.json").read_text())
    return {"ok": True, "wall_seconds": round(wall, 1), **{k: result.get(k) for k in (
        "samples_per_second", "steps", "epochs", "best_val_auc", "backend", "bf16", "world_size", "zero_stage",
        "train_seconds", "resumed_from_step")}}


def main() -> int:
    import torch

    out = Path(os.environ.get("OUT") or REPO / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    folder = make_run(Path(os.environ.get("GPU_SMOKE_DIR", "/tmp/gpu_smoke_run")))
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
              "rows": ROWS, "features": FEATURES, "micro_batch": BATCH, "epochs": EPOCHS, "hidden": HIDDEN}
    report["plain_pytorch_fp32"] = plain_loop(folder)
    report["train_py_deepspeed"] = workload(folder)
    ds = report["train_py_deepspeed"].get("samples_per_second")
    if ds:
        report["deepspeed_over_plain"] = round(ds / report["plain_pytorch_fp32"]["samples_per_second"], 3)
    (out / "gpu_smoke.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0 if report["train_py_deepspeed"]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
