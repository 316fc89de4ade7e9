"""Training launchers: one interface, a local torchrun implementation and Kubernetes ones.

The asset that trains (`model_checkpoint`) builds a `TrainRequest` and hands it to whichever launcher the
deployment configured; the launcher starts the training workload (`python -m workloads.training`, the package
`workloads/training/`) and relays its Dagster Pipes messages.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg


@dataclass(frozen=True)
class TrainRequest:
    """Everything a launcher needs to start one training run of one spec."""

    spec_name: str
    # Arguments for the workload (after `-m workloads.training`); paths in them must be visible to the workload.
    args: Sequence[str]
    # Extra environment for every rank (never secrets in plain text: launchers read those from the cluster).
    env: Mapping[str, str] = field(default_factory=dict)
    # Values rank 0 reads through Dagster Pipes extras.
    extras: Mapping[str, Any] = field(default_factory=dict)
    # Ranks per node: processes on a CPU; on GPU pods one per GPU.
    nproc_per_node: int = 2
    # GPUs per pod the spec asked for (its training.nproc_per_node, when it names one); None: the launcher's own.
    gpus_per_node: int | None = None
    # Nodes the spec asked for (training.num_nodes above 1); None: the launcher's own.
    num_nodes: int | None = None


class TrainingLauncher(dg.ConfigurableResource):
    """Starts the training workload for a TrainRequest and returns Dagster Pipes' completed invocation."""

    def launch(self, context: dg.AssetExecutionContext, request: TrainRequest) -> dg.PipesClientCompletedInvocation:
        raise NotImplementedError(f"{type(self).__name__} does not implement launch()")


REPO_ROOT = Path(__file__).resolve().parents[1]
# The training workload, run as a module (`python -m`, `torchrun -m`, `deepspeed --module`) from the repository
# root locally and from the training image's working directory on Kubernetes.
WORKLOAD_MODULE = "workloads.training"


class LocalTorchrunLauncher(TrainingLauncher):
    """Runs `torchrun --standalone --nproc_per_node N -m workloads.training ...` on this machine, from the
    repository root, through `dg.PipesSubprocessClient`: DeepSpeed on the CPU accelerator with gloo unless
    configured otherwise.

    Every rank inherits the Pipes environment; the workload lets only global rank 0 open it.
    """

    module: str = WORKLOAD_MODULE  # run with `-m` from the repository root
    accelerator: str = "cpu"  # DS_ACCELERATOR for the ranks; "" lets DeepSpeed detect a GPU
    backend: str = "gloo"
    omp_num_threads: int = 1  # the ranks share this machine's cores

    def command(self, request: TrainRequest) -> list[str]:
        package = REPO_ROOT.joinpath(*self.module.split("."))
        if not (package / "__main__.py").is_file() and not package.with_suffix(".py").is_file():
            raise FileNotFoundError(f"{request.spec_name}: training workload {self.module} ({package}) does not exist "
                                    f"under {REPO_ROOT}")
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", str(request.nproc_per_node), "-m", self.module, *request.args,
                "--backend", self.backend]

    def launch(self, context: dg.AssetExecutionContext, request: TrainRequest) -> dg.PipesClientCompletedInvocation:
        if request.num_nodes and request.num_nodes > 1:
            context.log.warning(f"{request.spec_name}: training.num_nodes={request.num_nodes} applies on Kubernetes (a "
                                f"TrainJob); here all {request.nproc_per_node} ranks run on this machine")
        env = {"OMP_NUM_THREADS": str(self.omp_num_threads), "PYTHONUNBUFFERED": "1", **request.env}
        if self.accelerator:
            env["DS_ACCELERATOR"] = self.accelerator
        command = self.command(request)
        context.log.info(f"{request.spec_name}: launching {' '.join(command)}")
        client = dg.PipesSubprocessClient(cwd=str(REPO_ROOT))
        return client.run(context=context, command=command, env=env, extras=dict(request.extras))
