"""The typed spec: shipped specs load, and every mistake names the file and the key."""

from pathlib import Path

import pytest
from support import PIPELINES, shipped_spec, write_spec

from assets.spec import SpecError, load_spec, load_specs


def test_shipped_specs_load():
    specs = {s.name: s.spec for s in load_specs(PIPELINES)}
    assert set(specs) == {"credit_risk", "credit_scoring"}
    risk, scoring = specs["credit_risk"], specs["credit_scoring"]
    assert risk.has_text and risk.features.text == ["emp_title"]
    assert not scoring.has_text
    assert risk.target.positive == ["D", "E", "F", "G"]
    assert [s.column for s in scoring.sensitive_features] == ["Age", "Marital"]
    assert scoring.sensitive_features[0].bins == [0, 25, 40, 65, 150]
    # Columns fixed after the loan was granted leak the grade and must never be features.
    leaks = {"interest_rate", "sub_grade", "installment", "loan_status", "balance", "paid_total",
             "paid_principal", "paid_interest", "paid_late_fees", "initial_listing_status", "disbursement_method"}
    assert not leaks & set(risk.features.all)
    # Sensitive columns slice the fairness metrics and are not inputs.
    assert not set(risk.sensitive_columns) & set(risk.features.all)
    assert not set(scoring.sensitive_columns) & set(scoring.features.all)


def test_unknown_key_names_file_and_key(tmp_path: Path):
    spec = shipped_spec("credit_scoring")
    spec["featurs"] = spec.pop("features")
    path = write_spec(tmp_path, spec)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert str(path) in str(err.value)
    assert "unknown key 'featurs'" in str(err.value)


def test_nested_unknown_key(tmp_path: Path):
    spec = shipped_spec("credit_scoring")
    spec["split"]["tset"] = 0.3
    with pytest.raises(SpecError, match=r"unknown key 'split\.tset'"):
        load_spec(write_spec(tmp_path, spec))


def test_source_unknown_key(tmp_path: Path):
    spec = shipped_spec("credit_scoring")
    spec["source"]["pakage"] = "modeldata"
    with pytest.raises(SpecError, match=r"unknown key 'source\.pakage'"):
        load_spec(write_spec(tmp_path, spec))


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.pop("target"), r"'target': Field required"),
    (lambda s: s["source"].update(kind="ftp"), r"source"),
    (lambda s: s.update(name="Bad Name"), r"'name'"),
    (lambda s: s["split"].update(test=1.5), r"'split.test'"),
    (lambda s: s["features"]["numeric"].append("Status"), r"target.column 'Status' is also a feature"),
    (lambda s: s["features"]["categorical"].append("Income"), r"'Income' is listed as both numeric and categorical"),
    (lambda s: s["split"].update(strategy="time"), r"needs time_column"),
    (lambda s: s["validation"]["columns"].update(nope={"min": 1}), r"'nope' is not a column"),
    (lambda s: s["sensitive"][0].update(bins=[40, 25]), r"ascending"),
    (lambda s: s.update(monitoring={"window": 100}), r"'monitoring'.*min_window \(200\) is larger than window \(100\)"),
    (lambda s: s.update(monitoring={"sensor_interval_seconds": 0}), r"'monitoring.sensor_interval_seconds'"),
])
def test_bad_values_are_named(tmp_path: Path, mutate, message):
    spec = shipped_spec("credit_scoring")
    mutate(spec)
    with pytest.raises(SpecError, match=message):
        load_spec(write_spec(tmp_path, spec))


def test_not_yaml_and_not_mapping(tmp_path: Path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(SpecError, match="YAML mapping"):
        load_spec(bad)


def test_duplicate_names_and_missing_folder(tmp_path: Path):
    spec = shipped_spec("credit_scoring")
    write_spec(tmp_path, spec, "a.yaml")
    write_spec(tmp_path, spec, "b.yaml")
    with pytest.raises(SpecError, match="already used by"):
        load_specs(tmp_path)
    with pytest.raises(SpecError, match="does not exist"):
        load_specs(tmp_path / "nowhere")


def test_relative_file_source_resolves_against_spec_folder(tmp_path: Path):
    spec = shipped_spec("credit_scoring")
    spec["source"] = {"kind": "file", "path": "data/credit.csv"}
    loaded = load_spec(write_spec(tmp_path, spec))
    assert loaded.resolve("data/credit.csv") == (tmp_path / "data" / "credit.csv").resolve()


def test_spec_hash_changes_with_content(tmp_path: Path):
    a = load_spec(write_spec(tmp_path, shipped_spec("credit_scoring"), "a.yaml")).spec
    changed = shipped_spec("credit_scoring")
    changed["split"]["seed"] = 8
    b = load_spec(write_spec(tmp_path, changed, "b.yaml")).spec
    assert a.spec_hash != b.spec_hash
