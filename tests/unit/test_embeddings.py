"""The embeddings stage on the real all-MiniLM-L6-v2: vectors, the content-hash cache, checks, the factory."""

from __future__ import annotations
from pathlib import Path
import numpy as np
import pandas as pd
from assets.checks.embedding_checks import evaluate
from assets import embeddings as embeddings_stage
from assets.spec import load_spec
from orchestration.definitions import build_definitions
from resources.embedder import (SHIPPED_MODEL_NAME, EmbeddingCache, embed_with_cache,
                                encode, resolve_model)
from support import copy_shipped

# --- a small text spec: a CSV in the test's folder and a `kind: file` spec over it ---------------------------


def test_near_duplicates_are_closer_than_unrelated_texts():
    ref = resolve_model(None, "test")
    assert ref.name == SHIPPED_MODEL_NAME and len(ref.weights_hash) == 64
    v = encode(ref, ["Senior software engineer", "Sr. Software Engineer", "registered nurse", "truck driver",
                     "The cat sat on the mat.", "A cat was sitting on the mat."], batch_size=4)
    assert v.dtype == np.float32 and v.shape == (6, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    sim = v @ v.T
    assert sim[0, 1] > 0.6 and sim[4, 5] > 0.6
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[0, 3] + 0.3
    assert sim[4, 5] > max(sim[4, 0], sim[4, 2]) + 0.3


def test_cache_embeds_each_new_text_once(tmp_path: Path):
    ref = resolve_model(None, "test")
    cache = EmbeddingCache(tmp_path / "cache")
    first = embed_with_cache(ref, ["nurse", "welder", "nurse", ""], cache, batch_size=8)
    assert (first.texts_embedded, first.rows_embedded, first.rows_reused) == (3, 4, 0)
    np.testing.assert_array_equal(first.vectors[0], first.vectors[2])
    second = embed_with_cache(ref, ["welder", "chef", "nurse"], cache, batch_size=8)
    assert (second.texts_embedded, second.rows_embedded, second.rows_reused) == (1, 1, 2)
    np.testing.assert_array_equal(second.vectors[0], first.vectors[1])
    np.testing.assert_allclose(second.vectors[1], encode(ref, ["chef"], 8)[0], atol=1e-6)
    assert len(cache) == 4


def test_checks_catch_bad_vectors():
    validated = pd.DataFrame({"row_id": ["a", "b", "c"]})
    good = np.eye(3, dtype=np.float32)
    ok = pd.DataFrame({"row_id": ["a", "b", "c"], "t__embedding": list(good)})
    assert all(passed for passed, _, _ in evaluate(ok, validated, {"t": "t__embedding"}).values())

    bad = pd.DataFrame({"row_id": ["a", "b", "b"],
                        "t__embedding": [good[0], np.array([np.nan, 0, 0], np.float32), good[1] * 2]})
    out = evaluate(bad, validated, {"t": "t__embedding"})
    assert not out["embedding_finite"][0] and "row_id ['b']" in out["embedding_finite"][1]
    assert not out["embedding_unit_norm"][0]
    assert not out["embedding_covers_validated_rows"][0] and "['c']" in out["embedding_covers_validated_rows"][1]
    mixed = pd.DataFrame({"row_id": ["a", "b", "c"], "t__embedding": [good[0], good[1], np.ones(4) / 2]})
    assert not evaluate(mixed, validated, {"t": "t__embedding"})["embedding_dimension"][0]


def test_specs_without_text_get_no_embedding_assets(pipelines: Path):
    copy_shipped(pipelines, "credit_scoring", "credit_risk")
    graph = build_definitions(pipelines).resolve_asset_graph()
    groups = {k.to_user_string(): graph.get(k).group_name for k in graph.get_all_asset_keys()}
    assert groups["credit_risk/text_embeddings"] == groups["credit_risk/vector_index"] == "embeddings"
    assert not {"credit_scoring/text_embeddings", "credit_scoring/vector_index"} & set(groups)
    assert not embeddings_stage.definitions(load_spec(pipelines / "credit_scoring.yaml")).assets
    parents = {k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys}
               for k in graph.get_all_asset_keys()}
    assert parents["credit_risk/text_embeddings"] == {"credit_risk/validated_dataset"}
    assert "credit_risk/text_embeddings" in parents["credit_risk/vector_index"]
