"""Runs under torchrun (tests/stage/test_deepspeed_settings.py): each `training.deepspeed` combination, twice.

    PYTHONPATH=<repo> torchrun --standalone --nproc_per_node 2 tests/deepspeed_matrix.py <cases.json> <out.json>

For every case (TrainConfig fields over a tiny table) the real workload (`workloads.training.loop.train`) runs
uninterrupted into `<case>/straight`; then the same config runs into `<case>/resumed`, interrupted on every rank
right after the checkpoint of step `stop_at` (where the reliability tests' SIGKILL hook would fire) and started
again in the same process, which must resume from that sharded checkpoint. Rank 0 writes, per case, both
results, or the error that stopped it. Dropout is off, so the two exports must be the same weights.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from core.train_config import TrainConfig, TrainConfigError
from workloads.training import loop
from workloads.training.reporter import Reporter


class Interrupted(Exception):
    """Stands in for a killed launch: raised on every rank after the checkpoint of a step."""


def run(cfg: TrainConfig, rank: int, stop_at: int | None = None) -> dict:
    original = loop.kill_hook

    def interrupt(s) -> None:
        if stop_at is not None and s.state["step"] == stop_at and s.resumed_from < stop_at:
            raise Interrupted(stop_at)
        original(s)

    loop.kill_hook = interrupt
    try:
        try:
            loop.train(cfg, Reporter(rank, None))
        except Interrupted:
            loop.train(cfg, Reporter(rank, None))
    finally:
        loop.kill_hook = original
    return json.loads((Path(cfg.output_dir) / "result.json").read_text()) if rank == 0 else {}


def main(cases_file: str, out_file: str) -> int:
    cases = json.loads(Path(cases_file).read_text())
    outcomes = {}
    rank = int(os.environ.get("RANK", "0"))
    for name, case in cases.items():
        folder = Path(case.pop("folder"))
        stop_at = case.pop("stop_at")
        outcome: dict = {}
        try:
            for run_name, stop in (("straight", None), ("resumed", stop_at)):
                cfg = TrainConfig.build({**case, "output_dir": str(folder / run_name / "model"),
                                         "checkpoint_dir": str(folder / run_name / "ckpt")}, name)
                result = run(cfg, rank, stop)
                outcome[run_name] = {k: result.get(k) for k in (
                    "steps", "resumed_from_step", "zero_stage", "precision", "engine", "network", "world_size",
                    "weights_path", "validation_probabilities", "calibration")}
        except TrainConfigError as exc:
            outcome["refused"] = str(exc)
        outcomes[name] = outcome
    if rank == 0:
        Path(out_file).write_text(json.dumps(outcomes))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
