"""Model quality against simple baselines, on real tables the project has never been tuned on (issue 12).

For every spec (by default the four in benchmarks/specs/ and the two shipped ones) it does what the graph does
up to `model_checkpoint`, with the same code: read the source, clean the rows (`assets.data.clean_rows`),
split them (`assign_splits`), embed text with the shipped MiniLM when the spec has text, fit the preprocessing
on the train split (`assets.features`), write the run folder and launch the training workload
(`-m workloads.training`) under torchrun with the config the asset would write (`assets.training.workload_config`).
Then it scores the exported network on the test rows and fits the baselines (`assets.baselines`) on the same train
rows and matrix. Run it from the repository root:

    .venv/bin/python -m benchmarks.model_quality                  # all six
    .venv/bin/python -m benchmarks.model_quality --only creditcard,hmda --nproc 1
    .venv/bin/python -m benchmarks.model_quality --set learning_rate=0.003   # try a setting

Prints a markdown table and writes benchmarks/results/model_quality.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from assets.baselines import best_baseline, fit_baselines
from assets.data import assign_splits, clean_rows
from assets.features import LABEL, ROW_ID, SPLIT, build_feature_frame, dumps, fit_preprocessing, transform
from assets.sources import read_source
from assets.spec import LoadedSpec, load_spec
from assets.training import workload_config
from core.train_config import TrainConfig
from workloads.training.calibration import network_logits
from workloads.training.metrics import log_loss, roc_auc

REPO = Path(__file__).resolve().parents[1]
SPECS = [REPO / "benchmarks" / "specs" / f"{n}.yaml" for n in ("swisslabor", "creditcard", "hmda", "default")]
SHIPPED = [REPO / "pipelines" / f"{n}.yaml" for n in ("credit_scoring", "credit_risk")]
TOLERANCE = 0.02


def train_config(loaded: LoadedSpec, run_dir: Path, overrides: dict[str, Any]) -> TrainConfig:
    """The config the model_checkpoint asset would write for this spec, with `overrides` on top (validated)."""
    config = workload_config(loaded.spec, data=str(run_dir / "data.npz"),
                             preprocessing=str(run_dir / "preprocessing.json"), output_dir=str(run_dir / "model"),
                             checkpoint_dir=str(run_dir / "checkpoints"), run_name=f"{loaded.name}-benchmark")
    return TrainConfig.build({**config.model_dump(), **overrides}, f"{loaded.path} with --set {overrides}")


def embeddings_for(loaded: LoadedSpec, validated: pd.DataFrame, work: Path) -> pd.DataFrame | None:
    """The text_embeddings frame the graph would build (shipped MiniLM, cached by text hash under `work`)."""
    spec = loaded.spec
    if not spec.has_text:
        return None
    from assets.features import embedding_column
    from resources.embedder import EmbeddingCache, embed_with_cache, resolve_model

    ref = resolve_model(spec.embeddings.model, spec.name, loaded.path.parent)
    cache = EmbeddingCache(work / "embedding_cache" / ref.cache_id)
    frame = pd.DataFrame({ROW_ID: validated[ROW_ID].astype(str).to_numpy()})
    for col in spec.features.text:
        run = embed_with_cache(ref, validated[col].astype(str).tolist(), cache, spec.embeddings.batch_size)
        frame[embedding_column(col)] = list(run.vectors)
    return frame


def prepare(loaded: LoadedSpec, run_dir: Path, work: Path) -> dict[str, Any]:
    """Rows to matrices exactly as the graph does; data.npz and preprocessing.json in run_dir."""
    spec = loaded.spec
    raw, _ = read_source(loaded)
    validated, _rejected = clean_rows(raw, spec)
    splits = pd.DataFrame({ROW_ID: validated[ROW_ID], SPLIT: assign_splits(validated, spec)})
    embeddings = embeddings_for(loaded, validated, work)
    f = spec.features
    frame = build_feature_frame(validated, splits, f.numeric, f.categorical, f.text, embeddings, spec.name)
    parts = {s: frame[frame[SPLIT] == s] for s in ("train", "validation", "test")}
    prep = fit_preprocessing(parts["train"], f.numeric, f.categorical, f.text, spec.training.max_categories)
    m = {f"x_{k}": transform(v, prep) for k, v in (("train", parts["train"]), ("val", parts["validation"]),
                                                   ("test", parts["test"]))}
    m.update({f"y_{k}": v[LABEL].to_numpy(np.float32) for k, v in (("train", parts["train"]),
                                                                    ("val", parts["validation"]),
                                                                    ("test", parts["test"]))})
    run_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, x_train=m["x_train"], y_train=m["y_train"], x_val=m["x_val"], y_val=m["y_val"])
    (run_dir / "data.npz").write_bytes(buf.getvalue())
    (run_dir / "preprocessing.json").write_text(dumps(prep))
    return {**m, "rows": len(validated), "positive_rate": float(validated[LABEL].mean()),
            "n_features": prep["n_features"]}


def launch(config_path: Path, nproc: int) -> float:
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    env.pop("DAGSTER_PIPES_CONTEXT", None)
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "workloads.training", "--config", str(config_path)]
    else:
        cmd = [sys.executable, "-m", "workloads.training", "--config", str(config_path)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"training failed for {config_path}:\n{out.stderr[-4000:]}")
    return seconds


def run_one(path: Path, work: Path, nproc: int | None, overrides: dict[str, Any]) -> dict[str, Any]:
    loaded = load_spec(path)
    run_dir = work / loaded.name
    data = prepare(loaded, run_dir, work)
    config = train_config(loaded, run_dir, overrides)
    config.write(run_dir / "config.json")
    import shutil

    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # every benchmark run trains from scratch
    wall = launch(run_dir / "config.json", nproc or loaded.spec.training.nproc_per_node)
    result = json.loads((run_dir / "model" / "result.json").read_text())
    from safetensors.torch import load_file

    weights = load_file(str(run_dir / "model" / "model.safetensors"))
    z = network_logits(weights, data["n_features"], list(config.hidden), data["x_test"])
    p = 1.0 / (1.0 + np.exp(-z))
    model_auc = roc_auc(data["y_test"], p)
    baselines = fit_baselines(data["x_train"], data["y_train"], data["x_test"], data["y_test"],
                              seed=loaded.spec.split.seed)
    best = best_baseline(baselines)
    by_name = {b.name: b for b in baselines}
    return {
        "name": loaded.name, "source": f"{loaded.spec.source.package}/{loaded.spec.source.dataset}",
        "rows": data["rows"], "train_rows": len(data["y_train"]), "test_rows": len(data["y_test"]),
        "n_features": data["n_features"], "positive_rate": data["positive_rate"], "model_auc": model_auc,
        "logistic_regression_auc": by_name["logistic_regression"].auc,
        "gradient_boosting_auc": by_name["gradient_boosting"].auc,
        "baseline_fit_seconds": {b.name: b.fit_seconds for b in baselines},
        "gap_to_best_baseline": best.auc - model_auc, "within_tolerance": best.auc - model_auc <= TOLERANCE,
        "test_log_loss": log_loss(data["y_test"], p), "test_mean_probability": float(p.mean()),
        "test_positive_rate": float(data["y_test"].mean()),
        "train_wall_seconds": wall, "train_seconds_in_loop": result["train_seconds"], "steps": result["steps"],
        "best_step": result["best_step"], "epochs": result["epochs"], "stopped_early": result["stopped_early"],
        "budget": result["budget"], "pos_weight": result["pos_weight"], "calibration": result["calibration"],
        "best_val_auc": result["best_val_auc"], "world_size": result["world_size"], "overrides": overrides,
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| data set | rows | positive rate | model AUC | logistic regression | gradient boosting | gap to best "
             "| steps (best) | training wall time |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} ({r['source']}) | {r['rows']:,} | {r['positive_rate']:.1%} | "
                     f"{r['model_auc']:.3f} | {r['logistic_regression_auc']:.3f} | {r['gradient_boosting_auc']:.3f} | "
                     f"{r['gap_to_best_baseline']:+.3f} | {r['steps']} ({r['best_step']}) | "
                     f"{r['train_wall_seconds']:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="comma-separated spec names")
    parser.add_argument("--nproc", type=int, default=None, help="ranks (default: the spec's nproc_per_node)")
    parser.add_argument("--set", action="append", default=[], help="training override key=JSON value")
    parser.add_argument("--work", default=str(REPO / ".intelligentops" / "benchmarks" / "model_quality"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "model_quality.json"))
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    wanted = {n for n in args.only.split(",") if n}
    paths = [p for p in [*SPECS, *SHIPPED] if not wanted or p.stem in wanted]
    work = Path(args.work)
    rows = []
    for path in paths:
        r = run_one(path, work, args.nproc, overrides)
        rows.append(r)
        print(f"{r['name']}: model {r['model_auc']:.4f}, LR {r['logistic_regression_auc']:.4f}, "
              f"GB {r['gradient_boosting_auc']:.4f}, {r['steps']} steps (best {r['best_step']}), "
              f"{r['train_wall_seconds']:.0f} s", flush=True)
    print(table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    return 0 if all(r["within_tolerance"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
