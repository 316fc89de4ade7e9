"""Resources: where state lives and the services the assets talk to, chosen by one variable.

`resources_for(settings)` is the environment matrix: read it side by side to see what "local" and
"kubernetes" use. `$INTELLIGENTOPS_DEPLOYMENT` picks one (default: local); resources/settings.py reads it.
"""

from __future__ import annotations

from typing import Any

from resources.launchers import LocalTorchrunLauncher
from resources.mlflow import MlflowResource
from resources.servers import AuditResource, LocalServerLauncher
from resources.settings import KubernetesSettings, Settings
from resources.storage import ParquetIOManager, StorageResource
from resources.vectors import VectorIndexResource


def resources_for(settings: Settings) -> dict[str, Any]:
    home = settings.home
    # On a cluster the home is an object-store URL (s3://...), shared by every pod; locally a folder.
    resources: dict[str, Any] = {
        "storage": StorageResource(home=home),
        "io_manager": ParquetIOManager(base_path=f"{home.rstrip('/')}/assets"),
        "vectors": VectorIndexResource(home=home),
        # Tracking on SQLite under the home unless MLFLOW_TRACKING_URI names a server.
        "mlflow": MlflowResource(home=home, tracking_uri=settings.mlflow_tracking_uri,
                                 artifact_root=settings.mlflow_artifacts),
        # torchrun on this machine; the "kubernetes" deployment replaces it below.
        "launcher": LocalTorchrunLauncher(),
        # Specs that ask for several nodes (training.launcher: trainjob) also train with torchrun on one machine.
        "trainjob_launcher": LocalTorchrunLauncher(),
        # The inference server as a process here; a KServe InferenceService under "kubernetes".
        "server": LocalServerLauncher(home=home),
        # The decision audit log: SQLite under the home unless INTELLIGENTOPS_AUDIT_URL names a database.
        "audit": AuditResource(home=home, url=settings.audit_url, keys_dir=settings.keys_dir),
    }
    if settings.deployment == "kubernetes":
        # Training on GPU pods (launcher) or several nodes (trainjob_launcher); deploy/README.md lists the env vars.
        from resources.k8s import kubernetes_launchers
        from resources.servers import kubernetes_server_launcher

        k8s = KubernetesSettings.from_env()
        resources.update(kubernetes_launchers(k8s, home))
        resources["server"] = kubernetes_server_launcher(k8s)
    return resources
