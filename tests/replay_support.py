"""A small frame for the replay tests."""

from __future__ import annotations

import numpy as np
import pandas as pd


def replay_frame() -> pd.DataFrame:
    """Ten applicants with a text, a number (one missing), a category, a month, a grade and a row id."""
    return pd.DataFrame({
        "job": ["Registered Nurse", "clerk", "clerk", "teacher", None, "clerk", "nurse aide", "driver", "clerk", "clerk"],
        "income": [50_000.0, 40_000, np.nan, 61_000, 30_000, 45_000, 52_000, 38_000, 41_000, 39_000],
        "purpose": ["car", "credit_card", "credit_card", "car", "medical", "car", "credit_card", "car", "car", "car"],
        "month": ["Jan-2018", "Jan-2018", "Feb-2018", "Feb-2018", "Mar-2018", "Mar-2018", "Jan-2018", "Mar-2018",
                  "Feb-2018", "Jan-2018"],
        "grade": list("ABCDEFGABC"),
        "rid": range(100, 110),
    })
