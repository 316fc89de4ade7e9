"""MLflow tracking and registry as our own resource (not dagster-mlflow, which leaves runs open in assets).

Default: tracking and registry on SQLite at `<home>/mlflow/mlflow.db`, artifacts under `<home>/mlflow/artifacts`.
Point `tracking_uri` at a server (`http://mlflow:5000`, or `dg.EnvVar("MLFLOW_TRACKING_URI")`) on a cluster.

Safe to use from several threads at once (the inference server calls it from request threads): every call goes
through an `MlflowClient` or a function that takes the URIs as arguments, never through mlflow's global
tracking URI or per-call changes to the environment. Models are logged by saving them locally and uploading
the folder to the run, and loaded by downloading one resolved version and loading it from disk.
mlflow itself is imported inside the methods, so loading the code location stays light.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

MODEL_ARTIFACT_PATH = "model"
# Tracking URIs of a server, which keeps artifacts in a store of its own choosing.
SERVER_SCHEMES = ("http://", "https://", "databricks")


def refuse_pickle() -> None:
    """A process that loads models through this resource never unpickles one.

    MLflow reads this variable when it loads a model. It is set once and never put back, so no thread can see
    it flip while another loads.
    """
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"


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
        """Where new experiments keep their artifacts: never the current directory.

        Only a tracking server (http, https, databricks) chooses its own artifact store. Any other tracking URI
        (SQLite, Postgres, MySQL, a file store) would make MLflow default to `./mlruns` wherever the process
        happens to run, so those get `artifact_root` (INTELLIGENTOPS_MLFLOW_ARTIFACTS) or `<home>/mlflow/artifacts`.
        """
        if self.artifact_root:
            if "://" in self.artifact_root:
                return self.artifact_root
            root = Path(self.artifact_root).expanduser().resolve()
            root.mkdir(parents=True, exist_ok=True)
            return root.as_uri()
        if self.tracking_uri and self.tracking_uri.startswith(SERVER_SCHEMES):
            return None
        root = self._local_root() / "artifacts"
        root.mkdir(parents=True, exist_ok=True)
        return root.as_uri()

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.resolved_tracking_uri(), registry_uri=self.resolved_registry_uri())

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

    # --- models --------------------------------------------------------------------------------------------
    def log_pyfunc(self, run_id: str, prepare: Callable[[Path], None] | None = None, **save_model_kwargs: Any) -> str:
        """Save a pyfunc locally (`mlflow.pyfunc.save_model` arguments) and upload it to the run.

        `prepare`, when given, is called with the saved folder before the upload (registration writes the
        folder's manifest and signature there, so the registry receives exactly the sealed files). Returns the
        artifact URI of the uploaded model folder, which `register` takes as the version's source.
        """
        import mlflow

        with tempfile.TemporaryDirectory(prefix="intelligentops-model-") as tmp:
            local = Path(tmp) / MODEL_ARTIFACT_PATH
            mlflow.pyfunc.save_model(path=str(local), **save_model_kwargs)
            if prepare is not None:
                prepare(local)
            client = self.client()
            client.log_artifacts(run_id, str(local), MODEL_ARTIFACT_PATH)
            return f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT_PATH}"

    def register(self, source: str, name: str, run_id: str | None = None,
                 tags: Mapping[str, str] | None = None) -> str:
        """Register `source` (a model folder's artifact URI) as a new version of `name`; returns the version."""
        from mlflow.exceptions import MlflowException

        client = self.client()
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        mv = client.create_model_version(name, source, run_id=run_id,
                                         tags={k: str(v) for k, v in (tags or {}).items()})
        return str(mv.version)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client().set_registered_model_alias(name, alias, str(version))

    def get_version(self, name: str, alias: str):
        """The ModelVersion an alias points to (tags, run_id, source); MlflowException if unset."""
        return self.client().get_model_version_by_alias(name, alias)

    def alias_version(self, name: str, alias: str):
        """The ModelVersion an alias points to, or None when the alias (or the model) does not exist; a registry
        that cannot be reached is core.registry.RegistryUnreachable, naming its URI."""
        from core.registry import connect, version_by_alias

        uri = self.resolved_registry_uri()
        return version_by_alias(connect(self.resolved_tracking_uri(), uri), name, alias, uri)

    def shown_registry_uri(self) -> str:
        """The registry's URI as a message may show it: any password hidden."""
        from core.registry import shown_uri

        return shown_uri(self.resolved_registry_uri())

    def download_version(self, name: str, version: str, dst: Path | str | None = None) -> Path:
        """The files of one model version, on local disk."""
        import mlflow

        # Resolved through our client: mlflow's `models:/` resolution would consult the global registry URI.
        source = self.client().get_model_version_download_uri(name, str(version))
        return Path(mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=str(dst) if dst else None, tracking_uri=self.resolved_tracking_uri()))

    def load_model(self, name: str, alias: str | None = None, version: str | None = None):
        """The pyfunc of an explicit version, or of the version an alias points to now; never unpickles."""
        import mlflow

        if (alias is None) == (version is None):
            raise ValueError("load_model takes exactly one of alias= or version=")
        if version is None:
            version = str(self.get_version(name, alias).version)
        refuse_pickle()
        return mlflow.pyfunc.load_model(str(self.download_version(name, version)))
