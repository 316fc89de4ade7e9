"""credit_risk with frozen text embeddings (the default `mlp`) against `text_finetune`, through the graph.

    PYTHONPATH=. .venv/bin/python -m benchmarks.text_finetune_quality [--layers 2] [--max-steps N]

One home, two specs read from the same data: the shipped credit_risk, and a copy named credit_risk_finetune whose
only change is `training.model: text_finetune` (plus the flags given). Both are materialized up to
`model_evaluation`, so each model is scored on its spec's test split (the same rows: training_splits depends on
the data and the seed alone, and the script checks the two splits hashes match) next to the baselines the
evaluation fits. Reported per model: test AUC, best validation AUC, training time (the workload's steps and the
model_checkpoint materialization's wall time), and the size of what a version ships (weights, and the fine-tuned
encoder). Prints a markdown table and writes benchmarks/results/text_finetune_quality.json; benchmarks/README.md
(section Training) records a run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def materialize_keys(defs, instance, name: str) -> dict[str, float]:
    """The spec's graph up to model_evaluation: the data and embeddings, then model_checkpoint alone (timed), then
    registration and evaluation. Returns wall seconds of the checkpoint step and of the whole."""
    import dagster as dg

    everything = [*defs.assets, *(defs.asset_checks or [])]
    key = dg.AssetKey([name, "model_checkpoint"])
    evaluation = dg.AssetKey([name, "model_evaluation"])
    steps = [dg.AssetSelection.keys(key).upstream() - dg.AssetSelection.keys(key), dg.AssetSelection.keys(key),
             dg.AssetSelection.keys(evaluation).upstream() - dg.AssetSelection.keys(key).upstream()]
    seconds = []
    for selection in steps:
        t0 = time.perf_counter()
        result = dg.materialize(everything, selection=selection, resources=defs.resources, instance=instance,
                                raise_on_error=False)
        seconds.append(time.perf_counter() - t0)
        if not result.success:
            raise SystemExit(f"{name}: materializing {selection} failed")
    return {"checkpoint": round(seconds[1], 1), "total": round(sum(seconds), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=None, help="encoder_trainable_layers (default: the spec's)")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--keep", help="keep the home here instead of a temporary folder")
    args = parser.parse_args(argv)
    import dagster as dg

    from orchestration.definitions import build_definitions

    root = Path(args.keep or tempfile.mkdtemp(prefix="intelligentops-finetune-"))
    home, pipelines = root / "home", root / "pipelines"
    (home / "dagster").mkdir(parents=True, exist_ok=True)
    pipelines.mkdir(exist_ok=True)
    shipped = yaml.safe_load((REPO / "pipelines" / "credit_risk.yaml").read_text())
    (pipelines / "credit_risk.yaml").write_text(yaml.safe_dump(shipped, sort_keys=False))
    tuned = {**shipped, "name": "credit_risk_finetune",
             "training": {**shipped.get("training", {}), "model": "text_finetune"}}
    if args.layers:
        tuned["training"]["encoder_trainable_layers"] = args.layers
    if args.max_steps:
        tuned["training"]["max_steps"] = args.max_steps
    (pipelines / "credit_risk_finetune.yaml").write_text(yaml.safe_dump(tuned, sort_keys=False))
    os.environ["INTELLIGENTOPS_HOME"] = str(home)
    os.environ["INTELLIGENTOPS_PIPELINES"] = str(pipelines)
    defs = build_definitions(pipelines)
    rows = []
    with dg.instance_for_test(temp_dir=str(home / "dagster")) as instance:
        for name in ("credit_risk", "credit_risk_finetune"):
            seconds = materialize_keys(defs, instance, name)

            def meta(asset: str) -> dict:
                event = instance.get_latest_materialization_event(dg.AssetKey([name, asset]))
                return {k: v.value for k, v in event.asset_materialization.metadata.items()} if event else {}

            ev, ck, splits = meta("model_evaluation"), meta("model_checkpoint"), meta("training_splits")
            model_dir = Path(ck["model_dir"])
            result = json.loads((model_dir / "result.json").read_text())
            rows.append({
                "spec": name, "model": tuned["training"]["model"] if name.endswith("finetune") else "mlp",
                "test_auc": ev.get("test_auc"), "best_val_auc": ck.get("best_val_auc"),
                "logistic_regression_auc": ev.get("baseline_logistic_regression_auc"),
                "gradient_boosting_auc": ev.get("baseline_gradient_boosting_auc"),
                "steps": ck.get("steps"), "stopped_early": ck.get("stopped_early"), "world_size": ck.get("world_size"),
                "train_seconds": ck.get("train_seconds"), "checkpoint_materialization_seconds": seconds["checkpoint"],
                "graph_seconds": seconds["total"], "samples_per_second": result.get("samples_per_second"),
                "trainable_parameters": result["engine"]["trainable_parameters"],
                "weights_bytes": (model_dir / "model.safetensors").stat().st_size,
                "version_bytes": folder_bytes(model_dir) - (model_dir / "result.json").stat().st_size,
                "splits_hash": splits.get("splits_hash"),
            })
            print(json.dumps(rows[-1]), flush=True)
    same_split = rows[0]["splits_hash"] == rows[1]["splits_hash"]
    print(f"\nsame test split: {same_split}\n")
    print("| model | test AUC | best val AUC | LR / GBM on its inputs | steps | training (workload) | "
          "model_checkpoint wall | ships |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['test_auc']:.3f} | {r['best_val_auc']:.3f} | "
              f"{r['logistic_regression_auc']:.3f} / {r['gradient_boosting_auc']:.3f} | {r['steps']} | "
              f"{r['train_seconds']:.0f} s | {r['checkpoint_materialization_seconds']:.0f} s | "
              f"{r['version_bytes'] / 1e6:.1f} MB |")
    out = REPO / "benchmarks" / "results" / "text_finetune_quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"same_split": same_split, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
