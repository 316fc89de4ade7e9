"""Where a training run reports: stderr on every rank; on global rank 0 also Dagster Pipes and MLflow.

Every rank inherits the Pipes environment, but only global rank 0 opens it (`__main__`), or messages from
several ranks would interleave. MLflow goes through `MlflowClient.log_batch` alone: no global state.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from typing import Any

from core.train_config import TrainConfig


class Reporter:
    """Logs to stderr on every rank; on global rank 0 also to Dagster Pipes and MLflow."""

    def __init__(self, rank: int, pipes: Any | None) -> None:
        self.rank = rank
        self.pipes = pipes
        self.mlflow: Any = None
        self.run_id: str | None = None

    def _emit(self, level: str, msg: str) -> None:
        print(f"[train rank {self.rank}] {level.upper()}: {msg}", file=sys.stderr, flush=True)
        if self.pipes is not None:
            getattr(self.pipes.log, level)(msg)

    def info(self, msg: str) -> None:
        if self.rank == 0:
            self._emit("info", msg)

    def warning(self, msg: str) -> None:
        if self.rank == 0:
            self._emit("warning", msg)

    def error(self, msg: str) -> None:
        if self.rank == 0:
            self._emit("error", msg)

    def start_mlflow(self, cfg: TrainConfig, params: dict[str, Any], tags: dict[str, str]) -> None:
        if self.rank != 0 or not cfg.mlflow_tracking_uri or not cfg.mlflow_experiment_id:
            return
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunTag

        self.mlflow = MlflowClient(tracking_uri=cfg.mlflow_tracking_uri)
        run = self.mlflow.create_run(cfg.mlflow_experiment_id, run_name=cfg.run_name)
        self.run_id = run.info.run_id
        self.mlflow.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())],
                              tags=[RunTag(k, str(v)) for k, v in sorted({**cfg.mlflow_tags, **tags}.items())])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.mlflow is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and math.isfinite(v)]
        if batch:
            self.mlflow.log_batch(self.run_id, metrics=batch)

    def end_mlflow(self, status: str) -> None:
        if self.mlflow is not None and self.run_id:
            with contextlib.suppress(Exception):
                self.mlflow.set_terminated(self.run_id, status)

    def report_materialization(self, result: dict[str, Any], resumed_from: int) -> None:
        """The model as the asset's materialization: the weights digest is its data version."""
        if self.pipes is None:
            return
        self.pipes.report_asset_materialization(
            data_version=result["weights_sha256"][:16],
            metadata={
                "epochs": result["epochs"], "steps": result["steps"], "evaluations": result["evaluations"],
                "best_val_auc": result["best_val_auc"] if result["best_val_auc"] is not None else "n/a",
                "samples_per_second": round(result["samples_per_second"] or 0.0, 1),
                "resumed_from_step": resumed_from,
                "checkpoint_path": {"raw_value": result["checkpoint_path"], "type": "path"},
                "weights_sha256": result["weights_sha256"],
                "calibration": result["calibration"]["method"],
                "mlflow_run_id": self.run_id or "none",
            })
