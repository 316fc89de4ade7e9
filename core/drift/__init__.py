"""Drift detection: statistics (`stats`), encoding (`encoding`), the detector bundle (`bundle`), its plot
(`plot`) and the value objects they return (`results`)."""

from core.drift.bundle import DetectorBundle, fit_detectors, load_detectors
from core.drift.plot import drift_plot
from core.drift.results import (DEFAULT_PERMUTATIONS, MIN_WINDOW, MISSING_CATEGORY, SCORE_MEAN_SHARE, BundleConfig,
                                DetectorOutcome, DriftDetectorError, DriftResult, FeatureShift)
from core.drift.stats import (correct, corrected_from_alibi, mean_shift_test, mmd2_permutation_test,
                              monte_carlo_p_value, scores_p_value, text_test)

__all__ = ["DEFAULT_PERMUTATIONS", "MIN_WINDOW", "MISSING_CATEGORY", "SCORE_MEAN_SHARE", "BundleConfig",
           "DetectorBundle", "DetectorOutcome", "DriftDetectorError", "DriftResult", "FeatureShift", "correct",
           "corrected_from_alibi", "drift_plot", "fit_detectors", "load_detectors", "mean_shift_test",
           "mmd2_permutation_test", "monte_carlo_p_value", "scores_p_value", "text_test"]
