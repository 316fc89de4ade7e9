"""A small synthetic lending table and its spec: what the compliance, monitoring and drift-loop tests train on."""

from __future__ import annotations

import numpy as np
import pandas as pd

# Everything up to and including the promotion; serving and monitoring are later stages with tests of their own.
PROMOTION = 'key:"loans/*" and not group:monitoring and not key:"loans/deployment"'


def loans(n: int = 1500, seed: int = 0, biased: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    region = rng.choice(["north", "south"], n)
    debt = rng.uniform(0, 40, n).round(1)
    income = rng.lognormal(10.5, 0.4, n).round(0)
    if biased:  # the label follows the sensitive column, not the applicant's finances
        risk = (region == "south") ^ (rng.uniform(size=n) < 0.1)
    else:
        risk = (debt / 40 - (np.log(income) - 10.5) + rng.normal(0, 0.15, n)) > 0.6
    return pd.DataFrame({"loan_id": [f"L{i:05d}" for i in range(n)], "income": income, "debt_ratio": debt,
                         "purpose": rng.choice(["car", "home", "education"], n), "region": region,
                         "outcome": np.where(risk, "default", "repaid")})


def spec(**over) -> dict:
    s = {
        "name": "loans",
        "description": "Flags risky loans for review.",
        "source": {"kind": "file", "path": "loans.csv"},
        "id_column": "loan_id",
        "target": {"column": "outcome", "positive": ["default"]},
        "features": {"numeric": ["income", "debt_ratio"], "categorical": ["purpose"]},
        "sensitive": ["region"],
        "training": {"checkpoint_every_steps": 50},
        # The label is a linear rule on two inputs with little noise, so a copy trained on 100 queries already agrees
        # with the model at kappa ~0.95 (0.97 after 1,000): this toy spec accepts being copied. The shipped specs
        # measure 0.72 and 0.84 under the default limit 0.95 (tests/stage/test_robustness_gate.py keeps it).
        "compliance": {"intended_purpose": "Test lending model: flags loans for a person to review.",
                       "min_group_size": 20, "max_extraction_agreement": 1.0},
    }
    # A test's own compliance keys are added to these (a test that wants the default copy limit says so).
    s["compliance"].update(over.pop("compliance", {}))
    s.update(over)
    return s
