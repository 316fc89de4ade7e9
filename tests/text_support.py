"""A small text spec (one numeric and one text feature over a CSV of realistic job titles) for the embedding
and vector-index tests."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pandas as pd

from support import write_spec

# --- a small text spec: a CSV in the test's folder and a `kind: file` spec over it ---------------------------

ADJECTIVES = ["senior", "junior", "lead", "assistant", "chief", "staff", "principal", "associate", "head",
              "deputy", "regional", "night", "part-time", "trainee", "certified"]


ROLES = ["software engineer", "registered nurse", "truck driver", "school teacher", "accountant", "electrician",
         "store manager", "police officer", "dental hygienist", "sales representative", "pharmacist", "welder",
         "bank teller", "chef", "paralegal", "carpenter", "social worker", "web developer", "mechanic",
         "librarian"]


def titles(n: int) -> list[str]:
    """n distinct, realistic job titles."""
    out = [f"{a} {r}" for r in ROLES for a in ADJECTIVES]
    if n > len(out):
        raise ValueError(f"at most {len(out)} distinct titles")
    return out[:n]


def write_text_spec(pipelines: Path, data_dir: Path, name: str = "jobs", rows: int = 80,
                    texts: list[str] | None = None, **extra) -> tuple[Path, pd.DataFrame]:
    """A spec with one numeric and one text feature over a CSV of `rows` rows; returns (csv path, frame)."""
    texts = texts if texts is not None else titles(rows)
    frame = pd.DataFrame({
        "id": [f"r{i:04d}" for i in range(rows)],
        "amount": [float(1000 + 37 * i % 900) for i in range(rows)],
        "title": texts,
        "outcome": ["bad" if i % 3 == 0 else "good" for i in range(rows)],
    })
    csv = data_dir / f"{name}.csv"
    frame.to_csv(csv, index=False)
    spec = {"name": name, "source": {"kind": "file", "path": str(csv)}, "id_column": "id",
            "target": {"column": "outcome", "positive": ["bad"]},
            "features": {"numeric": ["amount"], "text": ["title"]}, **extra}
    write_spec(pipelines, spec)
    return csv, frame


def _metadata(result: dg.ExecuteInProcessResult, key: str) -> dict:
    mats = result.asset_materializations_for_node(key.replace("/", "__"))
    assert mats, f"{key} was not materialized"
    return {k: v.value for k, v in mats[-1].metadata.items()}
