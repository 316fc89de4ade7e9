"""The exported model: one folder swapped into `output_dir` in one rename, vouched for by core's manifest.

    model.safetensors    the (calibrated) weights, the architecture in the safetensors metadata
    preprocessing.json   how raw rows became the columns (copied from the run folder)
    result.json          the run's report: metrics, steps, budget, calibration, throughput, checkpoints
    manifest.json        core.manifest: sha256 of each file above, plus architecture, calibration, steps,
                         best_step and format
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from core.files import atomic_write_json_local, sha256_file
from core.manifest import write_manifest
from core.train_config import TrainConfig

WEIGHTS = "model.safetensors"
PREPROCESSING = "preprocessing.json"
RESULT = "result.json"


def architecture(cfg: TrainConfig, in_features: int) -> dict[str, Any]:
    """What workloads/tabular_mlp.build_mlp needs to rebuild the network."""
    return {"kind": "mlp", "in_features": in_features, "hidden": list(cfg.hidden), "dropout": cfg.dropout}


def export(cfg: TrainConfig, weights: dict[str, Any], in_features: int, calibration: dict[str, Any],
           steps: int, best_step: int, report: dict[str, Any]) -> dict[str, Any]:
    """Write the model folder and swap it into `cfg.output_dir`; returns result.json's content.

    `report` is the run's report; the weights' path and sha256 are added to it.
    """
    from safetensors.torch import save_file

    out = Path(cfg.output_dir)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    arch = architecture(cfg, in_features)
    save_file(weights, str(tmp / WEIGHTS), metadata={"architecture": json.dumps(arch)})
    if cfg.preprocessing:
        shutil.copyfile(cfg.preprocessing, tmp / PREPROCESSING)
    result = {**report, "output_dir": str(out), "weights_path": str(out / WEIGHTS),
              "weights_sha256": sha256_file(tmp / WEIGHTS), "calibration": calibration}
    atomic_write_json_local(tmp / RESULT, result)
    write_manifest(tmp, architecture=arch, calibration=calibration, steps=steps, best_step=best_step,
                   format="safetensors")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return result
