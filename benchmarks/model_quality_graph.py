"""Model quality through the graph itself: each spec materialized up to `champion_model`, as a user's run would.

`model_quality.py` drives the same code step by step to iterate on training defaults; this script is the check
that counts (issue 12): the model the gates promote, its test AUC and the baselines that `model_evaluation`
fitted on the same train split and inputs, read back from the Dagster instance. Each spec gets its own
temporary home.

    PYTHONPATH=. .venv/bin/python benchmarks/model_quality_graph.py               # four benchmark specs + two shipped
    PYTHONPATH=. .venv/bin/python benchmarks/model_quality_graph.py --only creditcard,credit_scoring

Prints a markdown table and writes benchmarks/results/model_quality_graph.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SPECS = [REPO / "benchmarks" / "specs" / f"{n}.yaml" for n in ("swisslabor", "creditcard", "hmda", "default")]
SHIPPED = [REPO / "pipelines" / f"{n}.yaml" for n in ("credit_scoring", "credit_risk")]


def run_one(path: Path) -> dict:
    import dagster as dg

    from orchestration.definitions import build_definitions

    with tempfile.TemporaryDirectory(prefix="intelligentops-quality-") as tmp:
        home, pipelines = Path(tmp) / "home", Path(tmp) / "pipelines"
        pipelines.mkdir()
        shutil.copy(path, pipelines / path.name)
        os.environ["INTELLIGENTOPS_HOME"] = str(home)
        defs = build_definitions(pipelines)
        name = path.stem
        (home / "dagster").mkdir(parents=True)
        with dg.instance_for_test(temp_dir=str(home / "dagster")) as instance:
            selection = dg.AssetSelection.from_string(
                f'key:"{name}/*" and not group:monitoring and not key:"{name}/deployment"')
            started = time.perf_counter()
            result = dg.materialize([*defs.assets, *(defs.asset_checks or [])], selection=selection,
                                    resources=defs.resources, instance=instance, raise_on_error=False)
            seconds = time.perf_counter() - started

            def meta(asset: str) -> dict:
                event = instance.get_latest_materialization_event(dg.AssetKey([name, asset]))
                return {k: v.value for k, v in event.asset_materialization.metadata.items()} if event else {}

            ev, validated, checkpoint = meta("model_evaluation"), meta("validated_dataset"), meta("model_checkpoint")
            failed = [c.check_name for c in result.get_asset_check_evaluations() if not c.passed]
            promoted = bool(meta("champion_model").get("champion_version"))
    baselines = {k.removeprefix("baseline_").removesuffix("_auc"): v for k, v in ev.items()
                 if k.startswith("baseline_") and k.endswith("_auc")}
    best = max(baselines.values()) if baselines else float("nan")
    return {"spec": name, "rows": validated.get("dagster/row_count"), "positive_rate": validated.get("positive_rate"),
            "model_auc": ev.get("test_auc"), **{f"{k}_auc": v for k, v in baselines.items()},
            "gap": round(best - ev.get("test_auc", float("nan")), 4), "promoted": promoted, "failed_gates": failed,
            "train_seconds": checkpoint.get("train_seconds"), "graph_seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated spec names")
    args = parser.parse_args(argv)
    paths = SPECS + SHIPPED
    if args.only:
        wanted = set(args.only.split(","))
        paths = [p for p in paths if p.stem in wanted]
    rows = []
    for p in paths:
        rows.append(run_one(p))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| spec | rows | positives | model | logistic regression | gradient boosting | best baseline - model |"
          " promoted (failed gates) | graph time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['spec']} | {r['rows']:,} | {r['positive_rate']:.1%} | {r['model_auc']:.3f} | "
              f"{r.get('logistic_regression_auc', float('nan')):.3f} | {r.get('gradient_boosting_auc', float('nan')):.3f} | "
              f"{r['gap']:+.3f} | {'yes' if r['promoted'] else 'no'} ({', '.join(r['failed_gates']) or 'none'}) | "
              f"{r['graph_seconds']:.0f} s |")
    out = REPO / "benchmarks" / "results" / "model_quality_graph.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
