"""The embeddings stage: validated_dataset -> text_embeddings (checked) -> vector_index.

Only specs with text features get this stage. Every text column is embedded by one sentence-transformers
model (the shipped all-MiniLM-L6-v2 unless the spec names another directory), on the runtime
`embeddings.runtime` chooses (by default its ONNX graph, INT8 where it holds up: resources/embedder.py); a text
already embedded by the same model, at the same weights hash, on the same runtime and graph, is read from the
cache under the home instead of being embedded again.
"""

import hashlib
import json
import time
from typing import Any

import dagster as dg

from assets import naming
from assets.checks.embedding_checks import build_embedding_checks
from assets.features import clean_text, embedding_column
from assets.naming import LABEL, ROW_ID, asset_key
from assets.partitions import (Frames, month_keys, partition_output, partitioned_asset_kwargs, quiet_preview,
                               run_keys, split_aligned, with_note)
from assets.spec import LoadedSpec, PipelineSpec
from assets.wiring import DataFrameType, Log
from core.lazy import np, pd
from resources.storage import StorageResource, frame_hash
from resources.vectors import VectorIndexResource


def embeddings_version(weights_hash: str, frame: "pd.DataFrame", text_columns: list[str]) -> str:
    """A hash of the model and every (row id, vector) of a text_embeddings frame: equal vectors, equal version."""
    h = hashlib.sha256(weights_hash.encode())
    h.update("\0".join(frame[ROW_ID].astype(str)).encode())
    for col in text_columns:
        h.update(f"\0{col}\0".encode())
        h.update(np.ascontiguousarray(np.stack(frame[embedding_column(col)].to_numpy()), dtype=np.float32).tobytes())
    return h.hexdigest()


def _model_metadata(spec: PipelineSpec, loaded: LoadedSpec):
    from resources.embedder import resolve_model

    return resolve_model(spec.embeddings.model, spec.name, loaded.path.parent)


def _preview(validated: "pd.DataFrame", frame: "pd.DataFrame", text_columns: list[str], rows: int = 5) -> str:
    shown = pd.DataFrame({ROW_ID: frame[ROW_ID].head(rows)})
    for col in text_columns:
        shown[col] = validated[col].head(rows).map(lambda t: (t[:40] + "...") if len(t) > 40 else t)
        shown[f"{col} (first 4 dims)"] = frame[embedding_column(col)].head(rows).map(
            lambda v: ", ".join(f"{x:+.3f}" for x in v[:4]))
    return shown.to_markdown(index=False)


def _embed(storage: StorageResource, loaded: LoadedSpec, validated: "pd.DataFrame", log: Log
           ) -> "tuple[pd.DataFrame, dict[str, Any]]":
    """Vectors of every text column of `validated` through the cache, and what that cost (run-wide metadata)."""
    spec = loaded.spec
    text_columns = list(spec.features.text)
    from resources.embedder import EmbeddingCache, embed_with_cache, encoder_runtime, model_dimension

    missing = [c for c in text_columns if c not in validated.columns]
    if missing:
        raise KeyError(f"{spec.name}: validated_dataset has no text column(s) {missing}; "
                       f"re-materialize {spec.name}/validated_dataset")
    started = time.perf_counter()
    ref = _model_metadata(spec, loaded)
    texts = {col: validated[col].map(clean_text).tolist() for col in text_columns}
    runtime = encoder_runtime(ref, spec.embeddings.runtime, [t for c in text_columns for t in texts[c]],
                              storage.local_dir("embedding_cache", "onnx"), spec.embeddings.batch_size)
    runtime_seconds = time.perf_counter() - started
    # The folder names the runtime and the graph's digest: PyTorch and ONNX vectors never mix.
    cache = EmbeddingCache(storage.local_dir("embedding_cache", ref.cache_id + runtime.cache_suffix))
    frame = pd.DataFrame({ROW_ID: validated[ROW_ID].astype(str).to_numpy()})
    per_column: dict[str, Any] = {}
    totals = {"rows_embedded": 0, "rows_reused": 0, "texts_embedded": 0, "encode_seconds": 0.0}
    dim: int | None = None
    for col in text_columns:
        run = embed_with_cache(ref, texts[col], cache, spec.embeddings.batch_size, runtime)
        dim = int(run.vectors.shape[1]) if len(texts[col]) else model_dimension(ref)
        frame[embedding_column(col)] = list(run.vectors)
        per_column[col] = {"rows_embedded": run.rows_embedded, "rows_reused": run.rows_reused,
                           "texts_embedded": run.texts_embedded}
        for k in ("rows_embedded", "rows_reused", "texts_embedded"):
            totals[k] += getattr(run, k)
        totals["encode_seconds"] += run.encode_seconds
        log.info(f"{spec.name}/{col}: embedded {run.texts_embedded} new distinct texts "
                 f"({run.rows_embedded} rows), reused {run.rows_reused} rows from the cache")
    seconds = time.perf_counter() - started
    encoded = totals["texts_embedded"]
    return frame, {
        "model": ref.name,
        "model_path": dg.MetadataValue.path(str(ref.path)),
        "weights_hash": ref.weights_hash,
        "runtime": runtime.path,
        "runtime_cosine": runtime.cosine if runtime.cosine is not None else "n/a",
        "runtime_detail": (f"ONNX graph sha256 {runtime.graph_sha256}, mean cosine {runtime.cosine:.4f} to the "
                           f"PyTorch encoder on {runtime.texts} distinct texts" if runtime.graph_sha256
                           else runtime.reason),
        "graph_sha256": runtime.graph_sha256 or "none",
        "runtime_seconds": round(runtime_seconds, 3),
        "dimension": dim,
        "text_columns": ", ".join(text_columns),
        "rows_embedded": totals["rows_embedded"],
        "rows_reused": totals["rows_reused"],
        "texts_embedded": encoded,
        "per_column": dg.MetadataValue.json(per_column),
        "throughput_texts_per_s": round(encoded / totals["encode_seconds"], 1) if encoded else 0.0,
        "throughput_rows_per_s": round(len(frame) * len(text_columns) / seconds, 1) if seconds else 0.0,
        "seconds": round(seconds, 3),
        "batch_size": spec.embeddings.batch_size,
        "cache_dir": dg.MetadataValue.path(str(cache.folder)),
    }


def _version_metadata(loaded: LoadedSpec, validated: "pd.DataFrame", frame: "pd.DataFrame", weights_hash: str
                      ) -> dict[str, Any]:
    text_columns = list(loaded.spec.features.text)
    return {"embeddings_version": embeddings_version(weights_hash, frame, text_columns),
            "dagster/row_count": len(frame),
            "preview": dg.MetadataValue.md(_preview(validated, frame, text_columns))}


def embed_text_columns(storage: StorageResource, loaded: LoadedSpec, validated: "pd.DataFrame", log: Log
                       ) -> "dg.Output[pd.DataFrame]":
    """Sentence embeddings of every text column, L2-normalized, keyed by row_id, through the content-hash cache."""
    frame, meta = _embed(storage, loaded, validated, log)
    versioned = _version_metadata(loaded, validated, frame, meta["weights_hash"])
    return dg.Output(frame, data_version=dg.DataVersion(versioned["embeddings_version"][:16]),
                     metadata={**versioned, **meta})


def embed_months(storage: StorageResource, loaded: LoadedSpec, validated: "pd.DataFrame", keys: list[str], log: Log
                 ) -> "tuple[dict[str, pd.DataFrame], dict[str, dict[str, Any]], dict[str, Any]]":
    """A run's months embedded at once (the cache embeds each new text once), then cut by month: each month's
    vectors and version, and what the run cost. Only texts the cache has never seen are encoded."""
    frame, meta = _embed(storage, loaded, validated, log)
    months = month_keys(loaded.spec, validated[loaded.spec.time_column])
    frames, rows = split_aligned(frame, months, keys), split_aligned(validated, months, keys)
    metas = {k: {**_version_metadata(loaded, rows[k], frames[k], meta["weights_hash"]), "partition": k}
             for k in keys}
    return frames, metas, meta


def index_rows(vectors: VectorIndexResource, loaded: LoadedSpec, embeddings: "pd.DataFrame", validated: "pd.DataFrame",
               log: Log, partition: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each text column's LanceDB table brought to these rows (a partitioned spec's: this month's rows, the other
    months untouched); the summary (the asset's value) and metadata, with what the ANN index did."""
    spec = loaded.spec
    text_columns = list(spec.features.text)
    ref = _model_metadata(spec, loaded)
    version = embeddings_version(ref.weights_hash, embeddings, text_columns)
    joined = validated.merge(embeddings, on=ROW_ID, how="inner", validate="one_to_one")
    if len(joined) != len(validated) or len(joined) != len(embeddings):
        where = f" {partition}" if partition else ""
        raise ValueError(f"{spec.name}: text_embeddings{where} ({len(embeddings)} rows) does not cover "
                         f"validated_dataset{where} ({len(validated)} rows); re-materialize {spec.name}/text_embeddings")
    dim = len(embeddings[embedding_column(text_columns[0])].iloc[0])
    model = {"name": ref.name, "path": str(ref.path), "weights_hash": ref.weights_hash, "dimension": dim}
    summary: dict[str, Any] = {"embeddings_version": version, "model": model, "tables": {}}
    meta: dict[str, Any] = {}
    for col in text_columns:
        others = [c for c in spec.features.all if c != col]
        # A spec whose only feature is this text has no other fields to show a reviewer.
        fields = (joined[others].astype(object).where(joined[others].notna(), None).to_dict(orient="records")
                  if others else [{}] * len(joined))
        rows = pd.DataFrame({
            "row_id": joined[ROW_ID].astype(str), "text": joined[col].astype(str), "label": joined[LABEL],
            "fields": [json.dumps(f, default=str, sort_keys=True) for f in fields],
            "vector": joined[embedding_column(col)],
        })
        write = vectors.write(spec.name, col, rows, model, partition)
        log.info(f"{spec.name}/{col}: table {write.table} at version {write.version} "
                 f"(+{write.inserted} ~{write.updated} -{write.deleted}{', appended' if write.appended else ''}); "
                 f"ANN {'trained on ' + str(write.ann.trained_rows) + ' rows' if write.ann.trained_now else 'kept'}")
        summary["tables"][col] = {"table": write.table, "uri": write.uri, "version": write.version,
                                  "rows": write.rows, "ann_index": write.ann_index}
        prefix = "" if len(text_columns) == 1 else f"{col}/"
        meta.update({
            f"{prefix}lance_table_version": write.version, f"{prefix}table_uri": dg.MetadataValue.path(write.uri),
            f"{prefix}rows_inserted": write.inserted, f"{prefix}rows_updated": write.updated,
            f"{prefix}rows_deleted": write.deleted, f"{prefix}ann_index": write.ann_index or "none (exact scan)",
            f"{prefix}table_rebuilt": write.rebuilt, f"{prefix}appended": write.appended,
            f"{prefix}table_rows": write.rows,
            f"{prefix}ann_trained_rows": write.ann.trained_rows, f"{prefix}ann_trained_now": write.ann.trained_now,
            f"{prefix}ann_unindexed_rows": write.ann.unindexed_rows,
            f"{prefix}ann_seconds": round(write.ann.seconds, 3),
        })
    meta.update({"embeddings_version": version, "model": ref.name, "weights_hash": ref.weights_hash,
                 "dimension": dim, "dagster/row_count": len(joined), "ann_min_rows": vectors.ann_min_rows,
                 "ann_retrain_factor": vectors.ann_retrain_factor,
                 "preview": dg.MetadataValue.md(joined[[ROW_ID, LABEL, *text_columns]].head(5)
                                                .to_markdown(index=False))})
    # The table holds labels and features as well as vectors, so its version follows both inputs.
    meta["content_hash"] = hashlib.sha256(f"{version}{frame_hash(validated)}".encode()).hexdigest()
    return summary, meta if partition is None else {**meta, "partition": partition}


def write_vector_index(vectors: VectorIndexResource, loaded: LoadedSpec, embeddings: "pd.DataFrame",
                       validated: "pd.DataFrame", log: Log) -> dg.Output[dict]:
    """One LanceDB table per text column, written incrementally; the Lance version of each is recorded."""
    summary, meta = index_rows(vectors, loaded, embeddings, validated, log)
    return dg.Output(summary, data_version=dg.DataVersion(meta["content_hash"][:16]), metadata=meta)


def index_months(vectors: VectorIndexResource, loaded: LoadedSpec, embeddings: "pd.DataFrame",
                 validated: "pd.DataFrame", keys: list[str], log: Log
                 ) -> tuple[dict[str, dict], dict[str, dict[str, Any]]]:
    """A run's months written into the tables one month at a time (a new month is appended), in time order."""
    months = month_keys(loaded.spec, validated[loaded.spec.time_column])
    rows = split_aligned(validated, months, keys)
    ids = {k: set(rows[k][ROW_ID].astype(str)) for k in keys}
    vectors_by_month = {k: embeddings[embeddings[ROW_ID].astype(str).isin(ids[k])].reset_index(drop=True)
                        for k in keys}
    done = {k: index_rows(vectors, loaded, vectors_by_month[k], rows[k], log, k) for k in sorted(keys)}
    return {k: v[0] for k, v in done.items()}, {k: v[1] for k, v in done.items()}


# --- wiring ---------------------------------------------------------------------------------------------------


def definitions(loaded: LoadedSpec) -> dg.Definitions:
    """text_embeddings, its checks and vector_index for one spec with text features (none without); a month at a
    time when the spec has partitions."""
    if not loaded.spec.has_text:
        return dg.Definitions()
    with quiet_preview():
        return _definitions(loaded)


def _definitions(loaded: LoadedSpec) -> dg.Definitions:
    spec = loaded.spec
    validated_key, embeddings_key, index_key = (asset_key(spec.name, n) for n in
                                                (naming.VALIDATED_DATASET, naming.TEXT_EMBEDDINGS,
                                                 naming.VECTOR_INDEX))

    partitioned = partitioned_asset_kwargs(spec)

    @dg.asset(key=embeddings_key, group_name=naming.EMBEDDINGS, ins={"validated": dg.AssetIn(key=validated_key)},
              **partitioned)
    def text_embeddings(context: dg.AssetExecutionContext, storage: StorageResource,
                        validated: DataFrameType) -> dg.Output[Frames]:
        """Sentence embeddings of every text column, L2-normalized, keyed by row_id.

        Texts are cached by content hash per model: only texts this model has never embedded are encoded.
        `embeddings_version` identifies these exact vectors; training records it as lineage.
        """
        keys = run_keys(context)
        if not keys:
            return embed_text_columns(storage, loaded, validated, context.log)
        frames, metas, common = embed_months(storage, loaded, validated, keys, context.log)
        return partition_output(context, keys, frames, metas, common, version_key="embeddings_version")

    @dg.asset(key=index_key, group_name=naming.EMBEDDINGS,
              ins={"embeddings": dg.AssetIn(key=embeddings_key), "validated": dg.AssetIn(key=validated_key)},
              **partitioned)
    def vector_index(context: dg.AssetExecutionContext, vectors: VectorIndexResource, embeddings: DataFrameType,
                     validated: DataFrameType) -> dg.Output[Any]:
        """A LanceDB table per text column (row id, text, label, the row's other features, its vector) for
        similar-case lookups and text drift. Only changed rows are written; the Lance table version of each
        materialization is recorded. An ANN index (IVF-SQ) is trained once a table reaches the resource's
        `ann_min_rows`, extended as rows arrive and trained again only when the table has doubled
        (`ann_retrain_factor`); below `ann_min_rows` a query is an exact scan."""
        keys = run_keys(context)
        if not keys:
            return write_vector_index(vectors, loaded, embeddings, validated, context.log)
        summaries, metas = index_months(vectors, loaded, embeddings, validated, keys, context.log)
        return partition_output(context, keys, summaries, metas)

    checks = build_embedding_checks(spec.name, embeddings_key, validated_key,
                                    {c: embedding_column(c) for c in spec.features.text},
                                    partitions_def=partitioned.get("partitions_def"))
    assets = [with_note(text_embeddings, spec, "A month at a time: only the month's texts the cache has not seen "
                                               "are encoded."),
              with_note(vector_index, spec, "A month at a time: a month the tables do not hold yet is appended; "
                                            "the other months are neither read nor rewritten.")]
    return dg.Definitions(assets=assets, asset_checks=[checks])
