"""The exported model: one folder swapped into `output_dir` in one rename, vouched for by core's manifest.

    model.safetensors    the (calibrated) weights: the network, or text_finetune's head; the architecture in
                         the safetensors metadata
    encoder/             text_finetune: the fine-tuned sentence-transformers encoder (safetensors, tokenizer)
    <module>.py          a user's factory: the module's source that trained, and will serve
    preprocessing.json   how raw rows became the columns (copied from the run folder)
    result.json          the run's report: metrics, steps, budget, engine, calibration, throughput, checkpoints,
                         and the exported model's probabilities for the validation rows
    manifest.json        core.manifest: sha256 of every file above (encoder/ included), plus architecture,
                         calibration, steps, best_step and format

One consolidated fp32 state, whatever ZeRO stage, offload or precision trained it (the loop gathers it).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from core.files import atomic_write_json_local, sha256_file
from core.manifest import write_manifest
from core.train_config import TrainConfig
from workloads.training.models import WEIGHTS, Network

PREPROCESSING = "preprocessing.json"
RESULT = "result.json"


def export(cfg: TrainConfig, network: Network, weights: dict[str, Any], calibration: dict[str, Any],
           steps: int, best_step: int, report: dict[str, Any]) -> dict[str, Any]:
    """Write the model folder and swap it into `cfg.output_dir`; returns result.json's content.

    `report` is the run's report; the weights' path and sha256 are added to it.
    """
    out = Path(cfg.output_dir)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    arch = network.export(weights, tmp)
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
