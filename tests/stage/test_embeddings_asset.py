"""text_embeddings materialized on a real instance with the real MiniLM model."""

from __future__ import annotations

import time
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from orchestration.definitions import build_definitions
from assets.features import clean_text
from core.files import sha256_file
from resources.embedder import SHIPPED_MODEL_NAME, EmbeddingModelError, encode, encoder_runtime, resolve_model
from support import materialize
from text_support import _metadata, write_text_spec

def _checks(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def test_text_embeddings_asset_contract(home: Path, instance, pipelines: Path, tmp_path: Path):
    _, frame = write_text_spec(pipelines, tmp_path, rows=60)
    defs = build_definitions(pipelines)
    started = time.perf_counter()
    result = materialize(defs, instance, 'key:"jobs/*" and (group:data or group:embeddings)')
    assert result.success, result.all_events
    assert all(_checks(result).values()) and {"embedding_dimension", "embedding_finite", "embedding_unit_norm",
                                               "embedding_covers_validated_rows"} <= set(_checks(result))

    stored = pd.read_parquet(home / "assets" / "jobs" / "text_embeddings.parquet")
    validated = pd.read_parquet(home / "assets" / "jobs" / "validated_dataset.parquet")
    assert list(stored.columns) == ["row_id", "title__embedding"]
    assert stored["row_id"].tolist() == validated["row_id"].tolist() == frame["id"].tolist()
    matrix = np.stack(stored["title__embedding"].to_numpy())
    assert matrix.dtype == np.float32 and matrix.shape == (60, 384)
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)

    meta = _metadata(result, "jobs/text_embeddings")
    assert meta["model"] == SHIPPED_MODEL_NAME and meta["dimension"] == 384
    ref = resolve_model(None, "jobs")
    assert meta["weights_hash"] == ref.weights_hash
    # The default runtime: the encoder's own INT8 graph, checked against PyTorch, the vectors its own.
    graph = home / "embedding_cache" / "onnx" / ref.weights_hash / "encoder.int8.onnx"
    assert meta["runtime"] == "onnx-int8" and meta["runtime_cosine"] >= 0.98
    assert meta["graph_sha256"] == sha256_file(graph) and meta["graph_sha256"] in meta["runtime_detail"]
    assert Path(meta["cache_dir"]).name == f"{ref.cache_id}-onnx-int8-{meta['graph_sha256'][:16]}"
    runtime = encoder_runtime(ref, "auto", [], home / "embedding_cache" / "onnx")
    np.testing.assert_allclose(matrix, encode(ref, validated["title"].map(clean_text).tolist(), 16, runtime),
                               rtol=0, atol=1e-6)
    assert meta["rows_embedded"] == 60 and meta["rows_reused"] == 0 and len(meta["embeddings_version"]) == 64
    assert meta["throughput_texts_per_s"] > 0 and "title" in meta["preview"]
    assert _metadata(result, "jobs/vector_index")["embeddings_version"] == meta["embeddings_version"]
    assert time.perf_counter() - started < 120


def test_second_materialization_embeds_exactly_the_ten_changed_rows(home: Path, instance, pipelines: Path,
                                                                     tmp_path: Path):
    csv, frame = write_text_spec(pipelines, tmp_path, rows=120)
    defs = build_definitions(pipelines)
    first = materialize(defs, instance, 'key:"jobs/*" and (group:data or group:embeddings)')
    assert first.success
    before = pd.read_parquet(home / "assets" / "jobs" / "text_embeddings.parquet")

    changed = frame.index[5:105:10]
    frame.loc[changed, "title"] = [f"apprentice beekeeper number {i}" for i in range(10)]
    frame.to_csv(csv, index=False)
    second = materialize(defs, instance, 'key:"jobs/*" and (group:data or group:embeddings)')
    assert second.success and all(_checks(second).values())

    meta = _metadata(second, "jobs/text_embeddings")
    assert (meta["rows_embedded"], meta["texts_embedded"], meta["rows_reused"]) == (10, 10, 110)
    assert meta["embeddings_version"] != _metadata(first, "jobs/text_embeddings")["embeddings_version"]
    after = pd.read_parquet(home / "assets" / "jobs" / "text_embeddings.parquet")
    same = ~after.index.isin(changed)
    np.testing.assert_array_equal(np.stack(after.loc[same, "title__embedding"]),
                                  np.stack(before.loc[same, "title__embedding"]))
    assert not np.allclose(np.stack(after.loc[changed, "title__embedding"]),
                           np.stack(before.loc[changed, "title__embedding"]))

    third = materialize(defs, instance, 'key:"jobs/text_embeddings"')
    meta3 = _metadata(third, "jobs/text_embeddings")
    assert (meta3["rows_embedded"], meta3["rows_reused"]) == (0, 120)
    assert meta3["embeddings_version"] == meta["embeddings_version"]


def test_configured_model_that_is_not_a_model_names_the_spec(home: Path, instance, pipelines: Path,
                                                             tmp_path: Path):
    write_text_spec(pipelines, tmp_path, rows=60, embeddings={"model": "models/nowhere"})
    with pytest.raises(EmbeddingModelError, match=r"jobs: embeddings.model 'models/nowhere'.*nowhere"):
        materialize(build_definitions(pipelines), instance, 'key:"jobs/*" and (group:data or group:embeddings)', raise_on_error=True)


def test_pytorch_runtime_embeds_with_the_sentence_transformer(home: Path, instance, pipelines: Path,
                                                             tmp_path: Path):
    write_text_spec(pipelines, tmp_path, rows=60, embeddings={"runtime": "pytorch"})
    result = materialize(build_definitions(pipelines), instance,
                         'key:"jobs/*" and (group:data or group:embeddings)')
    assert result.success and all(_checks(result).values())
    meta = _metadata(result, "jobs/text_embeddings")
    ref = resolve_model(None, "jobs")
    assert meta["runtime"] == "pytorch" and meta["graph_sha256"] == "none" and meta["runtime_cosine"] == "n/a"
    assert meta["runtime_detail"] == "embeddings.runtime: pytorch" and Path(meta["cache_dir"]).name == ref.cache_id
    assert not (home / "embedding_cache" / "onnx" / ref.weights_hash).exists()  # nothing exported
    stored = pd.read_parquet(home / "assets" / "jobs" / "text_embeddings.parquet")
    validated = pd.read_parquet(home / "assets" / "jobs" / "validated_dataset.parquet")
    np.testing.assert_allclose(np.stack(stored["title__embedding"]),
                               encode(ref, validated["title"].map(clean_text).tolist(), 16), rtol=0, atol=1e-5)
