"""Cost of re-materializing text_embeddings after 1% of the texts change, as a share of a full run.

    PYTHONPATH=. .venv/bin/python benchmarks/embeddings_incremental.py [--changed 0.01]

The credit_risk data (10,000 loans) is copied to a Parquet file behind a `kind: file` copy of the spec, in a
fresh $INTELLIGENTOPS_HOME. raw_dataset and validated_dataset are materialized untimed; then text_embeddings is
materialized through Dagster (the real asset, IO manager, metadata) and timed:
  1. full: empty cache;
  2. incremental: after `--changed` of the rows get a new, distinct emp_title.
Each timed run happens twice: in a fresh Python process (what a Dagster run costs, torch import and model
load included) and in one warm process where the model is already loaded (the code path alone).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ASSETS = ("raw_dataset", "validated_dataset", "text_embeddings")


def materialize(names: tuple[str, ...]) -> dict:
    """Materialize credit_risk assets by name in this process; returns the embeddings metadata and wall time."""
    import dagster as dg

    from orchestration.definitions import build_definitions

    defs = build_definitions()
    started = time.perf_counter()
    result = dg.materialize([*defs.assets, *defs.asset_checks], resources=defs.resources,
                            instance=dg.DagsterInstance.get(),
                            selection=dg.AssetSelection.assets(*(dg.AssetKey(["credit_risk", n]) for n in names)))
    seconds = time.perf_counter() - started
    assert result.success
    mats = result.asset_materializations_for_node("credit_risk__text_embeddings")
    meta = {k: v.value for k, v in mats[-1].metadata.items()} if mats else {}
    return {"seconds": seconds, "asset_seconds": meta.get("seconds"), "rows_embedded": meta.get("rows_embedded"),
            "rows_reused": meta.get("rows_reused")}


def in_fresh_process(env: dict, names: tuple[str, ...]) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(REPO / 'benchmarks')!r});"
            f"from embeddings_incremental import materialize; print('RESULT', json.dumps(materialize({names!r})))")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    process = time.perf_counter() - started
    out = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    return {**out, "process_seconds": process}


def setup(root: Path) -> tuple[dict, Path]:
    import pandas as pd

    sys.path.insert(0, str(REPO))
    from assets.sources import read_source
    from assets.spec import load_spec

    df, _ = read_source(load_spec(REPO / "pipelines" / "credit_risk.yaml"))
    data = root / "loans.parquet"
    pd.DataFrame(df).to_parquet(data, index=False)
    spec = yaml.safe_load((REPO / "pipelines" / "credit_risk.yaml").read_text())
    spec["source"] = {"kind": "file", "path": str(data)}
    (root / "pipelines").mkdir()
    (root / "pipelines" / "credit_risk.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    env = {**os.environ, "INTELLIGENTOPS_HOME": str(root / "home"), "INTELLIGENTOPS_PIPELINES": str(root / "pipelines"),
           "DAGSTER_HOME": str(root / "dagster"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO)}
    (root / "dagster").mkdir()
    return env, data


def change_texts(data: Path, share: float) -> int:
    import pandas as pd

    df = pd.read_parquet(data)
    n = max(1, round(len(df) * share))
    rows = df.index[:: len(df) // n][:n]
    df.loc[rows, "emp_title"] = [f"benchmark changed title {i}" for i in range(n)]
    df.to_parquet(data, index=False)
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changed", type=float, default=0.01)
    args = parser.parse_args()
    report: dict[str, dict] = {}
    for mode in ("fresh process", "warm process"):
        with tempfile.TemporaryDirectory() as tmp:
            env, data = setup(Path(tmp))
            if mode == "fresh process":
                in_fresh_process(env, ASSETS[:2])
                full = in_fresh_process(env, ASSETS[2:])
                n = change_texts(data, args.changed)
                in_fresh_process(env, ASSETS[:2])
                incremental = in_fresh_process(env, ASSETS[2:])
            else:
                os.environ.update(env)
                materialize(ASSETS[:2])
                full = materialize(ASSETS[2:])
                n = change_texts(data, args.changed)
                materialize(ASSETS[:2])
                incremental = materialize(ASSETS[2:])
            report[mode] = {"full": full, "incremental": incremental, "changed_rows": n,
                            "share_run": incremental["seconds"] / full["seconds"],
                            "share_asset": incremental["asset_seconds"] / full["asset_seconds"]}
            print(f"{mode:14s} {n} of {full['rows_embedded']} rows changed; {incremental['rows_embedded']} embedded, "
                  f"{incremental['rows_reused']} reused")
            print(f"  asset body     full {full['asset_seconds']:6.2f} s  incremental {incremental['asset_seconds']:5.2f} s"
                  f"  share {100 * report[mode]['share_asset']:4.1f}%")
            print(f"  Dagster run    full {full['seconds']:6.2f} s  incremental {incremental['seconds']:5.2f} s"
                  f"  share {100 * report[mode]['share_run']:4.1f}%")
            if "process_seconds" in full:
                print(f"  whole process  full {full['process_seconds']:6.2f} s  incremental "
                      f"{incremental['process_seconds']:5.2f} s  share "
                      f"{100 * incremental['process_seconds'] / full['process_seconds']:4.1f}%")
    if os.environ.get("BENCH_JSON"):
        print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
