"""A small lending table with a few complete columns, for the null-rate tests (learned rates, refusals)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def loans(n: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    debt = rng.uniform(0, 40, n).round(1)
    return pd.DataFrame({
        "loan_id": [f"L{i:05d}" for i in range(n)],
        "income": rng.lognormal(10.5, 0.5, n).round(0),
        "debt_ratio": debt,
        "purpose": rng.choice(["car", "home", "education"], n),
        "region": rng.choice(["north", "south"], n),
        "outcome": np.where((debt / 40 + rng.normal(0, 0.3, n)) > 0.7, "default", "repaid"),
    })


def spec(**validation) -> dict:
    return {
        "name": "loans",
        "source": {"kind": "file", "path": "loans.csv"},
        "id_column": "loan_id",
        "target": {"column": "outcome", "positive": ["default"]},
        "features": {"numeric": ["income", "debt_ratio"], "categorical": ["purpose"]},
        "sensitive": ["region"],
        "validation": {"min_rows": 50, **validation},
    }


def emptied(df: pd.DataFrame, column: str, fraction: float) -> pd.DataFrame:
    out = df.copy()
    out.loc[out.index[: round(fraction * len(out))], column] = None
    return out
