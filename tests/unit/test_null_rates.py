"""Null rates are learned from the last validated snapshot: a column that empties out is refused, naming it."""

import pandas as pd
import pytest
from assets.checks.data_quality import Profile, null_tolerance, validate_frame
from assets.spec import PipelineSpec
from null_rates_support import emptied, loans, spec


def _profile_of(df: pd.DataFrame, s: PipelineSpec) -> Profile:
    return Profile.of(df, s, df)


@pytest.mark.parametrize("override, passes", [
    ({}, False),                                                 # learned 0% -> at most 2%
    ({"max_null_fraction": 0.25}, True),                         # written in the spec: wins over the learned rate
    ({"columns": {"purpose": {"max_null_fraction": 0.2}}}, True),  # a column's own bound wins too
    ({"columns": {"purpose": {"max_null_fraction": 0.1}}}, False),
])
def test_spec_overrides_win_over_learned_rates(override: dict, passes: bool):
    s = PipelineSpec.model_validate(spec(**override))
    profile = _profile_of(loans(), s)
    assert profile.null_rates["purpose"] == 0.0
    outcome = {o.name: o for o in validate_frame(emptied(loans(), "purpose", 0.14), s, profile)}["null_rates"]
    assert outcome.passed is passes, outcome.description


def test_a_partly_empty_column_may_drift_within_tolerance_but_not_double():
    s = PipelineSpec.model_validate(spec())
    profile = _profile_of(emptied(loans(), "income", 0.10), s)
    assert profile.null_rates["income"] == pytest.approx(0.10)
    assert null_tolerance(0.10) == pytest.approx(0.05) and null_tolerance(0.0) == 0.02
    outcomes = {f: {o.name: o for o in validate_frame(emptied(loans(), "income", f), s, profile)}["null_rates"]
                for f in (0.13, 0.20)}
    assert outcomes[0.13].passed, outcomes[0.13].description
    assert not outcomes[0.20].passed
    assert "column 'income' is 20.0% null, up from 10.0%" in outcomes[0.20].description
    assert "at most 15.0% allowed" in outcomes[0.20].description


def test_first_snapshot_and_profiles_without_null_rates_use_the_spec_default():
    s = PipelineSpec.model_validate(spec())
    bad = emptied(loans(), "purpose", 0.14)
    for profile in (None, Profile.from_json({"numeric": {}, "categories": {}, "row_count": 300})):
        outcome = {o.name: o for o in validate_frame(bad, s, profile)}["null_rates"]
        assert outcome.passed, outcome.description  # 14% is inside the default 25%
    worse = {o.name: o for o in validate_frame(emptied(loans(), "purpose", 0.4), s, None)}["null_rates"]
    assert not worse.passed and "40.0% null (at most 25.0% allowed)" in worse.description
