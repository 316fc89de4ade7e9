"""Training launchers: one interface, a local torchrun implementation and Kubernetes ones.

The asset that trains (`model_checkpoint`) builds a `TrainRequest` and hands it to whichever launcher the
deployment configured; the launcher starts `workloads/train.py` and relays its Dagster Pipes messages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg


@dataclass(frozen=True)
class TrainRequest:
    """Everything a launcher needs to start one training run of one spec."""

    spec_name: str
    # Arguments for workloads/train.py (after the script path); paths in them must be visible to the workload.
    args: Sequence[str]
    # Extra environment for every rank (never secrets in plain text: launchers read those from the cluster).
    env: Mapping[str, str] = field(default_factory=dict)
    # Values rank 0 reads through Dagster Pipes extras.
    extras: Mapping[str, Any] = field(default_factory=dict)
    nproc_per_node: int = 2


class TrainingLauncher(dg.ConfigurableResource):
    """Starts workloads/train.py for a TrainRequest and returns Dagster Pipes' completed invocation."""

    def launch(self, context: dg.AssetExecutionContext, request: TrainRequest) -> dg.PipesClientCompletedInvocation:
        raise NotImplementedError(f"{type(self).__name__} does not implement launch()")
