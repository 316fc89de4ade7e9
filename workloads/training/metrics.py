"""Validation metrics the loop and the calibration share: AUC with ties averaged, and log loss (numpy only)."""

from __future__ import annotations

from typing import Any


def roc_auc(y: Any, p: Any) -> float:
    """Area under the ROC curve with tied scores averaged (NaN when only one class is present)."""
    import numpy as np

    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    _, inverse, counts = np.unique(p[order], return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = np.empty(len(p))
    ranks[order] = average_rank[inverse]
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def log_loss(y: Any, p: Any) -> float:
    import numpy as np

    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    y = np.asarray(y, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
