"""The KServe launcher without a cluster.

The rendered ConfigMap and the InferenceService's pod-level pieces are validated against the Kubernetes OpenAPI
schema (kubernetes-validate, strict); the InferenceService reads back unchanged through the kserve SDK's typed
models. Then `deploy()` runs the real Kubernetes client against a small fake API server on loopback that keeps
objects in memory and answers the REST paths the client calls, so the requests themselves are checked.
"""

import json
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from support import JsonHandler

from core.server_config import ServerConfig, read_server_config
from resources.servers import CONFIG_FILE, KEYS_MOUNT, KServeLauncher

K8S_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
CONFIG = ServerConfig(spec="credit_risk", tracking_uri="http://mlflow.intelligentops:5000", audit_url="env:AUDIT_URL",
                      mode="canary", canary_share=0.1, numeric={"income": [0, 1e6], "age": [18, 100]},
                      categorical={"purpose": None}, text=["emp_title"], port=None)
FULL = dict(image="registry.example.com/intelligentops:0.1.0", namespace="intelligentops",
            service_account="intelligentops-serve", env={"LOG_LEVEL": "info"},
            secret_env={"AUDIT_URL": "audit-db/url"}, min_replicas=2, max_replicas=5)


def roundtrip(data: Any, klass: str) -> Any:
    """Read `data` as the typed model `klass` (kserve's own models, or the kubernetes client's for the core
    objects inside) and write it back; a field the models do not know is an error."""
    import re

    import kserve.models
    import kubernetes

    if klass.startswith("list["):
        return [roundtrip(d, klass[5:-1]) for d in data]
    if klass.startswith("dict("):
        inner = re.match(r"dict\(([^,]*), (.*)\)", klass).group(2)
        return {k: roundtrip(v, inner) for k, v in data.items()}
    if not hasattr(kserve.models, klass):
        if hasattr(kubernetes.client, klass):
            api = kubernetes.client.ApiClient()
            return api.sanitize_for_serialization(api._ApiClient__deserialize(data, klass))
        return data
    cls = getattr(kserve.models, klass)
    by_json = {v: k for k, v in cls.attribute_map.items()}
    unknown = sorted(set(data) - set(by_json))
    assert not unknown, f"{klass} has no fields {unknown}"
    return {key: roundtrip(value, cls.openapi_types[by_json[key]]) for key, value in data.items()}


def validate_k8s(obj: dict[str, Any]) -> None:
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("settings", [dict(image="img:1"), FULL])
def test_inference_service_and_config_map_are_valid(settings: dict, tmp_path: Path, monkeypatch) -> None:
    config_map, isvc = KServeLauncher(**settings).render("credit_risk", CONFIG)
    validate_k8s(config_map)
    served = json.loads(config_map["data"][CONFIG_FILE])
    assert served["port"] == 8080 and served["spec"] == "credit_risk" and served["audit_url"] == "env:AUDIT_URL"
    # The ConfigMap holds exactly what the server reads: the same schema, with the secret from the environment.
    mounted = tmp_path / CONFIG_FILE
    mounted.write_text(config_map["data"][CONFIG_FILE])
    monkeypatch.setenv("AUDIT_URL", "postgresql+psycopg2://audit@db/audit")
    # Inside the pod it binds every address, knowingly: the InferenceService's gateway is what callers reach.
    assert read_server_config(mounted) == CONFIG.replace(port=8080, model_cache="/tmp/intelligentops-models",
                                                          audit_url="postgresql+psycopg2://audit@db/audit",
                                                          host="0.0.0.0", gateway_authenticates=True,
                                                          keys_dir=KEYS_MOUNT)
    assert list(served["numeric"]) == list(CONFIG.numeric)  # column order is the model's input order

    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    assert isvc["metadata"]["name"] == "credit-risk"
    # The typed models read it back unchanged: no misspelled or unknown field was dropped.
    assert roundtrip(isvc, "V1beta1InferenceService") == isvc

    predictor = isvc["spec"]["predictor"]
    (container,) = predictor["containers"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"},
           "spec": {"containers": predictor["containers"], "volumes": predictor["volumes"],
                    **({"serviceAccountName": predictor["serviceAccountName"]}
                       if "serviceAccountName" in predictor else {})}}
    validate_k8s(pod)
    assert container["command"] == ["python", "-m", "workloads.serving", "--config",
                                    f"/etc/intelligentops/{CONFIG_FILE}"]
    # Every worker process gets a CPU: the predictor asks for as many as the config's workers.
    assert served["workers"] == CONFIG.workers and container["resources"]["requests"]["cpu"] == str(CONFIG.workers)
    assert container["workingDir"] == "/app"  # the image's repository root, where `-m workloads.serving` resolves
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/models/credit_risk/ready"
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
    if settings is FULL:
        assert env["AUDIT_URL"] == {"secretKeyRef": {"name": "audit-db", "key": "url"}}
        assert predictor["minReplicas"] == 2 and predictor["serviceAccountName"] == "intelligentops-serve"
    assert predictor["volumes"][0]["configMap"]["name"] == config_map["metadata"]["name"]
    # The audit log's keys come from their own Secret, owner-read-only, at the config's keys_dir; never in the
    # ConfigMap.
    keys = next(v for v in predictor["volumes"] if v["name"] == "server-keys")
    assert keys["secret"] == {"secretName": "intelligentops-keys", "defaultMode": 0o400}
    assert {"name": "server-keys", "mountPath": KEYS_MOUNT, "readOnly": True} in container["volumeMounts"]


def test_the_audit_database_url_stays_out_of_the_config_map() -> None:
    url = "postgresql+psycopg2://audit:s3cret@db:5432/audit"
    config_map, isvc = KServeLauncher(image="img:1").render("credit_risk", CONFIG.replace(audit_url=url))
    assert "s3cret" not in json.dumps(config_map) and "s3cret" not in json.dumps(isvc)
    assert json.loads(config_map["data"][CONFIG_FILE])["audit_url"] == "env:INTELLIGENTOPS_AUDIT_URL"
    env = {e["name"]: e.get("valueFrom") for e in isvc["spec"]["predictor"]["containers"][0]["env"]}
    assert env["INTELLIGENTOPS_AUDIT_URL"] == {"secretKeyRef": {"name": "intelligentops-audit", "key": "url"}}


def test_bad_secret_reference_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"secret_env\['AUDIT_URL'\] = 'no-key'"):
        KServeLauncher(image="img:1", secret_env={"AUDIT_URL": "no-key"}).render("credit_risk", CONFIG)


class FakeApiServer(ThreadingHTTPServer):
    """The slice of the Kubernetes API the launcher uses, in memory: ConfigMaps and InferenceServices."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.objects: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, str]] = []
        self.ready_after_gets = 2


class _Handler(JsonHandler):
    server: FakeApiServer

    def _body(self) -> dict[str, Any]:
        return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")

    def _route(self) -> tuple[str, str | None]:
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "configmaps":
            return f"configmaps/{parts[3]}", parts[5] if len(parts) > 5 else None
        if parts[:3] == ["apis", "serving.kserve.io", "v1beta1"] and parts[5] == "inferenceservices":
            return f"inferenceservices/{parts[4]}", parts[6] if len(parts) > 6 else None
        raise AssertionError(f"unexpected path {self.path}")

    def do_POST(self) -> None:
        kind, _ = self._route()
        body = self._body()
        key = f"{kind}/{body['metadata']['name']}"
        self.server.requests.append(("POST", key, self.headers.get("Content-Type", "")))
        if key in self.server.objects:
            return self.send_json(409, {"kind": "Status", "code": 409, "reason": "AlreadyExists"})
        self.server.objects[key] = body
        self.send_json(201, body)

    def do_PUT(self) -> None:
        kind, name = self._route()
        self.server.requests.append(("PUT", f"{kind}/{name}", self.headers.get("Content-Type", "")))
        self.server.objects[f"{kind}/{name}"] = self._body()
        self.send_json(200, self.server.objects[f"{kind}/{name}"])

    def do_PATCH(self) -> None:
        kind, name = self._route()
        key = f"{kind}/{name}"
        self.server.requests.append(("PATCH", key, self.headers.get("Content-Type", "")))
        self.server.objects[key] = {**self.server.objects[key], **self._body()}
        self.send_json(200, self.server.objects[key])

    def do_GET(self) -> None:
        kind, name = self._route()
        key = f"{kind}/{name}"
        self.server.requests.append(("GET", key, ""))
        obj = dict(self.server.objects[key])
        self.server.ready_after_gets -= 1
        ready = self.server.ready_after_gets <= 0
        obj["status"] = {"url": f"http://{name}.intelligentops.example.com",
                         "conditions": [{"type": "Ready", "status": "True" if ready else "False",
                                         "reason": "" if ready else "PredictorNotReady"}]}
        self.send_json(200, obj)


@pytest.fixture
def api(tmp_path: Path):
    server = FakeApiServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
        "users": [{"name": "fake", "user": {"token": "fake"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
    }))
    yield server, str(kubeconfig)
    server.shutdown()


def test_deploy_applies_through_the_kubernetes_client_and_waits_for_ready(api) -> None:
    server, kubeconfig = api
    launcher = KServeLauncher(**FULL, kubeconfig_file=kubeconfig, poll_interval=0.01, ready_timeout=10)
    first = launcher.deploy("credit_risk", CONFIG, {"champion": "3"})
    assert first.how == "applied" and first.endpoint == "http://credit-risk.intelligentops.example.com"
    assert first.resource_name == "credit-risk" and first.serving == {"champion": "3"}
    stored = server.objects["inferenceservices/intelligentops/credit-risk"]
    assert stored["spec"]["predictor"]["containers"][0]["image"] == FULL["image"]
    assert json.loads(server.objects["configmaps/intelligentops/credit-risk-server-config"]["data"][CONFIG_FILE]
                      )["mode"] == "canary"

    # A second deploy with a changed config replaces the ConfigMap and patches the InferenceService, whose new
    # config annotation rolls the predictor.
    server.ready_after_gets = 1
    second = launcher.deploy("credit_risk", CONFIG.replace(mode="shadow"), {"champion": "4"})
    assert second.how == "patched"
    methods = [(m, k.split("/")[0]) for m, k, _ in server.requests]
    assert ("PUT", "configmaps") in methods and ("PATCH", "inferenceservices") in methods
    patch_type = next(t for m, k, t in server.requests if m == "PATCH")
    assert "merge-patch" in patch_type or "json-patch" in patch_type or "apply-patch" in patch_type
    assert json.loads(server.objects["configmaps/intelligentops/credit-risk-server-config"]["data"][CONFIG_FILE]
                      )["mode"] == "shadow"


def test_not_ready_in_time_says_why(api) -> None:
    server, kubeconfig = api
    server.ready_after_gets = 10_000
    launcher = KServeLauncher(image="img:1", kubeconfig_file=kubeconfig, poll_interval=0.01, ready_timeout=0.3)
    with pytest.raises(Exception, match="not ready within .* Ready=False \\(PredictorNotReady"):
        launcher.deploy("credit_risk", CONFIG, {"champion": "1"})
