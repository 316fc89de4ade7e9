"""Reference models for every evaluation: logistic regression and gradient boosting on the network's own inputs.

They are fitted on the train split and scored on the test rows, on the very matrix the network sees
(`assets.features.transform` with the preprocessing fitted on the train split: median imputation and missing
indicators, standardization, one-hot categories, text embeddings). Using that matrix rather than sklearn's own
preprocessing of the raw columns means a gap between the network and a baseline is the model's, never a
difference in what the two were shown. Standardized inputs are what logistic regression wants; gradient
boosting is indifferent to monotone scaling and reads one-hot columns as well as it reads categories.

Plain functions; scikit-learn is imported inside them so the code location never loads it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

LOGISTIC_REGRESSION = "logistic_regression"
GRADIENT_BOOSTING = "gradient_boosting"
EARLY_STOPPING_ROWS = 10_000  # scikit-learn's own threshold for early_stopping="auto"


class BaselineError(ValueError):
    """Inputs a baseline cannot be fitted or scored on; the message says which split and why."""


@dataclass(frozen=True)
class BaselineResult:
    """One reference model's test AUC and how long its fit took."""

    name: str
    auc: float
    fit_seconds: float


def _check(x_train: Any, y_train: Any, x_test: Any, y_test: Any) -> tuple[np.ndarray, ...]:
    xt, yt = np.asarray(x_train, dtype=np.float64), np.asarray(y_train).astype(int)
    xs, ys = np.asarray(x_test, dtype=np.float64), np.asarray(y_test).astype(int)
    if xt.ndim != 2 or xs.ndim != 2 or xt.shape[1] != xs.shape[1]:
        raise BaselineError(f"train matrix {xt.shape} and test matrix {xs.shape} must be 2-D with the same columns")
    if len(xt) != len(yt) or len(xs) != len(ys):
        raise BaselineError(f"{len(xt)} train rows with {len(yt)} labels, {len(xs)} test rows with {len(ys)} labels")
    for split, y in (("train", yt), ("test", ys)):
        if len(np.unique(y)) < 2:
            raise BaselineError(f"the {split} split holds only one class ({len(y)} rows); a baseline needs both "
                                "positives and negatives there")
    return xt, yt, xs, ys


def logistic_regression(x_train: Any, y_train: Any, x_test: Any, y_test: Any, seed: int = 7) -> BaselineResult:
    """L2-regularized logistic regression (C=1, lbfgs) on the standardized matrix."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    xt, yt, xs, ys = _check(x_train, y_train, x_test, y_test)
    t0 = time.perf_counter()
    model = LogisticRegression(C=1.0, max_iter=2000, random_state=seed).fit(xt, yt)
    seconds = time.perf_counter() - t0
    return BaselineResult(LOGISTIC_REGRESSION, float(roc_auc_score(ys, model.predict_proba(xs)[:, 1])), seconds)


def gradient_boosting(x_train: Any, y_train: Any, x_test: Any, y_test: Any, seed: int = 7,
                      validation: tuple[Any, Any] | None = None) -> BaselineResult:
    """scikit-learn's HistGradientBoostingClassifier with its defaults (early stopping from 10,000 rows).

    Given the validation split (`validation`: its matrix and labels) and more than 10,000 train rows, it stops
    early on those rows, the ones the network's operating threshold is chosen on, instead of on a tenth cut off the
    train rows: that cut copies the whole train matrix, 3 GB at a million rows, at the evaluation's memory peak.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score

    xt, yt, xs, ys = _check(x_train, y_train, x_test, y_test)
    stop_on: dict[str, np.ndarray] = {}
    if validation is not None and len(xt) > EARLY_STOPPING_ROWS:
        try:
            xv, yv, _, _ = _check(validation[0], validation[1], xs, ys)
            stop_on = {"X_val": xv, "y_val": yv}
        except BaselineError:  # a validation split of one class: scikit-learn's own cut of the train rows, then
            pass
    t0 = time.perf_counter()
    model = HistGradientBoostingClassifier(random_state=seed).fit(xt, yt, **stop_on)
    seconds = time.perf_counter() - t0
    return BaselineResult(GRADIENT_BOOSTING, float(roc_auc_score(ys, model.predict_proba(xs)[:, 1])), seconds)


def fit_baselines(x_train: Any, y_train: Any, x_test: Any, y_test: Any, seed: int = 7,
                  validation: tuple[Any, Any] | None = None) -> list[BaselineResult]:
    """Both baselines, fitted on the train rows and scored on the test rows (gradient boosting may stop early on
    `validation`)."""
    return [logistic_regression(x_train, y_train, x_test, y_test, seed),
            gradient_boosting(x_train, y_train, x_test, y_test, seed, validation)]


def best_baseline(results: Sequence[BaselineResult]) -> BaselineResult:
    """The baseline with the highest test AUC."""
    if not results:
        raise BaselineError("no baseline results to compare with")
    return max(results, key=lambda r: r.auc)


def split_matrices(frame: pd.DataFrame, prep: dict[str, Any]) -> tuple[np.ndarray, ...]:
    """x_train, y_train, x_test, y_test of a feature frame (assets.features.build_feature_frame) under `prep`."""
    from assets.features import LABEL, SPLIT, transform

    train, test = frame[frame[SPLIT] == "train"], frame[frame[SPLIT] == "test"]
    if not len(train) or not len(test):
        raise BaselineError(f"the feature frame has {len(train)} train and {len(test)} test rows; both are needed")
    return (transform(train, prep), train[LABEL].to_numpy(np.int64),
            transform(test, prep), test[LABEL].to_numpy(np.int64))
