"""Partitions as plain functions: the spec keys and their errors, months of rows, the training window, merged profiles."""

import datetime

import pandas as pd
import pytest

from assets.checks.data_quality import Profile
from assets.partitions import month_keys, partitions_def, split_by_partition, window_bounds, window_label
from assets.spec import PipelineSpec
from resources.storage import window_keys


def spec(**over) -> PipelineSpec:
    raw = {"name": "loans", "source": {"kind": "file", "path": "x.csv"}, "id_column": "id",
           "target": {"column": "y", "positive": [1]}, "features": {"numeric": ["a"]}, "time_column": "t",
           "partitions": {"grain": "month", "start": "2018-01", "end": "2018-04"}}
    raw.update(over)
    return PipelineSpec.model_validate(raw)


def test_partitions_are_declared_months_known_without_the_data():
    pdef = partitions_def(spec())
    assert list(pdef.get_partition_keys()) == ["2018-01", "2018-02", "2018-03", "2018-04"]
    # YAML reads an unquoted 2018-01-01 as a date; it is the same month.
    assert spec(partitions={"start": datetime.date(2018, 1, 1)}).partitions.start == "2018-01"
    open_ended = partitions_def(spec(partitions={"start": "2025-01"}))
    assert open_ended.get_last_partition_key() < datetime.date.today().strftime("%Y-%m")
    assert partitions_def(spec(partitions=None, time_column=None)) is None


@pytest.mark.parametrize("over, message", [
    ({"time_column": None}, "partitions needs time_column"),
    ({"partitions": {"start": "2018-13"}}, "partitions.start '2018-13' is not a month"),
    ({"partitions": {"start": "2018-03", "end": "2018-01"}}, "partitions.end 2018-01 is before partitions.start"),
    ({"partitions": {"start": "2018-01", "grain": "week"}}, "grain"),
    ({"partitions": None, "training": {"window": {"months": 12}}}, "training.window names months of partitions"),
    ({"training": {"window": {"months": 0}}}, "months"),
])
def test_partition_mistakes_are_refused_with_the_key(over, message):
    with pytest.raises(ValueError, match=message):
        spec(**over)


def test_rows_fall_in_the_month_of_their_time_and_unparsable_times_in_none():
    s = spec()
    frame = pd.DataFrame({"t": ["Jan-2018", "Feb-2018", "Feb-2018", None, "Mar-2018"], "a": range(5)})
    assert list(month_keys(s, frame["t"])) == ["2018-01", "2018-02", "2018-02", None, "2018-03"]
    parts = split_by_partition(frame, s, ["2018-02", "2018-04"])
    assert list(parts["2018-02"]["a"]) == [1, 2] and parts["2018-04"].empty
    timestamps = pd.Series(pd.to_datetime(["2018-01-31T23:00:00-02:00"]))  # 01:00 UTC on 1 February
    assert list(month_keys(s, timestamps)) == ["2018-02"]
    with pytest.raises(ValueError, match="time column 't' holds numbers"):
        month_keys(s, pd.Series([201801, 201802]))


def test_the_window_ends_at_the_newest_month_present_and_keeps_those_present():
    ordered = ["2018-01", "2018-02", "2018-03", "2018-04", "2018-05"]
    assert window_keys(ordered, {"2018-01", "2018-02", "2018-03"}, 2) == ["2018-02", "2018-03"]
    assert window_keys(ordered, {"2018-01", "2018-03"}, None) == ["2018-01", "2018-03"]  # the gap is the reader's
    assert window_keys(ordered, {"2018-05"}, 24) == ["2018-05"]
    assert window_keys(ordered, set(), 3) == []
    assert window_label(["2018-02", "2018-03"]) == "2018-02...2018-03" and window_label([]) == "none"
    start, end = window_bounds(["2018-03", "2018-02"])
    assert (start, end) == (pd.Timestamp("2018-02-01"), pd.Timestamp("2018-04-01"))


def test_months_merge_into_one_profile():
    jan = Profile(numeric={"a": (0.0, 10.0)}, categories={"c": ["x"]}, row_count=100, null_rates={"a": 0.0})
    feb = Profile(numeric={"a": (-5.0, 3.0)}, categories={"c": ["y", "x"]}, row_count=300, null_rates={"a": 0.2})
    merged = Profile.merge([jan, feb])
    assert merged.numeric == {"a": (-5.0, 10.0)} and merged.categories == {"c": ["x", "y"]}
    assert merged.row_count == 400 and merged.null_rates == {"a": pytest.approx(0.15)}
    assert Profile.merge([]) is None


def test_a_sql_source_reads_only_the_months_of_the_run(tmp_path):
    import sqlalchemy as sa

    from assets.sources import SourceError, read_source
    from assets.spec import LoadedSpec

    url = f"sqlite:///{tmp_path / 'loans.db'}"
    engine = sa.create_engine(url)
    pd.DataFrame({"id": [1, 2, 3], "a": [1.0, 2.0, 3.0], "y": [0, 1, 0],
                  "t": ["2018-01-15", "2018-02-15", "2018-03-15"]}).to_sql("loans", engine, index=False)
    engine.dispose()
    query = "select * from loans where t >= :partition_start and t < :partition_end"
    loaded = LoadedSpec(spec=spec(source={"kind": "sql", "url": url, "query": query}), path=tmp_path / "loans.yaml")
    frame, _ = read_source(loaded, window_bounds(["2018-02"]))
    assert list(frame["id"]) == [2]
    with pytest.raises(SourceError, match="names :partition_end, :partition_start, which only a partitioned spec"):
        read_source(loaded)


def test_a_month_is_judged_by_a_reference_of_enough_rows_allowing_for_its_own_size():
    from assets.checks.data_quality import null_tolerance
    from assets.profile import MIN_REFERENCE_ROWS, reference_before

    month = Profile(numeric={"a": (0.0, 1.0)}, row_count=MIN_REFERENCE_ROWS // 2, null_rates={"a": 0.06})
    assert reference_before({"2018-01": month}, "2018-02") is None  # half a reference: declared rules only
    assert reference_before({"2018-01": month, "2018-02": month}, "2018-03").row_count == MIN_REFERENCE_ROWS
    assert reference_before({"2018-01": month, "2018-03": month}, "2018-02") is None  # later months never count
    # A 300-row month may stray 4 standard errors (5.5 points at 6%); a 30,000-row one only the usual 3 points.
    assert null_tolerance(0.06, 300) == pytest.approx(4 * (0.06 * 0.94 / 300) ** 0.5)
    assert null_tolerance(0.06, 30_000) == null_tolerance(0.06) == pytest.approx(0.03)
