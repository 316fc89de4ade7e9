"""Attack traffic: plain functions that turn a frame of real rows into what a model thief or a prober sends.

They exist so the abuse checks (core/abuse.py, the server's out-of-distribution flag) are tested and measured
against the attacks they stop (tests/e2e/test_abuse.py, benchmarks/abuse.py):

- `probe`: a few real applicants, each varied one feature at a time over a grid of values (the way one maps a
  decision boundary or the influence of each feature), in the order they would be sent.
- `uniform`: applicants drawn uniformly at random from the input space (each numeric column over the range the
  server accepts, or its real range, each categorical column one of its real values), the way one samples
  inputs to train a copy of the model.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def probe(frame: pd.DataFrame, numeric: list[str], categorical: list[str], rows: int, seeds: int = 3,
          steps: int = 8, seed: int = 0) -> pd.DataFrame:
    """`rows` probes: `seeds` real applicants, each feature stepped over `steps` values between its 5th and 95th
    percentile (categorical: each real category), one feature at a time."""
    rng = np.random.default_rng(seed)
    bases = frame.iloc[rng.choice(len(frame), size=seeds, replace=False)]
    out: list[dict] = []
    while len(out) < rows:
        for _, base in bases.iterrows():
            for col in [*numeric, *categorical]:
                if col in numeric:
                    v = pd.to_numeric(frame[col], errors="coerce").dropna()
                    values = np.linspace(v.quantile(0.05), v.quantile(0.95), steps)
                else:
                    values = frame[col].dropna().unique()[:steps]
                for value in values:
                    out.append({**base.to_dict(), col: value.item() if hasattr(value, "item") else value})
    return pd.DataFrame(out[:rows], columns=frame.columns)


def uniform(frame: pd.DataFrame, numeric: list[str], categorical: list[str], rows: int, seed: int = 0,
            bounds: dict[str, tuple[float, float] | list[float] | None] | None = None) -> pd.DataFrame:
    """`rows` applicants drawn uniformly over each numeric column's range (`bounds`: what the server accepts, as
    its config says, else the real values' range) and each categorical column's real values; other columns (text)
    take a random real value."""
    rng = np.random.default_rng(seed)
    out = pd.DataFrame(index=range(rows))
    for col in numeric:
        v = pd.to_numeric(frame[col], errors="coerce").dropna()
        whole = bool(np.all(v == np.round(v)))
        lo, hi = (bounds or {}).get(col) or (v.min(), v.max())
        draw = rng.uniform(lo, hi, rows)
        out[col] = np.round(draw) if whole else draw
    for col in categorical:
        out[col] = rng.choice(frame[col].dropna().unique(), rows)
    for col in frame.columns:
        if col not in out.columns:
            out[col] = frame[col].iloc[rng.integers(0, len(frame), rows)].to_numpy()
    return out[list(frame.columns)]
