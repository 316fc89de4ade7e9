"""Shifts: plain functions that turn a frame of real rows into shifted traffic (re-weighted values, scaled numbers,
replaced categories, a later time slice), applied by `apply_shifts` in a fixed order."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from workloads.replay import ReplayError



def _column(frame: pd.DataFrame, column: str, what: str) -> pd.Series:
    if column not in frame.columns:
        raise ReplayError(f"{what}: no column {column!r} in the data (columns: {list(frame.columns)[:30]})")
    return frame[column]


def reweight(frame: pd.DataFrame, column: str, weights: dict[str, float], seed: int = 0, rows: int | None = None,
             match: str = "exact") -> pd.DataFrame:
    """Re-sample rows (with replacement) so a row is drawn in proportion to the weight of its value.

    A row whose value matches none of `weights` keeps weight 1, so {"nurse": 5} makes nurses five times as
    common relative to everyone else. `match="contains"` matches case-insensitive substrings (free text such
    as job titles); "exact" compares whole values.
    """
    values = _column(frame, column, "reweight").astype(object).where(frame[column].notna(), "").astype(str)
    if match not in ("exact", "contains"):
        raise ReplayError(f"reweight: match {match!r}: use 'exact' or 'contains'")
    w = np.ones(len(frame), dtype=np.float64)
    for value, weight in weights.items():
        if weight < 0 or not math.isfinite(weight):
            raise ReplayError(f"reweight {column}: weight {weight} for {value!r} must be a finite number >= 0")
        hit = (values.str.lower().str.contains(value.lower(), regex=False) if match == "contains"
               else values == value).to_numpy()
        if not hit.any():
            raise ReplayError(f"reweight {column}: no row has the value {value!r} ({match} match); nothing to "
                              f"re-weight (e.g. values: {sorted(values.unique())[:10]})")
        w[hit] = weight
    if w.sum() == 0:
        raise ReplayError(f"reweight {column}: every weight is 0; no row could be drawn")
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(frame), size=rows or len(frame), replace=True, p=w / w.sum())
    return frame.iloc[idx].reset_index(drop=True)


def scale(frame: pd.DataFrame, column: str, factor: float) -> pd.DataFrame:
    """A copy with a numeric column multiplied by `factor` (incomes scaled by 1.1: factor 1.1)."""
    values = _column(frame, column, "scale")
    if not pd.api.types.is_numeric_dtype(values):
        raise ReplayError(f"scale: column {column!r} is not numeric (dtype {values.dtype}); only numbers scale")
    out = frame.copy()
    out[column] = values * factor
    return out


def replace_category(frame: pd.DataFrame, column: str, old: str, new: str, fraction: float = 1.0,
                     seed: int = 0) -> pd.DataFrame:
    """A copy where `fraction` of the rows whose `column` equals `old` carry `new` instead."""
    values = _column(frame, column, "replace")
    if not 0 < fraction <= 1:
        raise ReplayError(f"replace {column}: fraction {fraction} must be in (0, 1]")
    hit = np.nonzero((values.astype(object) == old).to_numpy())[0]
    if hit.size == 0:
        raise ReplayError(f"replace {column}: no row has the value {old!r} (values: {sorted(map(str, values.dropna().unique()))[:12]})")
    if fraction < 1:
        hit = np.random.default_rng(seed).choice(hit, size=max(1, int(round(fraction * hit.size))), replace=False)
    out = frame.copy()
    out[column] = out[column].astype(object)
    out.iloc[hit, out.columns.get_loc(column)] = new
    return out


def _times(values: pd.Series, fmt: str | None, column: str) -> pd.Series:
    parsed = pd.to_datetime(values, format=fmt, errors="coerce") if fmt else pd.to_datetime(values, errors="coerce")
    if parsed.notna().sum() == 0:
        hint = f" with format {fmt!r}" if fmt else "; pass --time-format (e.g. %b-%Y for 'Mar-2018')"
        raise ReplayError(f"after: column {column!r} holds no parseable dates{hint} (e.g. {values.iloc[0]!r})")
    return parsed


def after_time(frame: pd.DataFrame, column: str, after: str, fmt: str | None = None) -> pd.DataFrame:
    """The rows whose `column` is a time strictly after `after` (a later time slice), in time order."""
    times = _times(_column(frame, column, "after"), fmt, column)
    try:
        cut = pd.to_datetime(after, format=fmt) if fmt else pd.to_datetime(after)
    except (ValueError, TypeError) as exc:
        raise ReplayError(f"after: {after!r} is not a date{f' in format {fmt!r}' if fmt else ''}") from exc
    keep = (times > cut).to_numpy()
    if not keep.any():
        raise ReplayError(f"after: no row of {column!r} is after {after!r} (latest: {times.max()})")
    out = frame.loc[keep].copy()
    return out.iloc[np.argsort(times[keep].to_numpy(), kind="stable")].reset_index(drop=True)


@dataclass(frozen=True)
class Shift:
    """Every shift the command line asked for, applied by `apply_shifts` in a fixed order."""

    after: tuple[str, str] | None = None                       # (column, date)
    time_format: str | None = None
    reweights: tuple[tuple[str, dict[str, float]], ...] = ()   # (column, {value: weight})
    match: str = "exact"
    scales: tuple[tuple[str, float], ...] = ()
    replaces: tuple[tuple[str, str, str], ...] = ()            # (column, old, new)
    replace_fraction: float = 1.0
    seed: int = 0

    @property
    def empty(self) -> bool:
        return not (self.after or self.reweights or self.scales or self.replaces)


def apply_shifts(frame: pd.DataFrame, shift: Shift) -> pd.DataFrame:
    """The time slice first (it chooses the population), then re-weighting, scaling and replacement."""
    out = frame
    if shift.after:
        out = after_time(out, shift.after[0], shift.after[1], shift.time_format)
    for i, (col, weights) in enumerate(shift.reweights):
        out = reweight(out, col, weights, seed=shift.seed + i, match=shift.match)
    for col, factor in shift.scales:
        out = scale(out, col, factor)
    for i, (col, old, new) in enumerate(shift.replaces):
        out = replace_category(out, col, old, new, shift.replace_fraction, seed=shift.seed + 100 + i)
    return out
