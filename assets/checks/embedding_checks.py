"""Blocking checks on text_embeddings: the vectors are the model's dimension, finite, unit norm, and cover
every validated row. A failure stops vector_index and training from reading bad vectors."""

from typing import Any

import dagster as dg

from assets.naming import ROW_ID
from assets.wiring import DataFrameType
from core.lazy import np, pd

NORM_TOLERANCE = 1e-3

EMBEDDING_CHECKS = {
    "embedding_dimension": "Every vector of every text column has the same dimension, the model's.",
    "embedding_finite": "No vector holds NaN or an infinite value.",
    "embedding_unit_norm": f"Every vector has L2 norm 1 (within {NORM_TOLERANCE}).",
    "embedding_covers_validated_rows": "Every validated row has exactly one vector per text column, and no other row.",
}


# Rows per block when norms are taken in float64: a million 384-wide vectors would be 3 GiB at once.
BLOCK_ROWS = 65_536


def _matrix(series: "pd.Series") -> "tuple[np.ndarray | None, set[int]]":
    lengths = {len(v) for v in series}
    if len(lengths) != 1:
        return None, lengths
    return np.stack(series.to_numpy()), lengths


def _finite_and_norm_errors(matrix: "np.ndarray") -> "tuple[np.ndarray, np.ndarray]":
    """Which rows are finite, and |L2 norm - 1| of those, in float64 a block of rows at a time."""
    finite = np.empty(len(matrix), dtype=bool)
    errors = []
    for start in range(0, len(matrix), BLOCK_ROWS):
        block = matrix[start:start + BLOCK_ROWS].astype(np.float64)
        ok = np.isfinite(block).all(axis=1)
        finite[start:start + len(block)] = ok
        errors.append(np.abs(np.linalg.norm(block[ok], axis=1) - 1.0))
    return finite, np.concatenate(errors) if errors else np.zeros(0)


def evaluate(embeddings: "pd.DataFrame", validated: "pd.DataFrame",
             columns: dict[str, str]) -> dict[str, tuple[bool, str, dict[str, Any]]]:
    """Each check's (passed, description, metadata); plain function so tests can call it on any frame."""
    out: dict[str, tuple[bool, str, dict[str, Any]]] = {}
    dims, problems_dim, problems_finite, problems_norm = {}, [], [], []
    worst_norm_error = 0.0
    for text_col, emb_col in columns.items():
        if emb_col not in embeddings.columns:
            problems_dim.append(f"column {emb_col!r} (for text column {text_col!r}) is missing")
            continue
        matrix, lengths = _matrix(embeddings[emb_col])
        dims[emb_col] = sorted(lengths)
        if matrix is None:
            problems_dim.append(f"{emb_col!r} mixes dimensions {sorted(lengths)}")
            continue
        finite, errors = _finite_and_norm_errors(matrix)
        bad = ~finite
        if bad.any():
            ids = embeddings.loc[bad, ROW_ID].astype(str).head(5).tolist()
            problems_finite.append(f"{emb_col!r}: {int(bad.sum())} vectors hold NaN or inf (row_id {ids})")
        if len(errors):
            worst_norm_error = max(worst_norm_error, float(errors.max()))
            off = errors > NORM_TOLERANCE
            if off.any():
                problems_norm.append(f"{emb_col!r}: {int(off.sum())} vectors are not unit norm "
                                     f"(largest |norm - 1| = {errors.max():.2e})")
    all_dims = {d for ds in dims.values() for d in ds}
    if len(all_dims) > 1:
        problems_dim.append(f"text columns disagree on dimension: {dims}")
    out["embedding_dimension"] = (not problems_dim, "; ".join(problems_dim) or f"dimension {sorted(all_dims)}",
                                  {"dimension": next(iter(all_dims)) if len(all_dims) == 1 else -1})
    out["embedding_finite"] = (not problems_finite, "; ".join(problems_finite) or "all finite", {})
    out["embedding_unit_norm"] = (not problems_norm, "; ".join(problems_norm) or "all unit norm",
                                  {"max_abs_norm_error": worst_norm_error})
    have, want = embeddings[ROW_ID].astype(str), validated[ROW_ID].astype(str)
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    dupes = int(have.duplicated().sum())
    ok = not missing and not extra and not dupes
    desc = "every validated row has a vector" if ok else (
        f"{len(missing)} validated rows have no vector (row_id {missing[:5]}), {len(extra)} vectors belong to no "
        f"validated row (row_id {extra[:5]}), {dupes} repeated row ids; re-materialize text_embeddings")
    out["embedding_covers_validated_rows"] = (ok, desc, {"missing": len(missing), "extra": len(extra),
                                                         "repeated": dupes})
    return out


def build_embedding_checks(spec_name: str, embeddings_key: dg.AssetKey, validated_key: dg.AssetKey,
                           columns: dict[str, str],
                           partitions_def: dg.PartitionsDefinition | None = None) -> dg.AssetChecksDefinition:
    """One multi-check over text_embeddings (and validated_dataset for coverage), every check blocking; with the
    spec's `partitions_def`, over the run's months of both."""
    specs = [dg.AssetCheckSpec(name=name, asset=embeddings_key, blocking=True, description=doc,
                               additional_deps=[validated_key] if name == "embedding_covers_validated_rows" else None,
                               partitions_def=partitions_def)
             for name, doc in EMBEDDING_CHECKS.items()]

    @dg.multi_asset_check(specs=specs, name=f"{spec_name}__embedding_checks",
                          ins={"embeddings": dg.AssetIn(key=embeddings_key),
                               "validated": dg.AssetIn(key=validated_key)})
    def embedding_checks(context: dg.AssetCheckExecutionContext, embeddings: DataFrameType,
                         validated: DataFrameType):
        """Dimension, finiteness, unit norm and coverage of every text column's vectors."""
        for name, (passed, description, metadata) in evaluate(embeddings, validated, columns).items():
            if not passed:
                context.log.error(f"{spec_name}/{name}: {description}")
            yield dg.AssetCheckResult(asset_key=embeddings_key, check_name=name, passed=passed,
                                      severity=dg.AssetCheckSeverity.ERROR, description=description[:2000],
                                      metadata=metadata)

    return embedding_checks
