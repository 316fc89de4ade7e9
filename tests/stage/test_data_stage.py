"""The data stage on a real Dagster instance: shipped specs, and bad input that fails loudly losing nothing."""

import json
from pathlib import Path
import dagster as dg
import numpy as np
import pandas as pd
import pytest
from support import copy_shipped, failure_text, materialize, write_spec
from orchestration.definitions import build_definitions

DATA_KEYS = ("raw_dataset", "validated_dataset", "training_splits")


def small_frame(n: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    income = rng.lognormal(10.5, 0.5, n).round(0)
    debt = rng.uniform(0, 40, n).round(1)
    risk = (debt / 40 + rng.normal(0, 0.3, n)) > 0.7
    return pd.DataFrame({
        "loan_id": [f"L{i:05d}" for i in range(n)],
        "income": income,
        "debt_ratio": debt,
        "purpose": rng.choice(["car", "home", "education"], n),
        "region": rng.choice(["north", "south"], n),
        "outcome": np.where(risk, "default", "repaid"),
    })


def small_spec(path: str = "loans.csv", **over) -> dict:
    spec = {
        "name": "loans",
        "source": {"kind": "file", "path": path},
        "id_column": "loan_id",
        "target": {"column": "outcome", "positive": ["default"]},
        "features": {"numeric": ["income", "debt_ratio"], "categorical": ["purpose"]},
        "sensitive": ["region"],
        "validation": {"min_rows": 50, "columns": {"debt_ratio": {"min": 0, "max": 100}}},
    }
    spec.update(over)
    return spec


def events(instance, key: str) -> list:
    return instance.fetch_materializations(dg.AssetKey(key.split("/")), limit=100).records


def test_shipped_specs_materialize_data_stage(home: Path, pipelines: Path, instance):
    copy_shipped(pipelines, "credit_risk", "credit_scoring")
    defs = build_definitions(pipelines)
    for name, rows in (("credit_risk", 10_000), ("credit_scoring", 4_454)):
        result = materialize(defs, instance, f'key:"{name}/*" and group:data')
        assert result.success, name
        checks = result.get_asset_check_evaluations()
        assert len(checks) == 6 and all(c.passed for c in checks), [(c.check_name, c.description) for c in checks]
        meta = {m.asset_key.path[-1]: m.materialization.metadata for m in result.get_asset_materialization_events()}
        assert set(meta) == set(DATA_KEYS)
        assert meta["raw_dataset"]["dagster/row_count"].value == rows
        assert len(meta["raw_dataset"]["content_hash"].value) == 64
        validated = pd.read_parquet(home / "assets" / name / "validated_dataset.parquet")
        splits = pd.read_parquet(home / "assets" / name / "training_splits.parquet")
        assert len(validated) + meta["validated_dataset"]["rows_set_aside"].value == rows
        assert set(validated["label"].unique()) == {0, 1}
        assert list(splits["row_id"]) == list(validated["row_id"])
        shares = splits["split"].value_counts(normalize=True)
        assert abs(shares["test"] - 0.2) < 0.01 and abs(shares["validation"] - 0.1) < 0.01
        for part in ("train", "validation", "test"):
            assert len(meta["training_splits"][f"{part}_hash"].value) == 64
    risk = pd.read_parquet(home / "assets" / "credit_risk" / "validated_dataset.parquet")
    # High risk = grade D to G: 18.5% of the loans.
    assert abs(risk["label"].mean() - 0.185) < 0.01
    assert not {"interest_rate", "sub_grade", "installment", "loan_status"} & set(risk.columns)


def test_splits_are_deterministic_and_stratified(home: Path, pipelines: Path, instance, tmp_path: Path):
    small_frame(400).to_csv(pipelines / "loans.csv", index=False)
    write_spec(pipelines, small_spec())
    defs = build_definitions(pipelines)
    assert materialize(defs, instance, 'key:"loans/*" and group:data').success
    first = pd.read_parquet(home / "assets" / "loans" / "training_splits.parquet")
    # The same rows in another order get the same splits.
    small_frame(400).sample(frac=1, random_state=3).to_csv(pipelines / "loans.csv", index=False)
    assert materialize(defs, instance, 'key:"loans/*" and group:data').success
    second = pd.read_parquet(home / "assets" / "loans" / "training_splits.parquet")
    assert first.set_index("row_id")["split"].sort_index().equals(second.set_index("row_id")["split"].sort_index())
    validated = pd.read_parquet(home / "assets" / "loans" / "validated_dataset.parquet").merge(first, on="row_id")
    rates = validated.groupby("split")["label"].mean()
    assert rates.max() - rates.min() < 0.03


def test_time_split_puts_latest_rows_in_test(home: Path, pipelines: Path, instance):
    df = small_frame(300)
    df["month"] = np.repeat(["Jan-2018", "Feb-2018", "Mar-2018"], 100)
    df.to_csv(pipelines / "loans.csv", index=False)
    write_spec(pipelines, small_spec(time_column="month", split={"strategy": "time", "test": 0.2,
                                                                 "validation": 0.1}))
    assert materialize(build_definitions(pipelines), instance, 'key:"loans/*" and group:data').success
    merged = pd.read_parquet(home / "assets" / "loans" / "validated_dataset.parquet").merge(
        pd.read_parquet(home / "assets" / "loans" / "training_splits.parquet"), on="row_id")
    assert set(merged.loc[merged.split == "test", "month"]) == {"Mar-2018"}
    assert set(merged.loc[merged.split == "validation", "month"]) == {"Mar-2018"}
    # Every row of the earliest months trains; none of the test rows is older than any training row.
    assert (merged.loc[merged.month != "Mar-2018", "split"] == "train").all()


def test_row_level_rules_set_rows_aside_with_reason(home: Path, pipelines: Path, instance):
    df = small_frame(300)
    df.loc[3, "outcome"] = None
    df.loc[7, "debt_ratio"] = 250.0  # above the declared max of 100
    df.to_csv(pipelines / "loans.csv", index=False)
    write_spec(pipelines, small_spec())
    result = materialize(build_definitions(pipelines), instance, 'key:"loans/*" and group:data')
    assert result.success
    meta = {m.asset_key.path[-1]: m.materialization.metadata for m in result.get_asset_materialization_events()}
    assert meta["validated_dataset"]["rows_set_aside"].value == 2
    rejected = pd.read_parquet(home / "loans" / "validation" / "rejected_rows.parquet")
    reasons = dict(zip(rejected["loan_id"], rejected["reason"]))
    assert reasons == {"L00003": "target 'outcome' is null", "L00007": "'debt_ratio' above declared max 100.0"}


def _break(kind: str, df: pd.DataFrame, folder: Path) -> None:
    path = folder / "loans.csv"
    if kind == "missing column":
        df.drop(columns=["debt_ratio"]).to_csv(path, index=False)
    elif kind == "wrong type":
        df = df.astype({"income": object})
        df.loc[::2, "income"] = "unknown"
        df.to_csv(path, index=False)
    elif kind == "nulls above threshold":
        df.loc[df.index[:120], "purpose"] = None
        df.to_csv(path, index=False)
    elif kind == "duplicate ids":
        df.loc[5, "loan_id"] = df.loc[4, "loan_id"]
        df.to_csv(path, index=False)
    elif kind == "empty source":
        df.iloc[:0].to_csv(path, index=False)
    elif kind == "unreadable file":
        path.write_bytes(b"\x00\xff\xfe garbage \x00\n\"unterminated,quote\n" * 3)
    elif kind == "value out of learned range":
        df["income"] = df["income"] * 1000  # a unit change: dollars became milli-dollars
        df.to_csv(path, index=False)
    else:
        raise AssertionError(kind)


BAD_INPUT = {
    # kind: (failing check or None when the asset itself fails, words the error must contain)
    "missing column": ("columns_present", ["column 'debt_ratio'", "missing", "expect_column_to_exist"]),
    "wrong type": ("column_types", ["column 'income'", "wrong type", "expect_column_values_to_be_in_type_list"]),
    "nulls above threshold": ("null_rates", ["column 'purpose'", "40.0% null", "at most 2.0% allowed",
                                             "up from 0.0% in the last validated snapshot",
                                             "expect_column_values_to_not_be_null"]),
    "duplicate ids": ("unique_ids", ["column 'loan_id'", "duplicate", "L00004",
                                     "expect_column_values_to_be_unique"]),
    "value out of learned range": ("value_ranges", ["column 'income'", "outside",
                                                    "expect_column_values_to_be_between"]),
    "empty source": (None, ["gave no rows", "loans.csv"]),
    "unreadable file": (None, ["cannot read", "loans.csv"]),
}


@pytest.mark.parametrize("kind", list(BAD_INPUT))
def test_bad_input_fails_clearly_and_keeps_last_good(kind: str, home: Path, pipelines: Path, instance):
    df = small_frame(300)
    df.to_csv(pipelines / "loans.csv", index=False)
    write_spec(pipelines, small_spec())
    defs = build_definitions(pipelines)
    assert materialize(defs, instance, 'key:"loans/*" and group:data').success
    validated_path = home / "assets" / "loans" / "validated_dataset.parquet"
    good_bytes = validated_path.read_bytes()
    good_events = len(events(instance, "loans/validated_dataset"))

    _break(kind, df.copy(), pipelines)
    result = materialize(defs, instance, 'key:"loans/*" and group:data')
    assert not result.success
    check, words = BAD_INPUT[kind]
    if check is not None:
        failed = {c.check_name: c for c in result.get_asset_check_evaluations() if not c.passed}
        assert check in failed, {c.check_name: c.description for c in result.get_asset_check_evaluations()}
        text = failed[check].description
    else:
        text = failure_text(result)
    for w in words:
        assert w in text, f"{w!r} not in {text!r}"
    # Nothing lost: the last good validated_dataset is still the file on disk and the latest materialization.
    assert validated_path.read_bytes() == good_bytes
    assert len(events(instance, "loans/validated_dataset")) == good_events


def test_validated_dataset_refuses_a_snapshot_that_failed_its_checks(home: Path, pipelines: Path, instance):
    """Materializing validated_dataset alone (checks not selected) still cannot pass bad data downstream."""
    df = small_frame(300)
    df.to_csv(pipelines / "loans.csv", index=False)
    write_spec(pipelines, small_spec())
    defs = build_definitions(pipelines)
    assert materialize(defs, instance, 'key:"loans/*" and group:data').success
    good = (home / "assets" / "loans" / "validated_dataset.parquet").read_bytes()
    _break("duplicate ids", df.copy(), pipelines)
    assert not materialize(defs, instance, 'key:"loans/raw_dataset"').success
    result = materialize(defs, instance, dg.AssetSelection.assets(dg.AssetKey(["loans", "validated_dataset"])).
                         without_checks())
    assert not result.success
    assert "failed its data checks" in failure_text(result)
    assert (home / "assets" / "loans" / "validated_dataset.parquet").read_bytes() == good
    records = list((home / "loans" / "validation").glob("*.json"))
    assert any(not json.loads(p.read_text()).get("passed", True) for p in records if p.name != "profile.json")


def test_sql_and_jsonl_and_parquet_sources(home: Path, pipelines: Path, instance, tmp_path: Path):
    import sqlalchemy as sa

    df = small_frame(200)
    db = tmp_path / "loans.db"
    engine = sa.create_engine(f"sqlite:///{db}")
    df.to_sql("loans", engine, index=False)
    engine.dispose()
    df.to_json(pipelines / "loans.jsonl", orient="records", lines=True, double_precision=15)
    df.to_parquet(pipelines / "loans.parquet", index=False)
    sources = {
        "via_sql": {"kind": "sql", "url": f"sqlite:///{db}", "query": "select * from loans where income > 0"},
        "via_jsonl": {"kind": "file", "path": "loans.jsonl"},
        "via_parquet": {"kind": "file", "path": "loans.parquet"},
    }
    for name, source in sources.items():
        write_spec(pipelines, small_spec(name=name, source=source))
    defs = build_definitions(pipelines)
    hashes = set()
    for name in sources:
        result = materialize(defs, instance, f'key:"{name}/*" and group:data')
        assert result.success, name
        meta = {m.asset_key.path[-1]: m.materialization.metadata for m in result.get_asset_materialization_events()}
        assert meta["validated_dataset"]["dagster/row_count"].value == 200
        hashes.add(meta["validated_dataset"]["content_hash"].value)
    # The same rows through three kinds of source give the same validated content.
    assert len(hashes) == 1


def test_sql_source_error_names_the_query_target(home: Path, pipelines: Path, instance, tmp_path: Path):
    write_spec(pipelines, small_spec(source={"kind": "sql", "url": f"sqlite:///{tmp_path}/none.db",
                                             "query": "select * from missing_table"}))
    result = materialize(build_definitions(pipelines), instance, 'key:"loans/*" and group:data')
    assert not result.success
    msg = failure_text(result)
    assert "missing_table" in msg and "query against sqlite" in msg
