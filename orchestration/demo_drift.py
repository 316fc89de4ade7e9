"""`make demo-drift`: the monitoring loop end to end, with the real daemon, on a pipeline that `make run` served.

    python -m orchestration.demo_drift [spec] [shift]     (default credit_risk)

`shift` is `python -m workloads.replay send`'s shift flags (`--scale COLUMN=FACTOR`,
`--reweight COLUMN:VALUE=WEIGHT`, ...); without them, credit_risk gets its documented shift and any other spec
one chosen from its training data.

1. Checks that the spec's server answers (`make run` leaves it running) and starts `dagster-daemon` on the same
   instance, so the drift sensor (on by default) ticks for real.
2. Sends one window of the spec's own rows as they are, then one window shifted (incomes scaled, one occupation
   over-represented) with `python -m workloads.replay` over HTTP.
3. Waits for the sensor to ask for a drift report per window and, for the shifted one, a `<spec>__retrain` run;
   waits for that run to go through training, evaluation and every blocking gate.
4. Prints each window's verdict and the retrain's result: a new champion that the server now serves, or the
   refusal and its reason, as the sensor wrote it back onto the window's drift report. The champion is never
   moved by anything but the gates.

Everything it starts is stopped on exit except the inference server, which was running before.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from assets.drift_sensor import RetrainOutcome
    from assets.spec import PipelineSpec
    from resources.settings import Settings

REPO = Path(__file__).resolve().parents[1]
TAG = "intelligentops/"


def _latest_meta(instance, spec: str, asset: str) -> dict:
    import dagster as dg

    event = instance.get_latest_materialization_event(dg.AssetKey([spec, asset]))
    if event is None or event.asset_materialization is None:
        return {}
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def _ready(endpoint: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{endpoint}/v2/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _replay(endpoint: str, spec_path: Path, rows: int, out: Path, *shift: str) -> None:
    """Rows to the server as traffic. On an open (loopback) server predict needs no key; with API keys the replay
    uses $REPLAY_API_KEY, never the deployment's own keys (smoke decisions are not traffic; the operator key has
    no predict scope)."""
    cmd = [sys.executable, "-m", "workloads.replay", "send", "--url", endpoint, "--model",
           spec_path.stem, "--spec", str(spec_path), "--rows", str(rows), "--rate", "250", "--batch", "25",
           "--decisions", str(out), *shift]
    subprocess.run(cmd, check=True, cwd=REPO)


def outcomes_command(endpoint: str, spec: str, home: Path, decisions: str) -> str:
    """How to report the true outcomes of replayed decisions: the outcomes scope is the operator key's."""
    return (f".venv/bin/python -m workloads.replay outcomes --url {endpoint} --model {spec} --decisions "
            f"{decisions} --api-key-file {home / spec / 'deployment' / 'operator.key'}")


# credit_risk's shift is the one the README and benchmarks describe.
KNOWN_SHIFTS = {"credit_risk": (["--scale", "annual_income=1.5", "--reweight", "emp_title:nurse=8", "--match",
                                 "contains"], "annual_income x1.5, nurses x8")}


def default_shift(spec: PipelineSpec, home: Path) -> tuple[list[str], str]:
    """A shift for any spec, from the data it was trained on: its first categorical feature's rarest common value
    eight times as likely, and its first non-negative numeric feature scaled by 1.25 where that stays inside the
    range the server accepts (the training span's half again above the maximum)."""
    import pandas as pd

    if spec.name in KNOWN_SHIFTS:
        return KNOWN_SHIFTS[spec.name]
    snapshot = home / "assets" / spec.name / "validated_dataset.parquet"
    if not snapshot.is_file():
        return [], "no shift (no validated snapshot to choose one from)"
    frame = pd.read_parquet(snapshot)
    args: list[str] = []
    said: list[str] = []
    for col in spec.features.categorical:
        shares = frame[col].dropna().astype(str).value_counts(normalize=True)
        common = shares[shares >= 0.02]
        if len(common) >= 2:
            value = str(common.index[-1])
            args += ["--reweight", f"{col}:{value}={8}"]
            said.append(f"{col}={value} x8")
            break
    for col in spec.features.numeric:
        values = pd.to_numeric(frame[col], errors="coerce").dropna()
        if len(values) and values.min() >= 0 and values.min() <= 0.5 * values.max() and values.max() > 0:
            args += ["--scale", f"{col}=1.25"]
            said.append(f"{col} x1.25")
            break
    return args, ", ".join(said) or "no shift (no feature to shift)"


def _runs(instance, job: str) -> list:
    import dagster as dg

    return list(instance.get_runs(filters=dg.RunsFilter(job_name=job)))


def _written_back(instance, spec: str, window: str, run_id: str, daemon: subprocess.Popen,
                  timeout_s: float = 90) -> RetrainOutcome | None:
    """The retrain's outcome as the drift sensor writes it back onto the window's report (next tick or two)."""
    import dagster as dg

    from assets.drift_sensor import RetrainOutcome

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and daemon.poll() is None:
        found = instance.fetch_observations(dg.AssetRecordsFilter(asset_key=dg.AssetKey([spec, "drift_report"]),
                                                                  asset_partitions=[window]), limit=10)
        for record in found.records:
            written = RetrainOutcome.from_metadata(record.asset_observation.metadata)
            if written is not None and written.run_id == run_id:
                return written
        time.sleep(5)
    return None


def _open_window(instance, settings: Settings, spec: str, window: int) -> int:
    """How many traffic decisions wait after the last complete window, as the drift sensor counts windows."""
    from assets.windows import complete_windows, windows_partitions
    from core.audit.traffic import traffic_after, window_bounds
    from resources import resources_for

    store = resources_for(settings)["audit"].store()
    opened = instance.get_dynamic_partitions(windows_partitions(spec).name)
    complete = complete_windows(store, spec, opened, window)
    after = window_bounds(complete[-1])[1] if complete else 0
    return len(traffic_after(store, spec, after, window))


def _no_retrain(instance, spec: str, loaded: PipelineSpec, reports: list) -> int:
    """Both windows were reported and no retrain came: say which windows drifted, and why none was asked for."""
    import dagster as dg

    from assets.window_report import ReportRecord

    drifted = []
    for r in sorted(reports, key=lambda r: r.tags.get(f"{TAG}window", "")):
        window = r.tags.get(f"{TAG}window", "")
        found = instance.fetch_materializations(dg.AssetRecordsFilter(
            asset_key=dg.AssetKey([spec, "drift_report"]), asset_partitions=[window]), limit=1).records
        meta = {k: v.value for k, v in found[0].asset_materialization.metadata.items()} if found else {}
        print(f"  window {window}: run {r.status.value}, drift {meta.get('drift', 'n/a')}: {meta.get('message', '')}")
        if ReportRecord.from_metadata(meta, window).retrain_requested:
            drifted.append(window)
    if not drifted:
        print("no window found drift, so no retrain was asked for; try a larger shift (SHIFT=...)")
        return 1
    earlier = instance.get_run_records(dg.RunsFilter(job_name=f"{spec}__retrain"), limit=1)
    hours = loaded.monitoring.retrain_cooldown_hours
    if earlier:
        ago = (time.time() - earlier[0].create_timestamp.timestamp()) / 3600
        print(f"window(s) {', '.join(drifted)} found drift, but a retrain was asked for {ago:.1f} h ago and "
              f"monitoring.retrain_cooldown_hours ({hours} h) holds this one back; lower it in the spec to try "
              "again sooner")
    else:
        print(f"window(s) {', '.join(drifted)} found drift but no retrain was asked for; the sensor's ticks in the "
              "UI (make ui, Automation) say why")
    return 1


def main(spec: str = "credit_risk", shift: list[str] | None = None, timeout_s: float = 1800) -> int:
    import dagster as dg

    instance = dg.DagsterInstance.get()
    deployed = _latest_meta(instance, spec, "deployment")
    endpoint = str(deployed.get("endpoint") or "")
    if not endpoint or not _ready(endpoint):
        print(f"{spec}: no server answers (endpoint {endpoint or 'unknown'}); run `make run PIPELINE={spec}` first")
        return 2
    from assets.spec import load_spec
    from resources.settings import Settings

    settings = Settings.from_env()
    spec_path = settings.pipelines / f"{spec}.yaml"
    loaded = load_spec(spec_path).spec
    window = loaded.monitoring.window
    shift_args, shift_said = (shift, " ".join(shift)) if shift else default_shift(loaded, Path(settings.home))
    reports_before = {r.run_id for r in _runs(instance, f"{spec}__report_drift")}
    retrains_before = {r.run_id for r in _runs(instance, f"{spec}__retrain")}
    log = Path(tempfile.mkstemp(prefix="intelligentops-daemon-", suffix=".log")[1])
    print(f"{spec}: server {endpoint}; starting dagster-daemon (log {log})")
    daemon = subprocess.Popen([str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w",
                               str(REPO / "workspace.yaml")], cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            open_rows = _open_window(instance, settings, spec, window)
            if open_rows:
                print(f"{open_rows} earlier decisions wait in an open window: completing it with {window - open_rows} "
                      "rows as the data is first, so this run's windows are its own")
            print(f"sending {window} decisions as the data is, then {window} shifted ({shift_said})")
            try:
                if open_rows:
                    _replay(endpoint, spec_path, window - open_rows, Path(tmp) / "flush.jsonl", "--shuffle", "--seed",
                            "3")
                # Random rows (a data file's order, by time or by id, is itself a shift), different ones each time.
                _replay(endpoint, spec_path, window, Path(tmp) / "normal.jsonl", "--shuffle", "--seed", "1")
                _replay(endpoint, spec_path, window, Path(tmp) / "shifted.jsonl", "--shuffle", "--seed", "2",
                        *shift_args)
            except subprocess.CalledProcessError:
                print("replay failed (its message is above); nothing was changed")
                return 1
        deadline = time.monotonic() + timeout_s
        retrain = None
        reported_at = None  # when both windows' reports had finished
        while time.monotonic() < deadline:
            reports = [r for r in _runs(instance, f"{spec}__report_drift") if r.run_id not in reports_before]
            retrains = [r for r in _runs(instance, f"{spec}__retrain") if r.run_id not in retrains_before]
            if retrains and retrains[0].is_finished:
                retrain = retrains[0]
                break
            if not retrains and len(reports) >= 2 and all(r.is_finished for r in reports):
                reported_at = reported_at or time.monotonic()
                # The sensor reads finished reports on its next tick; give it two before explaining why not.
                if time.monotonic() - reported_at > 2 * loaded.monitoring.sensor_interval_seconds + 30:
                    return _no_retrain(instance, spec, loaded, reports)
            if daemon.poll() is not None:
                print(f"dagster-daemon exited; see {log}")
                return 1
            print(f"  waiting: {len(reports)} drift report run(s), {len(retrains)} retrain run(s) so far", flush=True)
            time.sleep(15)
        for r in sorted((r for r in _runs(instance, f"{spec}__report_drift") if r.run_id not in reports_before),
                        key=lambda r: r.tags.get(f"{TAG}window", "")):
            print(f"  drift report for window {r.tags.get(f'{TAG}window')}: run {r.status.value}")
        event = instance.get_latest_materialization_event(dg.AssetKey([spec, "drift_report"]))
        if event is not None:
            meta = {k: v.value for k, v in event.asset_materialization.metadata.items()}
            print(f"  latest report: window {meta.get('window')}, drift {meta.get('drift')}: {meta.get('message')}")
        if retrain is None:
            print(f"no retrain finished within {timeout_s:.0f} s; the Dagster UI (make ui) shows the sensor's ticks")
            return 1
        print(f"retrain run {retrain.run_id} ({retrain.tags.get(f'{TAG}trigger')} in window "
              f"{retrain.tags.get(f'{TAG}window')}): {retrain.status.value}")
        champion = _latest_meta(instance, spec, "champion_model")
        if retrain.status == dg.DagsterRunStatus.SUCCESS:
            print(f"  new champion: version {champion.get('champion_version')}; the server reloaded it")
        else:
            from assets.drift_sensor import retrain_outcome

            outcome = retrain_outcome(instance, retrain)
            print(f"  {outcome.outcome}, the champion keeps serving (version {champion.get('champion_version')}):")
            for reason in outcome.reason.split("; ")[:4]:
                print(f"    {reason[:400]}")
        window = retrain.tags.get(f"{TAG}window", "")
        written = _written_back(instance, spec, window, retrain.run_id, daemon)
        if written is not None:
            print(f"  the drift report of window {window} now says: retrain {written.outcome}: "
                  f"{written.reason[:300]}")
        print(f"  see it in the UI: make ui, then Automation -> {spec}__drift_sensor, Runs, and {spec}/drift_report "
              f"-> Partitions -> {window}")
        print("  outcomes (a live AUC per window) are reported with the deployment's operator key, e.g.:\n    "
              + outcomes_command(endpoint, spec, Path(settings.home), "<decisions.jsonl of a replay>"))
        return 0
    finally:
        daemon.terminate()
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()


if __name__ == "__main__":
    # python -m orchestration.demo_drift [spec] [workloads.replay shift flags, e.g. --scale lvrat=1.2]
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "credit_risk", sys.argv[2:] or None))
