"""What `make run` shows: one line per step with its key figure, the full log kept in the Dagster instance.

    python -m orchestration.run credit_risk            # the spec's __pipeline job
    python -m orchestration.run credit_risk --job data # its __data job

Runs the job in this process against `DagsterInstance.get()` ($DAGSTER_HOME), with Dagster's console logger at
WARNING; every event (DEBUG included) still goes to the instance's event log, where the UI shows it (Runs).
While the run goes, a line is printed for each asset materialization, check and step failure read from that
event log. What the steps and their subprocesses print (torchrun, the training ranks, library notices) goes to
`$DAGSTER_HOME/console/<run id>.log` instead of the terminal; the UI shows it per step too.
Exits 1 when the run fails, naming the blocking checks (gates) that failed.
The CLI way to materialize any part of the graph stays `dagster asset materialize` (README).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg

from assets import naming

# The figures a person wants from each asset's metadata, first found first shown (at most four per line).
KEY_FIGURES: tuple[tuple[str, str], ...] = (
    ("dagster/row_count", "rows"),
    ("rows_set_aside", "set aside"),
    ("train_rows", "train"),
    ("validation_rows", "validation"),
    ("test_rows", "test"),
    ("rows_embedded", "embedded"),
    ("rows_reused", "reused"),
    ("best_val_auc", "val AUC"),
    ("samples_per_second", "samples/s"),
    ("model_version", "version"),
    ("test_auc", "test AUC"),
    ("champion_test_auc", "champion AUC"),
    ("failed_gates", "failed gates"),
    ("champion_version", "champion"),
    ("decision", "decision"),
)
WATCHED = (dg.DagsterEventType.ASSET_MATERIALIZATION, dg.DagsterEventType.ASSET_CHECK_EVALUATION,
           dg.DagsterEventType.STEP_FAILURE)


def key_figures(metadata: dict[str, Any], limit: int = 4) -> str:
    parts = []
    for key, label in KEY_FIGURES:
        if key in metadata and len(parts) < limit:
            value = getattr(metadata[key], "value", metadata[key])
            if isinstance(value, float):
                value = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
            elif isinstance(value, int) and not isinstance(value, bool):
                value = f"{value:,}"
            parts.append(f"{label} {value}")
    return ", ".join(parts)


def describe(event: dg.DagsterEvent) -> str:
    """One console line for a materialization, a check or a step failure."""
    if event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION:
        mat = event.step_materialization_data.materialization
        figures = key_figures(dict(mat.metadata))
        name = mat.asset_key.to_user_string() + (f" {mat.partition}" if mat.partition else "")
        return f"  ok    {name:42s} {figures}".rstrip()
    if event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
        ev = event.asset_check_evaluation_data
        verdict = "pass" if ev.passed else ("FAIL" if ev.severity == dg.AssetCheckSeverity.ERROR else "warn")
        desc = f"  {ev.description}" if ev.description and not ev.passed else ""
        return f"  {verdict:5s} {ev.asset_key.to_user_string()}:{ev.check_name}{desc}"[:400]
    error = event.step_failure_data.error
    message = (error.message if error else "failed").strip().splitlines()[0]
    return f"  ERROR {event.step_key}: {message}"[:400]


def is_check_failure(event: dg.DagsterEvent) -> bool:
    """A step that failed only because a blocking check failed: its FAIL line already said why."""
    error = event.step_failure_data.error if event.event_type == dg.DagsterEventType.STEP_FAILURE else None
    return error is not None and error.cls_name == "DagsterAssetCheckFailedError"


def follow(instance: dg.DagsterInstance, run_id: str, stop: threading.Event,
           emit: Callable[[str], None]) -> None:
    """Print the run's watched events from the instance's event log as they land, until `stop` and drained.

    Checks that passed are gathered into one line per asset, printed when their step ends.
    """
    cursor = None
    passed: dict[str, list[str]] = {}

    def flush() -> None:
        for asset, names in passed.items():
            emit(f"  pass  {asset}: {', '.join(names)}")
        passed.clear()

    while True:
        finished = stop.is_set()
        page = instance.get_records_for_run(run_id, cursor=cursor)
        for record in page.records:
            event = record.event_log_entry.dagster_event
            if event is None:
                continue
            if event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
                check = event.asset_check_evaluation_data
                if check.passed:
                    passed.setdefault(check.asset_key.to_user_string(), []).append(check.check_name)
                    continue
            if event.event_type in WATCHED or event.event_type == dg.DagsterEventType.STEP_SUCCESS:
                flush()
            if event.event_type in WATCHED and not is_check_failure(event):
                emit(describe(event))
        cursor = page.cursor
        if finished and not page.has_more:
            flush()
            return
        stop.wait(0.5)


def failed_gates(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    out = []
    for record in instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records:
        ev = record.event_log_entry.dagster_event.asset_check_evaluation_data
        if not ev.passed and ev.severity == dg.AssetCheckSeverity.ERROR:
            out.append(f"{ev.asset_key.to_user_string()}:{ev.check_name}")
    return out


def quiet() -> None:
    """Dagster's beta, preview and supersession notices are about this package's code, not the user's run."""
    from dagster_shared.utils.warnings import BetaWarning, PreviewWarning, SupersessionWarning

    for category in (BetaWarning, PreviewWarning, SupersessionWarning):
        warnings.filterwarnings("ignore", category=category)
    # Libraries that log at INFO to the console from inside steps; their messages are in the step's logs.
    for name in ("mlflow", "alembic", "great_expectations", "py.warnings"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def steps_output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (and so every subprocess's: torchrun, ranks, progress bars) to
    `path` while the run goes; `emit` keeps writing to the terminal through a copy of the original stream."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with path.open("ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def terminal() -> Callable[[str], None]:
    """Print to the terminal as it is now, even while fds 1 and 2 point at the steps' log."""
    out = os.fdopen(os.dup(1), "w", buffering=1)

    def emit(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    return emit


def run(spec: str, kind: str = "pipeline", emit: Callable[[str], None] | None = None) -> int:
    from orchestration.definitions import build_definitions

    quiet()
    emit = emit or terminal()
    job_name = naming.job_name(spec, kind)
    defs = build_definitions()
    try:
        job = defs.resolve_job_def(job_name)
    except Exception:
        names = sorted(j.name for j in defs.jobs or [])
        emit(f"no job {job_name!r}; jobs here: {', '.join(names)}")
        return 2
    instance = dg.DagsterInstance.get()
    run_id = str(uuid.uuid4())
    output = Path(instance.root_directory) / "console" / f"{run_id}.log"
    emit(f"{job_name}: run {run_id}")
    stop = threading.Event()
    watcher = threading.Thread(target=follow, args=(instance, run_id, stop, emit), daemon=True)
    started = time.monotonic()
    # A partitioned spec's job runs every month of its partitions in one run (a single-run backfill), then trains on
    # the window; months without rows stop it, naming them (declare partitions.end for a closed history).
    months = list(job.partitions_def.get_partition_keys()) if job.partitions_def is not None else []
    tags = {"dagster/asset_partition_range_start": months[0], "dagster/asset_partition_range_end": months[-1]} \
        if months else None
    with steps_output_to(output):
        watcher.start()
        try:
            result = job.execute_in_process(
                instance=instance, run_id=run_id, raise_on_error=False, tags=tags,
                run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}})
        finally:
            stop.set()
            watcher.join()
    seconds = time.monotonic() - started
    emit(f"  full log: make ui, then Runs > {run_id[:8]}; the steps' own output: {output}")
    if result.success:
        emit(f"{job_name}: succeeded in {seconds:.0f} s")
        return 0
    gates = failed_gates(instance, run_id)
    if gates:
        emit(f"{job_name}: failed in {seconds:.0f} s; blocking check(s) failed: {', '.join(gates)}")
        if any(g.startswith(f"{spec}/{naming.COMPLIANCE_REPORT}:") for g in gates):
            emit(f"  {naming.CHAMPION_MODEL} was not promoted: the compliance report above says why")
    else:
        emit(f"{job_name}: failed in {seconds:.0f} s (the ERROR lines above say where)")
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestration.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", nargs="?", default="credit_risk", help="the spec's name (default credit_risk)")
    parser.add_argument("--job", default="pipeline", choices=["pipeline", "data"],
                        help="which of the spec's jobs to run (default pipeline)")
    args = parser.parse_args(argv)
    return run(args.spec, args.job)


if __name__ == "__main__":
    raise SystemExit(main())
