"""Specs whose network is not the default MLP (a user's factory, text_finetune), and what their tests share:
the whole pipeline to `deployment`, the validation rows in the order training scored them, and the running
server's answers for them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from support import REPO, failure_text, materialize, write_spec

EXAMPLE = REPO / "docs" / "examples" / "byo"
ROLES_RISKY = ["truck driver", "welder", "night guard", "line cook", "cashier"]
ROLES_SAFE = ["software engineer", "registered nurse", "pharmacist", "accountant", "school teacher"]
LEVELS = ["senior", "junior", "lead", "assistant", "head", ""]


def applicants(rows: int, seed: int, titles: bool) -> pd.DataFrame:
    """A table where region, the sensitive slice, is independent of everything, so the fairness gate can pass."""
    rng = np.random.default_rng(seed)
    income = rng.lognormal(10.6, 0.45, rows).round(0)
    debt = rng.uniform(0, 45, rows).round(1)
    age = rng.integers(21, 75, rows).astype(float)
    purpose = rng.choice(["car", "home", "debt", "education", "business"], rows)
    logit = (1.6 * (debt / 45 - 0.5) - 1.4 * (np.log(income) - 10.6) + 0.6 * (purpose == "business")
             - 0.015 * (age - 45) + 0.9 * (debt / 45) * (age < 30))
    frame = {"applicant": [f"a{i:05d}" for i in range(rows)], "income": income, "debt_ratio": debt, "age": age,
             "purpose": purpose, "region": rng.choice(["north", "south"], rows)}
    if titles:
        roles = rng.choice(ROLES_RISKY + ROLES_SAFE, rows)
        logit = logit + 1.5 * np.isin(roles, ROLES_RISKY)
        frame["job_title"] = [f"{rng.choice(LEVELS)} {r}".strip() for r in roles]
    frame["outcome"] = np.where(logit + rng.logistic(0, 0.5, rows) > np.quantile(logit, 0.7), "default", "repaid")
    return pd.DataFrame(frame)


def write_byo_spec(pipelines: Path, name: str, rows: int, training: dict, titles: bool = False,
                   seed: int = 21) -> Path:
    applicants(rows, seed, titles).to_csv(pipelines / f"{name}.csv", index=False)
    features = {"numeric": ["income", "debt_ratio", "age"], "categorical": ["purpose"]}
    if titles:
        features["text"] = ["job_title"]
    return write_spec(pipelines, {
        "name": name, "source": {"kind": "file", "path": f"{name}.csv"}, "id_column": "applicant",
        "target": {"column": "outcome", "positive": ["default"]}, "features": features, "sensitive": ["region"],
        "split": {"strategy": "random", "test": 0.2, "validation": 0.15, "seed": 5},
        "training": training,
        # The toy label is a simple rule on few inputs: a copy learns it from 1,000 queries (kappa ~0.95), so this
        # spec accepts being copied; the extraction gate's limit is tested in tests/stage/test_robustness_gate.py.
        "compliance": {"intended_purpose": "Test model: decision support for a person reviewing applications.",
                       "max_missing_text_shift": 0.3, "max_extraction_agreement": 1.0},
        "deployment": {"slo_p99_ms": 5000, "smoke_requests": 10},
    })


def copy_example_module(pipelines: Path) -> Path:
    """The docs' worked example module, beside the test's spec, exactly as a user would place it."""
    return Path(shutil.copy(EXAMPLE / "residual_nets.py", pipelines / "residual_nets.py"))


def through_deployment(defs: dg.Definitions, instance: dg.DagsterInstance, name: str) -> dg.ExecuteInProcessResult:
    """Every asset of the spec but the monitoring ones, with every check (the gates included)."""
    result = materialize(defs, instance, f'key:"{name}/*" and not group:monitoring')
    assert result.success, failure_text(result)
    return result


def metadata(result: dg.ExecuteInProcessResult, name: str, asset: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events()
               if e.materialization.asset_key == dg.AssetKey([name, asset])]
    return {k: getattr(v, "value", v) for k, v in event.materialization.metadata.items()}


def validation_rows(home: Path, name: str, columns: list[str]) -> pd.DataFrame:
    """The validation rows' features in data.npz's order (prepare_training_data keeps validated_dataset's order)."""
    validated = pd.read_parquet(home / "assets" / name / "validated_dataset.parquet")
    splits = pd.read_parquet(home / "assets" / name / "training_splits.parquet")
    wanted = set(splits.loc[splits["split"] == "validation", "row_id"].astype(str))
    picked = validated[validated["row_id"].astype(str).isin(wanted)]
    return picked[columns].reset_index(drop=True)


def served_probabilities(endpoint: str, name: str, rows: pd.DataFrame, numeric: list[str], key: str) -> np.ndarray:
    """The running server's probabilities for `rows`, over Open Inference Protocol v2, a few rows per request."""
    import httpx

    from core.protocol import v2_outputs, v2_request

    others = [c for c in rows.columns if c not in numeric]
    records = rows.astype(object).where(rows.notna(), None).to_dict("records")
    out: list[float] = []
    for i in range(0, len(records), 40):
        r = httpx.post(f"{endpoint}/v2/models/{name}/infer", json=v2_request(records[i:i + 40], numeric, others),
                       headers={"Authorization": f"Bearer {key}"}, timeout=120)
        assert r.status_code == 200, r.text
        out += [float(p) for p in v2_outputs(r.json())["probability"]]
    return np.asarray(out)


def smoke_key(home: Path, name: str) -> str:
    return (home / name / "deployment" / "smoke.key").read_text().strip()


def training_result(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / "result.json").read_text())
