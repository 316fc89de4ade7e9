"""Model quality against baselines: fitted on the train split, and a real training run within tolerance."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from assets.baselines import (
    GRADIENT_BOOSTING,
    LOGISTIC_REGRESSION,
    BaselineError,
    BaselineResult,
    best_baseline,
    fit_baselines,
    split_matrices,
)
from assets.features import build_feature_frame, fit_preprocessing
from assets.spec import load_spec
from support import REPO
from workloads.training.calibration import network_logits
from workloads.training.metrics import roc_auc


# --- the budget ---------------------------------------------------------------------------------------------


def _frame(rows: int = 600) -> tuple[pd.DataFrame, dict]:
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=rows), rng.normal(size=rows)
    color = rng.choice(["red", "blue", "green"], rows)
    label = ((a - 0.5 * b + (color == "red") + rng.normal(0, 0.5, rows)) > 0.5).astype(int)
    a[rng.random(rows) < 0.05] = np.nan
    ids = [f"r{i}" for i in range(rows)]
    validated = pd.DataFrame({"row_id": ids, "label": label, "a": a, "b": b, "color": color})
    split = np.where(np.arange(rows) % 5 == 0, "test", np.where(np.arange(rows) % 5 == 1, "validation", "train"))
    frame = build_feature_frame(validated, pd.DataFrame({"row_id": ids, "split": split}), ["a", "b"], ["color"])
    prep = fit_preprocessing(frame[frame["split"] == "train"], ["a", "b"], ["color"])
    return frame, prep


def test_baselines_fit_on_train_and_score_the_test_rows() -> None:
    frame, prep = _frame()
    x_train, y_train, x_test, y_test = split_matrices(frame, prep)
    assert len(x_train) == 360 and len(x_test) == 120 and x_train.shape[1] == prep["n_features"] == 8
    results = fit_baselines(x_train, y_train, x_test, y_test)
    assert [r.name for r in results] == [LOGISTIC_REGRESSION, GRADIENT_BOOSTING]
    from sklearn.metrics import roc_auc_score

    for r in results:
        assert isinstance(r, BaselineResult) and 0.85 < r.auc <= 1.0 and r.fit_seconds >= 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        results[0].auc = 1.0  # type: ignore[misc]
    # Scored on exactly the test rows: a constant predictor's AUC there is 0.5, and the LR's matches sklearn's.
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=1.0, max_iter=2000, random_state=7).fit(x_train, y_train)
    assert results[0].auc == pytest.approx(roc_auc_score(y_test, lr.predict_proba(x_test)[:, 1]))
    assert best_baseline(results) == max(results, key=lambda r: r.auc)


def test_baselines_name_the_split_that_cannot_be_used() -> None:
    frame, prep = _frame()
    x_train, y_train, x_test, y_test = split_matrices(frame, prep)
    with pytest.raises(BaselineError, match="the test split holds only one class"):
        fit_baselines(x_train, y_train, x_test, np.zeros_like(y_test))
    with pytest.raises(BaselineError, match="same columns"):
        fit_baselines(x_train, y_train, x_test[:, :3], y_test)
    with pytest.raises(BaselineError, match="no baseline results"):
        best_baseline([])


# --- one real run on a real table ---------------------------------------------------------------------------


@pytest.mark.slow
def test_training_on_a_real_table_comes_within_tolerance_of_the_better_baseline(tmp_path: Path) -> None:
    """AER CreditCard (1,319 rows), the issue's example: one rank, no launcher, the spec's default training."""
    from benchmarks import model_quality

    loaded = load_spec(REPO / "benchmarks" / "specs" / "creditcard.yaml")
    data = model_quality.prepare(loaded, tmp_path, tmp_path)
    config = model_quality.train_config(loaded, tmp_path, {})
    config.write(tmp_path / "config.json")
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    env.pop("DAGSTER_PIPES_CONTEXT", None)
    out = subprocess.run([sys.executable, "-m", "workloads.training", "--config", str(tmp_path / "config.json")],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "model" / "result.json").read_text())
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert result["calibration"]["method"] == "platt" and manifest["calibration"] == result["calibration"]
    assert result["budget"]["max_steps"] >= 500 and result["steps"] >= result["budget"]["min_steps"]

    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "model" / "model.safetensors"))
    p = 1 / (1 + np.exp(-network_logits(weights, data["n_features"], config.hidden, data["x_test"])))
    model_auc = roc_auc(data["y_test"], p)
    best = best_baseline(fit_baselines(data["x_train"], data["y_train"], data["x_test"], data["y_test"]))
    assert model_auc >= best.auc - 0.02, (model_auc, best)
    # Calibrated: the mean predicted probability on unseen rows is near their positive rate.
    assert abs(float(p.mean()) - float(data["y_test"].mean())) < 0.05
