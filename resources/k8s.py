"""Kubernetes training launchers: one GPU pod (dagster-k8s `PipesK8sClient`) or several nodes (Kubeflow Trainer).

Both start the same workload, the module `workloads.training`, from the training image's working directory and
read its Dagster Pipes messages from global rank 0's pod log:

- `K8sPodLauncher`: one pod runs `torchrun --standalone --nproc_per_node <gpus> -m workloads.training <args>`.
- `TrainJobLauncher`: a `TrainJob` (trainer.kubeflow.org/v1alpha1) on the `deepspeed-distributed` runtime, where
  `mpirun` in the launcher pod (also node 0) starts `python -m workloads.training <args>` on every slot; rank 0's
  output comes back through mpirun into the launcher pod's log. Specs with `training.num_nodes` above 1 (or
  `launcher: trainjob`) train this way.

GPUs per pod: the spec's `training.nproc_per_node` when the spec names it, else the launcher's `gpus`
(`INTELLIGENTOPS_K8S_GPUS`); one rank per GPU, NCCL between them (`--backend nccl`, with NCCL's async error
handling on so a rank that dies fails the others instead of leaving them in a collective). `gpus: 0` runs CPU
pods: `nproc_per_node` ranks on gloo with DeepSpeed's CPU accelerator.

Each launcher has a pure `render_*` method that returns exactly what it would submit, so the manifests are
validated in tests without a cluster. The kubernetes client, dagster_k8s and kubeflow_trainer_api are imported
inside functions: loading the code location must stay fast.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dagster as dg
from pydantic import Field

from core.train_config import CHECKPOINT_DIR_ENV
from resources.launchers import WORKLOAD_MODULE, TrainingLauncher, TrainRequest
from resources.settings import KubernetesSettings

TRAINER_GROUP = "trainer.kubeflow.org"
TRAINER_VERSION = "v1alpha1"
TRAINJOB_PLURAL = "trainjobs"
TRAIN_CONTAINER = "train"
# The deepspeed-distributed and torch-distributed runtimes both name their training container "node".
RUNTIME_CONTAINER = "node"
PATCH_MANAGER = "intelligentops.io/launcher"
HOME_VOLUME = "intelligentops-home"
CHECKPOINT_VOLUME = "checkpoints"
SHM_VOLUME = "dshm"
# JobSet labels every pod it creates; the Trainer names the JobSet after the TrainJob.
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
_SECRET_REF = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[-._a-zA-Z0-9]+$")


class Toleration(dg.Config):
    """One pod toleration (GPU node pools are usually tainted, e.g. nvidia.com/gpu=present:NoSchedule)."""

    key: str | None = None
    # Dagster config has no Literal type: the strings are checked in _check().
    operator: str = "Exists"  # Exists | Equal
    value: str | None = None
    effect: str | None = None  # NoSchedule | PreferNoSchedule | NoExecute
    toleration_seconds: int | None = None

    def manifest(self) -> dict[str, Any]:
        out = {"key": self.key, "operator": self.operator, "value": self.value, "effect": self.effect,
               "tolerationSeconds": self.toleration_seconds}
        return {k: v for k, v in out.items() if v is not None}


@dataclass(frozen=True)
class KubeApis:
    """The two API groups the launchers call; tests pass a hand-written fake with the same methods."""

    core: Any  # kubernetes.client.CoreV1Api
    custom: Any  # kubernetes.client.CustomObjectsApi


def connect(load_incluster_config: bool | None, kubeconfig_file: str | None, kube_context: str | None) -> KubeApis:
    """Load the cluster credentials the same way PipesK8sClient does and return the API clients."""
    import kubernetes

    if load_incluster_config or (load_incluster_config is None and kubeconfig_file is None
                                 and kube_context is None and os.getenv("KUBERNETES_SERVICE_HOST")):
        kubernetes.config.load_incluster_config()
    else:
        kubernetes.config.load_kube_config(config_file=kubeconfig_file, context=kube_context)
    return KubeApis(core=kubernetes.client.CoreV1Api(), custom=kubernetes.client.CustomObjectsApi())


def _one_of(owner: object, field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{type(owner).__name__}.{field} = {value!r}; expected one of {', '.join(allowed)}")


def _dns_label(text: str, limit: int) -> str:
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return label[:limit].rstrip("-") or "x"


class _KubernetesLauncher(TrainingLauncher):
    """Settings shared by the pod and TrainJob launchers."""

    image: str = Field(description="Training image (deploy/Dockerfile, target `train`), e.g. registry/intelligentops-train:0.1.0")
    namespace: str = Field("default", description="Namespace the training pods run in")
    image_pull_policy: str = Field("IfNotPresent", description="Always | IfNotPresent | Never")
    gpus: int = Field(1, ge=0, description="nvidia.com/gpu per pod (one training process per GPU); 0 runs on CPU")
    cpu_request: str | None = Field("4", description="CPU request per pod, a Kubernetes quantity")
    memory_request: str | None = Field("16Gi", description="Memory request per pod")
    memory_limit: str | None = Field(None, description="Memory limit per pod; unset leaves it to the namespace")
    shm_size: str | None = Field("8Gi", description="Size of /dev/shm (NCCL and DataLoader workers outgrow the 64Mi default)")
    node_selector: dict[str, str] = Field(default_factory=dict, description="e.g. {cloud.google.com/gke-accelerator: nvidia-h100-80gb}")
    tolerations: list[Toleration] = Field(default_factory=list)
    service_account: str | None = Field(None, description="Service account of the training pods")
    checkpoint_claim: str | None = Field(None, description="PVC holding checkpoints (deploy/k8s/checkpoints-pvc.yaml)")
    checkpoint_mount_path: str = Field("/checkpoints", description="Where the checkpoint PVC is mounted")
    checkpoint_url: str | None = Field(None, description="Object-store checkpoint folder (s3://...) when no PVC is used")
    home_claim: str | None = Field(None, description="ReadWriteMany PVC holding $INTELLIGENTOPS_HOME (deploy/k8s/home-pvc.yaml): "
                                                     "training reads its prepared data and writes its model there")
    home_mount_path: str | None = Field(None, description="Where the home claim is mounted: the home's own path, the same in "
                                                          "every pod")
    env: dict[str, str] = Field(default_factory=dict, description="Plain (non-secret) environment for every rank")
    secret_env: dict[str, str] = Field(default_factory=dict,
                                       description="Environment from Secrets: NAME -> 'secret-name/key'")
    working_dir: str = Field("/app", description="Folder in the image that holds the workloads and core packages "
                                                 "(the workload runs as `-m workloads.training` from there)")
    load_incluster_config: bool | None = Field(None, description="None: in-cluster when KUBERNETES_SERVICE_HOST is set")
    kubeconfig_file: str | None = None
    kube_context: str | None = None
    delete_on_completion: bool = Field(True, description="False leaves the pod/TrainJob for debugging")
    poll_interval: float = Field(10.0, gt=0, description="Seconds between Kubernetes API polls")
    timeout_seconds: float = Field(24 * 3600, gt=0, description="How long one training run may take")

    # --- pieces both manifests share -------------------------------------------------------------------------

    def _check(self) -> None:
        _one_of(self, "image_pull_policy", self.image_pull_policy, ("Always", "IfNotPresent", "Never"))
        for i, t in enumerate(self.tolerations):
            _one_of(self, f"tolerations[{i}].operator", t.operator, ("Exists", "Equal"))
            if t.effect is not None:
                _one_of(self, f"tolerations[{i}].effect", t.effect, ("NoSchedule", "PreferNoSchedule", "NoExecute"))
        if self.home_claim and not (self.home_mount_path or "").startswith("/"):
            raise ValueError(f"{type(self).__name__}: home_claim {self.home_claim!r} needs home_mount_path, the absolute "
                             f"path of $INTELLIGENTOPS_HOME in every pod (got {self.home_mount_path!r})")
        if self.checkpoint_claim and self.checkpoint_url:
            raise ValueError(f"{type(self).__name__}: set checkpoint_claim ({self.checkpoint_claim!r}) or "
                             f"checkpoint_url ({self.checkpoint_url!r}), not both")
        for name, ref in self.secret_env.items():
            if not _SECRET_REF.match(ref):
                raise ValueError(f"{type(self).__name__}.secret_env[{name!r}] = {ref!r}; expected 'secret-name/key'")

    def _checkpoint_location(self) -> str | None:
        return self.checkpoint_mount_path if self.checkpoint_claim else self.checkpoint_url

    def _env_list(self, request: TrainRequest, extra: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """Container env: the engine's defaults, launcher env, request env, checkpoint location, then references to
        Secrets."""
        plain = {**self._engine_env(request), **self.env, **request.env, **(extra or {})}
        if location := self._checkpoint_location():
            # Where the workload finds the checkpoint folder (a mounted PVC) or URL (object store).
            plain.setdefault(CHECKPOINT_DIR_ENV, location)
        out: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in plain.items()]
        for name, ref in self.secret_env.items():
            secret, key = ref.split("/", 1)
            out.append({"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
        return out

    def _engine_env(self, request: TrainRequest) -> dict[str, str]:
        if self._gpus(request):
            # A rank that dies makes the others' NCCL collectives fail instead of waiting for it forever.
            return {"NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
        return {"DS_ACCELERATOR": "cpu"}

    def _workload_args(self, request: TrainRequest) -> list[str]:
        return [*request.args, "--backend", "nccl" if self._gpus(request) else "gloo"]

    def _resources(self, request: TrainRequest) -> dict[str, dict[str, str]]:
        requests: dict[str, str] = {}
        limits: dict[str, str] = {}
        if self.cpu_request:
            requests["cpu"] = self.cpu_request
        if self.memory_request:
            requests["memory"] = self.memory_request
        if self.memory_limit:
            limits["memory"] = self.memory_limit
        if gpus := self._gpus(request):
            # Extended resources must have requests equal to limits.
            requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(gpus)
        return {k: v for k, v in {"requests": requests, "limits": limits}.items() if v}

    def _volumes(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(pod volumes, container volume mounts)."""
        volumes: list[dict[str, Any]] = []
        mounts: list[dict[str, Any]] = []
        if self.home_claim:
            # The paths model_checkpoint hands the workload (data.npz, config.json, the model folder) are under the
            # home, so the pod sees the home at the very path the run pod does.
            volumes.append({"name": HOME_VOLUME, "persistentVolumeClaim": {"claimName": self.home_claim}})
            mounts.append({"name": HOME_VOLUME, "mountPath": self.home_mount_path})
        if self.checkpoint_claim:
            volumes.append({"name": CHECKPOINT_VOLUME, "persistentVolumeClaim": {"claimName": self.checkpoint_claim}})
            mounts.append({"name": CHECKPOINT_VOLUME, "mountPath": self.checkpoint_mount_path})
        if self.shm_size:
            volumes.append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": self.shm_size}})
            mounts.append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})
        return volumes, mounts

    def _gpus(self, request: TrainRequest) -> int:
        """GPUs per pod: none for CPU pods (`gpus: 0`), else the spec's nproc_per_node when it names one, else
        `gpus`."""
        return (request.gpus_per_node or self.gpus) if self.gpus else 0

    def _procs_per_node(self, context: dg.AssetExecutionContext | None, request: TrainRequest) -> int:
        # One rank per GPU: NCCL refuses two ranks on one device.
        gpus = self._gpus(request)
        if gpus and context is not None:
            source = "the spec's training.nproc_per_node" if request.gpus_per_node else "INTELLIGENTOPS_K8S_GPUS"
            context.log.info(f"{type(self).__name__}: {gpus} GPU(s) per pod ({source}), one rank each, NCCL")
        return gpus or request.nproc_per_node


# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodRender:
    """What K8sPodLauncher hands to PipesK8sClient.run (base_pod_meta, base_pod_spec, command)."""

    meta: dict[str, Any]
    spec: dict[str, Any]
    command: list[str]


class K8sPodLauncher(_KubernetesLauncher):
    """Trains on one Kubernetes pod with all of its GPUs, through dagster-k8s's PipesK8sClient.

    The pod runs `torchrun --standalone --nproc_per_node <gpus> -m workloads.training <args>`; rank 0's Pipes
    messages are read from the pod log.
    """

    env_from_secrets: list[str] = Field(default_factory=list,
                                        description="Secrets whose keys all become environment variables")

    def render_pod(self, request: TrainRequest, context: dg.AssetExecutionContext | None = None) -> PodRender:
        self._check()
        nproc = self._procs_per_node(context, request)
        command = ["torchrun", "--standalone", "--nproc_per_node", str(nproc), "-m", WORKLOAD_MODULE,
                   *self._workload_args(request)]
        volumes, mounts = self._volumes()
        container: dict[str, Any] = {
            "name": TRAIN_CONTAINER,
            "image": self.image,
            "imagePullPolicy": self.image_pull_policy,
            "workingDir": self.working_dir,
            "env": self._env_list(request),
            "resources": self._resources(request),
        }
        if mounts:
            container["volumeMounts"] = mounts
        if self.env_from_secrets:
            container["envFrom"] = [{"secretRef": {"name": s}} for s in self.env_from_secrets]
        spec: dict[str, Any] = {"containers": [container], "restartPolicy": "Never"}
        if volumes:
            spec["volumes"] = volumes
        if self.node_selector:
            spec["nodeSelector"] = dict(self.node_selector)
        if self.tolerations:
            spec["tolerations"] = [t.manifest() for t in self.tolerations]
        if self.service_account:
            spec["serviceAccountName"] = self.service_account
        meta = {"labels": {"app.kubernetes.io/name": "intelligentops-train",
                           "intelligentops.io/spec": _dns_label(request.spec_name, 63)}}
        return PodRender(meta=meta, spec=spec, command=command)

    def render_pod_manifest(self, request: TrainRequest, pipes_env: Mapping[str, str] | None = None,
                            pod_name: str = "intelligentops-train") -> dict[str, Any]:
        """The full Pod PipesK8sClient would create (its own build_pod_body), as a camelCase dict."""
        import kubernetes
        from dagster_k8s.pipes import build_pod_body

        r = self.render_pod(request)
        pod = build_pod_body(pod_name=pod_name, image=self.image, command=r.command,
                             env_vars=dict(pipes_env or {}), base_pod_meta=r.meta, base_pod_spec=r.spec)
        manifest = kubernetes.client.ApiClient().sanitize_for_serialization(pod)
        return {"apiVersion": "v1", "kind": "Pod", **manifest}

    def launch(self, context: dg.AssetExecutionContext, request: TrainRequest) -> dg.PipesClientCompletedInvocation:
        from dagster_k8s import PipesK8sClient

        r = self.render_pod(request, context)
        client = PipesK8sClient(load_incluster_config=self.load_incluster_config,
                                kubeconfig_file=self.kubeconfig_file, kube_context=self.kube_context,
                                poll_interval=self.poll_interval)
        # image and command are already in the spec; PipesK8sClient adds the Pipes env to the first container.
        return client.run(context=context, extras=dict(request.extras), namespace=self.namespace,
                          base_pod_meta=r.meta, base_pod_spec=r.spec, image=self.image, command=r.command,
                          pod_wait_timeout=self.timeout_seconds, delete_pod_on_completion=self.delete_on_completion)


# ---------------------------------------------------------------------------------------------------------------


class TrainJobLauncher(_KubernetesLauncher):
    """Trains on several GPU nodes with a Kubeflow Trainer `TrainJob` (DeepSpeed runtime by default).

    With `deepspeed-distributed` (OpenMPI, the launcher pod is also node 0) the trainer command is
    `mpirun --hostfile /etc/mpi/hostfile -x <env>... python -m workloads.training <args>`; with
    `torch-distributed` it is `torchrun -m workloads.training <args>` on every node (the Trainer sets torchrun's
    PET_* variables). Rank 0's Pipes messages are read from the log of the pod labelled with
    `rank0_replicated_job` and completion index 0.
    """

    runtime_ref: str = Field("deepspeed-distributed", description="ClusterTrainingRuntime the TrainJob uses")
    runtime_kind: str = Field("mpi", description="mpi for deepspeed-distributed, torch for torch-distributed")
    num_nodes: int = Field(2, ge=1, description="Training nodes (pods), each with `gpus` GPUs")
    rank0_replicated_job: str | None = Field(None, description="JobSet replicated job of rank 0; default launcher (mpi) or node (torch)")
    hostfile: str = Field("/etc/mpi/hostfile", description="Where the MPI runtime writes the hostfile")
    python: str = Field("python", description="Interpreter mpirun starts on each slot")

    def _rank0_job(self) -> str:
        return self.rank0_replicated_job or ("launcher" if self.runtime_kind == "mpi" else "node")

    def trainjob_name(self, run_id: str, spec_name: str) -> str:
        # JobSet derives pod and service names from this; keep it well under the 63-character label limit.
        return f"io-{_dns_label(spec_name, 20)}-{run_id[:8]}".lower()

    def render_command(self, request: TrainRequest, env_names: list[str]) -> list[str]:
        if self.runtime_kind == "torch":
            return ["torchrun", "-m", WORKLOAD_MODULE, *self._workload_args(request)]
        # mpirun starts remote ranks through ssh; -x copies each variable from the launcher's environment.
        exported = [a for name in env_names for a in ("-x", name)]
        return ["mpirun", "--hostfile", self.hostfile, "--wdir", self.working_dir, *exported,
                self.python, "-m", WORKLOAD_MODULE, *self._workload_args(request)]

    def _nodes(self, request: TrainRequest) -> int:
        return request.num_nodes or self.num_nodes

    def render_trainjob(self, request: TrainRequest, name: str,
                        pipes_env: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The TrainJob object this launcher creates, built with the typed Trainer models."""
        from kubeflow_trainer_api import models as m

        self._check()
        _one_of(self, "runtime_kind", self.runtime_kind, ("mpi", "torch"))
        env = self._env_list(request, extra=pipes_env)
        env_names = [e["name"] for e in env]
        volumes, mounts = self._volumes()
        quantity = m.IoK8sApimachineryPkgApiResourceQuantity
        res = self._resources(request)
        resources = m.IoK8sApiCoreV1ResourceRequirements(
            requests={k: quantity(v) for k, v in res.get("requests", {}).items()} or None,
            limits={k: quantity(v) for k, v in res.get("limits", {}).items()} or None,
        )
        pod_patch = m.TrainerV1alpha1PodSpecPatch(
            node_selector=dict(self.node_selector) or None,
            tolerations=[m.IoK8sApiCoreV1Toleration.from_dict(t.manifest()) for t in self.tolerations] or None,
            service_account_name=self.service_account,
            volumes=[m.IoK8sApiCoreV1Volume.from_dict(v) for v in volumes] or None,
            containers=[m.TrainerV1alpha1ContainerPatch(
                name=RUNTIME_CONTAINER, volume_mounts=[m.IoK8sApiCoreV1VolumeMount.from_dict(v) for v in mounts])]
            if mounts else None,
        )
        # Every replicated job of the runtime gets the same pod patch: MPI worker nodes need the GPUs' node
        # pool, the checkpoint volume and /dev/shm just like the launcher.
        jobs = ["launcher", "node"] if self.runtime_kind == "mpi" else ["node"]
        patch = m.TrainerV1alpha1RuntimePatch(
            manager=PATCH_MANAGER,
            training_runtime_spec=m.TrainerV1alpha1TrainingRuntimeSpecPatch(
                template=m.TrainerV1alpha1JobSetTemplatePatch(spec=m.TrainerV1alpha1JobSetSpecPatch(replicated_jobs=[
                    m.TrainerV1alpha1ReplicatedJobPatch(name=j, template=m.TrainerV1alpha1JobTemplatePatch(
                        spec=m.TrainerV1alpha1JobSpecPatch(template=m.TrainerV1alpha1PodTemplatePatch(spec=pod_patch))))
                    for j in jobs]))),
        )
        job = m.TrainerV1alpha1TrainJob(
            api_version=f"{TRAINER_GROUP}/{TRAINER_VERSION}",
            kind="TrainJob",
            metadata=m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
                name=name, namespace=self.namespace,
                labels={"app.kubernetes.io/name": "intelligentops-train",
                        "intelligentops.io/spec": _dns_label(request.spec_name, 63)}),
            spec=m.TrainerV1alpha1TrainJobSpec(
                runtime_ref=m.TrainerV1alpha1RuntimeRef(name=self.runtime_ref),
                trainer=m.TrainerV1alpha1Trainer(
                    image=self.image,
                    command=self.render_command(request, env_names),
                    env=[m.IoK8sApiCoreV1EnvVar.from_dict(e) for e in env],
                    num_nodes=self._nodes(request),
                    num_proc_per_node=self._gpus(request) or request.nproc_per_node,
                    resources_per_node=resources,
                ),
                runtime_patches=[patch],
            ),
        )
        return job.to_dict()

    def rank0_selector(self, name: str) -> str:
        return f"{JOBSET_NAME_LABEL}={name},{REPLICATED_JOB_LABEL}={self._rank0_job()},{COMPLETION_INDEX_LABEL}=0"

    def _apis(self) -> KubeApis:
        return connect(self.load_incluster_config, self.kubeconfig_file, self.kube_context)

    def launch(self, context: dg.AssetExecutionContext, request: TrainRequest) -> dg.PipesClientCompletedInvocation:
        from dagster._core.pipes.utils import PipesEnvContextInjector, open_pipes_session
        from dagster_k8s.client import DagsterKubernetesClient, WaitForPodState
        from dagster_k8s.pipes import PipesK8sPodLogsMessageReader

        apis = self._apis()
        reader = PipesK8sPodLogsMessageReader()
        name = self.trainjob_name(context.run_id, request.spec_name)
        deadline = time.monotonic() + self.timeout_seconds
        with open_pipes_session(context=context, extras=dict(request.extras),
                                context_injector=PipesEnvContextInjector(), message_reader=reader) as session:
            body = self.render_trainjob(request, name, session.get_bootstrap_env_vars())
            apis.custom.create_namespaced_custom_object(TRAINER_GROUP, TRAINER_VERSION, self.namespace,
                                                        TRAINJOB_PLURAL, body)
            context.log.info(f"Created TrainJob {self.namespace}/{name} on runtime {self.runtime_ref} "
                             f"({self._nodes(request)} node(s) x {self._gpus(request)} GPU(s))")
            try:
                pod_name = self._wait_for_rank0_pod(apis, name, deadline)
                kube = DagsterKubernetesClient(batch_api=None, core_api=apis.core, logger=context.log.debug,
                                               sleeper=time.sleep, timer=time.time)
                # The log stream can only open once the container runs (or has already finished).
                kube.wait_for_pod(pod_name, self.namespace, wait_for_state=WaitForPodState.Ready,
                                  wait_time_between_attempts=self.poll_interval,
                                  wait_timeout=max(deadline - time.monotonic(), 1))
                reader.consume_pod_logs(context=context, core_api=apis.core, pod_name=pod_name,
                                        namespace=self.namespace)
                self._wait_for_trainjob(apis, name, deadline)
            finally:
                if self.delete_on_completion:
                    apis.custom.delete_namespaced_custom_object(TRAINER_GROUP, TRAINER_VERSION, self.namespace,
                                                                TRAINJOB_PLURAL, name)
        return dg.PipesClientCompletedInvocation(session)

    def _trainjob_condition(self, apis: KubeApis, name: str) -> tuple[str, str] | None:
        """("Complete" | "Failed", message) once the TrainJob has finished, else None."""
        obj = apis.custom.get_namespaced_custom_object(TRAINER_GROUP, TRAINER_VERSION, self.namespace,
                                                       TRAINJOB_PLURAL, name)
        for c in (obj.get("status") or {}).get("conditions") or []:
            if c.get("type") in ("Complete", "Failed") and c.get("status") == "True":
                return c["type"], f"{c.get('reason', '')}: {c.get('message', '')}"
        return None

    def _wait_for_rank0_pod(self, apis: KubeApis, name: str, deadline: float) -> str:
        selector = self.rank0_selector(name)
        while True:
            pods = apis.core.list_namespaced_pod(self.namespace, label_selector=selector).items
            if pods:
                # A retried Job leaves the failed pod behind: follow the newest one.
                pods.sort(key=lambda p: p.metadata.creation_timestamp or 0)
                return pods[-1].metadata.name
            if (done := self._trainjob_condition(apis, name)) and done[0] == "Failed":
                raise dg.Failure(f"TrainJob {self.namespace}/{name} failed before rank 0 started: {done[1]}")
            if time.monotonic() > deadline:
                raise dg.Failure(f"No rank-0 pod matched {selector!r} in {self.namespace} within "
                                 f"timeout_seconds={self.timeout_seconds}; is runtime {self.runtime_ref!r} installed "
                                 f"and rank0_replicated_job={self._rank0_job()!r} right for it?")
            time.sleep(self.poll_interval)

    def _wait_for_trainjob(self, apis: KubeApis, name: str, deadline: float) -> None:
        while (done := self._trainjob_condition(apis, name)) is None:
            if time.monotonic() > deadline:
                raise dg.Failure(f"TrainJob {self.namespace}/{name} still running after "
                                 f"timeout_seconds={self.timeout_seconds}")
            time.sleep(self.poll_interval)
        if done[0] == "Failed":
            raise dg.Failure(f"TrainJob {self.namespace}/{name} failed: {done[1]}")


# ---------------------------------------------------------------------------------------------------------------


def kubernetes_launchers(k8s: KubernetesSettings, home: str) -> dict[str, TrainingLauncher]:
    """The "kubernetes" deployment's launchers, configured from `INTELLIGENTOPS_K8S_*` (resources/settings.py).

    `launcher` is the single-pod launcher; `trainjob_launcher` serves specs with training.launcher: trainjob.
    The image is a dg.EnvVar so the code location loads without it and a run fails naming the variable.
    """
    common: dict[str, Any] = dict(
        image=dg.EnvVar("INTELLIGENTOPS_TRAIN_IMAGE"),
        namespace=k8s.namespace,
        gpus=k8s.gpus,
        service_account=k8s.service_account,
        checkpoint_claim=k8s.checkpoint_claim,
        home_claim=k8s.home_claim,
        home_mount_path=home if k8s.home_claim else None,
        checkpoint_url=k8s.checkpoint_url,
        node_selector=dict(k8s.node_selector),
        tolerations=[Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")],
    )
    return {
        "launcher": K8sPodLauncher(**common, env_from_secrets=list(k8s.env_secrets)),
        "trainjob_launcher": TrainJobLauncher(**common, num_nodes=k8s.num_nodes),
    }
