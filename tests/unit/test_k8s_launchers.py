"""Kubernetes launchers without a cluster.

Layers: the rendered manifests against the Kubernetes OpenAPI schema (kubernetes-validate, strict) and the
TrainJob against the Trainer's typed models; then `launch()` against a hand-written fake cluster that records
what it is sent and "runs" rank 0 as a real dagster-pipes program, whose output becomes the pod log, so the
messages reach a real `dg.materialize` on a real instance.
"""

from pathlib import Path
from typing import Any
import kubernetes_validate
import pytest
import yaml
from kubeflow_trainer_api import models as trainer_models
from resources.k8s import K8sPodLauncher, TrainJobLauncher, Toleration
from resources.launchers import REPO_ROOT, LocalTorchrunLauncher

from k8s_support import FULL, K8S_VERSIONS, REQUEST

REPO = Path(__file__).resolve().parents[2]




PIPES_ENV = {"DAGSTER_PIPES_CONTEXT": "e30=", "DAGSTER_PIPES_MESSAGES": "e30="}


def validate_k8s(obj: dict[str, Any]) -> None:
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# --- rendering -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [dict(image="img:1"), FULL, {**FULL, "checkpoint_claim": None,
                                                                 "checkpoint_url": "s3://bucket/ckpt", "gpus": 0}])
def test_pod_manifest_is_a_valid_pod(config: dict) -> None:
    launcher = K8sPodLauncher(**config, env_from_secrets=["mlflow-credentials"])
    pod = launcher.render_pod_manifest(REQUEST, PIPES_ENV)
    validate_k8s(pod)
    (container,) = pod["spec"]["containers"]
    env = env_of(container)
    assert env["DAGSTER_PIPES_CONTEXT"] == "e30=" and env["INTELLIGENTOPS_SPEC"] == "credit_risk"
    assert container["envFrom"] == [{"secretRef": {"name": "mlflow-credentials"}}]
    assert pod["spec"]["restartPolicy"] == "Never"
    gpus = config.get("gpus", 1)
    assert container["command"][:4] == ["torchrun", "--standalone", "--nproc_per_node", str(gpus or 2)]
    assert container["command"][4:] == ["-m", "workloads.training", *REQUEST.args]
    if gpus:
        assert container["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
    else:
        assert "nvidia.com/gpu" not in str(container["resources"])


def test_pod_manifest_carries_checkpoints_scheduling_and_secrets() -> None:
    pod = K8sPodLauncher(**FULL).render_pod_manifest(REQUEST, PIPES_ENV)
    spec, (container,) = pod["spec"], pod["spec"]["containers"]
    assert {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "intelligentops-checkpoints"}} in spec["volumes"]
    assert {"name": "checkpoints", "mountPath": "/checkpoints"} in container["volumeMounts"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert env_of(container)["INTELLIGENTOPS_CHECKPOINT_DIR"] == "/checkpoints"
    assert env_of(container)["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "object-store", "key": "secret-key"}}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert spec["nodeSelector"] == FULL["node_selector"] and spec["serviceAccountName"] == "intelligentops-train"
    assert container["resources"] == {"requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "2"},
                                      "limits": {"memory": "64Gi", "nvidia.com/gpu": "2"}}


@pytest.mark.parametrize(("config", "message"), [
    (dict(checkpoint_claim="c", checkpoint_url="s3://b/c"), "not both"),
    (dict(secret_env={"TOKEN": "no-key"}), "secret_env['TOKEN'] = 'no-key'"),
    (dict(image_pull_policy="Sometimes"), "image_pull_policy = 'Sometimes'"),
    (dict(tolerations=[Toleration(key="k", operator="Maybe")]), "tolerations[0].operator = 'Maybe'"),
])
def test_bad_settings_name_the_field(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        K8sPodLauncher(image="img:1", **config).render_pod(REQUEST)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TrainJobLauncher(image="img:1", **config).render_trainjob(REQUEST, "io-x-1")


def trainjob_core_objects(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The core/v1 pieces inside a TrainJob, assembled into Pods so the Kubernetes schema checks them."""
    trainer = job["spec"]["trainer"]
    pods = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "trainer"},
             "spec": {"containers": [{"name": "node", "image": trainer["image"], "command": trainer["command"],
                                      "env": trainer.get("env", []), "resources": trainer["resourcesPerNode"]}]}}]
    for patch in job["spec"].get("runtimePatches", []):
        for rjob in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            pod_spec = dict(rjob["template"]["spec"]["template"]["spec"])
            containers = [{"image": "patched", **c} for c in pod_spec.pop("containers", [{"name": "node"}])]
            pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": rjob["name"]},
                         "spec": {**pod_spec, "containers": containers}})
    return pods


@pytest.mark.parametrize("config", [dict(image="img:1"), FULL, {**FULL, "runtime_kind": "torch",
                                                                 "runtime_ref": "torch-distributed"}])
def test_trainjob_matches_the_trainer_api_and_kubernetes_schema(config: dict) -> None:
    launcher = TrainJobLauncher(**config, num_nodes=3)
    job = launcher.render_trainjob(REQUEST, "io-credit-risk-0123abcd", PIPES_ENV)
    # The typed Trainer models read it back unchanged: no unknown or misspelled field was dropped.
    parsed = trainer_models.TrainerV1alpha1TrainJob.from_dict(job)
    assert parsed.to_dict() == job
    assert parsed.spec.runtime_ref.name == config.get("runtime_ref", "deepspeed-distributed")
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["metadata"]["name"] == "io-credit-risk-0123abcd"
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] == 3 and trainer["numProcPerNode"] == config.get("gpus", 1)
    assert env_of(trainer)["DAGSTER_PIPES_CONTEXT"] == "e30="
    if launcher.runtime_kind == "mpi":
        assert trainer["command"][:3] == ["mpirun", "--hostfile", "/etc/mpi/hostfile"]
        # Every variable rank 0 needs reaches the ranks mpirun starts over ssh.
        exported = {trainer["command"][i + 1] for i, a in enumerate(trainer["command"]) if a == "-x"}
        assert set(env_of(trainer)) <= exported
    else:
        assert trainer["command"][0] == "torchrun"
    assert trainer["command"][-len(REQUEST.args) - 2:] == ["-m", "workloads.training", *REQUEST.args]
    assert trainer["command"][-len(REQUEST.args) - 3] == ("python" if launcher.runtime_kind == "mpi" else "torchrun")
    for pod in trainjob_core_objects(job):
        validate_k8s(pod)


def test_trainjob_requires_a_runtime_ref() -> None:
    job = TrainJobLauncher(image="img:1").render_trainjob(REQUEST, "io-x-1")
    del job["spec"]["runtimeRef"]
    with pytest.raises(ValueError, match="runtimeRef"):
        trainer_models.TrainerV1alpha1TrainJob.from_dict(job)


def test_local_launcher_runs_the_workload_module_under_torchrun() -> None:
    command = LocalTorchrunLauncher().command(REQUEST)
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    assert command[5:] == ["2", "-m", "workloads.training", *REQUEST.args, "--backend", "gloo"]
    assert (REPO_ROOT / "workloads" / "training" / "__main__.py").is_file()
    with pytest.raises(FileNotFoundError, match="credit_risk: training workload workloads.trainer .* does not exist"):
        LocalTorchrunLauncher(module="workloads.trainer").command(REQUEST)


def test_trainjob_names_are_dns_labels() -> None:
    name = TrainJobLauncher(image="img:1").trainjob_name("0123abcd-ffff-eeee", "A_Very_Long_Spec_Name_Indeed_Yes")
    assert name == "io-a-very-long-spec-nam-0123abcd" and len(name) <= 40


@pytest.mark.parametrize("path", sorted((REPO / "deploy" / "k8s").glob("*.yaml")), ids=lambda p: p.name)
def test_deploy_manifests_are_valid(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs, f"{path} holds no object"
    for doc in docs:
        if doc["apiVersion"].startswith("trainer.kubeflow.org/"):
            trainer_models.TrainerV1alpha1TrainJob.from_dict(doc)
            for pod in trainjob_core_objects(doc):
                validate_k8s(pod)
        else:
            validate_k8s(doc)


def test_rbac_allows_what_the_launchers_call() -> None:
    docs = list(yaml.safe_load_all((REPO / "deploy" / "k8s" / "rbac.yaml").read_text()))
    (role,) = [d for d in docs if d["kind"] == "Role"]
    allowed = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    needed = {("", "pods", v) for v in ("create", "get", "list", "watch", "delete")} | {("", "pods/log", "get")}
    needed |= {("trainer.kubeflow.org", "trainjobs", v) for v in ("create", "get", "delete")}
    assert needed <= allowed


# --- launch() against a fake cluster ---------------------------------------------------------------------------


def test_helm_values_run_the_code_location_on_kubernetes() -> None:
    values = yaml.safe_load((REPO / "deploy" / "helm" / "values.yaml").read_text())
    assert values["runLauncher"]["type"] == "K8sRunLauncher" and values["postgresql"]["enabled"]
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["--module-name", "orchestration.definitions"]
    env = {e["name"]: e["value"] for e in deployment["env"]}
    assert env["INTELLIGENTOPS_DEPLOYMENT"] == "kubernetes" and env["INTELLIGENTOPS_TRAIN_IMAGE"]
    # The run pods' service account is the one deploy/k8s/rbac.yaml lets launch training.
    rbac = list(yaml.safe_load_all((REPO / "deploy" / "k8s" / "rbac.yaml").read_text()))
    bound = {s["name"] for d in rbac if d["kind"] == "RoleBinding" for s in d["subjects"]}
    assert values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]["podSpecConfig"][
        "serviceAccountName"] in bound
