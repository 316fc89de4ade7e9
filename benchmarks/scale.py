"""How each step's time and memory grow with rows, and what one new month costs against the whole history.

    PYTHONPATH=. .venv/bin/python benchmarks/scale.py --rows 10000 100000 [1000000] [--phases full history month]

Data: credit_risk's spec over a seeded synthetic table shaped like its source (openintro `loans_full_schema`):
rows resampled from the 10,000 real loans, the continuous numbers jittered (x exp(N(0, 0.05)), kept inside the
spec's declared rules), `--new-texts` of the job titles made unique (default a fifth: each is one more text to
embed), and `--months` issue months (default 33, so one month is about 3% of the rows).

Phases, each in a fresh $INTELLIGENTOPS_HOME and a fresh Python process (so imports and model loads count), run
the way `dagster asset materialize` runs them (the default executor, each step in its own process, here one step at
a time):
- full: the unpartitioned spec (as shipped, only the source changed) from raw_dataset to compliance_report, one run;
- history: the same data with `partitions: {grain: month}` and `training.window: {months: 24}`, every month but
  the last through validation, embeddings and the vector index in one single-run backfill;
- month: then the last month alone, the way a new month arrives (same home as history).

Each step's time comes from the run's event log (step start to step end); its CPU time is what the run's process
tree used in that span (user + system of the process, its live children and the children it has reaped: torchrun
and its ranks included), which other work on a shared machine changes far less than wall time; memory is the peak
of the summed RSS of the process tree. Both are sampled every 0.2 s by psutil, per step and for the run. Results are written after every phase to `--out` (default benchmarks/results/scale.json), so a
long run keeps what it measured if it is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
SPEC = "credit_risk"
# Continuous columns of credit_risk that get jittered; counts (delinquencies, accounts) are kept as they were.
JITTER = ("annual_income", "debt_to_income", "loan_amount", "total_credit_limit", "total_credit_utilized",
          "account_never_delinq_percent", "months_since_last_credit_inquiry")
WORDS = ("unit", "site", "branch", "office", "team", "division", "store", "plant", "ward", "campus")
INGEST = ('key:"{s}/raw_dataset" or key:"{s}/validated_dataset" or key:"{s}/text_embeddings" '
          'or key:"{s}/vector_index"').format(s=SPEC)
FULL = f'+key:"{SPEC}/compliance_report" or key:"{SPEC}/vector_index"'


# --- the data ---------------------------------------------------------------------------------------------------


def generate(rows: int, seed: int = 0, new_texts: float = 0.2, months: int = 33) -> pd.DataFrame:
    """`rows` loans shaped like credit_risk's source, over `months` issue months ending March 2018."""
    from assets.sources import read_source
    from assets.spec import load_spec

    loaded = load_spec(REPO / "pipelines" / f"{SPEC}.yaml")
    source, _ = read_source(loaded)
    spec = loaded.spec
    source = source[[c for c in spec.columns if c != spec.time_column]].reset_index(drop=True)
    rng = np.random.default_rng(seed)
    frame = source.iloc[rng.integers(0, len(source), rows)].reset_index(drop=True)
    rules = spec.validation.columns
    for col in JITTER:
        values = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype="float64")
        jittered = values * np.exp(rng.normal(0.0, 0.05, rows))
        rule = rules.get(col)
        lo = rule.min if rule is not None and rule.min is not None else None
        hi = rule.max if rule is not None and rule.max is not None else None
        jittered = np.round(jittered, 2)
        frame[col] = jittered if lo is None and hi is None else np.clip(jittered, lo, hi)
    unique = rng.random(rows) < new_texts
    titles = frame["emp_title"].fillna("").astype(str).to_numpy(dtype=object)
    words = rng.choice(WORDS, rows)
    frame["emp_title"] = [f"{t or 'employee'} {w} {i}" if u else (t or None)
                          for i, (t, w, u) in enumerate(zip(titles, words, unique, strict=True))]
    frame[spec.id_column] = [f"s{i:07d}" for i in range(rows)]
    periods = pd.period_range(end="2018-03", periods=months, freq="M")
    frame[spec.time_column] = periods[rng.integers(0, months, rows)].strftime("%b-%Y")
    return frame


def write_spec(folder: Path, data: Path, partitioned: bool, months: int) -> None:
    spec = yaml.safe_load((REPO / "pipelines" / f"{SPEC}.yaml").read_text())
    spec["source"] = {"kind": "file", "path": str(data)}
    if partitioned:
        periods = pd.period_range(end="2018-03", periods=months, freq="M")
        spec["partitions"] = {"grain": "month", "start": str(periods[0]), "end": str(periods[-1])}
        spec.setdefault("training", {})["window"] = {"months": 24}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{SPEC}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    template = (spec.get("notices") or {}).get("template")
    if template:  # the spec's notice template lives next to it (without it the run stops at notice_template)
        (folder / template).write_text((REPO / "pipelines" / template).read_text())


# --- one measured run in its own process --------------------------------------------------------------------------


def child(selection: str, partition: str | None, first: str | None, last: str | None, out: str) -> None:
    """Inside the measured process: materialize `selection` (and its checks) on $DAGSTER_HOME's instance the way
    `dagster asset materialize` does (the definitions' default executor: each step in its own process), one step
    at a time so that each step's time and memory are its own."""
    import warnings

    import dagster as dg
    from dagster._core.definitions.reconstruct import ReconstructableRepository
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    from orchestration.definitions import build_definitions

    warnings.filterwarnings("ignore")
    keys = list(dg.AssetSelection.from_string(selection).resolve(build_definitions().resolve_asset_graph()))
    repo = ReconstructableRepository.for_module("orchestration.definitions", "defs", working_directory=str(REPO))
    job = repo.get_reconstructable_job("__ASSET_JOB")
    tags = {ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last} if first else {}
    if partition:
        tags = {"dagster/partition": partition}
    with dg.DagsterInstance.get() as instance:
        result = dg.execute_job(job, instance, asset_selection=keys, tags=tags,
                                run_config={"execution": {"config": {"multiprocess": {"max_concurrent": 1}}}})
        Path(out).write_text(json.dumps({"run_id": result.run_id, "success": result.success}))


def _tree(pid: int) -> tuple[int, float]:
    """The summed RSS of a process and its live descendants, and the CPU seconds they and every child they reaped
    have used (a reaped child's time, and its reaped children's, moves into its parent's children_* counters)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0.0
    rss, cpu = 0, 0.0
    for p in procs:
        try:
            rss += p.memory_info().rss
            t = p.cpu_times()
            cpu += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return rss, cpu


def measured(env: dict[str, str], selection: str, partition: str | None = None,
             months: tuple[str, str] | None = None) -> dict[str, Any]:
    """One run in a fresh process: wall time, each step's time and peak memory (the process tree's summed RSS)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = fh.name
    args = [sys.executable, __file__, "--child", selection, "--out", out]
    if partition:
        args += ["--partition", partition]
    if months:
        args += ["--first", months[0], "--last", months[1]]
    samples: list[tuple[float, int, float]] = []
    loads: list[float] = []
    started = time.time()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.time(), *_tree(proc.pid)))
            if len(samples) % 25 == 0:
                loads.append(os.getloadavg()[0])
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = proc.communicate()
    done.set()
    sampler.join()
    wall = time.time() - started
    if proc.returncode != 0:
        raise RuntimeError(f"measured run failed ({proc.returncode}): {stderr[-4000:]}")
    status = json.loads(Path(out).read_text())
    os.unlink(out)
    steps = step_times(env, status["run_id"])
    cpu_max = 0.0
    samples = [(t, rss, cpu_max := max(cpu_max, cpu)) for t, rss, cpu in samples]  # a reaped child never lowers it

    def cpu_at(when: float) -> float:
        return next((cpu for t, _, cpu in samples if t >= when), samples[-1][2] if samples else 0.0)

    for step in steps.values():
        inside = [rss for t, rss, _ in samples if step["start"] <= t <= step["end"]]
        step["peak_rss_gib"] = round(max(inside, default=0) / 2**30, 3)
        step["cpu_seconds"] = round(cpu_at(step["end"]) - cpu_at(step["start"]), 2)
    # The machine is shared: the 1-minute load average over the run says how much else ran on its two cores.
    return {"success": status["success"], "wall_seconds": round(wall, 1),
            "load_average": round(sum(loads) / len(loads), 2) if loads else None,
            "cpu_seconds": round(samples[-1][2], 1) if samples else None,
            "peak_rss_gib": round(max((r for _, r, _ in samples), default=0) / 2**30, 3),
            "steps": {k: {"seconds": round(v["end"] - v["start"], 2), "cpu_seconds": v["cpu_seconds"],
                          "peak_rss_gib": v["peak_rss_gib"], **({"failed": v["failed"]} if "failed" in v else {})}
                      for k, v in steps.items()}}


def step_times(env: dict[str, str], run_id: str) -> dict[str, dict[str, float]]:
    """Each step's start and end (epoch seconds) from the run's event log."""
    import dagster as dg

    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    times: dict[str, dict[str, float]] = {}
    with dg.DagsterInstance.get() as instance:
        for record in instance.all_logs(run_id):
            event = record.dagster_event
            if event is None or record.step_key is None:
                continue
            name = record.step_key.removeprefix(f"{SPEC}__")
            if event.event_type == dg.DagsterEventType.STEP_START:
                times.setdefault(name, {})["start"] = record.timestamp
            elif event.event_type in (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE):
                times.setdefault(name, {})["end"] = record.timestamp
                if event.event_type == dg.DagsterEventType.STEP_FAILURE:
                    error = event.step_failure_data.error
                    times[name]["failed"] = error.message.strip()[:300] if error else "step failed"
            elif event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION and not event.event_specific_data.passed:
                check = event.event_specific_data
                times.setdefault(name, {})["failed"] = f"check {check.check_name} failed"
    return {k: v for k, v in times.items() if "start" in v and "end" in v}


# --- the phases ---------------------------------------------------------------------------------------------------


def environment(root: Path, pipelines: Path) -> dict[str, str]:
    (root / "dagster").mkdir(parents=True, exist_ok=True)
    (root / "dagster" / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    return {**os.environ, "INTELLIGENTOPS_HOME": str(root / "home"), "INTELLIGENTOPS_PIPELINES": str(pipelines),
            "DAGSTER_HOME": str(root / "dagster"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "GX_ANALYTICS_ENABLED": "false", "DS_ACCELERATOR": "cpu",
            "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false", "PYTHONPATH": str(REPO)}


def measure_size(rows: int, phases: list[str], work: Path, args: argparse.Namespace,
                 save: Any) -> dict[str, Any]:
    result: dict[str, Any] = {"rows": rows}
    data = work / f"loans-{rows}.parquet"
    started = time.time()
    frame = generate(rows, args.seed, args.new_texts, args.months)
    frame.to_parquet(data, index=False)
    months = sorted(pd.PeriodIndex(pd.to_datetime(frame["issue_month"], format="%b-%Y"), freq="M").unique())
    keys = [str(m) for m in months]
    result["data"] = {"seconds": round(time.time() - started, 1), "months": len(keys),
                      "last_month_rows": int((frame["issue_month"] == months[-1].strftime("%b-%Y")).sum()),
                      "distinct_texts": int(frame["emp_title"].nunique())}
    del frame
    if "full" in phases:
        env = environment(work / f"full-{rows}", work / f"full-{rows}" / "pipelines")
        write_spec(Path(env["INTELLIGENTOPS_PIPELINES"]), data, partitioned=False, months=args.months)
        print(f"{rows:>9,} rows: full pipeline to compliance_report ...", flush=True)
        result["full"] = measured(env, FULL)
        save(rows, result)
    if "history" in phases or "month" in phases:
        env = environment(work / f"parts-{rows}", work / f"parts-{rows}" / "pipelines")
        write_spec(Path(env["INTELLIGENTOPS_PIPELINES"]), data, partitioned=True, months=args.months)
        print(f"{rows:>9,} rows: history backfill {keys[0]}...{keys[-2]} ...", flush=True)
        result["history"] = measured(env, INGEST, months=(keys[0], keys[-2]))
        save(rows, result)
        print(f"{rows:>9,} rows: new month {keys[-1]} ...", flush=True)
        result["month"] = measured(env, INGEST, partition=keys[-1])
        save(rows, result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--phases", nargs="+", default=["full", "history", "month"],
                        choices=["full", "history", "month"])
    parser.add_argument("--new-texts", type=float, default=0.2)
    parser.add_argument("--months", type=int, default=33)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scale.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--partition", help=argparse.SUPPRESS)
    parser.add_argument("--first", help=argparse.SUPPRESS)
    parser.add_argument("--last", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.partition, args.first, args.last, str(args.out))
        return
    results = json.loads(args.out.read_text()) if args.out.exists() else {}

    def save(rows: int, result: dict[str, Any]) -> None:
        results[str(rows)] = {**results.get(str(rows), {}), **result}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")

    with tempfile.TemporaryDirectory(prefix="scale-", dir=args.work) as tmp:
        for rows in args.rows:
            save(rows, measure_size(rows, args.phases, Path(tmp), args, save))
    print(json.dumps(results, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
