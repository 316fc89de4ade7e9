"""Model inputs: the feature frame, and preprocessing fitted on the train split only, stored as JSON.

This module imports numpy and pandas (inside the functions that use them, so loading the code location does not)
and nothing else of ours: the registered MLflow model ships this very file (`code_paths`) and calls `transform`
at serving time, so training and serving can never disagree on how a raw row becomes a vector.

- numeric: median imputation, a missing indicator, then standardization with the train split's mean and std
- categorical: one-hot over the `max_categories` most frequent train values plus "other" (missing is a value)
- text: the column's sentence embedding (`<column>__embedding`, a list of floats) appended as is; the text a
  model embeds is `clean_text(value)`, the one cleaning rule for validated_dataset, text_embeddings and the
  served model
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

# The same names as assets.data: repeated because this file ships alone inside the registered model.
ROW_ID = "row_id"
LABEL = "label"
SPLIT = "split"
EMBEDDING_SUFFIX = "__embedding"
OTHER = "other"
MISSING = "<missing>"
PREPROCESSING_VERSION = 1
EMBED_CHUNK = 65536  # rows of an embedding column converted at a time by transform


class FeatureError(ValueError):
    """Inputs that cannot become features; the message names the column, row or file."""


def clean_text(value: Any) -> str:
    """The text a sentence encoder sees for one raw value: missing (None, NaN, NA) is "", anything else its
    str() without surrounding whitespace.

    validated_dataset stores it, text_embeddings embeds it and the served model applies it to each request,
    so a text is embedded the same way whichever way it arrives.
    """
    import pandas as pd

    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return ""
    return str(value).strip()


def embedding_column(text_column: str) -> str:
    return f"{text_column}{EMBEDDING_SUFFIX}"


def build_feature_frame(validated: pd.DataFrame, splits: pd.DataFrame, numeric: Sequence[str],
                        categorical: Sequence[str], text: Sequence[str] = (),
                        embeddings: pd.DataFrame | None = None, spec_name: str = "?") -> pd.DataFrame:
    """row_id, label, split, the feature columns and, for each text column C, `C__embedding`.

    Splits and embeddings are joined on row_id; a validated row without a split or without an embedding is
    an error (a stale upstream asset), never silently dropped.
    """
    wanted = [*numeric, *categorical]
    missing_cols = [c for c in [ROW_ID, LABEL, *wanted] if c not in validated.columns]
    if missing_cols:
        raise FeatureError(f"{spec_name}: validated_dataset lacks column(s) {missing_cols}")
    frame = validated[[ROW_ID, LABEL, *wanted]].copy()
    frame[ROW_ID] = frame[ROW_ID].astype(str)
    split_map = splits[[ROW_ID, SPLIT]].copy()
    split_map[ROW_ID] = split_map[ROW_ID].astype(str)
    if split_map[ROW_ID].duplicated().any():
        dup = split_map.loc[split_map[ROW_ID].duplicated(), ROW_ID].iloc[0]
        raise FeatureError(f"{spec_name}: training_splits lists row_id {dup!r} more than once")
    frame = frame.merge(split_map, on=ROW_ID, how="left", validate="one_to_one")
    unsplit = frame[SPLIT].isna()
    if unsplit.any():
        raise FeatureError(
            f"{spec_name}: {int(unsplit.sum())} validated rows have no split (first row_id "
            f"{frame.loc[unsplit, ROW_ID].iloc[0]!r}); materialize training_splits again")
    if text:
        if embeddings is None:
            raise FeatureError(f"{spec_name}: text features {list(text)} need the text_embeddings asset")
        cols = [embedding_column(t) for t in text]
        absent = [c for c in [ROW_ID, *cols] if c not in embeddings.columns]
        if absent:
            raise FeatureError(f"{spec_name}: text_embeddings lacks column(s) {absent}")
        emb = embeddings[[ROW_ID, *cols]].copy()
        emb[ROW_ID] = emb[ROW_ID].astype(str)
        frame = frame.merge(emb, on=ROW_ID, how="left", validate="one_to_one")
        for c in cols:
            lost = frame[c].isna()
            if lost.any():
                raise FeatureError(
                    f"{spec_name}: {int(lost.sum())} rows have no {c} (first row_id "
                    f"{frame.loc[lost, ROW_ID].iloc[0]!r}); materialize text_embeddings again")
    return frame


def _category(value: Any) -> str:
    return MISSING if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def fit_preprocessing(train: pd.DataFrame, numeric: Sequence[str], categorical: Sequence[str],
                      text: Sequence[str] = (), max_categories: int = 30) -> dict[str, Any]:
    """Statistics of the train rows only, as a JSON-ready dict that `transform` reads."""
    import pandas as pd

    if len(train) == 0:
        raise FeatureError("the train split is empty; nothing to fit preprocessing on")
    prep: dict[str, Any] = {"version": PREPROCESSING_VERSION, "numeric": {}, "categorical": {}, "embeddings": {}}
    names: list[str] = []
    for col in numeric:
        values = pd.to_numeric(train[col], errors="coerce").astype("float64")
        median = float(values.median()) if values.notna().any() else 0.0
        filled = values.fillna(median)
        std = float(filled.std(ddof=0))
        prep["numeric"][col] = {"median": median, "mean": float(filled.mean()), "std": std if std > 1e-12 else 1.0}
        names += [col, f"{col}__missing"]
    for col in categorical:
        counts = train[col].map(_category).value_counts()
        # Most frequent first; ties by name so the same data always gives the same columns.
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        cats = [c for c, _ in ranked if c != OTHER][:max_categories]
        prep["categorical"][col] = {"categories": cats}
        names += [f"{col}={c}" for c in cats] + [f"{col}={OTHER}"]
    for col in text:
        ecol = embedding_column(col)
        first = train[ecol].iloc[0]
        dim = len(first)
        prep["embeddings"][col] = {"column": ecol, "dim": dim}
        names += [f"{ecol}[{i}]" for i in range(dim)]
    prep["feature_names"] = names
    prep["n_features"] = len(names)
    # JSON objects carry no order a reader must keep; the column order of the matrix is stated explicitly.
    prep["order"] = {"numeric": list(numeric), "categorical": list(categorical), "embeddings": list(text)}
    return prep


def ordered_items(prep: dict[str, Any], kind: str) -> list[tuple[str, dict[str, Any]]]:
    order = prep.get("order", {}).get(kind) or list(prep[kind])
    return [(col, prep[kind][col]) for col in order]


def transform(frame: pd.DataFrame, prep: dict[str, Any]) -> np.ndarray:
    """Raw feature columns (as in validated_dataset, plus embeddings) -> float32 matrix of n_features.

    The matrix is allocated once and filled a block at a time (numbers computed in float64, then stored), so a
    million rows cost the matrix and one column's temporaries, never a float64 copy of every embedding.
    """
    import numpy as np
    import pandas as pd

    described = (2 * len(prep["numeric"])
                 + sum(len(st["categories"]) + 1 for st in prep["categorical"].values())
                 + sum(st["dim"] for st in prep["embeddings"].values()))
    if described != prep["n_features"]:
        raise FeatureError(f"the preprocessing describes {described} features but says n_features is "
                           f"{prep['n_features']}: it is damaged; train the version again")
    n = len(frame)
    x = np.empty((n, described), dtype=np.float32)
    at = 0
    for col, st in ordered_items(prep, "numeric"):
        if col not in frame.columns:
            raise FeatureError(f"numeric feature column {col!r} is missing from the input")
        values = frame[col].to_numpy()
        if values.dtype.kind in "fiub":  # already numbers: pandas' checks cost more than the rest of the row here
            values = values.astype("float64")
        else:
            try:
                values = pd.to_numeric(frame[col], errors="raise").astype("float64").to_numpy()
            except (ValueError, TypeError) as exc:
                raise FeatureError(f"numeric feature column {col!r} holds a non-number: {exc}") from None
        missing = np.isnan(values)
        filled = np.where(missing, st["median"], values)
        x[:, at] = (filled - st["mean"]) / st["std"]
        x[:, at + 1] = missing
        at += 2
    for col, st in ordered_items(prep, "categorical"):
        if col not in frame.columns:
            raise FeatureError(f"categorical feature column {col!r} is missing from the input")
        cats = st["categories"]
        index = {c: i for i, c in enumerate(cats)}
        codes = np.array([index.get(_category(v), len(cats)) for v in frame[col].tolist()], dtype=np.int64)
        x[:, at:at + len(cats) + 1] = 0.0
        x[np.arange(n), at + codes] = 1.0
        at += len(cats) + 1
    for col, st in ordered_items(prep, "embeddings"):
        ecol, dim = st["column"], st["dim"]
        if ecol not in frame.columns:
            raise FeatureError(f"embedding column {ecol!r} (for text feature {col!r}) is missing from the input")
        rows = frame[ecol].tolist()
        bad = [i for i, r in enumerate(rows) if r is None or len(r) != dim]
        if bad:
            raise FeatureError(f"{ecol}: row {bad[0]} is not a vector of {dim} floats")
        for start in range(0, n, EMBED_CHUNK):  # a float32 vector is exact in float64, so this equals the old cast
            chunk = rows[start:start + EMBED_CHUNK]
            x[start:start + len(chunk), at:at + dim] = np.asarray(
                [np.asarray(r, dtype=np.float64) for r in chunk]).reshape(len(chunk), dim)
        at += dim
    return x


def dumps(prep: dict[str, Any]) -> str:
    return json.dumps(prep, indent=2, sort_keys=True)
