"""A small file-sourced spec for training tests: a few hundred rows, numeric and categorical features, no text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from support import write_spec

SPEC_NAME = "small_credit"


def write_small_spec(pipelines: Path, data_dir: Path, rows: int = 400, **training) -> Path:
    rng = np.random.default_rng(11)
    income = rng.lognormal(10, 0.4, rows)
    debt = rng.uniform(0, 40, rows)
    age = rng.integers(19, 80, rows).astype(float)
    home = rng.choice(["rent", "own", "mortgage"], rows, p=[0.45, 0.2, 0.35])
    purpose = rng.choice(["car", "house", "debt", "other", "education", "small_biz"], rows)
    score = -0.00004 * income + 0.08 * debt + 0.6 * (home == "rent") - 0.01 * age + rng.normal(0, 0.7, rows)
    status = np.where(score > np.quantile(score, 0.7), "bad", "good")
    debt[rng.random(rows) < 0.05] = np.nan  # some missing values for the imputer
    frame = pd.DataFrame({"id": [f"c{i:04d}" for i in range(rows)], "status": status, "income": income,
                          "debt": debt, "age": age, "home": home, "purpose": purpose})
    data_dir.mkdir(parents=True, exist_ok=True)
    csv = data_dir / "applicants.csv"
    frame.to_csv(csv, index=False)
    settings = {"hidden": [16, 8], "max_steps": 150, "learning_rate": 0.01, "checkpoint_every_steps": 4,
                "checkpoint_min_seconds": 0, "early_stopping_patience": 3, "deepspeed": {"micro_batch_size": 32},
                "nproc_per_node": 2, **training}
    spec = {
        "name": SPEC_NAME,
        "source": {"kind": "file", "path": str(csv)},
        "id_column": "id",
        "target": {"column": "status", "positive": ["bad"]},
        "features": {"numeric": ["income", "debt", "age"], "categorical": ["home", "purpose"]},
        "sensitive": ["home"],
        "split": {"strategy": "random", "test": 0.2, "validation": 0.15, "seed": 3},
        "training": settings,
    }
    return write_spec(pipelines, spec)
