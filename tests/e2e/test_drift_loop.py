"""The monitoring loop end to end over HTTP: a trained and served model, traffic replayed with python -m workloads.replay
to the real server, drift reports per window, exactly one retrain for the shifted window, the retrain through
every gate, its outcome written back onto the window's report, and the server serving the new champion.

The sensor is evaluated in-process (test_daemon_restart.py covers the real daemon); every run it asks for is
executed as the daemon would launch it: the same job, partition and tags.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import httpx
import pytest
from support import REPO, failure_text, materialize, write_spec
from loans_support import loans, spec

from assets import naming
from assets.drift_sensor import SensorCursor
from core.audit.traffic import window_bounds
from orchestration.definitions import build_definitions

pytestmark = pytest.mark.slow
WINDOW = 300
TAG = naming.TAG_PREFIX


def _replay(endpoint: str, pipelines: Path, data: Path, out: Path, *extra: str) -> None:
    sent = subprocess.run([sys.executable, "-m", "workloads.replay", "send", "--url", endpoint,
                           "--model", "loans", "--spec", str(pipelines / "loans.yaml"), "--data", str(data),
                           "--batch", "25", "--decisions", str(out), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert sent.returncode == 0, sent.stdout + sent.stderr


def _run(defs: dg.Definitions, instance, request: dg.RunRequest) -> dg.ExecuteInProcessResult:
    """Launch a sensor's request as the daemon would: its job, partition and tags (run key included)."""
    tags = {**request.tags, "dagster/run_key": request.run_key}
    return defs.resolve_job_def(request.job_name).execute_in_process(
        instance=instance, partition_key=request.partition_key, tags=tags, raise_on_error=False)


def test_shifted_traffic_over_http_asks_for_exactly_one_retrain_which_the_gates_promote(
        home: Path, pipelines: Path, instance, tmp_path: Path):
    loans(2000).to_csv(pipelines / "loans.csv", index=False)
    write_spec(pipelines, spec(monitoring={"window": WINDOW, "min_window": 200, "permutations": 100},
                               deployment={"smoke_requests": 10}))
    defs = build_definitions(pipelines)
    sensor = defs.get_sensor_def(naming.drift_sensor_name("loans"))
    audit = defs.resources["audit"]

    def tick(cursor: str | None) -> dg.SensorResult:
        result = sensor(dg.build_sensor_context(instance=instance, cursor=cursor, resources={"audit": audit},
                                                definitions=defs))
        for req in result.dynamic_partitions_requests or []:
            instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        return result

    launcher = defs.resources["server"]
    try:
        served = materialize(defs, instance, 'key:"loans/*" and not group:monitoring')
        assert served.success, failure_text(served)
        deployed = {m.asset_key.path[-1]: m.materialization.metadata
                    for m in served.get_asset_materialization_events()}["deployment"]
        endpoint = deployed["endpoint"].value
        # The deployment's smoke requests are on the audit log, marked as its own, and no window counts them.
        smoke = audit.store().latest_seq("loans")
        assert smoke >= 11 and {r.key_id for r in audit.store().read_after(0, spec="loans")} == {"deployment-smoke"}
        cursor = tick(None).cursor
        assert SensorCursor.parse(cursor).seq == 0  # no window yet

        # One window as the data is, then one with every income 30% higher, through the real server over HTTP.
        loans(WINDOW, seed=21).to_csv(tmp_path / "normal.csv", index=False)
        loans(WINDOW, seed=22).to_csv(tmp_path / "later.csv", index=False)
        _replay(endpoint, pipelines, tmp_path / "normal.csv", tmp_path / "normal.jsonl")
        _replay(endpoint, pipelines, tmp_path / "later.csv", tmp_path / "shifted.jsonl", "--scale", "income=1.3")

        first = tick(cursor)
        reports = [r for r in first.run_requests if r.job_name == "loans__report_drift"]
        assert [window_bounds(r.partition_key) for r in reports] == [(smoke + 1, smoke + WINDOW),
                                                                      (smoke + WINDOW + 1, smoke + 2 * WINDOW)]
        normal, shifted = (r.partition_key for r in reports)
        verdicts = {}
        for req in reports:
            ran = _run(defs, instance, req)
            assert ran.success, failure_text(ran)
            meta = ran.asset_materializations_for_node("loans__drift_report")[0].metadata
            verdicts[req.partition_key] = meta["drift"].value
            assert meta["model_version"].value == "1" and meta["decisions"].value == WINDOW
        assert verdicts == {normal: False, shifted: True}

        second = tick(first.cursor)
        retrains = [r for r in second.run_requests if r.job_name == "loans__retrain"]
        assert [r.run_key for r in retrains] == [f"retrain:{shifted}"]
        assert "income" in retrains[0].tags[f"{TAG}evidence"] and retrains[0].tags[f"{TAG}trigger"] == "drift"
        # The same tick again (a daemon that died before recording it): the same run key, nothing else.
        assert [r.run_key for r in tick(first.cursor).run_requests if r.job_name == "loans__retrain"] == \
            [f"retrain:{shifted}"]

        # Outcomes of the normal window come back later, over HTTP: the window is judged again with a live AUC.
        # Outcomes need the outcomes scope: the deployment's operator key, kept beside the server's config.
        operator = Path(launcher.home) / "loans" / "deployment" / "operator.key"
        reported = subprocess.run([sys.executable, "-m", "workloads.replay", "outcomes", "--url",
                                   endpoint, "--model", "loans", "--decisions", str(tmp_path / "normal.jsonl"),
                                   "--api-key-file", str(operator)],
                                  cwd=REPO, capture_output=True, text=True, timeout=120)
        assert reported.returncode == 0, reported.stdout + reported.stderr
        third = tick(second.cursor)
        rechecks = [r for r in third.run_requests if r.job_name == "loans__report_drift"]
        assert [r.run_key for r in rechecks] == [f"outcomes:{normal}:300"]
        assert not [r for r in third.run_requests if r.job_name == "loans__retrain"]
        rejudged = _run(defs, instance, rechecks[0])
        meta = rejudged.asset_materializations_for_node("loans__drift_report")[0].metadata
        assert meta["outcomes"].value == WINDOW and meta["live_auc"].value > 0.7
        assert meta["performance_drop"].value is False

        # The retrain goes through every gate; this one passes, so v2 becomes champion and the server reloads it.
        retrain = _run(defs, instance, retrains[0])
        assert retrain.success, failure_text(retrain)
        back = tick(third.cursor)
        assert not [r for r in back.run_requests if r.job_name == "loans__retrain"]
        (written,) = back.asset_events
        assert written.partition == shifted
        assert {k: v.value for k, v in written.metadata.items()}["retrain_outcome"] == "promoted"
        assert {k: v.value for k, v in written.metadata.items()}["champion_version"] == "2"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = httpx.get(f"{endpoint}/intelligentops/status", timeout=5,
                               headers={"Authorization": f"Bearer {operator.read_text().strip()}"}).json()
            if status["versions"]["champion"]["version"] == "2":
                break
            time.sleep(1)
        assert status["versions"]["champion"]["version"] == "2", status
    finally:
        launcher.stop("loans")
