"""Where the inference server runs: a local process, or a KServe InferenceService on Kubernetes.

Both launchers run the same program, `python -m workloads.serving --config server.json` from the repository
root, with the typed config the deployment asset builds (core/server_config.py, assets/deployment.py):

- `LocalServerLauncher` starts the server as a process on this machine (pid, port, config and log under
  `<home>/<spec>/deployment/`), or, when one already runs with the same config, sends it SIGHUP so it re-reads
  the aliases and swaps models without dropping a request; then waits until it serves the expected version.
- `KServeLauncher` renders a ConfigMap (the config) and an `InferenceService` (serving.kserve.io/v1beta1) from the
  kserve SDK's typed models, whose predictor container runs the same program, and applies both through the
  Kubernetes client. `render()` is pure, so tests validate the manifests without a cluster.

`AuditResource` hands the assets the audit store (core/audit/) behind one URL.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from core.audit import default_audit_url
from core.server_config import DEFAULT_PORT, ServerConfig, TlsFiles, server_config_json, write_server_config
from resources.storage import atomic_write_json

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILE = "server.json"
STATE_FILE = "server.pid.json"
LOG_FILE = "server.log"  # the server's own log, rotated by size inside the server
OUTPUT_FILE = "server.out"  # what the process writes outside its log (before logging starts): new per start
SMOKE_KEY_FILE = "smoke.key"  # the deployment's own keys, mode 0600 (assets/deployment.py writes them)
OPERATOR_KEY_FILE = "operator.key"
TLS_MOUNT = "/etc/intelligentops/tls"
KEYS_MOUNT = "/etc/intelligentops-keys"
ISVC_GROUP, ISVC_VERSION, ISVC_PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
CONFIG_MOUNT = "/etc/intelligentops"
SERVER_MODULE = "workloads.serving"  # run with `python -m`, from the repository root (the image's working dir)


class ServerLaunchError(RuntimeError):
    """The launcher could not get a server to serve: it did not start, exited, or did not become ready in
    time; the message says where its log or status is."""


@dataclass(frozen=True)
class Deployed:
    """What a launcher did: where the server answers and which version it serves."""

    endpoint: str
    serving: dict[str, str]  # alias -> version
    how: str  # started | reloaded | restarted | applied
    tls: TlsFiles | None = None  # how a client of this endpoint speaks TLS (None: plain HTTP)
    pid: int | None = None
    log_path: str | None = None
    config_path: str | None = None
    resource_name: str | None = None


class AuditResource(dg.ConfigurableResource):
    """The decision audit log: SQLite under the home by default; `url` (or $INTELLIGENTOPS_AUDIT_URL) names
    another SQLAlchemy database, e.g. postgresql+psycopg2://... on a cluster. Its keys (core/audit/crypto.py)
    are in `keys_dir` ($INTELLIGENTOPS_KEYS_DIR), default `<home>/keys`; the server is given the same folder."""

    home: str
    url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<home>/audit/audit.db")
    keys_dir: str | None = Field(None, description="the keys folder; default <home>/keys")

    def resolved_url(self) -> str:
        return self.url or default_audit_url(self.home)

    def resolved_keys_dir(self) -> str:
        from core.keys import keys_dir

        return str(keys_dir(self.home, self.keys_dir))

    def checkpoint_file(self) -> str | None:
        """Where the store's heads are checkpointed: beside a SQLite store; for a database, under the home."""
        if self.resolved_url().startswith("sqlite") or "://" in self.home:
            return None
        return str(Path(self.home) / "audit" / "checkpoints.jsonl")

    def store(self):
        from core.audit import AuditKeys, AuditStore

        keys = AuditKeys.load(self.resolved_keys_dir())
        file = self.checkpoint_file()
        return AuditStore(self.resolved_url(), keys) if file is None else AuditStore(self.resolved_url(), keys,
                                                                                      checkpoints=file)


class ServerLauncher(dg.ConfigurableResource):
    """Starts or reloads a spec's inference server from its config and waits until it serves."""

    def deploy(self, spec_name: str, config: ServerConfig, expect: dict[str, str],
               log: Any = None) -> Deployed:
        raise NotImplementedError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def server_command(python: str, config_path: str) -> list[str]:
    """The server's command line; it runs with the repository root as its working directory."""
    return [python, "-m", SERVER_MODULE, "--config", config_path]


def _alive(pid: int) -> bool:
    """The pid runs and is one of our servers (not a reused pid)."""
    try:
        os.kill(pid, 0)
        proc = Path(f"/proc/{pid}/cmdline")
        if not proc.parent.exists():  # no /proc here: trust the pid
            return True
        args = proc.read_bytes().split(b"\0")
        # workloads/serve.py: a server started before the package existed, so an upgrade stops it, not orphans it
        return any(a == b"-m" and b == SERVER_MODULE.encode() for a, b in zip(args, args[1:])) or \
            any(a.endswith(b"workloads/serve.py") for a in args)
    except (ProcessLookupError, PermissionError, FileNotFoundError):
        return False


def config_digest(config: ServerConfig, leave_out: tuple[str, ...] = ()) -> str:
    """The sha256 of the config's JSON (keys sorted), without the keys in `leave_out`."""
    data = {k: v for k, v in config.to_json().items() if k not in leave_out}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class LocalServerLauncher(ServerLauncher):
    """The server as a process on this machine, outliving the Dagster run that started it."""

    home: str
    python: str | None = Field(None, description="Interpreter for the server; default the current one")
    ready_timeout: float = Field(300.0, gt=0, description="Seconds to wait for the server to serve")
    host: str = "127.0.0.1"

    def folder(self, spec_name: str) -> Path:
        p = Path(self.home) / spec_name / "deployment"
        p.mkdir(parents=True, exist_ok=True)
        return p

    def state(self, spec_name: str) -> dict[str, Any] | None:
        path = self.folder(spec_name) / STATE_FILE
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        return state if _alive(int(state["pid"])) else None

    def stop(self, spec_name: str, timeout: float = 30.0) -> bool:
        state = self.state(spec_name)
        if state is None:
            return False
        pid = int(state["pid"])
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        (self.folder(spec_name) / STATE_FILE).unlink(missing_ok=True)
        return True

    def deploy(self, spec_name: str, config: ServerConfig, expect: dict[str, str],
               log: Any = None) -> Deployed:
        folder = self.folder(spec_name)
        state = self.state(spec_name)
        wanted_port = config.port
        config = config.replace(log_file=str(folder / LOG_FILE))
        digest = config_digest(config, leave_out=("port",))
        if state is not None and state["digest"] == digest and wanted_port in (None, state["port"]):
            os.kill(int(state["pid"]), signal.SIGHUP)  # re-read the aliases now; in-flight requests finish
            serving = self._wait(spec_name, config, int(state["port"]), expect, int(state["pid"]))
            return Deployed(endpoint=self._url(config, int(state["port"])), serving=serving, how="reloaded",
                            pid=int(state["pid"]), log_path=str(folder / LOG_FILE),
                            config_path=str(folder / CONFIG_FILE), tls=config.tls)
        how = "started"
        previous_port = state["port"] if state else None
        if state is not None:
            self.stop(spec_name)
            how = "restarted"
        port = wanted_port or (previous_port if previous_port and _port_free(previous_port) else _free_port())
        if not _port_free(port):
            raise ServerLaunchError(f"{spec_name}: port {port} (deployment.port) is taken by another process; free it or "
                              "choose another port in the spec")
        config_path = folder / CONFIG_FILE
        write_server_config(config_path, config.replace(port=port))
        # The server rotates its own log (LOG_FILE); this file only catches what is written before logging starts
        # or below Python (a crash), and starts empty each time, so neither grows without bound.
        with open(folder / OUTPUT_FILE, "wb") as output:
            proc = subprocess.Popen(
                server_command(self.python or sys.executable, str(config_path)),
                cwd=str(REPO_ROOT), stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # outlives the Dagster step that started it
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"},
            )
        atomic_write_json(folder / STATE_FILE, {"pid": proc.pid, "port": port, "digest": digest,
                                                "started": time.time(), "config": str(config_path)})
        if log is not None:
            log.info(f"{spec_name}: server pid {proc.pid} on port {port}, log {folder / LOG_FILE}")
        serving = self._wait(spec_name, config, port, expect, proc.pid, proc)
        return Deployed(endpoint=self._url(config, port), serving=serving, how=how, pid=proc.pid,
                        log_path=str(folder / LOG_FILE), config_path=str(config_path), tls=config.tls)

    def _url(self, config: ServerConfig, port: int) -> str:
        """Where a client on this machine reaches the server: its host (loopback when it binds every address)."""
        host = self.host if config.host in ("0.0.0.0", "::", "127.0.0.1") else config.host
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if config.tls else 'http'}://{host}:{port}"

    def _tail(self, spec_name: str) -> str:
        folder = self.folder(spec_name)
        parts = []
        for name in (OUTPUT_FILE, LOG_FILE):
            path = folder / name
            if path.is_file() and path.stat().st_size:
                with open(path, "rb") as fh:
                    fh.seek(max(0, path.stat().st_size - 3000))
                    parts.append(f"--- {path}\n" + fh.read().decode("utf-8", "replace"))
        return "\n".join(parts)

    def _wait(self, spec_name: str, config: ServerConfig, port: int, expect: dict[str, str], pid: int,
              proc: subprocess.Popen | None = None) -> dict[str, str]:
        """Until the server is ready and serves the expected version per alias (asked with the smoke key, which
        has the read scope, over TLS when the server speaks it)."""
        import httpx

        key_file = self.folder(spec_name) / SMOKE_KEY_FILE
        headers = {"Authorization": f"Bearer {key_file.read_text().strip()}"} if key_file.is_file() else {}
        verify = config.tls.client_context() if config.tls else True
        deadline = time.monotonic() + self.ready_timeout
        seen: dict[str, str] = {}
        while time.monotonic() < deadline:
            if (proc is not None and proc.poll() is not None) or not _alive(pid):
                raise ServerLaunchError(f"{spec_name}: the server (pid {pid}) exited before it was ready; the end of "
                                        f"its output and log:\n{self._tail(spec_name)}")
            try:
                status = httpx.get(f"{self._url(config, port)}/intelligentops/status", headers=headers, timeout=2.0,
                                   verify=verify).json()
                seen = {a: v["version"] for a, v in status.get("versions", {}).items()}
                if all(seen.get(a) == v for a, v in expect.items()):
                    return seen
            except (httpx.HTTPError, ValueError, AttributeError):
                pass
            time.sleep(0.25)
        raise ServerLaunchError(f"{spec_name}: the server on port {port} did not serve {expect} within "
                          f"{self.ready_timeout:.0f} s (it serves {seen or 'nothing yet'}); see "
                          f"{self.folder(spec_name) / LOG_FILE}")


# --- Kubernetes ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KubeServingApis:
    core: Any  # kubernetes.client.CoreV1Api
    custom: Any  # kubernetes.client.CustomObjectsApi


class KServeLauncher(ServerLauncher):
    """A KServe InferenceService whose predictor container runs `python -m workloads.serving` from the
    project's image.

    The server's config travels as a ConfigMap; secrets (the audit database URL, MLflow credentials) as
    environment from Secrets, referenced in the config as `env:VAR`.
    """

    image: str = Field(description="The project's image (deploy/Dockerfile), e.g. registry/intelligentops:0.1.0")
    namespace: str = "default"
    service_account: str | None = None
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(3, ge=1)
    cpu_request: str | None = Field(None, description="None: one CPU per server worker (deployment.workers, which "
                                                      "reaches the predictor in its config)")
    memory_request: str = "2Gi"
    memory_limit: str | None = "4Gi"
    env: dict[str, str] = Field(default_factory=dict)
    secret_env: dict[str, str] = Field(default_factory=dict, description="NAME -> 'secret-name/key'")
    working_dir: str = "/app"
    audit_url_secret: str = Field("intelligentops-audit/url",
                                  description="'secret-name/key' holding the audit database URL; the URL itself "
                                              "never goes into the ConfigMap")
    tls_secret: str = Field("intelligentops-tls", description="a kubernetes.io/tls Secret (tls.crt, tls.key; "
                                                              "ca.crt for client certificates) mounted when the "
                                                              "spec sets deployment.tls")
    keys_secret: str = Field("intelligentops-keys", description="a Secret holding the keys folder's files "
                                                                "(audit-mac.key, audit-enc.key), mounted read-only "
                                                                "as the server's keys_dir")
    load_incluster_config: bool | None = None
    kubeconfig_file: str | None = None
    kube_context: str | None = None
    ready_timeout: float = Field(600.0, gt=0)
    poll_interval: float = Field(5.0, gt=0)

    def names(self, spec_name: str) -> tuple[str, str]:
        base = spec_name.replace("_", "-")[:50]
        return base, f"{base}-server-config"

    def render(self, spec_name: str, config: ServerConfig) -> tuple[dict[str, Any], dict[str, Any]]:
        """(ConfigMap, InferenceService) as plain dicts, built from the kubernetes and kserve typed models."""
        from kserve import (
            ApiClient,
            V1beta1InferenceService,
            V1beta1InferenceServiceSpec,
            V1beta1PredictorSpec,
        )
        from kubernetes import client as k

        isvc_name, cm_name = self.names(spec_name)
        port = DEFAULT_PORT
        labels = {"app.kubernetes.io/name": "intelligentops-server", "intelligentops.io/spec": spec_name}
        # Inside the pod the server binds every address: the InferenceService's gateway (Knative/Istio, with the
        # cluster's authentication) is what callers reach, so the server is told so knowingly. Logs go to stdout,
        # which the kubelet rotates. TLS files come from a Secret mounted at TLS_MOUNT.
        changes: dict[str, Any] = {"port": port, "model_cache": "/tmp/intelligentops-models", "host": "0.0.0.0",
                                   "gateway_authenticates": True, "log_file": None, "keys_dir": KEYS_MOUNT}
        if config.tls is not None:
            changes["tls"] = {"cert_file": f"{TLS_MOUNT}/tls.crt", "key_file": f"{TLS_MOUNT}/tls.key",
                              "client_ca_file": f"{TLS_MOUNT}/ca.crt" if config.tls.client_ca_file else None}
        secret_env = dict(self.secret_env)
        if not config.audit_url.startswith("env:"):
            # A database URL carries credentials: the predictor reads it from a Secret, not from the ConfigMap.
            changes["audit_url"] = "env:INTELLIGENTOPS_AUDIT_URL"
            secret_env.setdefault("INTELLIGENTOPS_AUDIT_URL", self.audit_url_secret)
        cluster_config = config.replace(**changes)  # validated again, as the server will read it
        config_map = k.V1ConfigMap(api_version="v1", kind="ConfigMap",
                                   metadata=k.V1ObjectMeta(name=cm_name, namespace=self.namespace, labels=labels),
                                   data={CONFIG_FILE: server_config_json(cluster_config)})
        env = [k.V1EnvVar(name=n, value=v) for n, v in {"MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
                                                        "PYTHONPATH": self.working_dir, **self.env}.items()]
        for name, ref in secret_env.items():
            if "/" not in ref:
                raise ValueError(f"KServeLauncher.secret_env[{name!r}] = {ref!r}; expected 'secret-name/key'")
            secret, key = ref.split("/", 1)
            env.append(k.V1EnvVar(name=name, value_from=k.V1EnvVarSource(
                secret_key_ref=k.V1SecretKeySelector(name=secret, key=key))))
        resources = {"requests": {"cpu": self.cpu_request or str(cluster_config.workers),
                                  "memory": self.memory_request}}
        if self.memory_limit:
            resources["limits"] = {"memory": self.memory_limit}
        tls = cluster_config.tls
        if tls is not None and tls.client_ca_file:  # the kubelet has no client certificate: a TCP probe
            probe = k.V1Probe(tcp_socket=k.V1TCPSocketAction(port=port), period_seconds=5, failure_threshold=3)
        else:
            probe = k.V1Probe(http_get=k.V1HTTPGetAction(path=f"/v2/models/{spec_name}/ready", port=port,
                                                         scheme="HTTPS" if tls else "HTTP"),
                              period_seconds=5, failure_threshold=3)
        mounts = [k.V1VolumeMount(name="server-config", mount_path=CONFIG_MOUNT, read_only=True)]
        volumes = [k.V1Volume(name="server-config", config_map=k.V1ConfigMapVolumeSource(name=cm_name))]
        # The audit log's keys (core/keys.py) from their Secret, owner-read-only as the server checks.
        mounts.append(k.V1VolumeMount(name="server-keys", mount_path=KEYS_MOUNT, read_only=True))
        volumes.append(k.V1Volume(name="server-keys", secret=k.V1SecretVolumeSource(secret_name=self.keys_secret,
                                                                                    default_mode=0o400)))
        if tls is not None:
            mounts.append(k.V1VolumeMount(name="server-tls", mount_path=TLS_MOUNT, read_only=True))
            volumes.append(k.V1Volume(name="server-tls", secret=k.V1SecretVolumeSource(secret_name=self.tls_secret,
                                                                                       default_mode=0o400)))
        container = k.V1Container(
            name="kserve-container", image=self.image, working_dir=self.working_dir,
            command=server_command("python", f"{CONFIG_MOUNT}/{CONFIG_FILE}"),
            ports=[k.V1ContainerPort(container_port=port, protocol="TCP")], env=env,
            resources=k.V1ResourceRequirements(**resources), readiness_probe=probe, volume_mounts=mounts)
        predictor = V1beta1PredictorSpec(
            containers=[container], min_replicas=self.min_replicas, max_replicas=self.max_replicas,
            service_account_name=self.service_account, volumes=volumes)
        isvc = V1beta1InferenceService(
            api_version=f"{ISVC_GROUP}/{ISVC_VERSION}", kind="InferenceService",
            metadata=k.V1ObjectMeta(name=isvc_name, namespace=self.namespace, labels=labels, annotations={
                "intelligentops.io/config-sha256": config_digest(cluster_config)}),
            spec=V1beta1InferenceServiceSpec(predictor=predictor))
        api = ApiClient()
        return api.sanitize_for_serialization(config_map), api.sanitize_for_serialization(isvc)

    def _apis(self) -> KubeServingApis:
        from resources.k8s import connect

        apis = connect(self.load_incluster_config, self.kubeconfig_file, self.kube_context)
        return KubeServingApis(core=apis.core, custom=apis.custom)

    def deploy(self, spec_name: str, config: ServerConfig, expect: dict[str, str], log: Any = None,
               apis: KubeServingApis | None = None) -> Deployed:
        from kubernetes.client.exceptions import ApiException

        apis = apis or self._apis()
        config_map, isvc = self.render(spec_name, config)
        name, cm_name = isvc["metadata"]["name"], config_map["metadata"]["name"]
        try:
            apis.core.create_namespaced_config_map(self.namespace, config_map)
        except ApiException as exc:
            if exc.status != 409:
                raise
            apis.core.replace_namespaced_config_map(cm_name, self.namespace, config_map)
        try:
            apis.custom.create_namespaced_custom_object(ISVC_GROUP, ISVC_VERSION, self.namespace, ISVC_PLURAL, isvc)
            how = "applied"
        except ApiException as exc:
            if exc.status != 409:
                raise
            # A changed config annotation rolls the predictor, which re-reads the aliases on start.
            apis.custom.patch_namespaced_custom_object(ISVC_GROUP, ISVC_VERSION, self.namespace, ISVC_PLURAL, name,
                                                       isvc)
            how = "patched"
        deadline = time.monotonic() + self.ready_timeout
        last = "no status yet"
        while time.monotonic() < deadline:
            obj = apis.custom.get_namespaced_custom_object(ISVC_GROUP, ISVC_VERSION, self.namespace, ISVC_PLURAL,
                                                           name)
            status = obj.get("status") or {}
            ready = next((c for c in status.get("conditions", []) if c.get("type") == "Ready"), None)
            if ready is not None and ready.get("status") == "True" and status.get("url"):
                return Deployed(endpoint=status["url"], serving=dict(expect), how=how, resource_name=name)
            if ready is not None:
                last = f"Ready={ready.get('status')} ({ready.get('reason', '')}: {ready.get('message', '')})"
            time.sleep(self.poll_interval)
        raise ServerLaunchError(f"{spec_name}: InferenceService {self.namespace}/{name} not ready within "
                          f"{self.ready_timeout:.0f} s: {last}")


def kubernetes_server_launcher(settings: Any) -> KServeLauncher:
    """The "kubernetes" deployment's server launcher, in the training launchers' namespace (KubernetesSettings).

    The image is a dg.EnvVar, as for training, so the code location loads without it and a run names the variable.
    """
    return KServeLauncher(image=dg.EnvVar("INTELLIGENTOPS_SERVE_IMAGE"), namespace=settings.namespace)
