"""Kubernetes launchers without a cluster.

Layers: the rendered manifests against the Kubernetes OpenAPI schema (kubernetes-validate, strict) and the
TrainJob against the Trainer's typed models; then `launch()` against a hand-written fake cluster that records
what it is sent and "runs" rank 0 as a real dagster-pipes program, whose output becomes the pod log, so the
messages reach a real `dg.materialize` on a real instance.
"""

import itertools
import subprocess
import sys
from pathlib import Path
from typing import Any

import dagster as dg
import kubernetes
import kubernetes_validate
import pytest
import yaml
from dagster_k8s.client import DagsterKubernetesClient
from kubeflow_trainer_api import models as trainer_models

import resources.k8s as k8s
from resources.k8s import K8sPodLauncher, TrainJobLauncher, Toleration
from resources.launchers import TrainingLauncher, TrainRequest

REPO = Path(__file__).resolve().parents[1]
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
    assert container["command"][4:] == ["workloads/train.py", *REQUEST.args]
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
    assert trainer["command"][-len(REQUEST.args) - 1:] == ["workloads/train.py", *REQUEST.args]
    for pod in trainjob_core_objects(job):
        validate_k8s(pod)


def test_trainjob_requires_a_runtime_ref() -> None:
    job = TrainJobLauncher(image="img:1").render_trainjob(REQUEST, "io-x-1")
    del job["spec"]["runtimeRef"]
    with pytest.raises(ValueError, match="runtimeRef"):
        trainer_models.TrainerV1alpha1TrainJob.from_dict(job)


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

RANK0 = """
import os
from dagster_pipes import open_dagster_pipes

with open_dagster_pipes() as pipes:
    pipes.log.info("rank 0 of " + os.environ.get("WORLD_SIZE", "1"))
    pipes.report_asset_materialization(metadata={
        "samples_per_second": 1234.5,
        "spec": pipes.extras["spec_name"],
        "checkpoint_dir": os.environ.get("INTELLIGENTOPS_CHECKPOINT_DIR", ""),
    })
print("plain output that is not a Pipes message")
"""


class FakeCluster:
    """The CoreV1Api and CustomObjectsApi methods the launchers call, over an in-memory cluster.

    Creating a pod (or a TrainJob, whose JobSet would create the rank-0 pod) runs RANK0 with that container's
    environment; its output, timestamped like `kubectl logs --timestamps`, is the pod's log.
    """

    def __init__(self) -> None:
        self.pods: dict[str, dict[str, Any]] = {}
        self.logs: dict[str, bytes] = {}
        self.trainjobs: dict[str, dict[str, Any]] = {}
        self.created: list[dict[str, Any]] = []
        self.deleted: list[tuple[str, str]] = []
        self._clock = itertools.count(1)

    def _run_rank0(self, name: str, container: dict[str, Any], labels: dict[str, str]) -> None:
        env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("DAGSTER_PIPES")}
        env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
        proc = subprocess.run([sys.executable, "-c", RANK0], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        lines = (proc.stderr + proc.stdout).splitlines()
        self.logs[name] = "".join(f"2026-01-01T00:00:{next(self._clock):02d}.000000000Z {ln}\n"
                                  for ln in lines).encode()
        self.pods[name] = {"name": name, "labels": labels, "container": container["name"]}

    def _pod_object(self, p: dict[str, Any]) -> kubernetes.client.V1Pod:
        c = kubernetes.client
        status = c.V1ContainerStatus(name=p["container"], ready=False, restart_count=0, image="img", image_id="",
                                     state=c.V1ContainerState(terminated=c.V1ContainerStateTerminated(exit_code=0)))
        return c.V1Pod(metadata=c.V1ObjectMeta(name=p["name"], labels=p["labels"]),
                       status=c.V1PodStatus(phase="Succeeded", container_statuses=[status]))

    # CoreV1Api
    def create_namespaced_pod(self, namespace: str, body: Any, **_: Any) -> None:
        pod = {"apiVersion": "v1", "kind": "Pod", **kubernetes.client.ApiClient().sanitize_for_serialization(body)}
        self.created.append(pod)
        self._run_rank0(pod["metadata"]["name"], pod["spec"]["containers"][0], pod["metadata"].get("labels", {}))

    def list_namespaced_pod(self, namespace: str, field_selector: str | None = None,
                            label_selector: str | None = None, **_: Any) -> kubernetes.client.V1PodList:
        def matches(p: dict[str, Any]) -> bool:
            if field_selector and field_selector != f"metadata.name={p['name']}":
                return False
            wanted = dict(kv.split("=", 1) for kv in label_selector.split(",")) if label_selector else {}
            return all(p["labels"].get(k) == v for k, v in wanted.items())
        return kubernetes.client.V1PodList(items=[self._pod_object(p) for p in self.pods.values() if matches(p)])

    def read_namespaced_pod_log(self, name: str, namespace: str, **_: Any) -> list[bytes]:
        return [self.logs[name]]

    def delete_namespaced_pod(self, name: str, namespace: str, **_: Any) -> None:
        self.deleted.append(("pod", name))

    # CustomObjectsApi
    def create_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str,
                                        body: dict[str, Any], **_: Any) -> dict[str, Any]:
        assert (group, version, plural) == ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
        self.created.append(body)
        name = body["metadata"]["name"]
        self.trainjobs[name] = {**body, "status": {"conditions": [
            {"type": "Complete", "status": "True", "reason": "JobsCompleted", "message": "done"}]}}
        trainer = body["spec"]["trainer"]
        # What the deepspeed-distributed runtime's JobSet would label its launcher pod (node 0, rank 0) with.
        labels = {"jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": "launcher",
                  "batch.kubernetes.io/job-completion-index": "0"}
        self._run_rank0(f"{name}-launcher-0-0-abcde", {"name": "node", "env": trainer.get("env", [])}, labels)
        return body

    def get_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str, name: str,
                                     **_: Any) -> dict[str, Any]:
        return self.trainjobs[name]

    def delete_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str, name: str,
                                        **_: Any) -> None:
        self.deleted.append(("trainjob", name))


@dg.asset
def model_checkpoint(context: dg.AssetExecutionContext, launcher: TrainingLauncher) -> dg.MaterializeResult:
    """A tiny stand-in for the training asset: hand a request to whichever launcher is configured."""
    return launcher.launch(context, REQUEST).get_materialize_result()


@pytest.fixture
def kubeconfig(tmp_path: Path) -> str:
    """A kubeconfig that loads for real but points nowhere: every API call goes to the fake."""
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": "https://fake-cluster.invalid"}}],
        "users": [{"name": "fake", "user": {"token": "fake"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
    }))
    return str(path)


def materialized_metadata(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    assert result.success
    (mat,) = result.asset_materializations_for_node("model_checkpoint")
    return {k: v.value for k, v in mat.metadata.items()}


def test_pod_launcher_relays_rank0_pipes_messages(instance, kubeconfig: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = FakeCluster()
    # PipesK8sClient builds its API client here; everything else in run() is dagster-k8s's own code.
    monkeypatch.setattr(DagsterKubernetesClient, "production_client", staticmethod(
        lambda **_: DagsterKubernetesClient(batch_api=None, core_api=cluster, logger=lambda *_: None,
                                            sleeper=lambda *_: None, timer=__import__("time").time)))
    launcher = K8sPodLauncher(**FULL, kubeconfig_file=kubeconfig, poll_interval=0.01)
    result = dg.materialize([model_checkpoint], resources={"launcher": launcher}, instance=instance)
    meta = materialized_metadata(result)
    assert meta["samples_per_second"] == 1234.5 and meta["spec"] == "credit_risk"
    assert meta["checkpoint_dir"] == "/checkpoints"
    (pod,) = cluster.created
    validate_k8s(pod)
    assert cluster.deleted == [("pod", pod["metadata"]["name"])]
    logs = [e.message for e in instance.all_logs(result.run_id) if e.message]
    assert any("rank 0 of" in m for m in logs)


def test_trainjob_launcher_relays_rank0_pipes_messages(instance, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = FakeCluster()
    monkeypatch.setattr(k8s, "connect", lambda *_: k8s.KubeApis(core=cluster, custom=cluster))
    launcher = TrainJobLauncher(**FULL, num_nodes=2, poll_interval=0.01)
    result = dg.materialize([model_checkpoint], resources={"launcher": launcher}, instance=instance)
    meta = materialized_metadata(result)
    assert meta["samples_per_second"] == 1234.5 and meta["spec"] == "credit_risk"
    (job,) = cluster.created
    assert trainer_models.TrainerV1alpha1TrainJob.from_dict(job).to_dict() == job
    for pod in trainjob_core_objects(job):
        validate_k8s(pod)
    assert job["metadata"]["name"].startswith("io-credit-risk-") and job["metadata"]["namespace"] == "intelligentops"
    assert cluster.deleted == [("trainjob", job["metadata"]["name"])]


def test_trainjob_failure_fails_the_asset(instance, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = FakeCluster()
    original = cluster.create_namespaced_custom_object

    def create_then_fail(*args: Any, **kwargs: Any) -> dict[str, Any]:
        body = original(*args, **kwargs)
        cluster.trainjobs[body["metadata"]["name"]]["status"]["conditions"] = [
            {"type": "Failed", "status": "True", "reason": "JobFailed", "message": "node-1 OOMKilled"}]
        return body

    cluster.create_namespaced_custom_object = create_then_fail  # type: ignore[method-assign]
    monkeypatch.setattr(k8s, "connect", lambda *_: k8s.KubeApis(core=cluster, custom=cluster))
    launcher = TrainJobLauncher(image="img:1", poll_interval=0.01, delete_on_completion=False)
    result = dg.materialize([model_checkpoint], resources={"launcher": launcher}, instance=instance,
                            raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "node-1 OOMKilled" in str(failure.step_failure_data.error)
    assert cluster.deleted == []


# --- wiring ----------------------------------------------------------------------------------------------------


def test_kubernetes_deployment_uses_the_kubernetes_launchers(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from resources import resources_for
    from resources.settings import Settings

    monkeypatch.setenv("INTELLIGENTOPS_K8S_NAMESPACE", "ml")
    monkeypatch.setenv("INTELLIGENTOPS_K8S_CHECKPOINT_PVC", "ckpt")
    monkeypatch.setenv("INTELLIGENTOPS_K8S_ENV_SECRETS", "mlflow-credentials,object-store")
    monkeypatch.setenv("INTELLIGENTOPS_K8S_HOME_PVC", "intelligentops-home")
    res = resources_for(Settings(home=str(home), pipelines=home, deployment="kubernetes"))
    assert isinstance(res["launcher"], K8sPodLauncher) and isinstance(res["trainjob_launcher"], TrainJobLauncher)
    assert res["launcher"].namespace == "ml" and res["launcher"].checkpoint_claim == "ckpt"
    assert res["launcher"].env_from_secrets == ["mlflow-credentials", "object-store"]
    monkeypatch.setenv("INTELLIGENTOPS_TRAIN_IMAGE", "registry.example.com/train:1")
    pod = res["launcher"].process_config_and_initialize().render_pod_manifest(REQUEST)
    assert pod["spec"]["containers"][0]["image"] == "registry.example.com/train:1"
    # The training pod sees the home (prepared data, the model folder) at the very path the run pod does.
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    mounts = {m["name"]: m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert claims["intelligentops-home"] == "intelligentops-home" and mounts["intelligentops-home"] == str(home)
    validate_k8s(pod)
    with pytest.raises(ValueError, match="home_claim 'h' needs home_mount_path"):
        K8sPodLauncher(image="i", home_claim="h").render_pod_manifest(REQUEST)


def test_importing_the_launchers_stays_light() -> None:
    code = ("import sys, resources.k8s, resources; "
            "heavy = [m for m in ('torch', 'deepspeed', 'kubernetes', 'dagster_k8s', 'kubeflow_trainer_api') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout + proc.stderr


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
