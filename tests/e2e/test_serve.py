"""The inference server and the deployment stage on real components.

One small model with a text feature is trained and registered once for the module (real torchrun + DeepSpeed on
CPU, MLflow on SQLite, LanceDB, MiniLM); every test then runs the real server (`python -m workloads.serving`,
KServe's ModelServer on loopback) as a process and talks HTTP to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import dagster as dg
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_support import SPEC, Server, build_registered_model, free_port, restore_env, set_env

from assets.serving_client import v2_request
from assets.spec import load_spec
from core.server_config import ServerConfig, write_server_config
from workloads.serving.versions import ServingRefused, load_version

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
ROW = {"income": 52000.0, "debt_ratio": 12.5, "purpose": "car", "title": "registered nurse"}


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    (root / "pipelines").mkdir()
    saved = set_env(root / "home", root / "pipelines")
    (root / "home" / "dagster").mkdir(parents=True)
    try:
        with dg.instance_for_test(temp_dir=str(root / "home" / "dagster")) as instance:
            reg = build_registered_model(root, instance)
            yield reg, instance
    finally:
        restore_env(saved)


@pytest.fixture(scope="module")
def client(registered):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=registered[0].tracking_uri)


@pytest.fixture(scope="module")
def second_version(registered, client) -> str:
    """Another registry version of the same weights: a real version number to move aliases to, no retraining."""
    reg = registered[0]
    first = client.get_model_version(SPEC, reg.version)
    with default_tracking(reg.tracking_uri):  # the registry resolves a logged model through the default store
        mv = client.create_model_version(SPEC, first.source, run_id=first.run_id, tags=dict(first.tags))
    return str(mv.version)


@contextlib.contextmanager
def default_tracking(uri: str):
    """MLflow's process-wide default store, for the calls that use it; never a stray ./mlflow.db."""
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def _free_port() -> int:
    return free_port()


@pytest.fixture
def servers(registered, tmp_path):
    started: list[Server] = []

    def make(name: str = "server", **overrides) -> Server:
        s = Server(registered[0], tmp_path, name, **overrides)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


KEYS = {"ops-key-123": {"id": "ops", "models": [SPEC], "rate_limit_per_minute": 1000,
                        "scopes": ["predict", "explain", "similar_cases"]},
        "report-key-321": {"id": "reporter", "models": [SPEC], "scopes": ["outcomes"]},
        "read-key-654": {"id": "reader", "scopes": ["read"]},
        "other-key-456": {"id": "elsewhere", "models": ["another_model"]},
        "slow-key-789": {"id": "slow", "models": ["*"], "rate_limit_per_minute": 3}}


@pytest.fixture(scope="module")
def main_server(registered, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("main-server")
    keys = tmp / "keys.json"
    keys.write_text(json.dumps({"keys": [{"sha256": hashlib.sha256(k.encode()).hexdigest(), **v}
                                         for k, v in KEYS.items()]}))
    server = Server(registered[0], tmp, "main", api_keys_file=str(keys), max_body_bytes=28_000).start()
    yield server
    server.stop()


AUTH = {"Authorization": "Bearer ops-key-123"}
REPORT = {"Authorization": "Bearer report-key-321"}
READ = {"Authorization": "Bearer read-key-654"}


def test_v1_v2_and_explain_answer_and_audit_every_decision(main_server: Server, registered):
    url, store = main_server.url, main_server.store
    v1 = httpx.post(f"{url}/v1/models/{SPEC}:predict", json={"instances": [ROW, {**ROW, "title": ""}]},
                    headers=AUTH)
    assert v1.status_code == 200, v1.text
    preds = v1.json()["predictions"]
    assert len(preds) == 2 and all(p["model_version"] == registered[0].version for p in preds)
    for p in preds:
        assert 0 <= p["probability"] <= 1 and p["decision"] == int(p["probability"] >= 0.4)
        assert p["threshold"] == 0.4 and p["variant"] == "champion" and len(p["top_factors"]) == 3
    assert len(preds[0]["similar_cases"]) == 3 and preds[1]["similar_cases"] == []

    # v2, pandas codec, JSON sent without any Content-Type header.
    body = json.dumps(v2_request(load_spec(registered[0].pipelines / f"{SPEC}.yaml").spec, [ROW, ROW])).encode()
    v2 = httpx.post(f"{url}/v2/models/{SPEC}/infer", content=body, headers=AUTH)
    assert v2.status_code == 200, v2.text
    out = {o["name"]: o for o in v2.json()["outputs"]}
    assert set(out) >= {"probability", "decision", "decision_id", "model_version", "variant", "top_factors"}
    assert out["probability"]["datatype"] == "FP64" and out["decision"]["datatype"] == "INT64"
    assert out["probability"]["data"][0] == pytest.approx(preds[0]["probability"])
    assert json.loads(out["top_factors"]["data"][0])[0]["feature"] in ("income", "debt_ratio", "purpose", "title")

    ex = httpx.post(f"{url}/v1/models/{SPEC}:explain", json={"instances": [ROW]}, headers=AUTH)
    assert ex.status_code == 200 and len(ex.json()["explanations"][0]["top_factors"]) == 3

    ids = [p["decision_id"] for p in preds] + out["decision_id"]["data"] + [ex.json()["explanations"][0]["decision_id"]]
    for did in ids:
        rec = store.get(did)
        assert rec is not None and rec.key_id == "ops" and rec.spec == SPEC and rec.inputs["purpose"] == "car"
    assert store.get(preds[0]["decision_id"]).similar_cases == preds[0]["similar_cases"]
    assert store.verify().ok
    # The key itself is never written anywhere in the audit database.
    db = Path(main_server.audit_url.split(":///", 1)[1])
    assert all(b"ops-key-123" not in p.read_bytes() for p in db.parent.glob(db.name + "*"))

    health = [httpx.get(f"{url}{p}", headers=READ) for p in ("/v2/health/live", "/v2/health/ready",
                                                                f"/v2/models/{SPEC}", f"/v2/models/{SPEC}/ready")]
    assert [h.status_code for h in health] == [200, 200, 200, 200]
    assert [i["name"] for i in health[2].json()["inputs"]] == ["income", "debt_ratio", "purpose", "title"]
    metrics = httpx.get(f"{url}/metrics", headers=READ).text
    assert f'intelligentops_decisions_total{{decision="0",model="{SPEC}",variant="champion",version="1"}}' in metrics \
        or f'intelligentops_decisions_total{{decision="1",model="{SPEC}",variant="champion",version="1"}}' in metrics
    assert 'intelligentops_requests_total{code="200",protocol="v2"}' in metrics
    assert "intelligentops_request_latency_seconds_bucket" in metrics
    # KServe times each stage of the model: decoding, scoring (with the audit commit) and answering, apart.
    for stage in ("preprocess", "predict", "explain", "postprocess"):
        assert f'request_{stage}_seconds_count{{model_name="{SPEC}"}}' in metrics, stage


def test_outcomes_come_back_over_http_with_the_key_and_bad_reports_name_the_item(main_server: Server):
    url, store = main_server.url, main_server.store
    answered = httpx.post(f"{url}/v1/models/{SPEC}:predict", json={"instances": [ROW, ROW]}, headers=AUTH).json()
    ids = [p["decision_id"] for p in answered["predictions"]]
    body = {"outcomes": [{"decision_id": ids[0], "outcome": 1}, {"decision_id": ids[1], "outcome": 0}]}
    assert httpx.post(f"{url}/v2/models/{SPEC}/outcomes", json=body).status_code == 401  # same gateway as /infer
    assert httpx.post(f"{url}/v2/models/{SPEC}/outcomes", json=body, headers=AUTH).status_code == 403  # no scope
    ok = httpx.post(f"{url}/v2/models/{SPEC}/outcomes", json=body, headers=REPORT)
    assert ok.status_code == 200 and ok.json() == {"recorded": 2}
    assert store.outcomes(ids) == {ids[0]: 1, ids[1]: 0}
    bad = [({"outcomes": [{"decision_id": ids[0], "outcome": 2}]}, 400, "outcomes[0].outcome must be 0 or 1"),
           ({"outcomes": [{"decision_id": "nope", "outcome": 1}]}, 404, "outcomes[0]: no decision 'nope'"),
           ({"outcomes": []}, 400, "non-empty list")]
    for payload, code, message in bad:
        r = httpx.post(f"{url}/v2/models/{SPEC}/outcomes", json=payload, headers=REPORT)
        assert r.status_code == code and message in r.text, r.text
    assert store.verify().ok  # outcomes live beside the chain, never in it


@pytest.mark.parametrize(("body", "field"), [
    ({"instances": [{**ROW, "income": "lots"}]}, "field 'income' row 0: 'lots' is not a number"),
    ({"instances": [{**ROW, "income": 1e12}]}, "field 'income' row 0: 1e+12 is outside the accepted range"),
    ({"instances": [{**ROW, "purpose": "boat"}]}, "field 'purpose' row 0: 'boat' is not a known category"),
    ({"instances": [{**ROW, "title": 7}]}, "field 'title' row 0: expected text"),
    ({"instances": [{k: v for k, v in ROW.items() if k != "debt_ratio"}]}, "missing feature field(s) ['debt_ratio']"),
    ({"instances": [{**ROW, "ssn": "123"}]}, "unknown field(s) ['ssn']"),
    ({"instances": [ROW] * 300}, "300 rows in one request; at most 256"),
    ({"rows": []}, "field \"instances\""),
])
def test_bad_v1_input_is_a_4xx_naming_the_field(main_server: Server, body, field):
    r = httpx.post(f"{main_server.url}/v1/models/{SPEC}:predict", json=body, headers=AUTH)
    assert 400 <= r.status_code < 500, r.text
    assert field in r.json()["error"], r.json()


def test_bad_v2_input_and_oversized_bodies(main_server: Server):
    url = f"{main_server.url}/v2/models/{SPEC}/infer"
    bad = {"inputs": [{"name": "income", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}
    r = httpx.post(url, json=bad, headers=AUTH)
    assert r.status_code == 400 and "input 'income': datatype BYTES for a numeric feature" in r.text
    r = httpx.post(url, json={"inputs": [{"name": "income", "datatype": "FP64", "shape": [2], "data": [1.0]}]},
                   headers=AUTH)
    assert r.status_code == 400 and "shape [2] does not match 1 values" in r.text
    r = httpx.post(f"{main_server.url}/v1/models/{SPEC}:predict", content=b"{" + b" " * 30_000 + b"}", headers=AUTH)
    assert r.status_code == 413 and "deployment.max_body_bytes" in r.text


def test_missing_key_401_wrong_model_403_over_limit_429(main_server: Server):
    url = f"{main_server.url}/v1/models/{SPEC}:predict"
    body = {"instances": [ROW]}
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
    forbidden = httpx.post(url, json=body, headers={"X-API-Key": "other-key-456"})
    assert forbidden.status_code == 403 and "'elsewhere' is not allowed to call this model" in forbidden.text
    codes = [httpx.post(url, json=body, headers={"X-API-Key": "slow-key-789"}).status_code for _ in range(5)]
    assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
    limited = httpx.post(url, json=body, headers={"X-API-Key": "slow-key-789"})
    assert int(limited.headers["retry-after"]) >= 1
    # A client cannot claim a key id by sending the internal header.
    spoof = httpx.post(url, json=body, headers={**AUTH, "x-intelligentops-key-id": "admin"})
    assert main_server.store.get(spoof.json()["predictions"][0]["decision_id"]).key_id == "ops"


json_values = st.recursive(st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=8),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                           max_leaves=8)
feature_value = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
                          st.sampled_from(["car", "home", "education", "nurse"]), json_values)
v1_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"instances": st.lists(st.dictionaries(
        st.sampled_from(["income", "debt_ratio", "purpose", "title", "x"]), feature_value, max_size=5), max_size=4)}),
    st.fixed_dictionaries({"instances": st.lists(st.fixed_dictionaries(
        {"income": feature_value, "debt_ratio": feature_value, "purpose": feature_value, "title": feature_value}),
        min_size=1, max_size=3)}),
)
tensor = st.fixed_dictionaries({
    "name": st.sampled_from(["income", "debt_ratio", "purpose", "title", "zzz"]),
    "datatype": st.sampled_from(["FP64", "INT64", "BYTES", "BOOL", "FP32", "nonsense"]),
    "shape": st.lists(st.integers(-1, 3), max_size=3),
    "data": st.lists(feature_value, max_size=3) | json_values,
})
v2_bodies = st.one_of(json_values, st.fixed_dictionaries({"inputs": st.lists(tensor, max_size=5)}),
                      st.fixed_dictionaries({"id": st.text(max_size=5), "inputs": st.lists(tensor, max_size=5),
                                             "parameters": json_values}))


@pytest.fixture
def only_real_modules():
    """Loading an MLflow model from code leaves a `dbutils` stand-in object in sys.modules; hypothesis reads every
    module's `__file__` to collect constants and fails on it ("argument of type 'MockDbutils' is not
    iterable"). The fuzzing needs none of that, so objects that are not modules are taken out first."""
    import types

    for name in [n for n, m in sys.modules.items() if not isinstance(m, types.ModuleType)]:
        sys.modules.pop(name)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(v1=v1_bodies, v2=v2_bodies)
def test_fuzzed_bodies_never_get_a_500(only_real_modules, main_server: Server, v1, v2):
    for path, body in ((f"/v1/models/{SPEC}:predict", v1), (f"/v1/models/{SPEC}:explain", v1),
                       (f"/v2/models/{SPEC}/infer", v2)):
        r = httpx.post(f"{main_server.url}{path}", content=json.dumps(body).encode(), headers=AUTH, timeout=30)
        assert r.status_code < 500, (path, body, r.status_code, r.text)


async def _send_many(url: str, n: int, connections: int) -> tuple[list, list]:
    """`n` one-applicant requests over `connections` concurrent connections."""
    import aiohttp

    results: list = []
    errors: list = []
    body = json.dumps({"instances": [ROW]})

    async def worker(session, k: int) -> None:
        for _ in range(k):
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                if r.status == 200:
                    results.extend((await r.json())["predictions"])
                else:
                    errors.append(await r.text())

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:
        await asyncio.gather(*[worker(session, n // connections) for _ in range(connections)])
    return results, errors


def _load(url: str, stop: threading.Event, results: list, errors: list, body=None) -> None:
    with httpx.Client(timeout=30) as c:
        while not stop.is_set():
            try:
                r = c.post(url, json=body or {"instances": [ROW]})
                if r.status_code == 200:
                    results.extend(r.json()["predictions"])
                else:
                    errors.append((r.status_code, r.text[:200]))
            except httpx.HTTPError as exc:
                errors.append(("transport", str(exc)))
                if stop.is_set():
                    return


def test_alias_move_under_load_fails_no_request(servers, client, registered, second_version):
    reg = registered[0]
    client.set_registered_model_alias(SPEC, "champion", reg.version)
    server = servers("swap").start()
    stop, results, errors = threading.Event(), [], []
    threads = [threading.Thread(target=_load, args=(f"{server.url}/v1/models/{SPEC}:predict", stop, results,
                                                     errors)) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        client.set_registered_model_alias(SPEC, "champion", second_version)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(r["model_version"] == second_version for r in results[-20:]):
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
        client.set_registered_model_alias(SPEC, "champion", reg.version)
    assert errors == []
    versions = [r["model_version"] for r in results]
    assert versions[0] == reg.version and versions[-1] == second_version
    switched = versions.index(second_version)
    # Once the new version answers, no later answer comes from the old one (in order per thread overall).
    assert versions[switched:].count(reg.version) <= 4
    assert server.store.verify().ok and len(server.store.read_after(0, limit=100_000)) == len(results)


def test_sigkill_under_load_loses_no_answered_decision(servers):
    server = servers("kill").start()
    stop, results, errors = threading.Event(), [], []
    threads = [threading.Thread(target=_load, args=(f"{server.url}/v1/models/{SPEC}:predict", stop, results,
                                                     errors)) for _ in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(results) < 80 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    stop.set()
    for t in threads:
        t.join()
    answered = {r["decision_id"] for r in results}
    assert len(answered) >= 80
    server.start()  # a restart opens the same log and continues its chain
    after = httpx.post(f"{server.url}/v1/models/{SPEC}:predict", json={"instances": [ROW]})
    assert after.status_code == 200
    store = server.store
    logged = {r.decision_id for r in store.read_after(0, limit=1_000_000)}
    assert answered <= logged, f"{len(answered - logged)} answered decisions are not on the log"
    check = store.verify()
    assert check.ok, check.problems
    assert store.get(after.json()["predictions"][0]["decision_id"]).seq == store.latest_seq()


def test_canary_share_and_shadow_records(servers, client, registered, second_version):
    client.set_registered_model_alias(SPEC, "challenger", second_version)
    canary = servers("canary", mode="canary", canary_share=0.25).start()
    results, errors = asyncio.run(_send_many(f"{canary.url}/v1/models/{SPEC}:predict", 2400, 16))
    assert errors == [] and len(results) == 2400
    share = sum(r["variant"] == "canary" for r in results) / len(results)
    assert abs(share - 0.25) < 0.04, share
    assert {r["model_version"] for r in results if r["variant"] == "canary"} == {second_version}
    logged = Counter(r.variant for r in canary.store.read_after(0, limit=10_000))
    assert logged["canary"] + logged["champion"] == 2400 and logged["canary"] == round(share * 2400)
    canary.stop()

    shadow = servers("shadow", mode="shadow").start()
    answered = [httpx.post(f"{shadow.url}/v1/models/{SPEC}:predict", json={"instances": [ROW, ROW]}).json()
                for _ in range(10)]
    preds = [p for a in answered for p in a["predictions"]]
    assert {p["variant"] for p in preds} == {"champion"} and len(preds) == 20
    records = shadow.store.read_after(0, limit=1000)
    by_variant = Counter((r.variant, r.model_version) for r in records)
    assert by_variant == {("champion", registered[0].version): 20, ("shadow", second_version): 20}
    assert not {r.decision_id for r in records if r.variant == "shadow"} & {p["decision_id"] for p in preds}
    client.delete_registered_model_alias(SPEC, "challenger")


def test_a_version_without_operating_threshold_is_refused(client, registered, second_version, tmp_path):
    cfg = ServerConfig(spec=SPEC, tracking_uri=registered[0].tracking_uri, audit_url="unused", text=["title"],
                       model_cache=str(tmp_path / "models"),
                       signing_public_key=str(registered[0].home / "keys" / "model-signing.pub"))
    client.delete_model_version_tag(SPEC, second_version, "operating_threshold")
    with default_tracking(registered[0].tracking_uri):
        _refusals(client, cfg, second_version, tmp_path)


def _refusals(client, cfg: ServerConfig, second_version: str, tmp_path: Path) -> None:
    try:
        with pytest.raises(ServingRefused, match=f"version {second_version} has no tag 'operating_threshold'"):
            load_version(client, cfg, second_version)
        client.set_model_version_tag(SPEC, second_version, "operating_threshold", "1.5")
        with pytest.raises(ServingRefused, match="operating_threshold = 1.5 is outside"):
            load_version(client, cfg, second_version)
    finally:
        client.set_model_version_tag(SPEC, second_version, "operating_threshold", "0.4")
    # The files are checked against the manifest before anything loads: a flipped byte is refused.
    loaded = load_version(client, cfg, second_version)
    assert loaded.threshold == 0.4 and loaded.version == second_version
    weights = next((tmp_path / "models").rglob("model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(ServingRefused, match="artifacts/model.safetensors: sha256 .* does not match manifest.json"):
        load_version(client, cfg, second_version)


def test_a_server_whose_registry_is_down_refuses_to_start_naming_it(tmp_path):
    """A registry that does not answer is not mistaken for a missing champion alias."""
    registry = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    path = tmp_path / "server.json"
    write_server_config(path, ServerConfig(spec=SPEC, tracking_uri=registry, audit_url=f"sqlite:///{tmp_path}/a.db",
                                           text=["title"], port=_free_port()))
    done = subprocess.run([sys.executable, "-m", "workloads.serving", "--config", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=180,
                          env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                               "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"serving: the MLflow registry at {registry} is unreachable"), last
    assert last.endswith("tracking_uri/registry_uri in the server config names it"), last
    assert "materialize" not in last


def test_deployment_asset_serves_checks_and_observes_the_log(registered, tmp_path):
    from orchestration.definitions import build_definitions
    from support import failure_text, materialize

    reg, instance = registered
    defs = build_definitions(reg.pipelines)
    resources = dict(defs.resources)
    # champion_model is not re-run here: the module fixture already set the alias.
    selection = 'key:"serve_loans/deployment" or key:"serve_loans/inference_log"'
    launcher = resources["server"]
    try:
        first = materialize(defs, instance, selection)
        assert first.success, failure_text(first)
        checks = {c.check_name: c for c in first.get_asset_check_evaluations()}
        assert checks["smoke_decision"].passed and "chain of" in checks["smoke_decision"].description
        assert checks["latency_slo"].passed, checks["latency_slo"].description
        meta = {m.asset_key.path[-1]: m.materialization.metadata for m in first.get_asset_materialization_events()}
        endpoint = meta["deployment"]["endpoint"].value
        assert meta["deployment"]["champion_version"].value == reg.version
        assert meta["deployment"]["how"].value in ("started", "restarted")
        assert meta["inference_log"]["chain_verified"].value is True
        assert meta["inference_log"]["decisions"].value >= 21  # the smoke decision and the burst
        state = json.loads((reg.home / SPEC / "deployment" / "server.pid.json").read_text())
        assert (reg.home / SPEC / "deployment" / "server.log").is_file() and endpoint.endswith(str(state["port"]))
        # Materializing again reloads the running server instead of starting another.
        second = materialize(defs, instance, selection)
        assert second.success, failure_text(second)
        meta2 = {m.asset_key.path[-1]: m.materialization.metadata for m in second.get_asset_materialization_events()}
        assert meta2["deployment"]["how"].value == "reloaded" and meta2["deployment"]["pid"].value == state["pid"]

        # The decision lookup traces a decision back to its model version and data.
        did = checks["smoke_decision"].metadata["decision_id"].value
        shown = subprocess.run([sys.executable, "-m", "orchestration.decisions", did], cwd=REPO,
                               capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO),
                                                                    "DAGSTER_HOME": str(reg.home / "dagster")})
        assert shown.returncode == 0, shown.stderr
        assert did in shown.stdout and "model version: 1" in shown.stdout and "dataset_hash" in shown.stdout
        verified = subprocess.run([sys.executable, "-m", "orchestration.decisions", "--verify"], cwd=REPO,
                                  capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert verified.returncode == 0 and "verifies" in verified.stdout, verified.stdout + verified.stderr
    finally:
        launcher.stop(SPEC)
