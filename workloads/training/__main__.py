"""Train a spec's network with DeepSpeed: a plain program that Dagster launches and observes through Pipes.

The network is the config's `model`: the tabular MLP (`mlp`), the text encoder fine-tuned with an MLP head
(`text_finetune`), or a user's own `torch.nn.Module` (`"module.path:factory"`, docs/byo-model.md).

It reads a prepared run folder (written by the `<spec>/model_checkpoint` asset, or by you):

    <run>/data.npz             x_train, y_train, x_val, y_val (float32; no pickle); text_finetune adds the
                               cleaned texts t_train, t_val (one column per text feature)
    <run>/preprocessing.json   how raw rows became those columns (copied next to the exported weights)
    <run>/config.json          a TrainConfig (core/train_config.py) as JSON

Launch it from the repository root (or wherever `workloads` and `core` are importable). One rank, no launcher:

    DS_ACCELERATOR=cpu python -m workloads.training --config <run>/config.json

Two ranks on CPU with torchrun (gloo):

    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 -m workloads.training --config <run>/config.json

or with DeepSpeed's own launcher, overriding any config field on the command line:

    DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 --module workloads.training --config <run>/config.json \\
        --max-steps 300

On GPUs leave DS_ACCELERATOR unset; `backend: auto` picks nccl. Under `mpirun` (Kubeflow Trainer's DeepSpeed
runtime) DeepSpeed finds the ranks from MPI. The package: `config` (the command line and environment over the
file), `networks`, `models`, `text` and `layers` (what trains and how it is fed and exported), `engine` (the
DeepSpeed settings resolved for this accelerator), `schedule` (budget, learning rate, class weight),
`calibration` (Platt), `checkpoints` (save, manifest, resume choice, pruning), `reporter` (stderr, Pipes,
MLflow), `loop` (start, resume, steps, finish) and `export` (the model folder and its manifest). A config the
workload cannot run (a bad key, a user's module that fails to import or returns the wrong shape, a precision
this accelerator lacks) exits with status 2 and one line naming the file and the key.

Only global rank 0 opens Dagster Pipes (when launched by Dagster) and MLflow: it reports logs, metrics per
evaluation, the checkpoint path, the weights digest as data version and the MLflow run id.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from core.train_config import TrainConfigError
from workloads.training.config import config_from_args
from workloads.training.loop import train
from workloads.training.reporter import Reporter

# The variables a launcher sets for a process's global rank: torchrun and DeepSpeed's launcher, then Open MPI.
RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def global_rank(environ: Mapping[str, str]) -> int | None:
    """This process's global rank as its launcher set it, or None without a launcher."""
    for var in RANK_VARIABLES:
        if environ.get(var, "") != "":
            return int(environ[var])
    return None


def setup_single_process_env() -> None:
    """`python -m workloads.training` without a launcher: one rank on a free local port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


def main(argv: Sequence[str] | None = None) -> int:
    rank = global_rank(os.environ)
    if rank is None:
        setup_single_process_env()
        rank = 0
    if rank == 0:
        from dagster_pipes import open_dagster_pipes

        pipes_cm: Any = open_dagster_pipes()
    else:
        # Every rank inherits the Pipes environment; only rank 0 may speak, or messages would interleave.
        pipes_cm = contextlib.nullcontext(None)
    with pipes_cm as pipes:
        reporter = Reporter(rank, pipes)
        try:
            cfg = config_from_args(argv)
        except TrainConfigError as exc:
            reporter.error(f"workloads.training: {exc}")
            return 2
        try:
            train(cfg, reporter)
        except TrainConfigError as exc:  # the network or the engine settings cannot run here: named, no traceback
            reporter.error(f"workloads.training: {exc}")
            reporter.end_mlflow("FAILED")
            return 2
        except BaseException:
            reporter.end_mlflow("FAILED")
            raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
