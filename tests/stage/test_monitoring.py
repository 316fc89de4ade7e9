"""The monitoring stage on real components: a SQLite audit log, an ephemeral Dagster instance, the drift sensor
evaluated with build_sensor_context, and real detectors fitted on a real model version."""

from __future__ import annotations
import uuid
from pathlib import Path
import dagster as dg
import pytest
from support import copy_shipped
from assets import naming
from assets.drift_sensor import SensorCursor
from core.audit import AuditStore
from core.audit.traffic import window_bounds, window_key
from orchestration.definitions import build_definitions

SPEC = "credit_scoring"


REPORT = dg.AssetKey([SPEC, "drift_report"])


def decisions(n: int, spec: str = SPEC, variant: str = "champion", version: str = "1") -> list[dict]:
    return [{"decision_id": uuid.uuid4().hex, "spec": spec, "model_name": spec, "model_version": version,
             "variant": variant, "inputs": {"Income": 100.0 + i}, "probability": 0.3, "decision": 0,
             "threshold": 0.5} for i in range(n)]


@pytest.fixture
def defs(pipelines: Path, home: Path) -> dg.Definitions:
    copy_shipped(pipelines, SPEC)
    return build_definitions(pipelines)


def _tick(defs: dg.Definitions, instance, cursor: str | None) -> dg.SensorResult:
    sensor = defs.get_sensor_def(naming.drift_sensor_name(SPEC))
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"audit": defs.resources["audit"]},
                                      definitions=defs)
    return sensor(context)


def test_each_full_window_is_requested_once_and_the_cursor_moves_with_the_requests(defs, instance, home: Path):
    store: AuditStore = defs.resources["audit"].store()
    store.append(decisions(1500))
    store.append(decisions(300, variant="shadow"))  # never answered to a caller: not part of any window
    store.append(decisions(700))
    store.append(decisions(999, spec="other_model"))

    first = _tick(defs, instance, None)
    keys = [r.partition_key for r in first.run_requests]
    assert [r.run_key for r in first.run_requests] == [f"report:{k}" for k in keys]
    assert len(keys) == 2
    assert window_bounds(keys[0]) == (1, 1000)
    assert window_bounds(keys[1]) == (1001, 2300)  # 500 champion + 300 shadow skipped + 500 champion
    assert SensorCursor.parse(first.cursor).seq == 2300
    assert [k for req in first.dynamic_partitions_requests for k in req.partition_keys] == keys

    # A daemon killed before the tick was recorded evaluates the same cursor again: the same run keys, which
    # Dagster refuses to launch twice.
    again = _tick(defs, instance, None)
    assert [r.run_key for r in again.run_requests] == [r.run_key for r in first.run_requests]
    # After the tick is recorded, nothing new until 1,000 more served decisions arrive.
    assert _tick(defs, instance, first.cursor).run_requests == []
    store.append(decisions(1000))
    later = _tick(defs, instance, first.cursor)
    # 200 champion decisions were left after seq 2300 (2301-2500); the other model's 999 (2501-3499) are not
    # this spec's, so the third window is those 200 and the first 800 of the new thousand (3500-4299).
    assert [window_bounds(r.partition_key) for r in later.run_requests] == [(2301, 4299)]


def test_the_deployments_smoke_requests_are_not_traffic(defs, instance):
    store: AuditStore = defs.resources["audit"].store()
    probes = [{**d, "key_id": "deployment-smoke"} for d in decisions(400)]
    store.append(probes[:200] + decisions(600) + probes[200:] + decisions(400))
    (request,) = _tick(defs, instance, None).run_requests
    # 1,000 served decisions of traffic: seq 201-800 and 1001-1400; the 400 smoke decisions are in no window.
    assert window_bounds(request.partition_key) == (201, 1400)
    from core.audit.traffic import window_records

    records = window_records(store, SPEC, 201, 1400)
    assert len(records) == 1000 and not [r for r in records if r.key_id == "deployment-smoke"]


def test_inference_log_counts_the_windows_the_sensor_opens(defs, instance):
    """After a deployment's smoke requests and traffic, inference_log's complete windows are the sensor's: before
    its tick (pending), after it (opened), beside a partial window of the nightly check, and as traffic grows."""
    from support import materialize

    from assets.monitoring import observe_inference_log
    from assets.windows import complete_windows

    store: AuditStore = defs.resources["audit"].store()
    smoke = [{**d, "key_id": "deployment-smoke"} for d in decisions(600)]
    store.append(smoke[:300] + decisions(1300) + decisions(200, variant="shadow") + smoke[300:] + decisions(1200))
    partitions = f"{SPEC}__drift_windows"

    def logged() -> int:
        done = materialize(defs, instance, f'key:"{SPEC}/inference_log"')
        assert done.success
        (event,) = done.asset_materializations_for_node(f"{SPEC}__inference_log")
        return event.metadata["complete_windows"].value

    def opened() -> list[str]:
        return instance.get_dynamic_partitions(partitions)

    # 3,300 decisions on the log, 2,500 of them traffic: two windows, not the three that counting smoke would give.
    first = _tick(defs, instance, None)
    requested = [r.partition_key for r in first.run_requests]
    assert len(requested) == 2 and logged() == 2
    assert complete_windows(store, SPEC, opened(), 1000) == requested
    instance.add_dynamic_partitions(partitions, requested)  # what the daemon does with the tick's result
    assert logged() == 2 and complete_windows(store, SPEC, opened(), 1000) == requested

    # The nightly check opens the 500 decisions left as a partial window: not a complete one.
    with dg.build_schedule_context(instance=instance, resources={"audit": defs.resources["audit"]}) as context:
        partial = defs.get_schedule_def(f"{SPEC}__nightly_drift_check")(context)
    assert partial.partition_key in opened() and logged() == 2

    # 600 more fill the third window, which overlaps the partial one; counted before and after the sensor opens it.
    store.append([{**d, "key_id": "deployment-smoke"} for d in decisions(50)] + decisions(600))
    later = _tick(defs, instance, first.cursor)
    (third,) = [r.partition_key for r in later.run_requests]
    assert window_bounds(third)[0] == window_bounds(partial.partition_key)[0]
    assert logged() == 3
    instance.add_dynamic_partitions(partitions, [third])
    assert complete_windows(store, SPEC, opened(), 1000) == [*requested, third] and logged() == 3
    obs = observe_inference_log(store, SPEC, 1000, opened())
    assert obs.decisions == 3950 and obs.per_variant["shadow"] == 200 and obs.complete_windows == 3


def test_a_report_that_found_drift_asks_for_one_retrain_within_the_cooldown(defs, instance):
    windows = [window_key(1, 1000), window_key(1001, 2000)]
    instance.add_dynamic_partitions(f"{SPEC}__drift_windows", windows)
    for w, drift in zip(windows, (True, True)):
        instance.report_runless_asset_event(dg.AssetMaterialization(
            REPORT, partition=w, metadata={"window": w, "drift": drift, "retrain_requested_by_sensor": drift,
                                           "model_version": "1", "message": "emp_title moved"}))
    result = _tick(defs, instance, SensorCursor(seq=2000).dump())
    retrains = [r for r in result.run_requests if r.job_name == f"{SPEC}__retrain"]
    # The second drifted window falls in the cooldown that the first retrain started.
    assert [r.run_key for r in retrains] == [f"retrain:{windows[0]}"]
    assert retrains[0].tags[f"{naming.TAG_PREFIX}trigger"] == "drift"
    assert "emp_title moved" in retrains[0].tags[f"{naming.TAG_PREFIX}evidence"]
    # Evaluated again from its new cursor: the reports were read, no second retrain.
    assert not [r for r in _tick(defs, instance, result.cursor).run_requests if r.job_name == f"{SPEC}__retrain"]
    # Evaluated again from the old cursor (a daemon killed mid-tick): the same run key, launched at most once.
    replay = _tick(defs, instance, SensorCursor(seq=2000).dump())
    assert [r.run_key for r in replay.run_requests if r.job_name == f"{SPEC}__retrain"] == [f"retrain:{windows[0]}"]


def test_outcomes_that_come_back_later_have_their_window_judged_again(defs, instance):
    """A window reported before its outcomes arrived is reported again as labelled decisions pass 30, 100, ...,
    and a report already asked for a retrain does not ask again when a second report of the window does too."""
    store: AuditStore = defs.resources["audit"].store()
    served = store.append(decisions(1000))
    first = _tick(defs, instance, None)
    (window,) = [r.partition_key for r in first.run_requests]
    instance.add_dynamic_partitions(f"{SPEC}__drift_windows", [window])
    for r in served[:29]:
        store.record_outcome(r.decision_id, 1)
    few = _tick(defs, instance, first.cursor)
    assert few.run_requests == []  # 29 labelled decisions: no live AUC yet
    assert SensorCursor.parse(few.cursor).outcome_id == 29
    for r in served[29:40]:
        store.record_outcome(r.decision_id, 0)
    enough = _tick(defs, instance, few.cursor)
    assert [(r.run_key, r.partition_key) for r in enough.run_requests] == [(f"outcomes:{window}:30", window)]
    assert enough.run_requests[0].tags[f"{naming.TAG_PREFIX}outcomes"] == "40"
    assert _tick(defs, instance, enough.cursor).run_requests == []  # nothing new came back
    for r in served[40:120]:
        store.record_outcome(r.decision_id, r.seq % 2)
    assert [r.run_key for r in _tick(defs, instance, enough.cursor).run_requests] == [f"outcomes:{window}:100"]


def test_a_live_auc_under_the_floor_asks_for_a_retrain_that_says_so(defs, instance):
    window = window_key(1, 1000)
    instance.add_dynamic_partitions(f"{SPEC}__drift_windows", [window])
    instance.report_runless_asset_event(dg.AssetMaterialization(REPORT, partition=window, metadata={
        "window": window, "drift": False, "performance_drop": True, "retrain_requested_by_sensor": True,
        "model_version": "1", "message": "no drift",
        "evidence": f"window {window} served by v1; live AUC 0.612 on 400 outcomes under the floor"}))
    (retrain,) = _tick(defs, instance, SensorCursor(seq=1000).dump()).run_requests
    assert retrain.job_name == f"{SPEC}__retrain" and retrain.run_key == f"retrain:{window}"
    assert retrain.tags[f"{naming.TAG_PREFIX}trigger"] == "performance"
    assert "live AUC 0.612" in retrain.tags[f"{naming.TAG_PREFIX}evidence"]


def test_the_nightly_check_reports_a_partial_window_and_skips_a_quiet_night(defs, instance):
    schedule = defs.get_schedule_def(f"{SPEC}__nightly_drift_check")
    audit = defs.resources["audit"]

    def night():
        # Closed after use: an open schedule context keeps a Dagster instance entered, and a later test's
        # definitions load would find its state storage without the instance.
        with dg.build_schedule_context(instance=instance, resources={"audit": audit}) as context:
            return schedule(context)

    quiet = night()
    assert isinstance(quiet, dg.SkipReason) and "no served decision" in quiet.skip_message
    store: AuditStore = audit.store()
    store.append(decisions(1000) + decisions(250))
    instance.add_dynamic_partitions(f"{SPEC}__drift_windows", [window_key(1, 1000)])  # the sensor's full window
    partial = night()
    assert partial.partition_key == window_key(1001, 1250) and partial.run_key == f"report:{partial.partition_key}"
    assert partial.tags[f"{naming.TAG_PREFIX}partial"] == "true"
    assert partial.partition_key in instance.get_dynamic_partitions(f"{SPEC}__drift_windows")
    assert isinstance(night(), dg.SkipReason)  # nothing new since that partial window


def test_monitoring_definitions_ship_the_sensor_running_and_the_weekly_retrain_stopped(defs):
    assert defs.get_sensor_def(naming.drift_sensor_name(SPEC)).default_status == dg.DefaultSensorStatus.RUNNING
    weekly = defs.get_schedule_def(f"{SPEC}__weekly_retrain")
    assert weekly.default_status == dg.DefaultScheduleStatus.STOPPED and weekly.job_name == f"{SPEC}__retrain"
    retrain = defs.resolve_job_def(f"{SPEC}__retrain")
    selected = {k.path[-1] for k in retrain.asset_layer.selected_asset_keys}
    assert {"raw_dataset", "model_checkpoint", "compliance_report", "champion_model"} <= selected
    assert "drift_report" not in selected


@pytest.mark.slow
def test_detectors_of_a_real_version_see_a_shifted_window_and_not_an_unshifted_one(home: Path, pipelines: Path,
                                                                                  instance):
    """Train a small spec to model_evaluation (which fits and tags the version's detectors), then score two
    windows of audited decisions: fresh rows from the same population, and the same rows with incomes tripled."""
    from support import materialize, write_spec
    from loans_support import loans, spec

    from assets.detectors import load_version_detectors
    from assets.window_report import report_window
    from assets.spec import load_spec
    from resources.mlflow import MlflowResource
    from resources.storage import StorageResource

    loans(1200).to_csv(pipelines / "loans.csv", index=False)
    write_spec(pipelines, spec(monitoring={"window": 300, "min_window": 200, "permutations": 100}))
    defs = build_definitions(pipelines)
    done = materialize(defs, instance, dg.AssetSelection.assets(dg.AssetKey(["loans", "model_evaluation"])).upstream())
    assert done.success
    evaluation = done.asset_materializations_for_node("loans__model_evaluation")[0].metadata
    digest = evaluation["drift_detectors_sha256"].value
    mlflow, storage = MlflowResource(home=str(home)), StorageResource(home=str(home))
    assert mlflow.client().get_model_version("loans", "1").tags["drift_detectors_sha256"] == digest
    assert load_version_detectors(storage, mlflow, "loans", "1") is not None

    model = mlflow.load_model("loans", version="1")
    loaded = load_spec(pipelines / "loans.yaml")
    store = defs.resources["audit"].store()

    def audit(frame):
        rows = frame[["income", "debt_ratio", "purpose"]]
        p = model.predict(rows)["probability"].to_numpy()
        return store.append([{"decision_id": uuid.uuid4().hex, "spec": "loans", "model_name": "loans",
                              "model_version": "1", "variant": "champion", "inputs": r, "probability": float(q),
                              "decision": int(q >= 0.5), "threshold": 0.5}
                             for r, q in zip(rows.to_dict(orient="records"), p)])

    fresh = audit(loans(300, seed=11))
    shifted_rows = loans(300, seed=12)
    shifted_rows["income"] = shifted_rows["income"] * 3
    shifted = audit(shifted_rows)
    calm = report_window(loaded, storage, mlflow, store, window_key(fresh[0].seq, fresh[-1].seq), home / "plots")
    moved = report_window(loaded, storage, mlflow, store, window_key(shifted[0].seq, shifted[-1].seq), home / "plots")
    assert calm.result["status"] == "scored" and not calm.drift, calm.result["message"]
    assert moved.drift and "income" in moved.result["features_moved"], moved.result["message"]
    assert moved.model_version == "1" and Path(moved.plot).is_file()
    # The same window scored again gives the same p-values: the detectors load back and are seeded.
    again = report_window(loaded, storage, mlflow, store, window_key(shifted[0].seq, shifted[-1].seq))
    assert [d["p_value"] for d in again.result["detectors"]] == [d["p_value"] for d in moved.result["detectors"]]


@pytest.mark.slow
def test_a_retrain_on_biased_outcomes_is_refused_by_fairness_and_the_champion_keeps_serving(
        home: Path, pipelines: Path, instance):
    """Outcomes come back labelled by region, not by finances; with learn_from_outcomes they join the next
    snapshot, the retrain learns the bias, the fairness gate refuses it, and champion stays where it was."""
    from support import failure_text, materialize, write_spec
    from loans_support import PROMOTION, loans, spec

    from resources.mlflow import MlflowResource

    loans(1500).to_csv(pipelines / "loans.csv", index=False)
    write_spec(pipelines, spec(features={"numeric": ["income", "debt_ratio"], "categorical": ["purpose", "region"]},
                               compliance={"intended_purpose": "Loans flagged for review.", "min_group_size": 20,
                                           "allow_sensitive_inputs": True},
                               monitoring={"learn_from_outcomes": True}))
    defs = build_definitions(pipelines)
    first = materialize(defs, instance, PROMOTION)
    assert first.success, failure_text(first)
    mlflow = MlflowResource(home=str(home))
    assert str(mlflow.get_version("loans", "champion").version) == "1"

    store = defs.resources["audit"].store()
    served = loans(3000, seed=5)
    records = store.append([{"decision_id": uuid.uuid4().hex, "spec": "loans", "model_name": "loans",
                             "model_version": "1", "variant": "champion", "probability": 0.5, "decision": 0,
                             "threshold": 0.5, "inputs": row}
                            for row in served[["income", "debt_ratio", "purpose", "region"]].to_dict(orient="records")])
    for r, region in zip(records, served["region"]):
        store.record_outcome(r.decision_id, int(region == "south"))

    window = window_key(records[0].seq, records[-1].seq)
    retrain = defs.resolve_job_def("loans__retrain").execute_in_process(
        instance=instance, raise_on_error=False, tags={f"{naming.TAG_PREFIX}window": window})
    assert not retrain.success
    raw = retrain.asset_materializations_for_node("loans__raw_dataset")[0].metadata
    assert raw["rows_from_outcomes"].value == 3000
    fairness = {c.check_name: c for c in retrain.get_asset_check_evaluations()}["fairness"]
    assert not fairness.passed and "region: demographic parity difference" in fairness.description
    assert str(mlflow.get_version("loans", "champion").version) == "1"
    assert str(mlflow.get_version("loans", "challenger").version) == "2"
    assert not retrain.asset_materializations_for_node("loans__champion_model")

    # The sensor writes the refusal back onto the drift report of the window that asked for the retrain.
    sensor = defs.get_sensor_def(naming.drift_sensor_name("loans"))
    tick = sensor(dg.build_sensor_context(instance=instance, resources={"audit": defs.resources["audit"]},
                                          definitions=defs, cursor=SensorCursor(seq=records[-1].seq).dump()))
    (seen,) = tick.asset_events
    assert seen.asset_key == dg.AssetKey(["loans", "drift_report"]) and seen.partition == window
    meta = {k: v.value for k, v in seen.metadata.items()}
    assert meta["retrain_outcome"] == "refused" and meta["retrain_run"] == retrain.run_id
    assert "fairness: region: demographic parity difference" in meta["retrain_reason"]
    assert meta["champion_version"] == "unchanged"
    later = sensor(dg.build_sensor_context(instance=instance, resources={"audit": defs.resources["audit"]},
                                           definitions=defs, cursor=tick.cursor))
    assert later.asset_events == []  # written back once
    # A daemon that stored the observation and died before its cursor: the old cursor again writes nothing twice.
    instance.report_runless_asset_event(seen)
    replay = sensor(dg.build_sensor_context(instance=instance, resources={"audit": defs.resources["audit"]},
                                            definitions=defs, cursor=SensorCursor(seq=records[-1].seq).dump()))
    assert replay.asset_events == []
