"""The drift sensor under a real `dagster-daemon`, killed with SIGKILL in the middle of a tick and started again,
twice (once right after the tick asked for its first run, once deeper into a tick).

The instance's run coordinator is a queue that launches nothing (max_concurrent_runs 0), so every run the
sensor asks for stays QUEUED where the test can count it, and no training starts. The daemon and its code
server run in their own process group and are killed together, as a pod would be.

What must hold afterwards: every window of the audit log has exactly one drift_report run, every report that
found drift has exactly one retrain run, and the sensor's later ticks ask for nothing again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import dagster as dg
import pytest
import yaml
from support import REPO, shipped_spec, write_spec

from assets import naming
from core.audit import AuditStore, default_audit_url
from core.audit.traffic import window_key

SPEC = "credit_scoring"
WINDOW = 20
DECISIONS = 1000  # 50 windows: the sensor asks for at most 20 per tick, so three ticks
DRIFTED = 3  # windows whose (pre-recorded) reports found drift
RUN_KEY = "dagster/run_key"

pytestmark = pytest.mark.slow


def _start(env: dict, workspace: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", str(workspace)],
                            cwd=REPO, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _kill(daemon: subprocess.Popen) -> None:
    try:
        os.killpg(daemon.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    daemon.wait(30)


def _run_keys(instance: dg.DagsterInstance, job: str) -> list[str]:
    return [r.tags.get(RUN_KEY, "") for r in instance.get_runs(dg.RunsFilter(job_name=job))]


def test_a_daemon_killed_mid_tick_neither_loses_a_window_nor_asks_twice(tmp_path: Path):
    home, pipelines, dagster_home = tmp_path / "home", tmp_path / "pipelines", tmp_path / "home" / "dagster"
    pipelines.mkdir()
    dagster_home.mkdir(parents=True)
    spec = shipped_spec(SPEC)
    spec["monitoring"] = {**spec.get("monitoring", {}), "window": WINDOW, "min_window": 10,
                          "sensor_interval_seconds": 1, "retrain_cooldown_hours": 0}
    write_spec(pipelines, spec)
    (dagster_home / "dagster.yaml").write_text(yaml.safe_dump({
        "storage": {"sqlite": {"base_dir": str(dagster_home)}},
        "run_coordinator": {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator",
                            "config": {"max_concurrent_runs": 0}},
        "telemetry": {"enabled": False}, "nux": {"enabled": False}}))
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(yaml.safe_dump({"load_from": [{"python_module": {
        "module_name": "orchestration.definitions", "attribute": "defs", "location_name": "intelligentops",
        "working_directory": str(REPO)}}]}))
    env = {**os.environ, "INTELLIGENTOPS_HOME": str(home), "INTELLIGENTOPS_PIPELINES": str(pipelines),
           "DAGSTER_HOME": str(dagster_home), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}

    store = AuditStore(default_audit_url(str(home)))
    store.append([{"decision_id": uuid.uuid4().hex, "spec": SPEC, "model_name": SPEC, "model_version": "1",
                   "variant": "champion", "inputs": {"Income": float(i)}, "probability": 0.3, "decision": 0,
                   "threshold": 0.5} for i in range(DECISIONS)])
    windows = [window_key(a, a + WINDOW - 1) for a in range(1, DECISIONS + 1, WINDOW)]
    report_job, retrain_job = f"{SPEC}__report_drift", f"{SPEC}__retrain"

    instance = dg.DagsterInstance.from_config(str(dagster_home))
    # Reports that found drift, as report runs would have recorded them: the same tick that requests new windows
    # asks for their retrains, so the kill can land among either kind of request.
    instance.add_dynamic_partitions(f"{SPEC}__drift_windows", windows[:DRIFTED])
    for w in windows[:DRIFTED]:
        instance.report_runless_asset_event(dg.AssetMaterialization(
            dg.AssetKey([SPEC, "drift_report"]), partition=w,
            metadata={"window": w, "drift": True, "retrain_requested_by_sensor": True, "model_version": "1",
                      "message": "Income moved"}))

    log = tmp_path / "daemon.log"
    daemon = _start(env, workspace, log)
    kills: list[int] = []  # report runs that existed when each kill landed
    try:
        # Kill twice: as soon as a tick has asked for its first window, then deeper into a later tick. A tick
        # asks for 20 windows, so a count that is not a multiple of 20 is a tick half done.
        for depth in (1, 5):
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                n = len(_run_keys(instance, report_job))
                if n % 20 >= depth:
                    _kill(daemon)
                    kills.append(n)
                    break
                if n == len(windows):
                    break
                if daemon.poll() is not None:
                    pytest.fail(f"dagster-daemon exited on its own:\n{log.read_text()[-3000:]}")
                time.sleep(0.02)
            daemon = _start(env, workspace, log)
        assert kills and 0 < kills[0] < len(windows), \
            f"every tick finished between two looks; no kill landed mid-tick:\n{log.read_text()[-2000:]}"

        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if len(set(_run_keys(instance, report_job))) == len(windows) and \
                    len(set(_run_keys(instance, retrain_job))) == DRIFTED:
                break
            if daemon.poll() is not None:
                pytest.fail(f"dagster-daemon exited on its own:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        time.sleep(5)  # a few more ticks, which must ask for nothing new
    finally:
        _kill(daemon)

    reports = Counter(_run_keys(instance, report_job))
    retrains = Counter(_run_keys(instance, retrain_job))
    assert reports == Counter({f"report:{w}": 1 for w in windows}), f"killed after {kills} report runs"
    assert retrains == Counter({f"retrain:{w}": 1 for w in windows[:DRIFTED]}), f"killed after {kills}"
    ticks = instance.get_ticks(*_sensor_ids(instance))
    print(f"killed after {kills} report runs; ticks: {[t.status.value for t in ticks]}")
    assert ticks and any(t.status.value == "SUCCESS" for t in ticks)
    assert set(instance.get_dynamic_partitions(f"{SPEC}__drift_windows")) == set(windows)


def _sensor_ids(instance: dg.DagsterInstance) -> tuple[str, str]:
    """(origin id, selector id) of the drift sensor, from the instigator state the daemon stored."""
    name = naming.drift_sensor_name(SPEC)
    for state in instance.all_instigator_state():
        if state.name == name:
            return state.instigator_origin_id, state.selector_id
    raise AssertionError(f"the daemon stored no state for {name}")
