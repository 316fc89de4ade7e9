"""The drift report's picture: each detector's p-value against its level, then what moved most."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from core.drift.encoding import category_strings
from core.drift.results import DriftResult

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
                norm = (lambda s: pd.Series(category_strings(s)).str.strip().str.lower()) if shift.kind == "text" \
                    else (lambda s: pd.Series(category_strings(s)))
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
