"""workloads/replay/: the shift functions, the command line's shift flags and the v2 body, on small frames
(the HTTP side against real servers is tests/stage/test_replay_http.py)."""

from __future__ import annotations
import json
import numpy as np
import pandas as pd
import pytest
from replay_support import replay_frame

from workloads.replay import ReplayError, cli, client, shifts


@pytest.fixture
def frame() -> pd.DataFrame:
    return replay_frame()


# --- shifts -------------------------------------------------------------------------------------------------


def test_reweight_makes_a_value_as_common_as_its_weight_says(frame: pd.DataFrame) -> None:
    out = shifts.reweight(frame, "job", {"nurse": 4.0}, seed=1, rows=20_000, match="contains")
    # two nurse rows of ten, weight 4 each: 8 / (8 + 8) = half the draws
    share = out["job"].str.contains("urse", na=False).mean()
    assert 0.47 < share < 0.53
    exact = shifts.reweight(frame, "job", {"clerk": 0.0}, seed=1, rows=500)
    assert "clerk" not in set(exact["job"]) and len(exact) == 500
    assert shifts.reweight(frame, "job", {"clerk": 2}, seed=5).equals(shifts.reweight(frame, "job", {"clerk": 2}, seed=5))
    with pytest.raises(ReplayError, match=r"no row has the value 'pilot' \(exact match\)"):
        shifts.reweight(frame, "job", {"pilot": 3})
    with pytest.raises(ReplayError, match=r"reweight: no column 'title'"):
        shifts.reweight(frame, "title", {"x": 1})


def test_scale_multiplies_a_numeric_column_only(frame: pd.DataFrame) -> None:
    out = shifts.scale(frame, "income", 1.1)
    assert out["income"].iloc[0] == pytest.approx(55_000) and np.isnan(out["income"].iloc[2])
    assert frame["income"].iloc[0] == 50_000  # the input is left alone
    with pytest.raises(ReplayError, match=r"scale: column 'purpose' is not numeric"):
        shifts.scale(frame, "purpose", 2)


def test_replace_category_all_or_a_fraction(frame: pd.DataFrame) -> None:
    out = shifts.replace_category(frame, "purpose", "car", "medical")
    assert (out["purpose"] == "car").sum() == 0 and (out["purpose"] == "medical").sum() == 7
    half = shifts.replace_category(frame, "purpose", "car", "medical", fraction=0.5, seed=2)
    assert (half["purpose"] == "car").sum() == 3 and (half["purpose"] == "medical").sum() == 4  # 3 of 6 cars
    with pytest.raises(ReplayError, match=r"replace purpose: no row has the value 'boat'"):
        shifts.replace_category(frame, "purpose", "boat", "car")


def test_after_time_keeps_a_later_slice_in_time_order(frame: pd.DataFrame) -> None:
    out = shifts.after_time(frame, "month", "Jan-2018", fmt="%b-%Y")
    assert list(out["month"]) == ["Feb-2018"] * 3 + ["Mar-2018"] * 3
    assert list(shifts.after_time(frame, "month", "Feb-2018", fmt="%b-%Y")["rid"]) == [104, 105, 107]
    with pytest.raises(ReplayError, match=r"no row of 'month' is after 'Mar-2018'"):
        shifts.after_time(frame, "month", "Mar-2018", fmt="%b-%Y")
    with pytest.raises(ReplayError, match=r"column 'month' holds no parseable dates with format '%Y-%m'"):
        shifts.after_time(frame, "month", "2018-01", fmt="%Y-%m")


def test_command_line_shifts_are_parsed_and_applied_in_order(frame: pd.DataFrame) -> None:
    args = cli.build_parser().parse_args([
        "send", "--url", "http://x", "--model", "m", "--decisions", "d.jsonl", "--scale", "income=2",
        "--reweight", "job:clerk=0,driver=1", "--replace", "purpose:car=boat", "--after", "month=Jan-2018",
        "--time-format", "%b-%Y"])
    shift = cli.parse_shift(args)
    assert shift.scales == (("income", 2.0),) and shift.reweights == (("job", {"clerk": 0.0, "driver": 1.0}),)
    assert shift.replaces == (("purpose", "car", "boat"),) and shift.after == ("month", "Jan-2018")
    out = shifts.apply_shifts(frame, shift)
    assert set(out["month"]) <= {"Feb-2018", "Mar-2018"} and "clerk" not in set(out["job"])
    assert "car" not in set(out["purpose"]) and out["income"].min() >= 2 * 30_000
    bad = cli.build_parser().parse_args(["send", "--url", "u", "--model", "m", "--decisions", "d",
                                         "--scale", "income=lots"])
    with pytest.raises(ReplayError, match=r"--scale 'income=lots': 'lots' is not a number"):
        cli.parse_shift(bad)


def test_v2_request_is_the_pandas_codec(frame: pd.DataFrame) -> None:
    body = client.v2_request(frame.iloc[:3], ["income"], ["job", "purpose"], "req-1")
    json.dumps(body, allow_nan=False)  # strict JSON: a missing number travels as null, never NaN
    assert body["parameters"] == {"content_type": "pd"} and body["id"] == "req-1"
    tensors = {t["name"]: t for t in body["inputs"]}
    assert tensors["income"] == {"name": "income", "shape": [3], "datatype": "FP64", "data": [50_000.0, 40_000.0, None]}
    assert tensors["job"]["datatype"] == "BYTES" and tensors["job"]["data"] == ["Registered Nurse", "clerk", "clerk"]


# --- HTTP: a real KServe server -----------------------------------------------------------------------------


