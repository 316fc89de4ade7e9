"""MLflow tracking and registry as our own resource (not dagster-mlflow, which leaves runs open in assets).

Default: tracking and registry on SQLite at `<home>/mlflow/mlflow.db`, artifacts under `<home>/mlflow/artifacts`.
Point `tracking_uri` at a server (`http://mlflow:5000`, or `dg.EnvVar("MLFLOW_TRACKING_URI")`) on a cluster.
mlflow itself is imported inside the methods, so loading the code location stays light.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

CHALLENGER = "challenger"


class MlflowResource(dg.ConfigurableResource):
    """One experiment and one registered model per spec; versions are addressed by alias, never by stage."""

    home: str = Field(description="$INTELLIGENTOPS_HOME; the default store lives under it")
    tracking_uri: str | None = Field(None, description="default sqlite:///<home>/mlflow/mlflow.db")
    registry_uri: str | None = Field(None, description="default: the tracking URI")
    artifact_root: str | None = Field(None, description="default <home>/mlflow/artifacts for a local store")

    # --- where ---------------------------------------------------------------------------------------------
    def _local_root(self) -> Path:
        if "://" in self.home:
            raise ValueError(f"home {self.home} is not a local folder: set MlflowResource.tracking_uri to a server")
        p = Path(self.home) / "mlflow"
        p.mkdir(parents=True, exist_ok=True)
        return p

    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{self._local_root() / 'mlflow.db'}"

    def resolved_registry_uri(self) -> str:
        return self.registry_uri or self.resolved_tracking_uri()

    def artifact_location(self) -> str | None:
        if self.artifact_root:
            return self.artifact_root
        if self.tracking_uri and not self.tracking_uri.startswith("sqlite:"):
            return None  # a server chooses its own artifact store
        root = self._local_root() / "artifacts"
        root.mkdir(parents=True, exist_ok=True)
        return root.as_uri()

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.resolved_tracking_uri(), registry_uri=self.resolved_registry_uri())

    @contextlib.contextmanager
    def activated(self) -> Iterator[Any]:
        """Point mlflow's fluent API (log_model, register_model) at this store for the duration.

        `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI; putting back what `get_tracking_uri()`
        returned would pin the process (and every subprocess) to a default `./mlflow.db`, so the exact
        previous state, unset included, is restored.
        """
        import mlflow
        from mlflow.tracking._model_registry import utils as registry_utils
        from mlflow.tracking._tracking_service import utils as tracking_utils

        saved_uris = (tracking_utils._tracking_uri, registry_utils._registry_uri)
        saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        mlflow.set_tracking_uri(self.resolved_tracking_uri())
        mlflow.set_registry_uri(self.resolved_registry_uri())
        try:
            yield mlflow
        finally:
            mlflow.set_tracking_uri(saved_uris[0])
            registry_utils._registry_uri = saved_uris[1]
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    # --- experiments and runs ------------------------------------------------------------------------------
    def experiment_id(self, name: str) -> str:
        """The experiment's id, creating it (with our artifact location) on first use."""
        client = self.client()
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(name, artifact_location=self.artifact_location())
        except Exception:
            exp = client.get_experiment_by_name(name)  # created concurrently by another run
            if exp is None:
                raise
            return exp.experiment_id

    def run_link(self, experiment_id: str, run_id: str) -> str:
        """A URL to open the run, or how to see it when the store is a local file."""
        uri = self.resolved_tracking_uri()
        if uri.startswith(("http://", "https://")):
            return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
        return f"mlflow ui --backend-store-uri {uri}  ->  /#/experiments/{experiment_id}/runs/{run_id}"

    # --- registry ------------------------------------------------------------------------------------------
    def register(self, model_uri: str, name: str, tags: Mapping[str, str] | None = None) -> str:
        """Register `model_uri` as a new version of `name` (created if new); returns the version number."""
        with self.activated() as mlflow:
            mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in (tags or {}).items()})
        return str(mv.version)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client().set_registered_model_alias(name, alias, str(version))

    def get_version(self, name: str, alias: str = CHALLENGER):
        """The ModelVersion an alias points to (tags, run_id, source); MlflowException if unset."""
        return self.client().get_model_version_by_alias(name, alias)

    def model_uri(self, name: str, alias: str = CHALLENGER, version: str | None = None) -> str:
        return f"models:/{name}/{version}" if version is not None else f"models:/{name}@{alias}"

    def load_model(self, name: str, alias: str = CHALLENGER, version: str | None = None):
        """The pyfunc the alias (or an explicit version) points to, loaded with pickle deserialization refused."""
        previous = os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION")
        os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
        try:
            with self.activated() as mlflow:
                return mlflow.pyfunc.load_model(self.model_uri(name, alias, version))
        finally:
            if previous is None:
                os.environ.pop("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", None)
            else:
                os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = previous
