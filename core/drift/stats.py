"""The statistics behind the detectors: permutation p-values, multiple-testing corrections, the score tests.

alibi-detect's permutation p-value is the share of permuted statistics at or above the observed one, leaving the
observed statistic out (alibi-detect issue 960): it can be 0 and is slightly anti-conservative. Here the p-value
is (1 + #{permuted >= observed}) / (1 + n_permutations), the Monte Carlo p-value, exact under "no drift". For MMD
the permutations are computed in one batched product over alibi-detect's own kernel matrix (its loop copies the
kernel matrix per permutation); for LSDD alibi-detect's count is recovered from its p-value and corrected.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from core.drift.results import SCORE_MEAN_SHARE, DriftDetectorError

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
