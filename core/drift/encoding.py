"""How a frame of decisions becomes the matrices the detectors read (reference and windows alike).

KS is rank based: a missing number becomes one value below every real one, so a change in how often a feature
is missing is a change in its distribution, as it should be. A category the reference never had is one code.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from core.drift.results import _MISSING_NUMBER, _UNSEEN_CODE, MISSING_CATEGORY, DriftDetectorError

def require_columns(frame: pd.DataFrame, columns: list[str] | tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DriftDetectorError(f"{what} has no column(s) {missing}; it must carry every feature the detectors "
                                 f"were fitted on (present: {list(frame.columns)[:20]})")


def numeric_block(frame: pd.DataFrame, columns: tuple[str, ...], what: str) -> np.ndarray:
    out = np.empty((len(frame), len(columns)), dtype=np.float64)
    for j, col in enumerate(columns):
        try:
            values = pd.to_numeric(frame[col], errors="raise").to_numpy(dtype=np.float64, na_value=np.nan)
        except (ValueError, TypeError) as exc:
            raise DriftDetectorError(f"{what}: numeric feature {col!r} holds non-numbers ({exc})") from exc
        if np.isinf(values).any():
            raise DriftDetectorError(f"{what}: numeric feature {col!r} holds infinite values")
        out[:, j] = np.where(np.isnan(values), _MISSING_NUMBER, values)
    return out


def category_strings(series: pd.Series) -> np.ndarray:
    return series.astype(object).where(series.notna(), MISSING_CATEGORY).astype(str).to_numpy()


def categorical_block(frame: pd.DataFrame, categories: dict[str, tuple[str, ...]],
                       columns: tuple[str, ...]) -> np.ndarray:
    out = np.empty((len(frame), len(columns)), dtype=np.float64)
    for j, col in enumerate(columns):
        codes = {v: float(i) for i, v in enumerate(categories[col])}
        out[:, j] = [codes.get(v, _UNSEEN_CODE) for v in category_strings(frame[col])]
    return out


def text_matrix(text_vectors: dict[str, np.ndarray], column: str, rows: int, dim: int | None, what: str) -> np.ndarray:
    if column not in text_vectors:
        raise DriftDetectorError(f"{what}: text_vectors has no entry for text feature {column!r} "
                                 f"(keys: {sorted(text_vectors)}); pass its sentence embeddings, one row per row")
    m = np.asarray(text_vectors[column], dtype=np.float32)
    if m.ndim != 2 or m.shape[0] != rows or (dim is not None and m.shape[1] != dim):
        want = f"({rows}, {dim if dim is not None else 'dim'})"
        raise DriftDetectorError(f"{what}: text_vectors[{column!r}] has shape {m.shape}, expected {want}: one "
                                 f"embedding per row, from the model the detectors were fitted with")
    if not np.isfinite(m).all():
        raise DriftDetectorError(f"{what}: text_vectors[{column!r}] holds non-finite values")
    return np.ascontiguousarray(m)


def scores_vector(scores: np.ndarray | None, rows: int | None, what: str) -> np.ndarray | None:
    if scores is None:
        return None
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if rows is not None and s.shape[0] != rows:
        raise DriftDetectorError(f"{what}: scores has {s.shape[0]} values for {rows} rows; one score per decision")
    if not np.isfinite(s).all():
        raise DriftDetectorError(f"{what}: scores holds non-finite values")
    return s
