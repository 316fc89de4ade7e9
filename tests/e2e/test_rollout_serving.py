"""Progressive rollout against the real server: one good model (v1, champion, served by the deployment) and one
deliberately crippled one (v2: one optimizer step at a tiny learning rate), trained once for the module.

- The crippled version fails its gates, is approved over them by a named person, and so enters its rollout in
  shadow; replayed traffic (with the sensitive column as an audit-only field) and its outcomes come back over
  HTTP; the step's analysis finds it worse on live outcomes and the sensor rolls it back through the rollback job,
  with the figures named; the server drops it.
- A split change under load: v1 against v3 (a copy of v1) at canary 50%, requests in flight from several threads,
  then a rollback: every decision committed after the server's `applied` event is the champion's, and no request
  failed.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import httpx
import pytest
from loans_support import PROMOTION, loans, spec
from serving_support import restore_env, set_env
from support import REPO, failure_text, materialize, write_spec

from assets import rollout_state
from assets.spec import load_spec
from core.audit.traffic import NOT_TRAFFIC_KEY_IDS
from orchestration.definitions import build_definitions

pytestmark = pytest.mark.slow
STEPS = [{"mode": "shadow", "decisions": 200, "min_outcomes": 100},
         {"mode": "canary", "share": 0.5, "decisions": 200}]
CRIPPLED = {"max_steps": 1, "hidden": [2], "learning_rate": 1e-6, "checkpoint_every_steps": 20}


def _spec(**training) -> dict:
    return spec(deployment={"slo_p99_ms": 5000, "smoke_requests": 5, "rollout": {"steps": STEPS}},
                training={"checkpoint_every_steps": 50, **training},
                compliance={"intended_purpose": "Test lending model.", "min_group_size": 20, "min_auc": 0.0})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout")
    home, pipelines = root / "home", root / "pipelines"
    pipelines.mkdir()
    (home / "dagster").mkdir(parents=True)
    saved = set_env(home, pipelines)
    loans().to_csv(pipelines / "loans.csv", index=False)
    try:
        with dg.instance_for_test(temp_dir=str(home / "dagster")) as instance:
            write_spec(pipelines, _spec())
            defs = build_definitions(pipelines)
            served = materialize(defs, instance, 'key:"loans/*" and not group:monitoring')
            assert served.success, failure_text(served)
            endpoint = {m.asset_key.path[-1]: m.materialization.metadata for m in
                        served.get_asset_materialization_events()}["deployment"]["endpoint"].value
            write_spec(pipelines, _spec(**CRIPPLED))
            crippled = build_definitions(pipelines)
            refused = materialize(crippled, instance, PROMOTION)
            assert not refused.success  # the gates refuse it ...
            approved = materialize(crippled, instance, 'key:"loans/champion_model"', run_config={"ops": {
                "loans__champion_model": {"config": {"approver": "ana@example.com",
                                                     "reason": "pilot: let live evidence decide"}}}})
            assert approved.success, failure_text(approved)  # ... a person approves: it enters its rollout
            write_spec(pipelines, _spec())
            try:
                yield root, build_definitions(pipelines), instance, endpoint
            finally:
                defs.resources["server"].stop("loans")
    finally:
        restore_env(saved)


def _status(root: Path, endpoint: str) -> dict:
    key = (root / "home" / "loans" / "deployment" / "operator.key").read_text().strip()
    return httpx.get(f"{endpoint}/intelligentops/status", headers={"Authorization": f"Bearer {key}"},
                     timeout=10).json()


def _wait_split(root: Path, endpoint: str, mode: str, challenger: str | None, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        split = _status(root, endpoint)["split"]
        if split["mode"] == mode and split["challenger"] == challenger:
            return split
        time.sleep(0.5)
    raise AssertionError(f"the server serves {split}, not {mode} {challenger}")


def _tick(defs: dg.Definitions, instance) -> list[dg.RunRequest]:
    sensor = defs.get_sensor_def("loans__rollout_sensor")
    result = sensor(dg.build_sensor_context(instance=instance, resources={"audit": defs.resources["audit"]},
                                            definitions=defs))
    if isinstance(result, dg.SkipReason):
        return []
    for req in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    return list(result.run_requests)


def _run(defs: dg.Definitions, instance, req: dg.RunRequest) -> dg.ExecuteInProcessResult:
    return defs.resolve_job_def(req.job_name).execute_in_process(
        instance=instance, partition_key=req.partition_key, run_config=req.run_config or None,
        tags={**req.tags, "dagster/run_key": req.run_key}, raise_on_error=False)


def _replay(root: Path, endpoint: str, out: Path, *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "workloads.replay", *args, "--url", endpoint, "--model", "loans",
                           "--decisions", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_crippled_version_approved_over_its_gates_is_rolled_back_on_live_outcomes(world, tmp_path: Path):
    root, defs, instance, endpoint = world
    store = defs.resources["audit"].store()
    state = rollout_state.current_rollout(store, "loans")
    assert (state.rollout, state.challenger, state.champion, state.mode) == ("v2", "2", "1", "shadow")
    assert store.latest_serving_event("loans").evidence["approved_by"] == "ana@example.com"
    _wait_split(root, endpoint, "shadow", "2")

    loans(300, seed=31).to_csv(tmp_path / "traffic.csv", index=False)
    _replay(root, endpoint, tmp_path / "sent.jsonl", "send", "--spec", str(root / "pipelines" / "loans.yaml"),
            "--data", str(tmp_path / "traffic.csv"), "--batch", "20")
    shadow = store.find(spec="loans", variant="shadow", limit=1000)
    assert len(shadow) == 300 and {r.audit_fields["region"] for r in shadow} == {"north", "south"}
    assert all("region" not in r.inputs for r in shadow)  # an audit-only field, never a model input
    _replay(root, endpoint, tmp_path / "sent.jsonl", "outcomes", "--api-key-file",
            str(root / "home" / "loans" / "deployment" / "operator.key"))

    analyse = [r for r in _tick(defs, instance) if r.job_name == "loans__analyse_rollout"]
    assert [r.partition_key for r in analyse] == ["v2-1-shadow"]
    analysed = _run(defs, instance, analyse[0])
    assert not analysed.success  # harm found: the blocking live_auc check fails at severity ERROR
    auc = {c.check_name: c for c in analysed.get_asset_check_evaluations()}["live_auc"]
    assert not auc.passed and "worse with significance: live AUC" in auc.description
    figures = auc.metadata["figures"].value[0]["values"]
    assert figures["paired"] is True and figures["challenger_outcomes"] == 300
    assert figures["champion_auc"] - figures["challenger_auc"] > 0.1

    rollback = [r for r in _tick(defs, instance) if r.job_name == "loans__rollback"]
    assert len(rollback) == 1
    assert _run(defs, instance, rollback[0]).success
    event = store.latest_serving_event("loans")
    assert (event.kind, event.actor, event.mode) == ("rollback", "rollout sensor", "champion")
    assert "live AUC" in event.reason and "DeLong paired" in event.reason
    _wait_split(root, endpoint, "champion", None)
    report = (root / "home" / "loans" / "compliance" / "v2" / "report.md").read_text()
    assert "## History of traffic" in report and "rollback by rollout sensor" in report
    assert "rollout by ana@example.com" in report


def test_a_split_change_under_load_leaks_no_request_to_a_variant_that_left_it(world):
    root, defs, instance, endpoint = world
    from mlflow import MlflowClient

    mlflow = defs.resources["mlflow"]
    client: MlflowClient = mlflow.client()
    one = client.get_model_version("loans", "1")
    three = client.create_model_version("loans", one.source, run_id=one.run_id, tags=one.tags)
    spec_ = load_spec(root / "pipelines" / "loans.yaml").spec
    store = defs.resources["audit"].store()
    rollout_state.enter(spec_, mlflow, store, str(three.version), "test", "an equal copy", {})
    rollout_state.advance(spec_, mlflow, store, "test", "straight to the canary", {})
    _wait_split(root, endpoint, "canary", "3")

    row = loans(1, seed=5).iloc[0]
    body = {"instances": [{"income": float(row.income), "debt_ratio": float(row.debt_ratio),
                           "purpose": row.purpose, "region": row.region}]}
    answers, failures, stop = [], [], threading.Event()

    def load() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                r = http.post(f"{endpoint}/v1/models/loans:predict", json=body)
                (answers if r.status_code == 200 else failures).append(r.status_code)

    threads = [threading.Thread(target=load) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while len(store.find(spec="loans", variant="canary", model_version="3", limit=50)) < 50:
            assert time.monotonic() < deadline, "no canary decisions under load"
            time.sleep(0.2)
        rollout_state.rollback(spec_, mlflow, store, "test", "take the canary out under load", {})
        split = _wait_split(root, endpoint, "champion", None)
        deadline = time.monotonic() + 60
        while not _status(root, endpoint)["split"]["taken_up"]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        applied = _status(root, endpoint)["split"]
        after = store.latest_seq("loans")
        while store.latest_seq("loans") < after + 100:
            assert time.monotonic() < deadline + 60
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures and len(answers) > 150
    event = next(e for e in store.serving_events("loans", kinds=("applied",)) if e.id == applied["applied_event"])
    assert event.evidence["control_event"] == split["control_event"] and event.mode == "champion"
    later = store.read_after(event.seq_at, limit=100_000, spec="loans", exclude_key_ids=NOT_TRAFFIC_KEY_IDS)
    before = store.read_after(0, limit=100_000, spec="loans", exclude_key_ids=NOT_TRAFFIC_KEY_IDS)
    assert len(later) >= 100 and any(r.variant == "canary" and r.seq <= event.seq_at for r in before)
    leaked = [(r.seq, r.variant, r.model_version) for r in later if (r.variant, r.model_version) != ("champion", "1")]
    assert leaked == [], f"after the split changed at seq {event.seq_at}: {leaked[:10]}"
