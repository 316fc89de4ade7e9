"""Shared fixtures of the Kubernetes launcher tests: schema versions, a training request and a full launcher config."""

from __future__ import annotations

import kubernetes_validate

from resources.k8s import Toleration
from resources.launchers import TrainRequest

# The oldest Kubernetes minor still commonly run and the newest the schema package knows.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())


REQUEST = TrainRequest(spec_name="credit_risk", args=["--prepared", "/data/credit_risk", "--epochs", "2"],
                       env={"INTELLIGENTOPS_SPEC": "credit_risk"}, extras={"spec_name": "credit_risk"},
                       nproc_per_node=2)


FULL = dict(
    image="registry.example.com/intelligentops-train:0.1.0",
    namespace="intelligentops",
    gpus=2,
    node_selector={"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
    tolerations=[Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")],
    service_account="intelligentops-train",
    checkpoint_claim="intelligentops-checkpoints",
    secret_env={"AWS_SECRET_ACCESS_KEY": "object-store/secret-key"},
    memory_limit="64Gi",
)
