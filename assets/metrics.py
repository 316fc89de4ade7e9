"""Model metrics as plain functions of labels and scores: overall, per slice, calibration, robustness.

Nothing here knows about Dagster or MLflow, so each number can be tested against a hand computation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeAlias

from assets.evidence import GroupRates, MissingText, NumericNoise, Robustness, SliceMetrics, SplitMetrics
from assets.spec import SensitiveFeature
from core.lazy import np, pd

PredictFn: TypeAlias = "Callable[[pd.DataFrame], np.ndarray]"


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Mean |observed rate - mean score| over equal-width score bins, weighted by bin size."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            total += mask.mean() * abs(y[mask].mean() - p[mask].mean())
    return float(total)


def choose_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The score cut that maximizes F1 on the given (validation) rows; 0.5 when no cut does better."""
    from sklearn.metrics import precision_recall_curve

    y, p = np.asarray(y), np.asarray(p)
    if len(np.unique(y)) < 2:
        return 0.5
    precision, recall, thresholds = precision_recall_curve(y, p)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)[:-1]
    if not len(f1):
        return 0.5
    return float(thresholds[int(np.argmax(f1))])


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> SplitMetrics:
    from sklearn.metrics import accuracy_score, precision_score, recall_score, roc_auc_score

    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=float)
    pred = (p >= threshold).astype(int)
    auc = float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")
    return SplitMetrics(
        auc=auc,
        accuracy=float(accuracy_score(y, pred)),
        precision=float(precision_score(y, pred, zero_division=0)),
        recall=float(recall_score(y, pred, zero_division=0)),
        selection_rate=float(pred.mean()),
        calibration_error=expected_calibration_error(y, p),
        threshold=float(threshold),
        rows=int(len(y)),
        positive_rate=float(y.mean()) if len(y) else float("nan"),
    )


def sensitive_groups(df: pd.DataFrame, feature: SensitiveFeature) -> pd.Series:
    """Group labels for one fairness slice: numeric columns cut into the spec's bins, others as text."""
    col = df[feature.column]
    if feature.bins is not None:
        labels = feature.labels or [f"[{a:g}, {b:g})" for a, b in zip(feature.bins[:-1], feature.bins[1:])]
        cut = pd.cut(pd.to_numeric(col, errors="coerce"), bins=feature.bins, labels=labels, right=False)
        return cut.astype(object).where(cut.notna(), "missing").astype(str)
    return col.map(lambda v: "missing" if pd.isna(v) else str(v)).astype(str)


def slice_metrics(y: np.ndarray, pred: np.ndarray, groups: pd.Series, min_group_size: int) -> SliceMetrics:
    """Selection rate, TPR and FPR per group (fairlearn MetricFrame), and the gaps over measurable groups.

    A group with fewer than `min_group_size` rows, or without both classes, is reported as too small to
    measure instead of being passed or failed on noise.
    """
    from fairlearn.metrics import MetricFrame, false_positive_rate, selection_rate, true_positive_rate

    y, pred = np.asarray(y).astype(int), np.asarray(pred).astype(int)
    groups = pd.Series(np.asarray(groups), name="group")
    frame = MetricFrame(
        metrics={"selection_rate": selection_rate, "tpr": true_positive_rate, "fpr": false_positive_rate,
                 "count": lambda yt, yp: len(yt)},
        y_true=y, y_pred=pred, sensitive_features=groups,
    )
    by_group = frame.by_group
    positives = pd.Series(y).groupby(groups.to_numpy()).sum()
    table: dict[str, GroupRates] = {}
    for g, row in by_group.iterrows():
        n = int(row["count"])
        n_pos = int(positives.get(g, 0))
        measurable = n >= min_group_size and 0 < n_pos < n
        table[str(g)] = GroupRates(rows=n, positives=n_pos, selection_rate=_num(row["selection_rate"]),
                                   tpr=_num(row["tpr"]), fpr=_num(row["fpr"]), measured=measurable)
    measured = {g: r for g, r in table.items() if r.measured}
    too_small = sorted(g for g, r in table.items() if not r.measured)

    def gap(metric: str) -> float | None:
        values = [getattr(r, metric) for r in measured.values() if getattr(r, metric) is not None]
        return float(max(values) - min(values)) if len(values) >= 2 else None

    dpd = gap("selection_rate")
    tpr_gap, fpr_gap = gap("tpr"), gap("fpr")
    eod = None if tpr_gap is None or fpr_gap is None else max(tpr_gap, fpr_gap)
    return SliceMetrics(groups=table, too_small=too_small, demographic_parity_difference=dpd,
                        equalized_odds_difference=eod, measured_groups=len(measured))


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def permutation_importance(predict: PredictFn, X: pd.DataFrame, y: np.ndarray, columns: list[str],
                           repeats: int = 2, seed: int = 0) -> dict[str, float]:
    """Mean drop in AUC when one input column's values are shuffled across rows (global importance)."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    base = roc_auc_score(y, predict(X))
    out: dict[str, float] = {}
    for col in columns:
        drops = []
        for _ in range(repeats):
            shuffled = X.copy()
            shuffled[col] = X[col].to_numpy()[rng.permutation(len(X))]
            drops.append(base - roc_auc_score(y, predict(shuffled)))
        out[col] = float(np.mean(drops))
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def robustness(predict: PredictFn, X: pd.DataFrame, numeric: list[str], text: list[str], threshold: float,
               relative_noise: float = 0.01, seed: int = 0) -> Robustness:
    """How far scores move under small numeric perturbations and under a missing text field."""
    rng = np.random.default_rng(seed)
    base = predict(X)
    numeric_noise = missing_text = None
    if numeric:
        noisy = X.copy()
        for col in numeric:
            values = pd.to_numeric(noisy[col], errors="coerce").to_numpy(dtype=float)
            scale = np.nanstd(values) if np.isfinite(np.nanstd(values)) else 0.0
            noisy[col] = values + rng.normal(0.0, relative_noise * (scale or 1.0), len(values))
        p = predict(noisy)
        numeric_noise = NumericNoise(relative_noise=relative_noise, mean_abs_shift=float(np.mean(np.abs(p - base))),
                                     p99_abs_shift=float(np.quantile(np.abs(p - base), 0.99)),
                                     decision_flip_rate=float(np.mean((p >= threshold) != (base >= threshold))))
    if text:
        blank = X.copy()
        for col in text:
            blank[col] = ""
        p = predict(blank)
        missing_text = MissingText(mean_abs_shift=float(np.mean(np.abs(p - base))),
                                   p99_abs_shift=float(np.quantile(np.abs(p - base), 0.99)),
                                   decision_flip_rate=float(np.mean((p >= threshold) != (base >= threshold))),
                                   all_finite=bool(np.isfinite(p).all()))
    return Robustness(numeric_noise=numeric_noise, missing_text=missing_text)
