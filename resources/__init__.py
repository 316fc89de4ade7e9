"""Resources: where state lives and the services the assets talk to, chosen by one variable.

`resources_for(deployment)` is the environment matrix: read it side by side to see what "local" and
"kubernetes" use. `$INTELLIGENTOPS_DEPLOYMENT` picks one (default: local).
"""

from __future__ import annotations

import os
from typing import Any

from resources.launchers import LocalTorchrunLauncher
from resources.mlflow import MlflowResource
from resources.servers import AuditResource, LocalServerLauncher
from resources.storage import ParquetIOManager, StorageResource, intelligentops_home
from resources.vectors import VectorIndexResource

DEPLOYMENTS = ("local", "kubernetes")


def resources_for(deployment: str | None = None) -> dict[str, Any]:
    deployment = deployment or os.environ.get("INTELLIGENTOPS_DEPLOYMENT", "local")
    if deployment not in DEPLOYMENTS:
        raise ValueError(f"INTELLIGENTOPS_DEPLOYMENT={deployment!r}; expected one of {', '.join(DEPLOYMENTS)}")
    home = intelligentops_home()
    # On a cluster the home is an object-store URL (s3://...), shared by every pod; locally a folder.
    resources: dict[str, Any] = {
        "storage": StorageResource(home=home),
        "io_manager": ParquetIOManager(base_path=f"{home.rstrip('/')}/assets"),
        "vectors": VectorIndexResource(home=home),
        # Tracking on SQLite under the home unless MLFLOW_TRACKING_URI names a server.
        "mlflow": MlflowResource(home=home, tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or None),
        # torchrun on this machine; the "kubernetes" deployment replaces it below.
        "launcher": LocalTorchrunLauncher(),
        # Specs that ask for several nodes (training.launcher: trainjob) also train with torchrun on one machine.
        "trainjob_launcher": LocalTorchrunLauncher(),
        # The inference server as a process here; a KServe InferenceService under "kubernetes".
        "server": LocalServerLauncher(home=home),
        # The decision audit log: SQLite under the home unless INTELLIGENTOPS_AUDIT_URL names a database.
        "audit": AuditResource(home=home, url=os.environ.get("INTELLIGENTOPS_AUDIT_URL") or None),
    }
    if deployment == "kubernetes":
        # Training on GPU pods (launcher) or several nodes (trainjob_launcher); deploy/README.md lists the env vars.
        from resources.k8s import kubernetes_launchers
        from resources.servers import kubernetes_server_launcher

        resources.update(kubernetes_launchers())
        resources["server"] = kubernetes_server_launcher()
    return resources
