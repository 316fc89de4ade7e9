"""A rollout driven by its sensor on a real Dagster instance, MLflow registry and keyed audit store, with live
traffic written as a server writes it (tests/rollout_support.py; the served version is tests/e2e's business):
an equal challenger advances step by step and is promoted, a crippled one is rolled back through the rollback job,
a person's hold stops the sensor, every move is a run and a serving event, and `--served-at` says who served across
a promotion and a rollback.
"""

from __future__ import annotations

import time
from pathlib import Path

import dagster as dg
import pytest
from loans_support import spec as loans_spec
from rollout_support import Scorer, traffic
from support import write_spec

from assets import rollout_state
from assets.spec import load_spec
from orchestration import decisions
from orchestration.definitions import build_definitions
from orchestration.rollout import move, utc_text

pytestmark = pytest.mark.slow
GOOD, COIN = Scorer(skill=0.35), Scorer(skill=0.0)
STEPS = [{"mode": "shadow", "decisions": 120}, {"mode": "canary", "share": 0.5, "decisions": 100, "min_outcomes": 40}]


@pytest.fixture
def world(home: Path, pipelines: Path, instance):
    write_spec(pipelines, loans_spec(deployment={"slo_p99_ms": 1000, "rollout": {"steps": STEPS}}))
    defs = build_definitions(pipelines)
    mlflow = defs.resources["mlflow"]
    client = mlflow.client()
    client.create_registered_model("loans")
    source = home / "fake-model"
    source.mkdir()
    for _ in range(3):
        client.create_model_version("loans", str(source))
    mlflow.set_alias("loans", "champion", "1")
    spec = load_spec(pipelines / "loans.yaml").spec
    return defs, spec, mlflow, defs.resources["audit"].store(), instance


def tick(defs: dg.Definitions, instance) -> list[dg.RunRequest]:
    sensor = defs.get_sensor_def("loans__rollout_sensor")
    result = sensor(dg.build_sensor_context(instance=instance, resources={"audit": defs.resources["audit"]},
                                            definitions=defs))
    if isinstance(result, dg.SkipReason):
        return []
    for req in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    return list(result.run_requests)


def run(defs: dg.Definitions, instance, request: dg.RunRequest, succeeds: bool = True) -> dg.ExecuteInProcessResult:
    """As the daemon would launch it: its job, partition, config and tags (run key included). An analysis that finds
    harm fails its run at the blocking check (severity ERROR), as a refused gate does; its figures are recorded."""
    result = defs.resolve_job_def(request.job_name).execute_in_process(
        instance=instance, partition_key=request.partition_key, run_config=request.run_config or None,
        tags={**request.tags, "dagster/run_key": request.run_key}, raise_on_error=False)
    assert result.success == succeeds, [e.message for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return result


def test_an_equal_challenger_advances_through_the_steps_and_is_promoted_and_served_at_says_so(world, capsys):
    defs, spec, mlflow, store, instance = world
    rollout_state.enter(spec, mlflow, store, "2", "gates", "every blocking gate passed", {"run_id": "r0"})
    assert tick(defs, instance) == []  # no decision yet: nothing to analyse
    traffic(store, 150, ("1", GOOD), ("2", GOOD), "shadow", seed=1, outcomes=0.0)

    analyse = tick(defs, instance)
    assert [r.run_key for r in analyse] == ["analysis:v2-1-shadow:120:0"]
    assert tick(defs, instance)[0].run_key == analyse[0].run_key  # the same tick again asks for the same run
    analysed = run(defs, instance, analyse[0])
    checks = {c.check_name: c for c in analysed.get_asset_check_evaluations()}
    assert set(checks) == {"decisions", "errors", "latency", "fairness", "live_auc"}
    assert all(c.passed for c in checks.values()), {n: c.description for n, c in checks.items()}

    advance = [r for r in tick(defs, instance) if r.job_name == "loans__rollout_step"]
    assert len(advance) == 1 and advance[0].run_key.startswith("advance:v2-1-shadow:")
    run(defs, instance, advance[0])
    step2 = store.latest_serving_event("loans")
    assert (step2.kind, step2.step, step2.mode, step2.share, step2.actor) == ("step", 2, "canary", 0.5,
                                                                               "rollout sensor")
    assert step2.evidence["analysis"] == "v2-1-shadow" and step2.evidence["checks"]["live_auc"] == "pass"
    assert step2.evidence["analysis_run"] == analysed.run_id
    canary_at = utc_text(step2.time)

    # The canary step waits for outcomes (min_outcomes 40): without them it holds.
    traffic(store, 260, ("1", GOOD), ("2", GOOD), "canary", seed=2, outcomes=0.0)
    held = [r for r in tick(defs, instance) if r.job_name == "loans__analyse_rollout"]
    run(defs, instance, held[0])
    assert not [r for r in tick(defs, instance) if r.job_name != "loans__analyse_rollout"]
    traffic(store, 200, ("1", GOOD), ("2", GOOD), "canary", seed=3, outcomes=1.0)
    again = [r for r in tick(defs, instance) if r.job_name == "loans__analyse_rollout"]
    assert again and again[0].run_key != held[0].run_key  # more decisions and outcomes: a new analysis
    run(defs, instance, again[0])
    promote = [r for r in tick(defs, instance) if r.job_name == "loans__rollout_step"]
    run(defs, instance, promote[0])
    assert str(mlflow.alias_version("loans", "champion").version) == "2"
    assert str(mlflow.alias_version("loans", "previous").version) == "1"
    promoted = store.latest_serving_event("loans")
    assert (promoted.kind, promoted.champion, promoted.challenger, promoted.rollout) == ("promote", "2", None, "v2")
    assert tick(defs, instance) == []  # no rollout under way

    # A person rolls back: champion -> previous, on record.
    time.sleep(0.01)
    assert move("loans", "rollback", "oncall@example.com", "complaints from branch offices",
                instance=instance) == 0
    assert str(mlflow.alias_version("loans", "champion").version) == "1"
    rolled = store.latest_serving_event("loans")
    assert (rolled.kind, rolled.actor, rolled.champion) == ("rollback", "oncall@example.com", "1")

    def served(at: str) -> str:
        capsys.readouterr()
        assert decisions.main(["--served-at", at, "--spec", "loans"]) == 0
        return capsys.readouterr().out

    at_canary = served(canary_at)
    assert "champion v1 answers, canary v2 answers 50% of requests" in at_canary
    assert "step by rollout sensor" in at_canary and "analysis v2-1-shadow" in at_canary
    assert "champion v2 answers every request" in served(utc_text(promoted.time))
    after = served(utc_text(rolled.time))
    assert "champion v1 answers every request" in after and "rollback by oncall@example.com" in after
    assert "complaints from branch offices" in after


def test_a_crippled_challenger_is_rolled_back_through_the_rollback_job_and_a_hold_stops_the_sensor(world):
    defs, spec, mlflow, store, instance = world
    rollout_state.enter(spec, mlflow, store, "3", "ana@example.com", "approved over the baseline gate", {})
    assert move("loans", "hold", "ana@example.com", "wait for the quarter's figures", instance=instance) == 0
    traffic(store, 150, ("1", GOOD), ("3", GOOD), "shadow", seed=4, outcomes=0.0)
    run(defs, instance, tick(defs, instance)[0])
    assert [r.job_name for r in tick(defs, instance)] == ["loans__analyse_rollout"]  # passed, but held: no advance

    traffic(store, 300, ("1", GOOD), ("3", COIN), "shadow", seed=5, outcomes=1.0)
    analyse = [r for r in tick(defs, instance) if r.job_name == "loans__analyse_rollout"]
    analysed = run(defs, instance, analyse[0], succeeds=False)
    assert analysed.asset_materializations_for_node("loans__rollout_analysis")  # the figures are on record
    auc = {c.check_name: c for c in analysed.get_asset_check_evaluations()}["live_auc"]
    assert not auc.passed and auc.severity == dg.AssetCheckSeverity.ERROR
    assert "worse with significance: live AUC" in auc.description
    rollback = [r for r in tick(defs, instance) if r.job_name == "loans__rollback"]
    assert len(rollback) == 1  # harm is never held
    done = run(defs, instance, rollback[0])
    event = store.latest_serving_event("loans")
    assert (event.kind, event.actor, event.mode, event.champion) == ("rollback", "rollout sensor", "champion", "1")
    assert "worse with significance: live AUC" in event.reason and event.evidence["verdict"] == "rollback"
    assert event.evidence["run_id"] == done.run_id and event.evidence["rolled_back"] == "3"
    tags = mlflow.client().get_model_version("loans", "3").tags
    assert tags["rolled_back_by"] == "rollout sensor" and "live AUC" in tags["rollback_reason"]
    assert str(mlflow.alias_version("loans", "champion").version) == "1"
    assert tick(defs, instance) == []
    assert store.verify().ok
