"""Where local state lives, atomic writes, and the Parquet IO manager.

Everything a run writes sits under `$INTELLIGENTOPS_HOME` (default `.intelligentops/` at the repository
root). Paths are `UPath`s, so a home of `s3://bucket/prefix` works with the same code once `s3fs` is
installed.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import BaseModel, Field
from upath import UPath

from core.files import atomic_write_local, json_bytes
from core.lazy import np, pd


def _is_local(path: UPath) -> bool:
    return getattr(path, "protocol", "") in ("", "file", "local")


def atomic_write_bytes(path: UPath | Path, data: bytes) -> None:
    """Write all of `data` or nothing: a reader never sees a half-written file.

    Locally that is core.files.atomic_write_local (a temporary file, flushed, renamed over the target). Object
    stores put whole objects, so there a plain write already has that property.
    """
    path = UPath(path)
    if not _is_local(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return
    atomic_write_local(Path(path.path), data)


def atomic_write_json(path: UPath | Path, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def frame_to_parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def _is_vector_column(col: pd.Series) -> bool:
    if col.dtype != object:
        return False
    first = col.dropna()
    return len(first) > 0 and hasattr(first.iloc[0], "__len__") and not isinstance(first.iloc[0], str | bytes)


def frame_hash(df: pd.DataFrame) -> str:
    """Content hash of a frame: its column names, dtypes and every value, independent of the index."""
    h = hashlib.sha256()
    h.update(json.dumps([[str(c), str(t)] for c, t in df.dtypes.items()]).encode())
    # Columns of vectors (embeddings) are not hashable cell by cell; hash their bytes instead.
    vector_cols = [c for c in df.columns if _is_vector_column(df[c])]
    plain = df.drop(columns=vector_cols)
    if plain.shape[1]:
        h.update(pd.util.hash_pandas_object(plain, index=False).to_numpy().tobytes())
    for c in vector_cols:
        h.update(str(c).encode())
        for v in df[c]:
            h.update(b"\0" if v is None else np.ascontiguousarray(v, dtype=np.float64).tobytes())
    return h.hexdigest()


class StorageResource(dg.ConfigurableResource):
    """The root of all local state and the paths under it, one folder per spec and concern."""

    home: str
    keys_dir: str | None = Field(None, description="INTELLIGENTOPS_KEYS_DIR: the keys folder (a mounted Secret on a "
                                                   "cluster); default <home>/keys")

    def keys_folder(self) -> tuple[Path, bool]:
        """The keys folder, and whether missing keys may be created there (only in the default one under a local
        home: a folder named by INTELLIGENTOPS_KEYS_DIR is a Secret that someone fills)."""
        if self.keys_dir:
            return Path(self.keys_dir).expanduser(), False
        if not _is_local(self.root):
            raise ValueError(f"{self.home} is not a local folder, so it holds no keys: set INTELLIGENTOPS_KEYS_DIR "
                             "to the mounted keys Secret")
        return Path(self.root.path) / "keys", True

    @property
    def root(self) -> UPath:
        return UPath(self.home)

    def path(self, *parts: str) -> UPath:
        return self.root.joinpath(*parts)

    def spec_dir(self, spec_name: str, concern: str) -> UPath:
        """e.g. spec_dir("credit_risk", "validation") -> <home>/credit_risk/validation"""
        p = self.path(spec_name, concern)
        p.mkdir(parents=True, exist_ok=True)
        return p

    def local_dir(self, *parts: str) -> Path:
        """A local folder for tools that need a filesystem path (MLflow's SQLite, LanceDB, checkpoints)."""
        if not _is_local(self.root):
            raise ValueError(f"{self.home} is not a local path; configure a server or object store for this")
        p = Path(self.root.path).joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p


# Definition metadata of a partitioned asset: how many of its latest months an unpartitioned reader sees (0: all).
WINDOW_METADATA = "intelligentops/window_months"


def window_keys(ordered: Sequence[str], present: set[str] | frozenset[str], months: int | None) -> list[str]:
    """The months of a training window: the last `months` partitions of `ordered` (None or 0: all of them) that end
    at the newest one in `present`, keeping those in `present`. Months missing inside it are the reader's concern."""
    have = [k for k in ordered if k in present]
    if not have:
        return []
    end = ordered.index(have[-1])
    start = 0 if not months else max(0, end - months + 1)
    return [k for k in ordered[start:end + 1] if k in present]


class ParquetIOManager(dg.ConfigurableIOManager):
    """Stores each asset's output under `<base_path>/<asset key>.parquet` (data frames) or `.json`; a partitioned
    asset's under `<base_path>/<asset key>/<partition>.parquet`.

    A partitioned asset's run of one month writes its value; a run of a range of months writes a `{month: value}`
    mapping, one file per month. A partitioned reader gets its months as one frame, in time order. An unpartitioned
    reader (training_splits, the training and evaluation stages) gets the training window: the latest
    `WINDOW_METADATA` months materialized (all when 0), newest last. Writes are atomic, so a failed or cancelled
    step leaves the last good version in place.
    """

    base_path: str

    def _path(self, key: dg.AssetKey, suffix: str, partition: str | None = None) -> UPath:
        if partition is not None:
            return UPath(self.base_path).joinpath(*key.path, f"{partition}{suffix}")
        return UPath(self.base_path).joinpath(*key.path[:-1], f"{key.path[-1]}{suffix}")

    def _write(self, key: dg.AssetKey, obj: Any, partition: str | None = None) -> UPath:
        if isinstance(obj, pd.DataFrame):
            path = self._path(key, ".parquet", partition)
            atomic_write_bytes(path, frame_to_parquet_bytes(obj))
        elif isinstance(obj, BaseModel):  # typed evidence: JSON only here, at the boundary
            path = self._path(key, ".json", partition)
            atomic_write_bytes(path, obj.model_dump_json(indent=2).encode())
        else:
            path = self._path(key, ".json", partition)
            atomic_write_json(path, obj)
        return path

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return
        key = context.asset_key
        if not context.has_asset_partitions:
            path = self._write(key, obj)
            context.add_output_metadata({"path": dg.MetadataValue.path(str(path))})
            return
        keys = list(context.asset_partition_keys)
        if len(keys) > 1 and not (isinstance(obj, dict) and set(obj) == set(keys)):
            raise TypeError(f"{key.to_user_string()}: a run of {len(keys)} partitions ({keys[0]}...{keys[-1]}) must "
                            "return a mapping of each partition key to its value")
        for k in keys:
            path = self._write(key, obj if len(keys) == 1 else obj[k], k)
        context.add_output_metadata({"path": dg.MetadataValue.path(str(path if len(keys) == 1 else path.parent))})

    def load_input(self, context: dg.InputContext) -> Any:
        key = context.asset_key
        if context.has_asset_partitions:
            keys = list(context.asset_partition_keys)
            if not _reader_is_partitioned(context):
                keys = self._window(context, keys)
            return self._read_partitions(key, keys)
        parquet, js = self._path(key, ".parquet"), self._path(key, ".json")
        if parquet.exists():
            with parquet.open("rb") as fh:
                return pd.read_parquet(fh)
        if js.exists():
            expected = getattr(context.dagster_type, "typing_type", None)
            if isinstance(expected, type) and issubclass(expected, BaseModel):
                return expected.model_validate_json(js.read_text())
            return json.loads(js.read_text())
        raise FileNotFoundError(
            f"{key.to_user_string()} has not been materialized under {self.base_path}; "
            f"materialize it first (dagster asset materialize --select '{key.to_user_string()}')"
        )

    def load_partition(self, key: dg.AssetKey, partition: str) -> Any:
        """One partition of an asset as this IO manager stored it (an op reading a month, say)."""
        return self._read_partitions(key, [partition])

    def _window(self, context: dg.InputContext, keys: list[str]) -> list[str]:
        meta = context.upstream_output.definition_metadata if context.upstream_output is not None else {}
        months = int(getattr(meta.get(WINDOW_METADATA, 0), "value", meta.get(WINDOW_METADATA, 0)) or 0)
        present = context.instance.get_materialized_partitions(context.asset_key)
        window = window_keys(keys, present, months)
        if not window:
            name = context.asset_key.to_user_string()
            raise FileNotFoundError(
                f"{name} has no materialized partition; backfill its months first (dagster asset materialize "
                f"--select '{name}' --partition-range {keys[0]}...{keys[-1]})")
        return window

    def _read_partitions(self, key: dg.AssetKey, keys: list[str]) -> Any:
        values = []
        for k in keys:
            parquet, js = self._path(key, ".parquet", k), self._path(key, ".json", k)
            if parquet.exists():
                with parquet.open("rb") as fh:
                    values.append(pd.read_parquet(fh))
            elif js.exists():
                values.append(json.loads(js.read_text()))
            else:
                raise FileNotFoundError(
                    f"{key.to_user_string()} partition {k} has not been materialized under {self.base_path}; "
                    f"materialize it first (dagster asset materialize --select '{key.to_user_string()}' "
                    f"--partition {k})")
        if values and all(isinstance(v, pd.DataFrame) for v in values):
            return values[0] if len(values) == 1 else pd.concat(values, ignore_index=True)
        return values[0] if len(values) == 1 else dict(zip(keys, values, strict=True))


def _reader_is_partitioned(context: dg.InputContext) -> bool:
    """Whether the step loading this input is itself partitioned (it then reads its own months); Dagster maps an
    unpartitioned reader onto every partition, of which the IO manager keeps the training window."""
    step = context.step_context
    assets_def = step.job_def.asset_layer.get_assets_def_for_node(step.node_handle)
    return assets_def is not None and assets_def.partitions_def is not None
