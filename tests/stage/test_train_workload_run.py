"""The training workload run by hand (one rank, no launcher, no Dagster) and exported again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.files import sha256_file
from core.manifest import MANIFEST, verify_manifest
from support import REPO


@pytest.mark.slow
def test_workload_runs_by_hand_and_a_finished_run_is_exported_again(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    y = (x[:, 0] - x[:, 1] + 0.3 * rng.normal(size=300) > 0).astype(np.float32)
    np.savez(tmp_path / "data.npz", x_train=x[:240], y_train=y[:240], x_val=x[240:], y_val=y[240:])
    args = [sys.executable, "-m", "workloads.training", "--data", str(tmp_path / "data.npz"),
            "--output-dir", str(tmp_path / "model"), "--checkpoint-dir", str(tmp_path / "ckpt"), "--max-steps", "24",
            "--micro-batch-size", "32", "--checkpoint-every-steps", "10", "--checkpoint-min-seconds", "0",
            "--learning-rate", "0.01"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    env.pop("DAGSTER_PIPES_CONTEXT", None)
    first = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads((tmp_path / "model" / "result.json").read_text())
    assert result["budget"]["max_steps"] == result["budget"]["min_steps"] == 24
    assert result["steps"] == 24 and result["evaluations"] >= 1 and result["best_val_auc"] > 0.8
    # The model folder and every checkpoint pass core's strict manifest check, as registration and resume do.
    manifest = verify_manifest(tmp_path / "model")
    assert set(manifest["files"]) == {"model.safetensors", "result.json"}
    assert manifest["files"]["model.safetensors"] == sha256_file(tmp_path / "model" / "model.safetensors")
    assert result["weights_sha256"] == manifest["files"]["model.safetensors"]
    assert manifest["steps"] == 24 and manifest["format"] == "safetensors"
    assert manifest["architecture"] == {"kind": "mlp", "in_features": 4, "hidden": [64, 32], "dropout": 0.1}
    assert manifest["calibration"] == result["calibration"]
    final = verify_manifest(tmp_path / "ckpt" / "global_step24.final")
    assert (final["world_size"], final["step"]) == (1, 24) and "best.safetensors" in final["files"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if (p / MANIFEST).is_file()) == [
        "global_step10", "global_step20", "global_step24.final"]

    again = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training had finished" in again.stderr
    result2 = json.loads((tmp_path / "model" / "result.json").read_text())
    assert result2["resumed_from_step"] == 24 and result2["weights_sha256"] == result["weights_sha256"]
