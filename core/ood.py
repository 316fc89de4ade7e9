"""Out-of-distribution inputs: a row unlike anything the model learned from, scored on the model's own inputs.

The detector is alibi-detect's `Mahalanobis` outlier detector on its PyTorch backend, fitted per model version
at evaluation on the version's prepared feature matrix (standardized numeric values with their missing flags,
one-hot categories, sentence embeddings: exactly what the network reads) of its training split. Its score is
the squared Mahalanobis distance of a row from the training rows (eigen-directions with variance under
`min_eigenvalue` left out); the threshold is the `quantile` (default 0.995) of the scores of held-out rows (the
validation and test splits, which the detector never saw), so about 1 - quantile of real applicants are
flagged, and a row far outside the data (a uniform random applicant, an income of a billion) always is.

Why Mahalanobis: scoring is one centring and one matrix product per row (benchmarks/README.md measures the
cost per row, target 0.5 ms), it needs no training loop, and its state is two arrays. alibi-detect 0.13 cannot
`save_detector` its new-style outlier detectors, so the fitted state (the mean and the scaled eigenvectors) is
saved as `.npy` arrays read back without pickle, with `ood.json` (threshold, quantile, sizes); the bundle's
manifest (core/drift/bundle.py) covers the folder, and the version tag `drift_detectors_sha256` names that
manifest, so a server verifies the detector like the drift detectors before it scores with it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.files import atomic_write_json_local

OOD_FOLDER = "ood"  # inside a version's detector bundle
OOD_FILE = "ood.json"
DEFAULT_QUANTILE = 0.995
MIN_EIGENVALUE = 1e-6
MIN_HELD_OUT = 50


class OodError(ValueError):
    """A detector that cannot be fitted or loaded; the message names the folder or the matrix and what to do."""


@dataclass(frozen=True)
class OodScores:
    """One score per row and whether it is above the version's threshold."""

    scores: np.ndarray
    flagged: np.ndarray
    threshold: float


class OodDetector:
    """A fitted (or loaded) detector: `score(x)` on rows of the version's prepared feature matrix."""

    def __init__(self, detector: Any, threshold: float, quantile: float, dims: int, meta: dict[str, Any]):
        self._detector, self.threshold, self.quantile, self.dims, self.meta = detector, threshold, quantile, dims, meta

    def score(self, x: np.ndarray) -> OodScores:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dims:
            raise OodError(f"out-of-distribution detector: rows of {self.dims} prepared features expected, got shape "
                           f"{x.shape}; the detector belongs to another model version")
        scores = np.asarray(self._detector.score(x), dtype=np.float64).reshape(-1)
        return OodScores(scores=scores, flagged=scores > self.threshold, threshold=self.threshold)


def _mahalanobis() -> Any:
    import logging

    logging.getLogger("alibi_detect").setLevel(logging.ERROR)
    from alibi_detect.od import _mahalanobis  # noqa: F401  (the new-style detector; `od.Mahalanobis` is the old one)

    return _mahalanobis.Mahalanobis(min_eigenvalue=MIN_EIGENVALUE, backend="pytorch", device="cpu")


def fit_ood(x_ref: np.ndarray, x_held_out: np.ndarray, out_dir: Path, quantile: float = DEFAULT_QUANTILE) -> OodDetector:
    """Fit on `x_ref` (training rows), set the threshold at `quantile` of `x_held_out`'s scores, save in `out_dir`."""
    x_ref = np.asarray(x_ref, dtype=np.float32)
    x_held_out = np.asarray(x_held_out, dtype=np.float32)
    if not 0.5 <= quantile < 1:
        raise OodError(f"out-of-distribution quantile {quantile}: use a value in [0.5, 1), e.g. 0.995 (about 0.5% of "
                       "real applicants flagged)")
    if x_ref.ndim != 2 or len(x_ref) <= x_ref.shape[1] // 4 or len(x_ref) < 10:
        raise OodError(f"out-of-distribution reference of shape {x_ref.shape}: too few training rows to fit a "
                       "covariance; the detector needs more rows than a quarter of its features")
    if x_held_out.ndim != 2 or x_held_out.shape[1] != x_ref.shape[1] or len(x_held_out) < MIN_HELD_OUT:
        raise OodError(f"out-of-distribution held-out rows of shape {x_held_out.shape}: at least {MIN_HELD_OUT} rows "
                       f"of {x_ref.shape[1]} features are needed to set the threshold")
    if not (np.isfinite(x_ref).all() and np.isfinite(x_held_out).all()):
        raise OodError("out-of-distribution reference: the prepared feature matrix has NaN or infinite values")
    det = _mahalanobis()
    det.fit(x_ref)
    held = np.asarray(det.score(x_held_out), dtype=np.float64)
    threshold = float(np.quantile(held, quantile, method="higher"))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backend = det.backend
    np.save(out_dir / "means.npy", backend.means.numpy().astype(np.float32))
    np.save(out_dir / "pcs.npy", backend.pcs.numpy().astype(np.float32))
    import alibi_detect

    meta = {"method": "mahalanobis", "backend": "pytorch", "quantile": quantile, "threshold": threshold,
            "dims": int(x_ref.shape[1]), "components": int(backend.pcs.shape[1]), "reference_rows": len(x_ref),
            "held_out_rows": len(x_held_out), "held_out_flagged": float(np.mean(held > threshold)),
            "min_eigenvalue": MIN_EIGENVALUE, "alibi_detect_version": alibi_detect.__version__,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_json_local(out_dir / OOD_FILE, meta)
    return OodDetector(det, threshold, quantile, int(x_ref.shape[1]), meta)


def load_ood(folder: Path) -> OodDetector:
    """The detector saved in `folder` (no pickle). Verify the folder (its bundle's manifest) before calling this."""
    import torch

    folder = Path(folder)
    try:
        meta = json.loads((folder / OOD_FILE).read_text())
        means = np.load(folder / "means.npy", allow_pickle=False)
        pcs = np.load(folder / "pcs.npy", allow_pickle=False)
        threshold, quantile, dims = float(meta["threshold"]), float(meta["quantile"]), int(meta["dims"])
    except (OSError, ValueError, KeyError) as exc:
        raise OodError(f"{folder}: not an out-of-distribution detector ({type(exc).__name__}: {exc}); re-evaluate "
                       "the version to refit it") from None
    if means.shape != (dims,) or pcs.ndim != 2 or pcs.shape[0] != dims:
        raise OodError(f"{folder}: arrays of shape {means.shape} and {pcs.shape} do not match dims={dims} in "
                       f"{OOD_FILE}; re-evaluate the version to refit it")
    det = _mahalanobis()
    det.backend.means = torch.from_numpy(means)
    det.backend.pcs = torch.from_numpy(pcs)
    det.backend._set_fitted()
    return OodDetector(det, threshold, quantile, dims, meta)
