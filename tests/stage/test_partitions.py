"""Time partitions on a real instance: months materialized and checked on their own, a new month costing only itself
(validation, embeddings, an appended vector index), training reading its window, a corrupted month stopped alone, a
backfill from the CLI, and an unpartitioned spec as it was."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from support import REPO, failure_text, write_spec
from text_support import titles

from orchestration.definitions import build_definitions
from resources.vectors import VectorIndexResource

MONTHS = ("2018-01", "2018-02", "2018-03")
ROWS = 150  # per month
INGEST = 'key:"{name}/*" and (group:data or group:embeddings) and not key:"{name}/training_splits"'


def month_rows(month: str, m: int, rng: np.random.Generator, texts: list[str] | None = None,
               rows: int = ROWS) -> pd.DataFrame:
    debt = rng.uniform(0, 40, rows).round(1)
    frame = pd.DataFrame({
        "id": [f"{month}-{i:03d}" for i in range(rows)],
        "amount": rng.lognormal(8, 0.4, rows).round(0),
        "debt": debt,
        "purpose": rng.choice(["car", "home", "education"], rows),
        "issued": f"{month}-{1 + m * 9:02d}",
        "outcome": np.where(debt / 40 + rng.normal(0, 0.3, rows) > 0.7, "bad", "good"),
    })
    if texts is not None:
        frame["title"] = texts
    return frame


def write_partitioned(pipelines: Path, name: str, frames: list[pd.DataFrame], text: bool = False, **over) -> Path:
    csv = pipelines / f"{name}.csv"
    pd.concat(frames, ignore_index=True).to_csv(csv, index=False)
    spec = {"name": name, "source": {"kind": "file", "path": csv.name}, "id_column": "id",
            "target": {"column": "outcome", "positive": ["bad"]},
            "features": {"numeric": ["amount", "debt"], "categorical": ["purpose"], **({"text": ["title"]} if text else {})},
            "time_column": "issued", "partitions": {"grain": "month", "start": MONTHS[0], "end": MONTHS[-1]},
            "training": {"window": {"months": 2}, "hidden": [8], "max_steps": 30, "min_steps": 10,
                         "nproc_per_node": 1, "deepspeed": {"micro_batch_size": 32}}}
    spec.update(over)
    write_spec(pipelines, spec)
    return csv


def run(defs: dg.Definitions, instance, selection: str, resources: dict | None = None, month: str | None = None,
        months: tuple[str, str] | None = None) -> dg.ExecuteInProcessResult:
    tags = {ASSET_PARTITION_RANGE_START_TAG: months[0], ASSET_PARTITION_RANGE_END_TAG: months[1]} if months else None
    return dg.materialize([*defs.assets, *defs.asset_checks], selection=dg.AssetSelection.from_string(selection),
                          resources=resources or defs.resources, instance=instance, partition_key=month, tags=tags,
                          raise_on_error=False)


def metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict[str, dict]:
    """Each materialized partition's metadata values for `asset`."""
    return {m.materialization.partition: {k: getattr(v, "value", v) for k, v in m.materialization.metadata.items()}
            for m in result.get_asset_materialization_events() if m.materialization.asset_key.path[-1] == asset}


def test_two_months_then_a_third_costs_only_the_third_and_training_reads_the_window(home: Path, pipelines: Path,
                                                                                   instance):
    rng = np.random.default_rng(0)
    pool = titles(250)  # month 3 repeats 100 titles of month 2 and brings 50 new ones
    texts = [pool[:ROWS], pool[50:50 + ROWS], pool[100:100 + ROWS]]
    # A month of 150 rows is scored against the reference once windows of 100 are enough (default 200).
    write_partitioned(pipelines, "jobs", [month_rows(m, i, rng, texts[i]) for i, m in enumerate(MONTHS)], text=True,
                      monitoring={"min_window": 100})
    defs = build_definitions(pipelines)
    resources = {**defs.resources, "vectors": VectorIndexResource(home=str(home), ann_min_rows=200)}
    first = run(defs, instance, INGEST.format(name="jobs"), resources, months=(MONTHS[0], MONTHS[1]))
    assert first.success, failure_text(first)
    index = metadata(first, "vector_index")
    assert set(index) == {"2018-01", "2018-02"}
    assert index["2018-02"]["ann_trained_now"] and index["2018-02"]["ann_trained_rows"] == 2 * ROWS

    third = run(defs, instance, INGEST.format(name="jobs"), resources, month=MONTHS[2])
    assert third.success, failure_text(third)
    # Only the third month was checked, validated and embedded: each event names it, and only its new texts ran.
    assert {e.partition for e in third.get_asset_check_evaluations()} == {"2018-03"}
    for asset in ("raw_dataset", "validated_dataset", "text_embeddings", "vector_index"):
        assert set(metadata(third, asset)) == {"2018-03"}, asset
    embedded = metadata(third, "text_embeddings")["2018-03"]
    assert (embedded["texts_embedded"], embedded["rows_reused"]) == (50, 100)
    # The index grew by the month, appended to the trained index without a rebuild or a retrain.
    grown = metadata(third, "vector_index")["2018-03"]
    assert grown["appended"] and grown["rows_inserted"] == ROWS
    assert not grown["table_rebuilt"] and grown["table_rows"] == 3 * ROWS and grown["rows_deleted"] == 0
    assert not grown["ann_trained_now"] and grown["ann_trained_rows"] == 2 * ROWS and grown["ann_unindexed_rows"] == 0
    assert grown["lance_table_version"] > index["2018-02"]["lance_table_version"]
    hits = resources["vectors"].similar("jobs", pool[200], k=1)
    assert hits["text"].iloc[0] == pool[200]  # a text only month 3 brought is found

    trained = run(defs, instance, 'key:"jobs/training_splits" or key:"jobs/model_checkpoint"', resources)
    assert trained.success, failure_text(trained)
    splits = metadata(trained, "training_splits")[None]
    assert splits["data_window"] == "2018-02...2018-03" and splits["dagster/row_count"] == 2 * ROWS
    assert set(splits["data_partitions"]) == {"2018-02", "2018-03"}
    checkpoint = metadata(trained, "model_checkpoint")[None]
    assert checkpoint["data_window"] == "2018-02...2018-03"
    assert checkpoint["data_partitions_hash"] == splits["data_partitions_hash"]
    assert checkpoint["train_rows"] + checkpoint["val_rows"] == splits["train_rows"] + splits["validation_rows"]

    # The version carries the window as lineage; serving it, a month is compared with its reference.
    evaluated = run(defs, instance, 'key:"jobs/registered_model" or key:"jobs/model_evaluation"', resources)
    assert evaluated.success, failure_text(evaluated)
    mlflow = resources["mlflow"]
    version = mlflow.get_version("jobs", "challenger")
    assert version.tags["data_window"] == "2018-02...2018-03"
    assert version.tags["data_partitions_hash"] == splits["data_partitions_hash"]
    mlflow.set_alias("jobs", "champion", str(version.version))
    job = defs.resolve_job_def("jobs__month_drift")
    assert job.execute_in_process(partition_key="2018-03", instance=instance, resources=resources).success
    [seen] = instance.fetch_observations(dg.AssetKey(["jobs", "validated_dataset"]), limit=5).records
    from assets.drift_sensor import MonthReport

    report = MonthReport.from_metadata(seen.asset_observation.metadata)
    assert (report.month, report.model_version, report.status) == ("2018-03", str(version.version), "scored")
    assert report.evidence.startswith(f"month 2018-03 against v{version.version}'s reference: ")
    assert seen.asset_observation.metadata["rows_scored"].value == ROWS


def test_a_corrupted_month_fails_its_own_checks_and_the_others_stay(home: Path, pipelines: Path, instance):
    rng = np.random.default_rng(1)
    # Months of 600 rows: January and February together are a reference (assets/profile.py, MIN_REFERENCE_ROWS).
    frames = [month_rows(m, i, rng, rows=600) for i, m in enumerate(MONTHS)]
    frames[2].loc[frames[2].index[:240], "amount"] = np.nan  # 40% of March lost its amounts upstream
    write_partitioned(pipelines, "loans", frames)
    defs = build_definitions(pipelines)
    data = 'key:"loans/raw_dataset" or key:"loans/validated_dataset"'
    assert run(defs, instance, data, months=(MONTHS[0], MONTHS[1])).success
    folder = home / "assets" / "loans" / "validated_dataset"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert set(before) == {"2018-01.parquet", "2018-02.parquet"}

    march = run(defs, instance, data, month=MONTHS[2])
    assert not march.success
    failed = [e for e in march.get_asset_check_evaluations() if not e.passed]
    assert [e.check_name for e in failed] == ["null_rates"] and failed[0].partition == "2018-03"
    # Checked against January and February (no missing amount: at most 2% allowed), the failure names its month.
    assert "2018-03: column 'amount' is 40.0% null, up from 0.0%" in failed[0].description
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert instance.get_materialized_partitions(dg.AssetKey(["loans", "validated_dataset"])) == {"2018-01", "2018-02"}

    # What reads the window is blocked, naming the month, until March is fixed.
    splits = run(defs, instance, 'key:"loans/training_splits"')
    assert not splits.success
    assert "raw_dataset month(s) 2018-03 are newer than the newest validated month 2018-02" in failure_text(splits)

    # A backfill over all three months in one run is stopped by March too, and changes nothing.
    again = run(defs, instance, data, months=(MONTHS[0], MONTHS[2]))
    assert not again.success and {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_backfill_from_the_cli(home: Path, pipelines: Path, tmp_path: Path):
    rng = np.random.default_rng(2)
    write_partitioned(pipelines, "loans", [month_rows(m, i, rng) for i, m in enumerate(MONTHS)])
    dagster_home = tmp_path / "dagster"
    dagster_home.mkdir()
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "INTELLIGENTOPS_PIPELINES": str(pipelines),
           "INTELLIGENTOPS_HOME": str(home), "PYTHONPATH": str(REPO)}
    done = subprocess.run([str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m",
                           "orchestration.definitions", "--select", 'key:"loans/*" and group:data and not '
                           'key:"loans/training_splits"', "--partition-range", "2018-01...2018-03"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (home / "assets" / "loans" / "validated_dataset").iterdir()) == \
        [f"{m}.parquet" for m in MONTHS]
    assert sorted(p.name for p in (home / "loans" / "validation" / "profiles").iterdir()) == \
        [f"{m}.json" for m in MONTHS]


def test_an_unpartitioned_spec_behaves_as_today(home: Path, pipelines: Path, instance):
    rng = np.random.default_rng(3)
    write_partitioned(pipelines, "loans", [month_rows(m, i, rng) for i, m in enumerate(MONTHS)], partitions=None,
                      training={})
    defs = build_definitions(pipelines)
    graph = defs.resolve_asset_graph()
    # Only the per-window drift reports and the per-step rollout analyses are partitioned (neither by month).
    assert all(graph.get(k).partitions_def is None for k in graph.get_all_asset_keys()
               if k.path[-1] not in ("drift_report", "rollout_analysis"))
    assert {j.name for j in defs.jobs} == {f"loans__{j}" for j in (
        "data", "pipeline", "rollback", "retrain", "report_drift", "rollout_step", "promote", "hold",
        "analyse_rollout")}  # no __ingest, no __month_drift
    result = run(defs, instance, 'key:"loans/*" and group:data')
    assert result.success, failure_text(result)
    assert metadata(result, "training_splits")[None]["dagster/row_count"] == 3 * ROWS
    assert "data_window" not in metadata(result, "training_splits")[None]
    assert (home / "assets" / "loans" / "validated_dataset.parquet").is_file()
    assert (home / "loans" / "validation" / "profile.json").is_file()
    assert not (home / "loans" / "validation" / "profiles").exists()


@pytest.fixture
def months_materialized(home: Path, pipelines: Path, instance) -> dg.Definitions:
    rng = np.random.default_rng(4)
    write_partitioned(pipelines, "loans", [month_rows(m, i, rng) for i, m in enumerate(MONTHS)])
    defs = build_definitions(pipelines)
    assert run(defs, instance, 'key:"loans/raw_dataset" or key:"loans/validated_dataset"',
               months=(MONTHS[0], MONTHS[1])).success
    return defs


def _tick(defs: dg.Definitions, instance, cursor: str | None) -> dg.SensorResult:
    sensor = defs.resolve_sensor_def("loans__drift_sensor")
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources={"audit": defs.resources["audit"]},
                                 definitions=defs) as context:
        return sensor(context)


def test_a_new_month_is_compared_with_the_reference_and_drift_asks_for_a_retrain_of_the_window(
        months_materialized: dg.Definitions, instance):
    from assets.drift_sensor import MonthReport, SensorCursor

    defs = months_materialized
    first = _tick(defs, instance, None)
    # A backfill of history asks for one comparison: its newest month.
    [check] = first.run_requests
    assert (check.job_name, check.partition_key) == ("loans__month_drift", "2018-02")
    assert check.run_key.startswith("month:2018-02:")
    assert SensorCursor.parse(first.cursor).month == "2018-02"
    assert _tick(defs, instance, first.cursor).run_requests == []

    # The comparison runs: without a champion there is nothing to compare with, and the month says so.
    job = defs.resolve_job_def("loans__month_drift")
    assert job.execute_in_process(partition_key="2018-02", instance=instance, resources=defs.resources).success
    [seen] = instance.fetch_observations(dg.AssetKey(["loans", "validated_dataset"]), limit=5).records
    report = MonthReport.from_metadata(seen.asset_observation.metadata)
    assert (report.month, report.status, report.drift) == ("2018-02", "no champion", False)
    assert _tick(defs, instance, first.cursor).run_requests == []

    # A month that drifted asks for one retrain, of the window ending at the newest month.
    drifted = MonthReport(month="2018-02", model_version="3", drift=True, status="scored",
                          evidence="month 2018-02 against v3's reference: drift in debt")
    instance.report_runless_asset_event(dg.AssetObservation(
        asset_key=dg.AssetKey(["loans", "validated_dataset"]), partition="2018-02", metadata=drifted.to_metadata()))
    second = _tick(defs, instance, first.cursor)
    [retrain] = second.run_requests
    assert (retrain.job_name, retrain.run_key, retrain.partition_key) == ("loans__retrain", "retrain:month:2018-02",
                                                                          "2018-02")
    assert retrain.tags["intelligentops/month_drift"] == "2018-02" and "drift in debt" in \
        retrain.tags["intelligentops/evidence"]

    # March arriving is the next comparison; a month older than the newest checked is not compared again.
    assert run(defs, instance, 'key:"loans/raw_dataset" or key:"loans/validated_dataset"', month=MONTHS[2]).success
    assert [r.run_key.rsplit(":", 1)[0] for r in _tick(defs, instance, second.cursor).run_requests] == \
        ["month:2018-03"]
