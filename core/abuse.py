"""Extraction and probing, per API key: pure statistics over each key's recent queries (Dagster-free).

Two patterns, each named per key:

- **probing** (PRADA, Juuti et al., "PRADA: Protecting against DNN Model Stealing Attacks", EuroS&P 2019): for
  each new query of a key, its distance to the nearest of that key's earlier queries (those kept in the key's
  growing set: a query joins it when its distance is above mean - std of the distances so far). Real
  applicants are independent draws, so these minimum distances spread out like a bell; an attacker who takes
  a few applicants and varies them feature by feature sends a few far queries and many near copies, and the
  distances pile up on one small value. A Shapiro-Wilk test on them gives W (1 for a perfect normal); a key
  with at least `min_queries` queries and W under `min_shapiro_w` is named.
  PRADA's W depends on the number of features (with two or three, real applicants' minimum distances are
  skewed too), so a second, dimension-free sign goes with it: the share of a key's queries that repeat one of
  its earlier queries in every feature but one (text included). Real applicants almost never do (a few percent
  on a three-feature toy table, none on credit_risk); one applicant stepped through one feature at a time always
  does. A key over `max_variant_share` is named for probing too.
- **sampling the input space**: the share of a key's queries that the server's out-of-distribution detector
  flagged (core/ood.py; about 1 - its quantile for real applicants); a key with at least `min_queries` scored
  queries and a share above `max_ood_rate` is named (uniform random applicants are nearly all flagged).

Distances are taken on an encoding fitted on reference rows (the serving version's training sample): each
numeric value becomes its quantile among the reference's (so heavy tails such as incomes weigh like any other
feature and a distance is a share of applicants), and each categorical or text value that differs from the other
query's adds 1 to the squared distance. Redacted and missing values are their own value. Free text (a job title)
is left out: real applicants' titles nearly always differ, which only adds noise to their distances (measured:
the lowest W of real keys rises from 0.81 to 0.85 over 200 queries without it).
benchmarks/README.md ("Abuse checks") measures false alarms on replayed real traffic and queries-to-detection.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MIN_QUERIES = 100
MIN_SHAPIRO_W = 0.78
MAX_OOD_RATE = 0.10
MAX_VARIANT_SHARE = 0.25
RECENT_QUERIES = 500  # per key: PRADA is quadratic in the queries it looks at
SCAN_DECISIONS = 20_000  # the latest traffic decisions read to find each key's recent queries


@dataclass(frozen=True)
class AbuseVerdict:
    """One key's recent traffic judged: how many queries, the PRADA W, the out-of-distribution share."""

    key_id: str
    queries: int
    shapiro_w: float | None  # None: too few queries to judge
    variant_share: float | None  # share of queries equal to an earlier one in all features but one
    ood_rate: float | None  # None: no query of the key was scored by an out-of-distribution detector
    ood_flagged: int = 0
    probing: bool = False
    sampling: bool = False
    queries_to_detection: int | None = None  # filled by `first_detection`

    @property
    def named(self) -> bool:
        return self.probing or self.sampling

    def describe(self) -> str:
        why = []
        if self.probing:
            why.append(f"probing: PRADA Shapiro-Wilk W {self.shapiro_w:.3f} over the minimum distances between its "
                       f"queries, {self.variant_share:.0%} of them an earlier query with one feature changed (a few "
                       "applicants varied feature by feature)")
        if self.sampling:
            why.append(f"sampling the input space: {self.ood_flagged} of {self.queries} queries "
                       f"({self.ood_rate:.0%}) out of distribution")
        return f"key {self.key_id!r} ({self.queries} queries): " + ("; ".join(why) or "looks like real applicants")

    def to_json(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "queries": self.queries, "shapiro_w": self.shapiro_w,
                "variant_share": self.variant_share, "ood_rate": self.ood_rate,
                "ood_flagged": self.ood_flagged, "probing": self.probing, "sampling": self.sampling}


@dataclass(frozen=True)
class QueryEncoder:
    """Rows -> (numeric quantiles, categorical codes), fitted on reference rows; see the module docstring."""

    numeric: tuple[str, ...]
    categorical: tuple[str, ...]  # categorical and text columns: compared as equal or not
    # per numeric column: its distinct reference values and the mid-rank quantile of each
    cdfs: tuple[tuple[np.ndarray, np.ndarray], ...] = field(default=())

    @classmethod
    def fit(cls, reference: Sequence[Mapping[str, Any]], numeric: Sequence[str],
            categorical: Sequence[str]) -> QueryEncoder:
        cdfs = []
        for col in numeric:
            v = np.asarray([_number(r.get(col)) for r in reference], dtype=np.float64)
            values, counts = np.unique(v[np.isfinite(v)], return_counts=True)
            below = np.cumsum(counts) - counts
            cdfs.append((values, (below + counts / 2.0) / max(int(counts.sum()), 1)))
        return cls(tuple(numeric), tuple(categorical), tuple(cdfs))

    def encode(self, rows: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        num = np.zeros((len(rows), len(self.numeric)))
        for j, (col, (values, quantiles)) in enumerate(zip(self.numeric, self.cdfs)):
            v = np.asarray([_number(r.get(col)) for r in rows], dtype=np.float64)
            # Interpolated between distinct values, so a value a hair off a common one (0.001 instead of 0)
            # stays beside it rather than jumping past all the ties.
            q = np.interp(v, values, quantiles) if len(values) else np.zeros(len(v))
            num[:, j] = np.where(np.isfinite(v), q, -1.0)  # missing: a value of its own, far from any quantile
        codes = np.zeros((len(rows), len(self.categorical)), dtype=np.int64)
        for j, col in enumerate(self.categorical):
            seen: dict[str, int] = {}
            codes[:, j] = [seen.setdefault(_text(r.get(col)), len(seen)) for r in rows]
        return num, codes


def _number(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def _text(value: Any) -> str:
    return "\x00none" if value is None else str(value).strip().lower()


def prada_distances(num: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The minimum distance of each query (after the first) to the key's growing set of earlier queries."""
    n = len(num)
    if n < 2:
        return np.zeros(0)
    kept = [0]
    dmins = np.zeros(n - 1)
    total = total_sq = 0.0
    for i in range(1, n):
        g = np.asarray(kept)
        d2 = ((num[g] - num[i]) ** 2).sum(axis=1) + (codes[g] != codes[i]).sum(axis=1)
        d = float(np.sqrt(d2.min()))
        dmins[i - 1] = d
        total += d
        total_sq += d * d
        mean = total / i
        std = math.sqrt(max(total_sq / i - mean * mean, 0.0))
        if d > mean - std:
            kept.append(i)
    return dmins


def shapiro_w(distances: np.ndarray) -> float:
    """Shapiro-Wilk W of the distances (1.0 for a perfect normal; a pile of equal values scores low)."""
    from scipy.stats import shapiro

    if len(distances) < 3:
        return 1.0
    if float(np.ptp(distances)) == 0.0:
        return 0.0  # every query at the same distance: as far from a bell as it gets
    return float(shapiro(distances[:5000]).statistic)


def variant_share(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> float:
    """The share of queries (after the first) equal to an earlier query in every column but at most one."""
    n = len(rows)
    if n < 2 or not columns:
        return 0.0
    codes = np.zeros((n, len(columns)), dtype=np.int64)
    for j, col in enumerate(columns):
        seen: dict[Any, int] = {}
        codes[:, j] = [seen.setdefault(_value_key(r.get(col)), len(seen)) for r in rows]
    hits = 0
    for i in range(1, n):
        if ((codes[:i] != codes[i]).sum(axis=1) <= 1).any():
            hits += 1
    return hits / (n - 1)


def _value_key(value: Any) -> Any:
    number = _number(value)
    return ("n", number) if math.isfinite(number) and not isinstance(value, str) else ("t", _text(value))


def judge_key(key_id: str, rows: Sequence[Mapping[str, Any]], ood_flags: Sequence[bool | None],
              encoder: QueryEncoder, *, text: Sequence[str] = (), min_queries: int = MIN_QUERIES,
              min_shapiro_w: float = MIN_SHAPIRO_W, max_variant_share: float = MAX_VARIANT_SHARE,
              max_ood_rate: float = MAX_OOD_RATE) -> AbuseVerdict:
    """One key's queries, oldest first, with the out-of-distribution flag the server gave each (None: not scored).
    `text` columns count in the variant share (not in the distances)."""
    n = len(rows)
    scored = [bool(f) for f in ood_flags if f is not None]
    flagged = sum(scored)
    rate = flagged / len(scored) if scored else None
    if n < min_queries:
        return AbuseVerdict(key_id, n, None, None, rate, flagged)
    w = shapiro_w(prada_distances(*encoder.encode(rows)))
    share = variant_share(rows, [*encoder.numeric, *encoder.categorical, *text])
    return AbuseVerdict(key_id, n, w, share, rate, flagged, probing=w < min_shapiro_w or share > max_variant_share,
                        sampling=len(scored) >= min_queries and rate is not None and rate > max_ood_rate)


def judge_keys(queries: Iterable[tuple[str | None, Mapping[str, Any], bool | None]], encoder: QueryEncoder,
               *, recent: int = RECENT_QUERIES, **limits: Any) -> list[AbuseVerdict]:
    """Every key's verdict over its `recent` latest queries; `queries` are (key id, inputs, ood flag) in log order.
    Traffic without a key id (an open server's) is not judged: its callers share no identity to name."""
    per_key: dict[str, list[tuple[Mapping[str, Any], bool | None]]] = {}
    for key_id, inputs, flag in queries:
        if key_id:
            per_key.setdefault(key_id, []).append((inputs, flag))
    out = []
    for key_id in sorted(per_key):
        items = per_key[key_id][-recent:]
        out.append(judge_key(key_id, [i for i, _ in items], [f for _, f in items], encoder, **limits))
    return out


def first_detection(rows: Sequence[Mapping[str, Any]], ood_flags: Sequence[bool | None], encoder: QueryEncoder,
                    step: int = 10, **limits: Any) -> int | None:
    """How many queries of one key it takes to name it (judged every `step` queries); None: never within `rows`."""
    min_queries = int(limits.get("min_queries", MIN_QUERIES))
    for n in range(min_queries, len(rows) + 1, step):
        if judge_key("k", rows[:n], ood_flags[:n], encoder, **limits).named:
            return n
    return None


def judge_store(store: Any, spec: str, numeric: Sequence[str], categorical: Sequence[str], text: Sequence[str],
                reference: Sequence[Mapping[str, Any]] | None = None, *, recent: int = RECENT_QUERIES,
                scan: int = SCAN_DECISIONS, **limits: Any) -> list[AbuseVerdict]:
    """Every key's verdict over its recent traffic on the audit log (the latest `scan` decisions; smoke and shadow
    decisions are not traffic). `reference` rows fit the distance encoding (the serving version's training
    sample); without them the traffic itself does."""
    from core.audit.traffic import record_features, traffic_after

    records = traffic_after(store, spec, max(0, store.latest_seq(spec) - scan), scan)
    features = [*numeric, *categorical, *text]
    rows = [record_features(r, features) for r in records]
    encoder = QueryEncoder.fit(reference if reference is not None else rows, numeric, categorical)
    queries = [(r.key_id, row, None if r.ood is None else r.ood != 0) for r, row in zip(records, rows)]
    return judge_keys(queries, encoder, recent=recent, text=tuple(text), **limits)


def verdicts_markdown(verdicts: Sequence[AbuseVerdict]) -> str:
    """One row per key: queries, PRADA W, variant share, out-of-distribution share, and what it is named for."""
    if not verdicts:
        return "no traffic with a key id yet (an open server's callers have none: the check needs API keys)"

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = ["| key | queries | PRADA W | one-feature variants | out of distribution | named |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for v in verdicts:
        named = ", ".join(n for n, on in (("probing", v.probing), ("sampling", v.sampling)) if on) or "no"
        lines.append(f"| {v.key_id} | {v.queries} | {num(v.shapiro_w, '.3f')} | {num(v.variant_share, '.0%')} | "
                     f"{num(v.ood_rate, '.1%')} | {named} |")
    return "\n".join(lines)
