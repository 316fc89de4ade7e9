"""What the drift detectors say: their constants, errors, per-window verdicts and the bundle's description.

Plain value objects; no ML library is imported here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MIN_WINDOW = 200
DEFAULT_PERMUTATIONS = 300
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
