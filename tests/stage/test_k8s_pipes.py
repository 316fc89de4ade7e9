"""The Kubernetes training launchers relay rank 0's Pipes messages into a real Dagster run (the API server is a fake)."""

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
from resources.k8s import K8sPodLauncher, TrainJobLauncher
from resources.launchers import TrainingLauncher

from k8s_support import FULL, K8S_VERSIONS, REQUEST

REPO = Path(__file__).resolve().parents[2]




def validate_k8s(obj: dict[str, Any]) -> None:
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


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
