"""Drift detectors fitted on a model version's reference data, saved beside it, and scored per window.

A bundle holds up to three kinds of detector, each an alibi-detect detector saved with `save_detector`:

- `tabular`: `TabularDrift` over the spec's numeric (two-sample Kolmogorov-Smirnov) and categorical
  (Chi-squared on the category counts) features, with a multiple-testing correction across the features.
  The default is `fdr` (Benjamini-Hochberg): it flags whenever Bonferroni would and also when several
  features move a little at once (incomes, credit limits and balances move together), and under "nothing
  moved" it is Simes' test, whose false-alarm rate was measured at the level on this data (the price of BH
  is an assumption of positive dependence between the features' p-values, which the measurement checks).
  benchmarks/README.md ("Drift detectors") has the figures.
- `text:<column>`: a kernel two-sample test on the column's sentence embeddings, MMD (the default) or LSDD,
  on the pytorch backend. alibi-detect's permutation p-value is the share of permuted statistics at or above
  the observed one, leaving the observed statistic out (alibi-detect issue 960): it can be 0 and is slightly
  anti-conservative. Here the p-value is (1 + #{permuted >= observed}) / (1 + n_permutations), the standard
  Monte Carlo p-value, which is exact under "no drift". For MMD the permutations are computed here in one
  batched product over alibi-detect's own kernel matrix (its loop copies the 6,000 x 6,000 matrix per
  permutation: 18 s per window on this machine); the observed statistic is alibi-detect's, unbiased MMD^2.
  For LSDD, alibi-detect's count is recovered from its p-value (p * n) and corrected the same way.
- `scores`: two tests of the model's predicted probabilities, as one detector with a weighted Bonferroni
  split of its level: Welch's t-test on the mean score at 3/4 of it, Kolmogorov-Smirnov (`KSDrift`) at 1/4,
  so the detector's p-value is min(1, p_mean / 0.75, p_ks / 0.25). The mean test aims at the drift a score
  detector exists for, applicants becoming riskier or safer, and says it in the score's units (mean 0.183 ->
  0.198, up); KS stays for a change of shape with the same mean (scores collapsing onto a spike, or splitting
  in two), which is large when it happens, so a quarter of the level is enough. The t-test reads the
  reference scores from KSDrift's own `x_ref.npy`, covered by the manifest.
  Measured (benchmarks/README.md, "Drift detectors": 20 reference/pool splits x 100 windows of 1,000 rows, at
  0.0167): where 10% of a window's rows are swapped for high-risk ones (high-risk share 18% -> 27%), KS alone
  flags 45% of windows, this pair 50%, Anderson-Darling 59% (the most powerful single test measured); false
  alarms 1.3%, 0.6% and 1.5%. Per split this pair's false alarms stayed at or under 3% in all 20, KS's and
  Anderson-Darling's reached 5% and 7% where the reference was furthest from its pool: a bundle has one
  reference, so that is the rate its owner lives with. No test of the scores reaches 90% on this shift: a
  Neyman-Pearson test that knows the null distribution exactly reaches 80% (76-86% across splits).

Decisions across detectors: `p_val` is the false-alarm rate of a whole window. It is split evenly over the
detectors (Bonferroni: each tests at p_val / k), so a window of unchanged traffic raises an alarm with
probability at most p_val whatever the number of detectors, and every detector's own false-alarm rate stays
below the level too.

Windows with fewer than `min_window` decisions (default `MIN_WINDOW` = 200) are reported as too small and not
scored: with 200 rows a KS test at the per-feature level this bundle uses only sees a difference of about
0.15 in the distribution functions, and an alarm (or a clean bill) on fewer would be noise.

The folder holds the detectors, `bundle.json` (features, category codes, levels, reference summaries) and
`manifest.json` (sha256 of every other file). `load_detectors` refuses a folder whose files do not match it,
naming the file, the same way model weights are verified.

Atomic writes and file digests are resources/storage.py's; alibi_detect, torch and matplotlib are imported
inside the functions that use them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from resources.storage import atomic_write_bytes, sha256_file

MIN_WINDOW = 200
DEFAULT_PERMUTATIONS = 300
MANIFEST = "manifest.json"
BUNDLE_FILE = "bundle.json"
FORMAT_VERSION = 1
MISSING_CATEGORY = "<missing>"
# Share of the score detector's level given to the mean test; KS gets the rest (module docstring).
SCORE_MEAN_SHARE = 0.75
# KS is rank based: a missing number becomes one value below every real one, so a change in how often a
# feature is missing is a change in its distribution, as it should be.
_MISSING_NUMBER = -1e30
_UNSEEN_CODE = -1.0  # a category the reference never had; all such values count as one new category


class DriftDetectorError(RuntimeError):
    """Detectors cannot be fitted, loaded or scored; the message names the file, column or key."""


# --- value objects ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectorOutcome:
    """One detector's verdict on a window. `threshold` is the p-value level this detector tests at."""

    name: str            # "tabular", "text:<column>", "scores"
    kind: str            # "tabular" | "text" | "scores"
    method: str          # "ks+chi2/fdr", "mmd", "lsdd", "ks+mean"
    statistic: float     # tabular: the largest per-feature statistic; text: MMD^2 or LSDD; scores: Welch t
    p_value: float       # tabular: the corrected (Simes or Bonferroni) p-value of "no feature moved";
                         # scores: the weighted Bonferroni min(1, p_mean / 0.75, p_ks / 0.25)
    threshold: float
    drift: bool


@dataclass(frozen=True)
class FeatureShift:
    """How one feature (or the text, or the scores) differs between the reference and the window."""

    feature: str
    kind: str            # "numeric" | "categorical" | "text" | "scores"
    test: str            # "ks" | "chi2" | "mmd" | "lsdd" | "welch-t" (the scores' mean)
    statistic: float
    p_value: float
    moved: bool          # flagged after the correction this detector applies
    effect: float        # numeric/scores KS: D (0..1); scores welch-t: mean after - before; categorical: total
                         # variation of shares; text: the statistic
    before: float | None  # numeric/scores: mean of present values; categorical: share of `category`
    after: float | None
    direction: str       # "up" | "down" | "changed" | "unchanged"
    category: str | None = None  # categorical/text: the value whose share changed most
    missing_before: float | None = None
    missing_after: float | None = None

    def describe(self) -> str:
        if self.kind in ("numeric", "scores") and self.before is not None and self.after is not None:
            measure = f"Welch t={self.statistic:.2f}" if self.test == "welch-t" else f"KS D={self.effect:.3f}"
            return (f"{self.feature}: mean {self.before:,.4g} -> {self.after:,.4g} ({self.direction}), "
                    f"{measure}, p={self.p_value:.2g}")
        if self.kind == "text":
            moved = f", most changed {self.category!r} {self.before:.1%} -> {self.after:.1%}" if self.category else ""
            return f"{self.feature}: {self.test} {self.statistic:.3g}, p={self.p_value:.2g}{moved}"
        if self.category is not None and self.before is not None and self.after is not None:
            return (f"{self.feature}: {self.category!r} {self.before:.1%} -> {self.after:.1%} of rows, "
                    f"total variation {self.effect:.3f}, p={self.p_value:.2g}")
        return f"{self.feature}: {self.test} statistic {self.statistic:.3g}, p={self.p_value:.2g}"


@dataclass(frozen=True)
class DriftResult:
    """A window's drift verdict: any detector flagged (`drift`), each detector's figures, what moved."""

    drift: bool
    status: str                      # "scored" | "too_small"
    window_size: int
    min_window: int
    p_val: float                     # the window-level false-alarm rate the bundle was fitted with
    detectors: tuple[DetectorOutcome, ...]
    features_moved: dict[str, FeatureShift]
    features: tuple[FeatureShift, ...] = ()   # every feature tested, moved or not
    message: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form, for run metadata and the drift report."""
        out = asdict(self)
        out["detectors"] = [asdict(d) for d in self.detectors]
        out["features_moved"] = {k: asdict(v) for k, v in self.features_moved.items()}
        out["features"] = [asdict(f) for f in self.features]
        return out


@dataclass(frozen=True)
class BundleConfig:
    """What `bundle.json` holds: everything needed to encode a window the way the reference was encoded."""

    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    text: tuple[str, ...]
    categories: dict[str, tuple[str, ...]]
    text_method: str
    correction: str
    p_val: float
    detector_p_val: float
    n_permutations: int
    seed: int
    min_window: int
    reference_rows: int
    score_rows: int
    text_dims: dict[str, int]
    numeric_means: dict[str, float | None]
    numeric_missing: dict[str, float]
    category_shares: dict[str, dict[str, float]]
    score_mean: float | None
    format_version: int = FORMAT_VERSION
    alibi_detect_version: str = ""
    created_at: str = ""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["numeric"], d["categorical"], d["text"] = list(self.numeric), list(self.categorical), list(self.text)
        d["categories"] = {k: list(v) for k, v in self.categories.items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], where: Path) -> BundleConfig:
        if d.get("format_version") != FORMAT_VERSION:
            raise DriftDetectorError(
                f"{where}: format_version {d.get('format_version')!r}, this code reads {FORMAT_VERSION}; "
                f"refit the detectors for this model version")
        try:
            return cls(**{**d, "numeric": tuple(d["numeric"]), "categorical": tuple(d["categorical"]),
                          "text": tuple(d["text"]),
                          "categories": {k: tuple(v) for k, v in d["categories"].items()}})
        except (KeyError, TypeError) as exc:
            raise DriftDetectorError(f"{where}: not a drift bundle description ({exc}); refit the detectors") from exc


# --- files: atomic writes and the manifest ------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (relative POSIX paths), written as `manifest.json`."""
    files = {p.relative_to(folder).as_posix(): sha256_file(p) for p in _files(folder)}
    _write_json(folder / MANIFEST, {"files": files, "algorithm": "sha256"})
    return files


def verify_manifest(folder: Path) -> dict[str, str]:
    """Check every file against `manifest.json`; raise naming the first file that is missing, extra or changed."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise DriftDetectorError(
            f"{manifest_path}: no manifest, so the detectors in {folder} cannot be verified; refit them "
            f"(fit_detectors) rather than trusting unverified files")
    try:
        expected: dict[str, str] = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DriftDetectorError(f"{manifest_path}: unreadable manifest ({exc}); refit the detectors") from exc
    present = {p.relative_to(folder).as_posix(): p for p in _files(folder)}
    for rel, digest in sorted(expected.items()):
        path = folder / rel
        if rel not in present:
            raise DriftDetectorError(f"{path}: listed in {manifest_path.name} but missing; refit the detectors")
        actual = sha256_file(path)
        if actual != digest:
            raise DriftDetectorError(
                f"{path}: sha256 {actual[:16]}... does not match {manifest_path.name} ({digest[:16]}...); the "
                f"detector file was changed after it was fitted. Refusing to load it: refit the detectors")
    extra = sorted(set(present) - set(expected))
    if extra:
        raise DriftDetectorError(
            f"{folder / extra[0]}: not listed in {manifest_path.name}; a file was added after the detectors were "
            f"fitted. Refusing to load: remove it or refit the detectors")
    return expected


# --- encoding -----------------------------------------------------------------------------------------------


def _require_columns(frame: pd.DataFrame, columns: list[str] | tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DriftDetectorError(f"{what} has no column(s) {missing}; it must carry every feature the detectors "
                                 f"were fitted on (present: {list(frame.columns)[:20]})")


def _numeric_block(frame: pd.DataFrame, columns: tuple[str, ...], what: str) -> np.ndarray:
    out = np.empty((len(frame), len(columns)), dtype=np.float64)
    for j, col in enumerate(columns):
        try:
            values = pd.to_numeric(frame[col], errors="raise").to_numpy(dtype=np.float64, na_value=np.nan)
        except (ValueError, TypeError) as exc:
            raise DriftDetectorError(f"{what}: numeric feature {col!r} holds non-numbers ({exc})") from exc
        if np.isinf(values).any():
            raise DriftDetectorError(f"{what}: numeric feature {col!r} holds infinite values")
        out[:, j] = np.where(np.isnan(values), _MISSING_NUMBER, values)
    return out


def _category_strings(series: pd.Series) -> np.ndarray:
    return series.astype(object).where(series.notna(), MISSING_CATEGORY).astype(str).to_numpy()


def _categorical_block(frame: pd.DataFrame, categories: dict[str, tuple[str, ...]],
                       columns: tuple[str, ...]) -> np.ndarray:
    out = np.empty((len(frame), len(columns)), dtype=np.float64)
    for j, col in enumerate(columns):
        codes = {v: float(i) for i, v in enumerate(categories[col])}
        out[:, j] = [codes.get(v, _UNSEEN_CODE) for v in _category_strings(frame[col])]
    return out


def _text_matrix(text_vectors: dict[str, np.ndarray], column: str, rows: int, dim: int | None, what: str) -> np.ndarray:
    if column not in text_vectors:
        raise DriftDetectorError(f"{what}: text_vectors has no entry for text feature {column!r} "
                                 f"(keys: {sorted(text_vectors)}); pass its sentence embeddings, one row per row")
    m = np.asarray(text_vectors[column], dtype=np.float32)
    if m.ndim != 2 or m.shape[0] != rows or (dim is not None and m.shape[1] != dim):
        want = f"({rows}, {dim if dim is not None else 'dim'})"
        raise DriftDetectorError(f"{what}: text_vectors[{column!r}] has shape {m.shape}, expected {want}: one "
                                 f"embedding per row, from the model the detectors were fitted with")
    if not np.isfinite(m).all():
        raise DriftDetectorError(f"{what}: text_vectors[{column!r}] holds non-finite values")
    return np.ascontiguousarray(m)


def _scores_vector(scores: np.ndarray | None, rows: int | None, what: str) -> np.ndarray | None:
    if scores is None:
        return None
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if rows is not None and s.shape[0] != rows:
        raise DriftDetectorError(f"{what}: scores has {s.shape[0]} values for {rows} rows; one score per decision")
    if not np.isfinite(s).all():
        raise DriftDetectorError(f"{what}: scores holds non-finite values")
    return s


# --- statistics ---------------------------------------------------------------------------------------------


def monte_carlo_p_value(observed: float, permuted: np.ndarray) -> float:
    """(1 + #{permuted >= observed}) / (1 + n): the permutation p-value that counts the observed statistic."""
    permuted = np.asarray(permuted, dtype=np.float64)
    return float((1 + np.count_nonzero(permuted >= observed)) / (1 + permuted.size))


def corrected_from_alibi(p_alibi: float, n_permutations: int) -> float:
    """alibi-detect's mean(observed <= permuted) turned into the Monte Carlo p-value (issue 960)."""
    exceed = int(round(p_alibi * n_permutations))
    return (1 + exceed) / (1 + n_permutations)


def correct(p_values: np.ndarray, alpha: float, method: str) -> tuple[float, np.ndarray]:
    """The family p-value (Bonferroni or Simes) and which members are flagged (Bonferroni or BH) at `alpha`."""
    p = np.asarray(p_values, dtype=np.float64)
    k = p.size
    if k == 0:
        return 1.0, np.zeros(0, dtype=bool)
    if method == "bonferroni":
        return float(min(1.0, k * p.min())), p <= alpha / k
    if method == "fdr":
        order = np.argsort(p)
        ranked = p[order]
        family = float(min(1.0, np.min(ranked * k / np.arange(1, k + 1))))
        below = np.nonzero(ranked <= alpha * np.arange(1, k + 1) / k)[0]
        flags = np.zeros(k, dtype=bool)
        if below.size:
            flags[order[: below.max() + 1]] = True
        return family, flags
    raise DriftDetectorError(f"correction {method!r}: use 'bonferroni' or 'fdr'")


def mean_shift_test(reference: np.ndarray, window: np.ndarray) -> tuple[float, float]:
    """Welch's t of the window's mean against the reference's (positive: the window's is higher), two-sided p.

    Welch, not Student: a shift that changes the mix of applicants changes the spread of the scores too.
    """
    from scipy.stats import ttest_ind

    res = ttest_ind(np.asarray(window, dtype=np.float64).reshape(-1),
                    np.asarray(reference, dtype=np.float64).reshape(-1), equal_var=False)
    return float(res.statistic), float(res.pvalue)


def scores_p_value(p_mean: float, p_ks: float, share: float = SCORE_MEAN_SHARE) -> float:
    """The score detector's p-value: weighted Bonferroni of the mean test (at `share` of the level) and KS."""
    return float(min(1.0, p_mean / share, p_ks / (1.0 - share)))


def _perm_assignments(total: int, window: int, n_permutations: int, seed: int):
    """(1 + n) x total 0/1 rows marking the 'window' side: the observed split first, then random ones."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    assign = torch.zeros(n_permutations + 1, total, dtype=torch.float32)
    assign[0, total - window:] = 1.0
    for i in range(1, n_permutations + 1):
        assign[i, torch.randperm(total, generator=gen)[:window]] = 1.0
    return assign


def mmd2_permutation_test(kernel_matrix, window: int, n_permutations: int, seed: int) -> tuple[float, np.ndarray]:
    """Unbiased MMD^2 of the last `window` rows against the rest, and the same under n random relabellings.

    The statistic only needs, per labelling a, q = a'K0a and a'r (K0: kernel with zero diagonal, r: its row
    sums), so all labellings come from one matrix product instead of one matrix copy each. Subtracting a
    constant from every off-diagonal entry leaves unbiased MMD^2 unchanged; centring them keeps float32 sums
    of 36 million entries accurate to far below the permutation spread.
    """
    import torch

    k = kernel_matrix.to(torch.float32).clone()
    total = k.shape[0]
    ref = total - window
    k.fill_diagonal_(0.0)
    centre = k.sum() / (total * (total - 1))
    k -= centre
    k.fill_diagonal_(0.0)
    r = k.sum(dim=1)
    t = r.sum()
    assign = _perm_assignments(total, window, n_permutations, seed)
    q = ((assign @ k) * assign).sum(dim=1)
    ar = assign @ r
    s_yy, s_xy = q, ar - q
    s_xx = t - 2 * ar + q
    stat = s_xx / (ref * (ref - 1)) + s_yy / (window * (window - 1)) - 2 * s_xy / (ref * window)
    stat = stat.double().numpy()
    return float(stat[0]), stat[1:]


# --- the bundle ---------------------------------------------------------------------------------------------


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
            s = _scores_vector(scores, rows, what)
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
        _require_columns(frame, [*cfg.numeric, *cfg.categorical], what)
        return np.hstack([_numeric_block(frame, cfg.numeric, what),
                          _categorical_block(frame, cfg.categories, cfg.categorical)])

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
                win = pd.Series(_category_strings(window[col])).value_counts(normalize=True)
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
        x = _text_matrix(text_vectors, col, len(window), cfg.text_dims[col], what)
        statistic, p = text_test(self._text[col], x, cfg.text_method, cfg.n_permutations, cfg.seed)
        drift = p <= cfg.detector_p_val
        top, before, after = None, None, None
        ref_texts = cfg.category_shares.get(f"text:{col}")
        if col in window.columns and ref_texts is not None:
            # The raw texts say which value (a job title) became more or less common; the size of the move is
            # the embedding statistic, since shares of free text differ between any two samples.
            win = pd.Series(_category_strings(window[col])).str.strip().str.lower().value_counts(normalize=True)
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


def text_test(detector: Any, x: np.ndarray, method: str, n_permutations: int, seed: int) -> tuple[float, float]:
    """(statistic, calibrated p-value) of one text detector on a window's embeddings; see the module docstring."""
    import torch

    inner = detector._detector  # the backend detector: alibi-detect's wrapper keeps it here
    if method == "mmd":
        x_ref = torch.from_numpy(np.asarray(inner.x_ref, dtype=np.float32))
        with torch.no_grad():
            kmat = inner.kernel_matrix(x_ref, torch.from_numpy(x))
        observed, permuted = mmd2_permutation_test(kmat, x.shape[0], n_permutations, seed)
        return observed, monte_carlo_p_value(observed, permuted)
    if method == "lsdd":
        # alibi-detect draws its permutations from torch's global generator: seed it in a forked state so a
        # window always gets the same p-value and the caller's random stream is left alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            p_alibi, statistic, _ = inner.score(x)
        return float(statistic), corrected_from_alibi(float(p_alibi), inner.n_permutations)
    raise DriftDetectorError(f"text_method {method!r}: use 'mmd' or 'lsdd'")


# --- fit, save, load ----------------------------------------------------------------------------------------


def _quiet_alibi() -> None:
    import logging

    logging.getLogger("alibi_detect").setLevel(logging.ERROR)


def fit_detectors(reference: pd.DataFrame, numeric: list[str], categorical: list[str],
                  text_vectors: dict[str, np.ndarray], scores: np.ndarray | None, out_dir: Path,
                  p_val: float = 0.05, seed: int = 0, *, text_method: str = "mmd", correction: str = "fdr",
                  n_permutations: int = DEFAULT_PERMUTATIONS, min_window: int = MIN_WINDOW) -> DetectorBundle:
    """Fit every detector on `reference` (a model version's training split) and save them in `out_dir`.

    `text_vectors` maps each text column to its embeddings, row for row with `reference`. `scores` are the
    model's probabilities on rows like the reference's, and need not be as many: pass scores the model did
    not train on (its validation split, or cross-fitted predictions). A model is more confident on its own
    training rows, so in-sample scores make the reference look unlike any new traffic; for a logistic
    regression the difference is small (benchmarks/README.md), for a network that fits its training rows
    closely it is not. The folder is replaced as a whole, atomically: readers see the old bundle or the new
    one, never a mix.
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
    _require_columns(reference, [*numeric, *categorical], what)
    overlap = set(numeric) & set(categorical)
    if overlap:
        raise DriftDetectorError(f"{what}: column(s) {sorted(overlap)} listed as both numeric and categorical")
    ref_scores = _scores_vector(scores, None, what)
    if ref_scores is not None and ref_scores.size < min_window:
        raise DriftDetectorError(f"{what}: {ref_scores.size} reference scores, fewer than min_window={min_window}")
    text_cols = tuple(text_vectors)
    text_mats = {c: _text_matrix(text_vectors, c, len(reference), None, what) for c in text_cols}

    n_detectors = (1 if numeric or categorical else 0) + len(text_cols) + (1 if ref_scores is not None else 0)
    if n_detectors == 0:
        raise DriftDetectorError(f"{what}: nothing to detect drift on: no features, no text vectors, no scores")
    detector_p_val = p_val / n_detectors

    categories = {c: tuple(sorted(set(_category_strings(reference[c])))) for c in categorical}
    shares: dict[str, dict[str, float]] = {
        c: {k: float(v) for k, v in pd.Series(_category_strings(reference[c])).value_counts(normalize=True).items()}
        for c in categorical}
    for c in text_cols:
        if c in reference.columns:
            texts = pd.Series(_category_strings(reference[c])).str.strip().str.lower()
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
        _write_json(staging / BUNDLE_FILE, config.to_json())
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
    verify_manifest(out_dir)
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


# --- the plot -----------------------------------------------------------------------------------------------


def drift_plot(result: DriftResult, reference: pd.DataFrame, window: pd.DataFrame, path: Path,
               reference_scores: np.ndarray | None = None, window_scores: np.ndarray | None = None,
               max_panels: int = 6) -> Path:
    """A PNG of what moved: each detector's p-value against its level, then the features that moved most.

    Numeric features and scores are drawn as the two empirical CDFs (what KS compares); categorical features
    and texts as the shares of the values that changed most. Written atomically; returns `path`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    shown = sorted(result.features_moved.values(), key=lambda f: f.p_value)
    if not shown:  # nothing moved: still show the closest calls, so a reader sees what was checked
        shown = sorted(result.features, key=lambda f: f.p_value)[:2]
    # the score detector's two tests share one picture (the two CDFs): draw it once
    first_scores = next((f for f in shown if f.kind == "scores"), None)
    shown = [f for f in shown if f.kind != "scores" or f is first_scores][:max_panels]
    panels = 1 + len(shown)
    cols = min(3, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    flat = list(axes.reshape(-1))
    ax = flat[0]
    if result.detectors:
        names = [d.name for d in result.detectors]
        ps = [max(d.p_value, 1e-300) for d in result.detectors]
        colors = ["tab:red" if d.drift else "tab:gray" for d in result.detectors]
        ax.barh(names, [-math.log10(p) for p in ps], color=colors)
        ax.axvline(-math.log10(result.detectors[0].threshold), color="black", ls="--", lw=1, label="level")
        ax.set_xlabel("-log10 p-value (right of the line: drift)")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"window of {result.window_size}: {'DRIFT' if result.drift else result.status}")
    for ax, shift in zip(flat[1:], shown, strict=False):
        col = shift.feature
        if shift.kind in ("numeric", "scores"):
            if shift.kind == "scores":
                before_v, after_v = reference_scores, window_scores
            else:
                before_v = pd.to_numeric(reference.get(col), errors="coerce") if col in reference else None
                after_v = pd.to_numeric(window.get(col), errors="coerce") if col in window else None
            if before_v is None or after_v is None:
                ax.text(0.5, 0.5, f"{col}: values not given", ha="center", transform=ax.transAxes)
            else:
                for values, label in ((before_v, "reference"), (after_v, "window")):
                    v = np.sort(pd.Series(values).dropna().to_numpy(dtype=float))
                    ax.step(v, np.arange(1, v.size + 1) / max(v.size, 1), where="post", label=label)
                if col == "annual_income" or (before_v is not None and pd.Series(before_v).max() > 1e4):
                    ax.set_xscale("symlog")
                ax.set_ylabel("share of rows at or below")
                ax.legend(fontsize=8)
        else:
            if col in reference and col in window:
                norm = (lambda s: pd.Series(_category_strings(s)).str.strip().str.lower()) if shift.kind == "text" \
                    else (lambda s: pd.Series(_category_strings(s)))
                b = norm(reference[col]).value_counts(normalize=True)
                a = norm(window[col]).value_counts(normalize=True)
                both = b.index.union(a.index)
                diff = (a.reindex(both, fill_value=0) - b.reindex(both, fill_value=0))
                top = diff.abs().sort_values(ascending=False).index[:8][::-1]
                y = np.arange(len(top))
                ax.barh(y - 0.2, b.reindex(top, fill_value=0).to_numpy(), height=0.4, label="reference")
                ax.barh(y + 0.2, a.reindex(top, fill_value=0).to_numpy(), height=0.4, label="window")
                ax.set_yticks(y, [str(t)[:24] for t in top], fontsize=7)
                ax.set_xlabel("share of rows")
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, f"{col}: values not given", ha="center", transform=ax.transAxes)
        ax.set_title(f"{col} ({shift.test}, p={shift.p_value:.2g}{', moved' if shift.moved else ''})", fontsize=9)
    for ax in flat[1 + len(shown):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=90)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path


__all__ = ["MIN_WINDOW", "BundleConfig", "DetectorBundle", "DetectorOutcome", "DriftDetectorError", "DriftResult",
           "FeatureShift", "correct", "drift_plot", "fit_detectors", "load_detectors", "monte_carlo_p_value",
           "corrected_from_alibi", "mean_shift_test", "mmd2_permutation_test", "scores_p_value", "verify_manifest",
           "write_manifest"]
