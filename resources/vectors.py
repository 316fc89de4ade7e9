"""The vector index: one LanceDB table per text column of a spec, as files under `$INTELLIGENTOPS_HOME`.

`VectorIndexResource.similar(spec, text_or_vector, k)` answers "which past cases read like this one" for the
rest of the code (reviewers' similar cases, the reference for text drift). A text query is embedded by the
same model, at the same weights hash, that embedded the table; the table says which one in its manifest.

lancedb is imported inside the methods that use it; importing this module costs nothing.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg

from core.lazy import np, pd
from resources.storage import StorageResource, atomic_write_json

MANIFEST = "manifest.json"


class VectorIndexError(RuntimeError):
    """The index for a spec is missing, or a query does not fit it; the message names the spec and column."""


@dataclass(frozen=True)
class AnnState:
    """A table's ANN index after a write: its name, how many rows it was trained on, whether this write trained it
    (first build or a retrain after the table grew by the resource's factor), and rows it does not cover yet."""

    name: str | None
    trained_rows: int = 0
    trained_now: bool = False
    unindexed_rows: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class IndexWrite:
    """What one materialization did to one column's table."""

    table: str
    uri: str
    version: int
    rows: int
    inserted: int
    updated: int
    deleted: int
    rebuilt: bool
    ann_index: str | None
    ann: AnnState = AnnState(name=None)
    appended: bool = False


def ann_partitions(rows: int) -> int:
    """IVF partitions for an index trained on `rows`: the square root (Lance's own rule) up to 256, then 256.

    Assigning every row to its partition costs rows x partitions, so a count that grew with the table made the
    build grow faster than the table (IVF-PQ with sqrt(rows) partitions: 2 s at 10k rows, 83 s at 100k); at a fixed
    256 it grows with the rows alone, and a query (32 partitions probed) still reads an eighth of the table at most.
    """
    return max(1, min(256, round(math.sqrt(rows))))


def table_name(column: str) -> str:
    """A LanceDB-safe table name for a text column (names allow letters, digits, `_`, `-`, `.`)."""
    return "text__" + re.sub(r"[^A-Za-z0-9_.-]", "_", column)


class VectorIndexResource(dg.ConfigurableResource):
    """LanceDB tables of text embeddings, one folder per spec under the home.

    `ann_min_rows`: below it a query is an exact scan (milliseconds at these sizes); at or above it an IVF-SQ
    index (IVF, vectors scalar-quantized to a byte per dimension) is trained once and extended as rows arrive: new
    rows are assigned to the trained partitions. It is trained again only when the table has grown to
    `ann_retrain_factor` times the rows it was trained on, so a table built month by month trains its index
    O(log rows) times, and the cost of a month stays proportional to the month.
    """

    home: str
    ann_min_rows: int = 50_000
    ann_retrain_factor: float = 2.0

    # --- layout ---------------------------------------------------------------------------------------------

    def db_dir(self, spec_name: str) -> Path:
        return StorageResource(home=self.home).local_dir(spec_name, "vector_index")

    def manifest(self, spec_name: str) -> dict[str, Any]:
        path = self.db_dir(spec_name) / MANIFEST
        if not path.exists():
            raise VectorIndexError(
                f"{spec_name}: no vector index under {path.parent}; materialize {spec_name}/vector_index first")
        return json.loads(path.read_text())

    def _connect(self, spec_name: str):
        import lancedb

        return lancedb.connect(str(self.db_dir(spec_name)))

    def _column(self, spec_name: str, column: str | None) -> tuple[dict[str, Any], str]:
        manifest = self.manifest(spec_name)
        columns = manifest["columns"]
        if column is None:
            column = next(iter(columns))
        if column not in columns:
            raise VectorIndexError(f"{spec_name}: the vector index has no text column {column!r}; "
                                   f"it has {', '.join(columns)}")
        return manifest, column

    def version(self, spec_name: str, column: str | None = None) -> int:
        manifest, column = self._column(spec_name, column)
        return int(self._connect(spec_name).open_table(manifest["columns"][column]).version)

    # --- writing --------------------------------------------------------------------------------------------

    def write(self, spec_name: str, column: str, rows: pd.DataFrame, model: dict[str, Any],
              partition: str | None = None) -> IndexWrite:
        """Bring `column`'s table to exactly `rows` (row_id, text, label, fields, vector), changing only what
        changed; a different model (weights hash) replaces the table. Returns the new table version.

        With `partition` (a month of a partitioned spec) the table keeps every month and only that month's rows are
        brought to `rows`: a month the table does not hold yet is appended, nothing else is read or rewritten.
        """
        import pyarrow as pa

        db = self._connect(spec_name)
        name = table_name(column)
        vectors = np.ascontiguousarray(np.stack(rows["vector"].to_numpy()), dtype=np.float32)
        dim = int(vectors.shape[1])
        columns = {
            "row_id": pa.array(rows["row_id"].astype(str), type=pa.string()),
            "text": pa.array(rows["text"].astype(str), type=pa.string()),
            "label": pa.array(rows["label"].astype("int64"), type=pa.int64()),
            "fields": pa.array(rows["fields"].astype(str), type=pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()), dim),
        }
        if partition is not None:
            columns["partition"] = pa.array([partition] * len(rows), type=pa.string())
        data = pa.table(columns)
        path = self.db_dir(spec_name) / MANIFEST
        previous = json.loads(path.read_text()) if path.exists() else {}
        existing = name in _table_names(db)
        same_model = previous.get("model", {}).get("weights_hash") == model["weights_hash"]
        table = db.open_table(name) if existing and same_model else None
        if table is not None and ("partition" in table.schema.names) != (partition is not None):
            table = None  # a spec that opted in to partitions (or out): its table is written anew
        inserted = updated = deleted = 0
        appended = rebuilt = False
        if table is not None and partition is not None and not table.count_rows(f"partition = '{partition}'"):
            table.add(data)
            inserted, appended = data.num_rows, True
        elif table is not None:
            before = table.count_rows()
            result = (table.merge_insert("row_id")
                      .when_matched_update_all(where="target.text != source.text OR target.label != source.label "
                                                     "OR target.fields != source.fields")
                      .when_not_matched_insert_all()
                      .when_not_matched_by_source_delete(None if partition is None else f"partition = '{partition}'")
                      .execute(data))
            inserted = int(getattr(result, "num_inserted_rows", 0))
            updated = int(getattr(result, "num_updated_rows", 0))
            deleted = int(getattr(result, "num_deleted_rows", max(0, before + inserted - data.num_rows)))
        else:
            table = db.create_table(name, data, mode="overwrite")
            inserted, rebuilt = data.num_rows, True
        trained = {} if rebuilt else previous.get("ann", {}).get(column, {})
        ann = self._maintain_ann_index(table, int(table.count_rows()), int(trained.get("trained_rows", 0)))
        manifest = {
            "spec": spec_name,
            "model": model,
            "columns": {**({} if not same_model else previous.get("columns", {})), column: name},
            "ann": {**({} if not same_model else previous.get("ann", {})),
                    column: {"index": ann.name, "trained_rows": ann.trained_rows}},
        }
        atomic_write_json(path, manifest)
        return IndexWrite(table=name, uri=str(self.db_dir(spec_name) / f"{name}.lance"), version=int(table.version),
                          rows=int(table.count_rows()), inserted=inserted, updated=updated, deleted=deleted,
                          rebuilt=rebuilt, ann_index=ann.name, ann=ann, appended=appended)

    def _maintain_ann_index(self, table, rows: int, trained_rows: int) -> AnnState:
        """Train an IVF-SQ index once the table reaches `ann_min_rows`, and again once it has grown to
        `ann_retrain_factor` times the rows it was trained on; in between, fold new rows into the trained one."""
        import time

        started = time.perf_counter()
        current = next((i.name for i in table.list_indices() if "vector" in list(getattr(i, "columns", []))), None)
        if rows < self.ann_min_rows and current is None:
            return AnnState(name=None)
        if current is not None and trained_rows and rows < trained_rows * self.ann_retrain_factor:
            if table.index_stats(current).num_unindexed_rows:
                table.optimize()
            return AnnState(name=current, trained_rows=trained_rows,
                            unindexed_rows=int(table.index_stats(current).num_unindexed_rows),
                            seconds=time.perf_counter() - started)
        table.create_index(metric="cosine", vector_column_name="vector", index_type="IVF_SQ",
                           num_partitions=ann_partitions(rows), replace=True)
        name = next(i.name for i in table.list_indices() if "vector" in list(getattr(i, "columns", [])))
        return AnnState(name=name, trained_rows=rows, trained_now=True,
                        unindexed_rows=int(table.index_stats(name).num_unindexed_rows),
                        seconds=time.perf_counter() - started)

    # --- reading --------------------------------------------------------------------------------------------

    def similar(self, spec_name: str, text_or_vector: str | Any, k: int = 5, column: str | None = None,
                exclude_row_id: str | None = None) -> pd.DataFrame:
        """The `k` rows of `spec_name` whose text is nearest to a text or a vector, nearest first.

        Columns: row_id, text, label, fields (JSON of the row's other features), similarity (cosine, 1 = same).
        """
        manifest, column = self._column(spec_name, column)
        model = manifest["model"]
        if isinstance(text_or_vector, str):
            from resources.embedder import ModelRef, encode

            ref = ModelRef(name=model["name"], path=Path(model["path"]), weights_hash=model["weights_hash"])
            query = encode(ref, [text_or_vector], batch_size=1)[0]
        else:
            query = np.asarray(text_or_vector, dtype=np.float32).reshape(-1)
            norm = float(np.linalg.norm(query))
            query = query / norm if norm > 0 else query
        if query.shape[0] != int(model["dimension"]):
            raise VectorIndexError(f"{spec_name}: a query vector of dimension {query.shape[0]} does not fit the "
                                   f"{column!r} index, whose vectors have dimension {model['dimension']}")
        table = self._connect(spec_name).open_table(manifest["columns"][column])
        search = table.search(query, vector_column_name="vector").distance_type("cosine")
        if table.list_indices():
            search = search.nprobes(32).refine_factor(10)
        if exclude_row_id is not None:
            search = search.where(f"row_id != '{exclude_row_id.replace(chr(39), chr(39) * 2)}'", prefilter=True)
        found = search.limit(k).select(["row_id", "text", "label", "fields"]).to_pandas()
        found["similarity"] = 1.0 - found.pop("_distance").astype(float)
        return found.reset_index(drop=True)


def _table_names(db) -> list[str]:
    if hasattr(db, "list_tables"):
        listed = db.list_tables()
        names = getattr(listed, "tables", listed)
        return list(names)
    return list(db.table_names())
