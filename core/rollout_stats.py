"""The tests a rollout step's analysis runs, as pure functions: each figure with its sample size, its verdict, and
what a test of that size can and cannot tell (Dagster-free; numpy and scipy, alibi-detect for the score KS).

Verdicts: `pass` (no evidence against the challenger), `hold` (not enough evidence yet), `rollback` (worse with
significance). "Can tell" is the smallest harm the test would detect four times in five at this size (80% power,
one-sided at `alpha`): below it, "no significant difference" means "too few decisions to tell", not "equal".

- Live AUC: DeLong's test (Sun and Xu's fast form), paired when both versions scored the same decisions (a shadow
  step: the challenger's shadow decision and the champion's answer of the same request), unpaired when each
  answered its own requests (a canary step). H0: the challenger's AUC is at most `tolerance` below the champion's.
- Failed rows: Fisher's exact test, one-sided, challenger against champion.
- Latency: a one-sided binomial test that more than `allowed` of the challenger's decisions took longer than the
  SLO (a p99 within the SLO is 1% allowed above it).
- Fairness: the flag rate (decision 1, the fairness gate's selection rate) per sensitive group on live decisions;
  the largest gap between two measurable groups against the gate's threshold, one-sided z test. The two groups
  are the extreme ones, chosen after looking among k groups, so the test is corrected for having looked: the gap
  is significant only at `alpha / (k (k - 1) / 2)` (Bonferroni over the pairs it could have picked), which keeps
  the chance of rolling back a version whose every true gap is within the limit at most `alpha`.
- Scores: alibi-detect's `KSDrift` between the two versions' scores; informative (a retrain on shifted data is
  expected to score differently), never a verdict of its own.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from core.lazy import np

PASS, HOLD, ROLLBACK = "pass", "hold", "rollback"
POWER_Z = 0.8416  # z of 80% power


def _z(alpha: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(1 - alpha))


def _norm_sf(x: float) -> float:
    from scipy.stats import norm

    return float(norm.sf(x))


@dataclass(frozen=True)
class Figure:
    """One check's figures: what was measured, on how many, the verdict and the sentence a person reads."""

    name: str
    verdict: str
    text: str
    can_tell: str
    values: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --- AUC -------------------------------------------------------------------------------------------------------


def _midrank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    z = x[order]
    n = len(x)
    ranks = np.zeros(n, dtype=np.float64)
    i = 0
    while i < n:
        j = i
        while j < n and z[j] == z[i]:
            j += 1
        ranks[i:j] = 0.5 * (i + j - 1) + 1
        i = j
    out = np.empty(n, dtype=np.float64)
    out[order] = ranks
    return out


def delong_components(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(AUCs, V10, V01) for k score rows on the same cases (k x n `scores`): DeLong's structural components."""
    y = np.asarray(y).astype(bool)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    pos, neg = scores[:, y], scores[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    k = scores.shape[0]
    aucs, v10, v01 = np.empty(k), np.empty((k, m)), np.empty((k, n))
    for r in range(k):
        tx, ty = _midrank(pos[r]), _midrank(neg[r])
        tz = _midrank(np.concatenate([pos[r], neg[r]]))
        aucs[r] = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
        v10[r] = (tz[:m] - tx) / n
        v01[r] = 1.0 - (tz[m:] - ty) / m
    return aucs, v10, v01


def _auc_var(v10: np.ndarray, v01: np.ndarray) -> np.ndarray:
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((v10.shape[0],) * 2)
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((v01.shape[0],) * 2)
    return s10 / m + s01 / n


def measurable(y: np.ndarray) -> bool:
    y = np.asarray(y)
    return len(y) >= 4 and 2 <= int(y.sum()) <= len(y) - 2


def compare_auc(y_challenger: np.ndarray, p_challenger: np.ndarray, y_champion: np.ndarray,
                p_champion: np.ndarray, paired: bool, tolerance: float, alpha: float,
                min_outcomes: int) -> Figure:
    """The challenger's live AUC against the champion's; paired: the same decisions (y) scored by both."""
    n1, n0 = len(y_challenger), len(y_champion)
    base = {"challenger_outcomes": n1, "champion_outcomes": n0, "paired": paired, "tolerance": tolerance,
            "min_outcomes": min_outcomes}
    if n1 < min_outcomes or not (measurable(y_challenger) and measurable(y_champion)):
        need = max(min_outcomes, 4)
        verdict = HOLD if min_outcomes else PASS
        why = (f"{n1} of the challenger's decisions have an outcome ({n0} of the champion's); the live AUC needs "
               f"{need} with both classes" + ("" if min_outcomes else "; this step does not wait for outcomes"))
        return Figure("live_auc", verdict, why, "nothing yet: no AUC is measured", base)
    if paired:
        aucs, v10, v01 = delong_components(y_challenger, np.vstack([p_challenger, p_champion]))
        cov = _auc_var(v10, v01)
        var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    else:
        a1, v10a, v01a = delong_components(y_challenger, p_challenger)
        a0, v10b, v01b = delong_components(y_champion, p_champion)
        aucs = np.array([a1[0], a0[0]])
        var = float(_auc_var(v10a, v01a)[0, 0] + _auc_var(v10b, v01b)[0, 0])
    se = math.sqrt(max(var, 1e-12))
    drop = float(aucs[1] - aucs[0])
    p_worse = _norm_sf((drop - tolerance) / se)
    upper = drop + _z(alpha) * se
    detectable = tolerance + (_z(alpha) + POWER_Z) * se
    values = {**base, "challenger_auc": round(float(aucs[0]), 4), "champion_auc": round(float(aucs[1]), 4),
              "drop": round(drop, 4), "se": round(se, 4), "p_worse": float(f"{p_worse:.3g}"),
              "drop_upper_bound": round(upper, 4), "detectable_drop": round(detectable, 4)}
    kind = "paired (the same decisions)" if paired else "unpaired (each on its own requests)"
    figures = (f"live AUC {aucs[0]:.3f} (challenger, {n1} outcomes) vs {aucs[1]:.3f} (champion, {n0}); "
               f"DeLong {kind}: drop {drop:+.3f}, p = {p_worse:.3g} that it exceeds the tolerance {tolerance}")
    can_tell = (f"at this size a drop larger than {detectable:.3f} would be detected 4 times in 5; the drop is below "
                f"{upper:.3f} with {1 - alpha:.0%} confidence")
    if p_worse < alpha:
        return Figure("live_auc", ROLLBACK, f"worse with significance: {figures}", can_tell, values)
    return Figure("live_auc", PASS, f"not significantly worse: {figures}", can_tell, values)


# --- failures, latency -----------------------------------------------------------------------------------------


def compare_failures(challenger_failed: int, challenger_rows: int, champion_failed: int, champion_rows: int,
                     tolerance: float, alpha: float) -> Figure:
    """Rows each version failed to score (an error, or no finite score) out of the rows it was given."""
    from scipy.stats import fisher_exact

    n1, n0 = challenger_rows, champion_rows
    r1 = challenger_failed / n1 if n1 else 0.0
    r0 = champion_failed / n0 if n0 else 0.0
    values = {"challenger_failed": challenger_failed, "challenger_rows": n1, "champion_failed": champion_failed,
              "champion_rows": n0, "challenger_rate": round(r1, 5), "champion_rate": round(r0, 5),
              "tolerance": tolerance}
    if not n1:
        return Figure("errors", HOLD, "the challenger was given no rows in this step yet", "nothing yet", values)
    p = float(fisher_exact([[challenger_failed, n1 - challenger_failed], [champion_failed, max(n0 - champion_failed,
                                                                                               0)]],
                           alternative="greater")[1]) if n0 else 1.0
    values["p_worse"] = float(f"{p:.3g}")
    base = max(r0, 1.0 / max(n0, 1))
    detectable = tolerance + (_z(alpha) + POWER_Z) * math.sqrt(base * (1 - base) * (1 / n1 + 1 / max(n0, 1)))
    can_tell = (f"an increase in the failure rate above {detectable:.2%} would be detected 4 times in 5"
                + (f"; with no failure in {n1} rows the challenger's rate is below {3 / n1:.2%} (95%)"
                   if challenger_failed == 0 else ""))
    text = (f"challenger failed {challenger_failed} of {n1} rows ({r1:.2%}), champion {champion_failed} of {n0} "
            f"({r0:.2%}); Fisher exact p = {p:.3g}")
    if p < alpha and r1 - r0 > tolerance:
        return Figure("errors", ROLLBACK, f"fails more with significance: {text}", can_tell, values)
    return Figure("errors", PASS, text, can_tell, values)


def latency_exceedance(challenger_ms: np.ndarray, champion_ms: np.ndarray, slo_ms: float, allowed: float,
                       alpha: float) -> Figure:
    """The share of the challenger's decisions slower than the SLO against `allowed` (binomial, one-sided).

    Where the champion is over `allowed` too on the same step's traffic (a loaded machine, a burst: the serving
    capacity, not the challenger), the challenger is compared with the champion instead (Fisher's exact test,
    one-sided, and a share at least `allowed` above the champion's), and the figure says both are over the SLO."""
    from scipy.stats import binomtest, fisher_exact

    c1, c0 = np.asarray(challenger_ms, dtype=float), np.asarray(champion_ms, dtype=float)
    n = len(c1)
    values: dict[str, Any] = {"challenger_decisions": n, "champion_decisions": len(c0), "slo_ms": slo_ms,
                              "allowed_share": allowed}
    for name, arr in (("challenger", c1), ("champion", c0)):
        if len(arr):
            values[f"{name}_p50_ms"] = round(float(np.percentile(arr, 50)), 2)
            values[f"{name}_p99_ms"] = round(float(np.percentile(arr, 99)), 2)
    if not n:
        return Figure("latency", HOLD, "no decision of the challenger in this step yet", "nothing yet", values)
    k = int((c1 > slo_ms).sum())
    p = float(binomtest(k, n, allowed, alternative="greater").pvalue)
    values.update({"challenger_over_slo": k, "champion_over_slo": int((c0 > slo_ms).sum()), "p_over": float(f"{p:.3g}")})
    detectable = allowed + (_z(alpha) + POWER_Z) * math.sqrt(max(allowed * (1 - allowed), 1e-6) / n)
    can_tell = f"a share above the SLO of {detectable:.2%} or more would be detected 4 times in 5"
    text = (f"challenger p99 {values['challenger_p99_ms']:.1f} ms, {k} of {n} decisions over {slo_ms:g} ms "
            f"(allowed {allowed:.0%}; champion p99 {values.get('champion_p99_ms', float('nan')):.1f} ms); binomial "
            f"p = {p:.3g}")
    k0, n0 = int((c0 > slo_ms).sum()), len(c0)
    if n0 and k0 / n0 > allowed:
        p_rel = float(fisher_exact([[k, n - k], [k0, n0 - k0]], alternative="greater")[1])
        values["p_over_champion"] = float(f"{p_rel:.3g}")
        text += (f"; BOTH versions are over the SLO on this traffic (champion {k0} of {n0}): compared with the "
                 f"champion, Fisher p = {p_rel:.3g}")
        if p_rel < alpha and k / n - k0 / n0 > allowed:
            return Figure("latency", ROLLBACK, f"slower than the champion with significance: {text}", can_tell,
                          values)
        return Figure("latency", PASS, f"not significantly slower than the champion: {text}", can_tell, values)
    if p < alpha:
        return Figure("latency", ROLLBACK, f"slower than the SLO with significance: {text}", can_tell, values)
    return Figure("latency", PASS, text, can_tell, values)


# --- fairness --------------------------------------------------------------------------------------------------


def group_rates(groups: list[str], decisions: list[int]) -> dict[str, tuple[int, int]]:
    """group -> (flagged, decisions)."""
    out: dict[str, list[int]] = {}
    for g, d in zip(groups, decisions):
        out.setdefault(g, [0, 0])
        out[g][0] += int(d)
        out[g][1] += 1
    return {g: (v[0], v[1]) for g, v in sorted(out.items())}


def parity_gap(rates: dict[str, tuple[int, int]], min_group_size: int) -> tuple[str, str, float, float, int] | None:
    """(highest group, lowest group, gap, its standard error, pairs it was picked from) over measurable groups;
    None under two of them."""
    measured = {g: (k, n) for g, (k, n) in rates.items() if n >= min_group_size and g != "missing"}
    if len(measured) < 2:
        return None
    share = {g: k / n for g, (k, n) in measured.items()}
    hi, lo = max(share, key=share.get), min(share, key=share.get)
    se = math.sqrt(sum(max(share[g] * (1 - share[g]), 0.25 / measured[g][1]) / measured[g][1] for g in (hi, lo)))
    return hi, lo, share[hi] - share[lo], se, len(measured) * (len(measured) - 1) // 2


def compare_parity(feature: str, challenger: dict[str, tuple[int, int]], champion: dict[str, tuple[int, int]],
                   threshold: float, min_group_size: int, alpha: float, approved_gap: bool) -> Figure:
    """The challenger's live flag-rate gap between sensitive groups against the fairness gate's threshold.

    Where the champion's gap on the same traffic is over the threshold too (live traffic unlike the test split,
    or a version a person approved over the fairness gate), the limit is the champion's gap: the rollout decides
    which of the two serves, and holding back a challenger no less fair than the champion changes nothing for the
    people decided about. Then the challenger is rolled back only when significantly worse than the champion,
    and the figure says that both versions are over the threshold on live traffic (a finding for the owner)."""
    ours, theirs = parity_gap(challenger, min_group_size), parity_gap(champion, min_group_size)
    values: dict[str, Any] = {"feature": feature, "threshold": threshold, "min_group_size": min_group_size,
                              "challenger_groups": {g: list(v) for g, v in challenger.items()},
                              "champion_groups": {g: list(v) for g, v in champion.items()}}
    if theirs is not None:
        values["champion_gap"] = round(theirs[2], 4)
    if ours is None:
        sizes = ", ".join(f"{g} {n}" for g, (_, n) in challenger.items()) or "no group known"
        return Figure(f"fairness:{feature}", HOLD,
                      f"{feature}: fewer than two groups with {min_group_size} of the challenger's decisions "
                      f"({sizes}); parity cannot be measured yet (callers send {feature} as an audit-only field)",
                      "nothing yet", values)
    hi, lo, gap, se, pairs = ours
    level = alpha / pairs  # the extremes were picked among `pairs` pairs after looking (Bonferroni)
    limit = threshold
    relative = theirs is not None and theirs[2] > threshold
    if relative:
        limit = theirs[2]  # the champion is over the threshold on this traffic: the challenger may not be worse
    p = _norm_sf((gap - limit) / se)
    values.update({"challenger_gap": round(gap, 4), "highest": hi, "lowest": lo, "se": round(se, 4),
                   "limit": round(limit, 4), "p_over": float(f"{p:.3g}"), "pairs": pairs,
                   "significance_level": float(f"{level:.3g}")})
    rates = {g: k / n for g, (k, n) in challenger.items() if n}
    text = (f"{feature}: flag rate {hi} {rates[hi]:.3f} ({challenger[hi][1]}) vs {lo} {rates[lo]:.3f} "
            f"({challenger[lo][1]}): gap {gap:.3f} against {limit:.3f}"
            + ((" (the champion's live gap: this version was approved over the fairness gate)" if approved_gap else
                f" (the champion's live gap: BOTH versions are over compliance.max_demographic_parity_difference "
                f"{threshold:g} on live traffic)") if relative else " (compliance.max_demographic_parity_difference)")
            + (f", champion's gap {theirs[2]:.3f}" if theirs is not None else "")
            + f"; p = {p:.3g} against {level:.3g} (alpha {alpha:g} over the {pairs} pair(s) of groups)")
    can_tell = (f"a gap more than {(_z(level) + POWER_Z) * se:.3f} above the limit would be detected 4 times in 5 (the "
                f"two groups compared are the extremes of {pairs} pair(s), so the test asks for alpha / {pairs})")
    if gap > limit and p < level:
        return Figure(f"fairness:{feature}", ROLLBACK, f"a live fairness breach: {text}", can_tell, values)
    if gap > limit and not relative:
        return Figure(f"fairness:{feature}", HOLD, f"over the limit, not yet significantly: {text}", can_tell, values)
    if relative:
        return Figure(f"fairness:{feature}", PASS, f"not significantly less fair than the champion: {text}",
                      can_tell, values)
    return Figure(f"fairness:{feature}", PASS, text, can_tell, values)


# --- scores ----------------------------------------------------------------------------------------------------


def score_shift(champion: np.ndarray, challenger: np.ndarray, alpha: float) -> Figure:
    """The two versions' score distributions compared with alibi-detect's KSDrift (informative)."""
    c0, c1 = np.asarray(champion, dtype=np.float32), np.asarray(challenger, dtype=np.float32)
    values: dict[str, Any] = {"champion_scores": len(c0), "challenger_scores": len(c1)}
    if len(c0) < 10 or len(c1) < 10:
        return Figure("scores", PASS, "too few scores to compare", "nothing yet", values)
    from alibi_detect.cd import KSDrift

    detector = KSDrift(c0.reshape(-1, 1), p_val=alpha)
    out = detector.predict(c1.reshape(-1, 1))["data"]
    d = float(np.asarray(out["distance"]).reshape(-1)[0])
    p = float(np.asarray(out["p_val"]).reshape(-1)[0])
    values.update({"ks_distance": round(d, 4), "p_value": float(f"{p:.3g}"),
                   "champion_mean": round(float(c0.mean()), 4), "challenger_mean": round(float(c1.mean()), 4)})
    n_eff = len(c0) * len(c1) / (len(c0) + len(c1))
    can_tell = f"a KS distance above {1.36 / math.sqrt(n_eff):.3f} is told from noise at 5%"
    text = (f"scores: mean {c1.mean():.3f} (challenger, {len(c1)}) vs {c0.mean():.3f} (champion, {len(c0)}); "
            f"KS distance {d:.3f}, p = {p:.3g}" + ("; the versions score differently (expected after a retrain on "
                                                     "shifted data)" if p < alpha else ""))
    return Figure("scores", PASS, text, can_tell, values)


def verdict_of(figures: list[Figure]) -> str:
    """rollback if any figure says so, else hold if any waits for evidence, else pass (advance)."""
    verdicts = {f.verdict for f in figures}
    return ROLLBACK if ROLLBACK in verdicts else HOLD if HOLD in verdicts else PASS
