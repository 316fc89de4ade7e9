"""The detectors of one model version: fitted on its reference data, saved with a manifest, scored per window.

A bundle holds up to three kinds of detector, each an alibi-detect detector saved with `save_detector`:

- `tabular`: `TabularDrift` over the spec's numeric (two-sample Kolmogorov-Smirnov) and categorical
  (Chi-squared on the category counts) features, with a multiple-testing correction across the features:
  `fdr` (Benjamini-Hochberg, the default; under "nothing moved" it is Simes' test) or `bonferroni`.
- `text:<column>`: a kernel two-sample test on the column's sentence embeddings, MMD (the default) or LSDD,
  on the pytorch backend, with a Monte Carlo permutation p-value (core/drift/stats.py).
- `scores`: the model's predicted probabilities, as one detector with a weighted Bonferroni split of its level:
  Welch's t-test on the mean score at 3/4 of it and Kolmogorov-Smirnov (`KSDrift`) at 1/4, so its p-value is
  min(1, p_mean / 0.75, p_ks / 0.25). The mean test aims at applicants becoming riskier or safer and says it in
  the score's units; KS stays for a change of shape with the same mean. The t-test reads the reference scores
  from KSDrift's own `x_ref.npy`, covered by the manifest.

Decisions across detectors: `p_val` is the false-alarm rate of a whole window, split evenly over the detectors
(Bonferroni: each tests at p_val / k). Windows with fewer than `min_window` decisions are reported as too small
and not scored. How often each detector flags which shift, and why these tests were chosen, is measured in
benchmarks/README.md ("Drift detectors").

The folder holds the detectors, `bundle.json` (features, category codes, levels, reference summaries) and
`manifest.json` (core/manifest.py); `load_detectors` refuses a folder whose files do not match it, naming the
file. alibi_detect and torch are imported inside the functions that use them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.drift.encoding import (categorical_block, category_strings, numeric_block, require_columns,
                                 scores_vector, text_matrix)
from core.drift.results import (BUNDLE_FILE, DEFAULT_PERMUTATIONS, MIN_WINDOW, SCORE_MEAN_SHARE, BundleConfig,
                                DetectorOutcome, DriftDetectorError, DriftResult, FeatureShift, _MISSING_NUMBER)
from core.drift.stats import correct, mean_shift_test, scores_p_value, text_test
from core.files import atomic_write_json_local
from core.manifest import ManifestError, verify_manifest, write_manifest


class DetectorBundle:
    """The fitted detectors of one model version, loaded from (or just written to) `folder`."""

    def __init__(self, folder: Path, config: BundleConfig, tabular: Any | None, text: dict[str, Any],
                 scores: Any | None):
        self.folder = folder
        self.config = config
        self._tabular = tabular
        self._text = text
        self._scores = scores

    @property
    def detector_names(self) -> list[str]:
        names = ["tabular"] if self._tabular is not None else []
        names += [f"text:{c}" for c in self.config.text]
        return names + (["scores"] if self._scores is not None else [])

    def too_small(self, rows: int) -> bool:
        return rows < self.config.min_window

    def score(self, window: pd.DataFrame, text_vectors: dict[str, np.ndarray] | None = None,
              scores: np.ndarray | None = None) -> DriftResult:
        """Test one window of decisions against the reference; see the module docstring for the rules."""
        cfg = self.config
        rows = len(window)
        if rows < cfg.min_window:
            return DriftResult(
                drift=False, status="too_small", window_size=rows, min_window=cfg.min_window, p_val=cfg.p_val,
                detectors=(), features_moved={},
                message=(f"window has {rows} decisions, fewer than the {cfg.min_window} needed to test for drift; "
                         f"not scored (wait for more decisions)"))
        started = time.perf_counter()
        what = f"drift window ({rows} rows)"
        outcomes: list[DetectorOutcome] = []
        features: list[FeatureShift] = []
        if self._tabular is not None:
            outcome, shifts = self._score_tabular(window, what)
            outcomes.append(outcome)
            features += shifts
        text_vectors = text_vectors or {}
        for col in cfg.text:
            outcome, shift = self._score_text(col, window, text_vectors, what)
            outcomes.append(outcome)
            features.append(shift)
        if self._scores is not None:
            s = scores_vector(scores, rows, what)
            if s is None:
                raise DriftDetectorError(f"{what}: the bundle has a score detector; pass the window's scores "
                                         f"(the model's probabilities, one per decision)")
            outcome, shifts = self._score_scores(s)
            outcomes.append(outcome)
            features += shifts
        moved = {f.feature: f for f in features if f.moved}
        drift = any(o.drift for o in outcomes)
        flagged = [o.name for o in outcomes if o.drift]
        message = (f"drift in {', '.join(flagged)}: " + "; ".join(f.describe() for f in moved.values())
                   if drift else f"no drift at window false-alarm rate {cfg.p_val}")
        return DriftResult(drift=drift, status="scored", window_size=rows, min_window=cfg.min_window,
                           p_val=cfg.p_val, detectors=tuple(outcomes), features_moved=moved,
                           features=tuple(features), message=message, seconds=time.perf_counter() - started)

    # each detector -----------------------------------------------------------------------------------------

    def _encode(self, frame: pd.DataFrame, what: str) -> np.ndarray:
        cfg = self.config
        require_columns(frame, [*cfg.numeric, *cfg.categorical], what)
        return np.hstack([numeric_block(frame, cfg.numeric, what),
                          categorical_block(frame, cfg.categories, cfg.categorical)])

    def _score_tabular(self, window: pd.DataFrame, what: str) -> tuple[DetectorOutcome, list[FeatureShift]]:
        cfg = self.config
        x = self._encode(window, what)
        preds = self._tabular.predict(x, drift_type="feature", return_p_val=True, return_distance=True)["data"]
        p = np.asarray(preds["p_val"], dtype=np.float64)
        dist = np.asarray(preds["distance"], dtype=np.float64)
        family_p, flags = correct(p, cfg.detector_p_val, cfg.correction)
        names = [*cfg.numeric, *cfg.categorical]
        shifts: list[FeatureShift] = []
        for j, col in enumerate(names):
            if col in cfg.numeric:
                vals = x[:, j]
                present = vals[vals != _MISSING_NUMBER]
                after = float(present.mean()) if present.size else None
                before = cfg.numeric_means[col]
                direction = ("unchanged" if before is None or after is None or after == before
                             else "up" if after > before else "down")
                shifts.append(FeatureShift(
                    feature=col, kind="numeric", test="ks", statistic=float(dist[j]), p_value=float(p[j]),
                    moved=bool(flags[j]), effect=float(dist[j]), before=before, after=after, direction=direction,
                    missing_before=cfg.numeric_missing[col], missing_after=float(np.mean(vals == _MISSING_NUMBER))))
            else:
                ref_shares = cfg.category_shares[col]
                win = pd.Series(category_strings(window[col])).value_counts(normalize=True)
                cats = sorted(set(ref_shares) | set(win.index))
                diffs = {c: float(win.get(c, 0.0)) - ref_shares.get(c, 0.0) for c in cats}
                top = max(diffs, key=lambda c: abs(diffs[c]))
                shifts.append(FeatureShift(
                    feature=col, kind="categorical", test="chi2", statistic=float(dist[j]), p_value=float(p[j]),
                    moved=bool(flags[j]), effect=float(sum(abs(v) for v in diffs.values()) / 2),
                    before=ref_shares.get(top, 0.0), after=float(win.get(top, 0.0)),
                    direction="changed" if diffs[top] else "unchanged", category=top))
        outcome = DetectorOutcome(
            name="tabular", kind="tabular", method=f"ks+chi2/{cfg.correction}",
            statistic=float(dist[: len(cfg.numeric)].max()) if cfg.numeric else float(dist.max()),
            p_value=family_p, threshold=cfg.detector_p_val, drift=bool(family_p <= cfg.detector_p_val))
        return outcome, shifts

    def _score_text(self, col: str, window: pd.DataFrame, text_vectors: dict[str, np.ndarray],
                    what: str) -> tuple[DetectorOutcome, FeatureShift]:
        cfg = self.config
        x = text_matrix(text_vectors, col, len(window), cfg.text_dims[col], what)
        statistic, p = text_test(self._text[col], x, cfg.text_method, cfg.n_permutations, cfg.seed)
        drift = p <= cfg.detector_p_val
        top, before, after = None, None, None
        ref_texts = cfg.category_shares.get(f"text:{col}")
        if col in window.columns and ref_texts is not None:
            # The raw texts say which value (a job title) became more or less common; the size of the move is
            # the embedding statistic, since shares of free text differ between any two samples.
            win = pd.Series(category_strings(window[col])).str.strip().str.lower().value_counts(normalize=True)
            diffs = {c: float(win.get(c, 0.0)) - ref_texts.get(c, 0.0) for c in set(ref_texts) | set(win.index)}
            top = max(sorted(diffs), key=lambda c: abs(diffs[c]))
            before, after = ref_texts.get(top, 0.0), float(win.get(top, 0.0))
        outcome = DetectorOutcome(name=f"text:{col}", kind="text", method=cfg.text_method, statistic=statistic,
                                  p_value=p, threshold=cfg.detector_p_val, drift=bool(drift))
        shift = FeatureShift(feature=col, kind="text", test=cfg.text_method, statistic=statistic, p_value=p,
                             moved=bool(drift), effect=statistic, before=before, after=after,
                             direction="changed" if drift else "unchanged", category=top)
        return outcome, shift

    def _score_scores(self, s: np.ndarray) -> tuple[DetectorOutcome, list[FeatureShift]]:
        cfg = self.config
        level = cfg.detector_p_val
        preds = self._scores.predict(s.reshape(-1, 1).astype(np.float32), return_p_val=True,
                                     return_distance=True)["data"]
        p_ks = float(np.asarray(preds["p_val"]).reshape(-1)[0])
        d = float(np.asarray(preds["distance"]).reshape(-1)[0])
        # The reference scores are KSDrift's own (scores/x_ref.npy), so the bundle holds them once.
        t, p_mean = mean_shift_test(self._scores.x_ref, s)
        p = scores_p_value(p_mean, p_ks)
        after = float(s.mean())
        before = cfg.score_mean
        direction = "unchanged" if before is None or after == before else "up" if after > before else "down"
        outcome = DetectorOutcome(name="scores", kind="scores", method="ks+mean", statistic=t, p_value=p,
                                  threshold=level, drift=bool(p <= level))
        shifts = [
            FeatureShift(feature="scores:mean", kind="scores", test="welch-t", statistic=t, p_value=p_mean,
                         moved=bool(p_mean <= SCORE_MEAN_SHARE * level),
                         effect=after - before if before is not None else 0.0, before=before, after=after,
                         direction=direction),
            FeatureShift(feature="scores", kind="scores", test="ks", statistic=d, p_value=p_ks,
                         moved=bool(p_ks <= (1.0 - SCORE_MEAN_SHARE) * level), effect=d, before=before,
                         after=after, direction=direction)]
        return outcome, shifts


def _quiet_alibi() -> None:
    import logging

    logging.getLogger("alibi_detect").setLevel(logging.ERROR)


def fit_detectors(reference: pd.DataFrame, numeric: list[str], categorical: list[str],
                  text_vectors: dict[str, np.ndarray], scores: np.ndarray | None, out_dir: Path,
                  p_val: float = 0.05, seed: int = 0, *, text_method: str = "mmd", correction: str = "fdr",
                  n_permutations: int = DEFAULT_PERMUTATIONS, min_window: int = MIN_WINDOW,
                  ood: tuple[np.ndarray, np.ndarray] | None = None, ood_quantile: float = 0.995) -> DetectorBundle:
    """Fit every detector on `reference` (a model version's training split) and save them in `out_dir`.

    `text_vectors` maps each text column to its embeddings, row for row with `reference`. `scores` are the
    model's probabilities on rows like the reference's, and need not be as many: pass scores the model did
    not train on (its validation split, or cross-fitted predictions). A model is more confident on its own
    training rows, so in-sample scores make the reference look unlike any new traffic; for a logistic
    regression the difference is small (benchmarks/README.md), for a network that fits its training rows
    closely it is not. `ood` (training rows, held-out rows of the version's prepared feature matrix) adds the
    out-of-distribution detector (core/ood.py) in `ood/`, under the same manifest. The folder is replaced as a
    whole, atomically: readers see the old bundle or the new one, never a mix.
    """
    _quiet_alibi()
    import alibi_detect
    from alibi_detect.cd import KSDrift, LSDDDrift, MMDDrift, TabularDrift
    from alibi_detect.saving import save_detector

    out_dir = Path(out_dir)
    what = f"drift reference ({len(reference)} rows)"
    if not 0 < p_val < 1:
        raise DriftDetectorError(f"p_val {p_val}: must be between 0 and 1 (the window false-alarm rate)")
    if text_method not in ("mmd", "lsdd"):
        raise DriftDetectorError(f"text_method {text_method!r}: use 'mmd' or 'lsdd'")
    if correction not in ("bonferroni", "fdr"):
        raise DriftDetectorError(f"correction {correction!r}: use 'bonferroni' or 'fdr'")
    if len(reference) < min_window:
        raise DriftDetectorError(f"{what}: fewer rows than min_window={min_window}; a reference must be larger "
                                 f"than the windows it judges")
    require_columns(reference, [*numeric, *categorical], what)
    overlap = set(numeric) & set(categorical)
    if overlap:
        raise DriftDetectorError(f"{what}: column(s) {sorted(overlap)} listed as both numeric and categorical")
    ref_scores = scores_vector(scores, None, what)
    if ref_scores is not None and ref_scores.size < min_window:
        raise DriftDetectorError(f"{what}: {ref_scores.size} reference scores, fewer than min_window={min_window}")
    text_cols = tuple(text_vectors)
    text_mats = {c: text_matrix(text_vectors, c, len(reference), None, what) for c in text_cols}

    n_detectors = (1 if numeric or categorical else 0) + len(text_cols) + (1 if ref_scores is not None else 0)
    if n_detectors == 0:
        raise DriftDetectorError(f"{what}: nothing to detect drift on: no features, no text vectors, no scores")
    detector_p_val = p_val / n_detectors

    categories = {c: tuple(sorted(set(category_strings(reference[c])))) for c in categorical}
    shares: dict[str, dict[str, float]] = {
        c: {k: float(v) for k, v in pd.Series(category_strings(reference[c])).value_counts(normalize=True).items()}
        for c in categorical}
    for c in text_cols:
        if c in reference.columns:
            texts = pd.Series(category_strings(reference[c])).str.strip().str.lower()
            shares[f"text:{c}"] = {k: float(v) for k, v in texts.value_counts(normalize=True).items()}
    numeric_means: dict[str, float | None] = {}
    numeric_missing: dict[str, float] = {}
    for c in numeric:
        vals = pd.to_numeric(reference[c], errors="coerce")
        numeric_means[c] = None if vals.notna().sum() == 0 else float(vals.mean())
        numeric_missing[c] = float(vals.isna().mean())

    config = BundleConfig(
        numeric=tuple(numeric), categorical=tuple(categorical), text=text_cols, categories=categories,
        text_method=text_method, correction=correction, p_val=p_val, detector_p_val=detector_p_val,
        n_permutations=n_permutations, seed=seed, min_window=min_window, reference_rows=len(reference),
        score_rows=0 if ref_scores is None else int(ref_scores.size),
        text_dims={c: int(m.shape[1]) for c, m in text_mats.items()}, numeric_means=numeric_means,
        numeric_missing=numeric_missing, category_shares=shares,
        score_mean=None if ref_scores is None else float(ref_scores.mean()),
        alibi_detect_version=alibi_detect.__version__,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tabular = None
        bundle_tmp = DetectorBundle(staging, config, None, {}, None)
        if numeric or categorical:
            x_ref = bundle_tmp._encode(reference, what)
            cat_idx = {len(numeric) + j: None for j in range(len(categorical))}
            tabular = TabularDrift(x_ref, p_val=detector_p_val, categories_per_feature=cat_idx or None,
                                   correction=correction, alternative="two-sided")
            save_detector(tabular, staging / "tabular")
        text: dict[str, Any] = {}
        for i, col in enumerate(text_cols):
            if text_method == "mmd":
                det = MMDDrift(text_mats[col], backend="pytorch", p_val=detector_p_val,
                               n_permutations=n_permutations, configure_kernel_from_x_ref=True, device="cpu")
            else:
                import torch

                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed + i)  # LSDD picks its kernel centres at random
                    det = LSDDDrift(text_mats[col], backend="pytorch", p_val=detector_p_val,
                                    n_permutations=n_permutations, device="cpu")
            save_detector(det, staging / "text" / _safe_name(col))
            text[col] = det
        score_det = None
        if ref_scores is not None:
            score_det = KSDrift(ref_scores.reshape(-1, 1).astype(np.float32), p_val=detector_p_val)
            save_detector(score_det, staging / "scores")
        if ood is not None:
            from core.ood import OOD_FOLDER, fit_ood

            fit_ood(ood[0], ood[1], staging / OOD_FOLDER, ood_quantile)
        atomic_write_json_local(staging / BUNDLE_FILE, config.to_json())
        write_manifest(staging)
        _swap_in(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return DetectorBundle(out_dir, config, tabular, text, score_det)


def _safe_name(column: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in column)


def _swap_in(staging: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_detectors(out_dir: Path) -> DetectorBundle:
    """The bundle saved in `out_dir`, after checking every file against its manifest."""
    _quiet_alibi()
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise DriftDetectorError(f"{out_dir}: no such folder of drift detectors; fit them first (fit_detectors)")
    try:
        verify_manifest(out_dir)
    except ManifestError as exc:
        raise DriftDetectorError(f"{exc}. Refusing to load the drift detectors: refit them (fit_detectors) rather "
                                 "than trusting unverified files") from None
    from alibi_detect.saving import load_detector

    config = BundleConfig.from_json(json.loads((out_dir / BUNDLE_FILE).read_text()), out_dir / BUNDLE_FILE)

    def load(sub: Path) -> Any:
        try:
            return load_detector(sub)
        except Exception as exc:  # alibi-detect's errors do not say which folder
            raise DriftDetectorError(f"{sub}: alibi-detect cannot load this detector ({type(exc).__name__}: "
                                     f"{exc}); refit the detectors") from exc

    tabular = load(out_dir / "tabular") if (out_dir / "tabular").is_dir() else None
    text: dict[str, Any] = {}
    for i, col in enumerate(config.text):
        import torch

        # LSDD re-picks its kernel centres from the reference when it is rebuilt: the same seed as at fit
        # gives the same centres, so a loaded bundle gives the fitted bundle's p-values.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + i)
            text[col] = load(out_dir / "text" / _safe_name(col))
    scores = load(out_dir / "scores") if (out_dir / "scores").is_dir() else None
    return DetectorBundle(out_dir, config, tabular, text, scores)
