"""vector_index on real LanceDB files and the real model: similar-case lookups, versions, the ANN index."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from orchestration.definitions import build_definitions
from resources.vectors import VectorIndexError, VectorIndexResource
from support import materialize
from text_support import _metadata, titles, write_text_spec


def test_similar_finds_the_expected_neighbour_and_the_version_advances(home: Path, instance, pipelines: Path,
                                                                        tmp_path: Path):
    csv, frame = write_text_spec(pipelines, tmp_path, rows=80)
    defs = build_definitions(pipelines)
    first = materialize(defs, instance, 'key:"jobs/*" and (group:data or group:embeddings)')
    assert first.success
    vectors = VectorIndexResource(home=str(home))
    v1 = _metadata(first, "jobs/vector_index")["lance_table_version"]
    assert vectors.version("jobs") == v1
    assert (home / "jobs" / "vector_index").is_dir()

    found = vectors.similar("jobs", "senior software developer", k=3)
    assert list(found.columns) == ["row_id", "text", "label", "fields", "similarity"]
    assert found["text"].iloc[0] == "senior software engineer"
    assert found["similarity"].is_monotonic_decreasing and found["similarity"].iloc[0] > 0.8
    row = frame.set_index("id").loc[found["row_id"].iloc[0]]
    assert json.loads(found["fields"].iloc[0]) == {"amount": row["amount"]}
    assert found["label"].iloc[0] == int(row["outcome"] == "bad")

    # A vector query (here: a stored row's own vector) finds that row first; excluding it finds the next.
    stored = pd.read_parquet(home / "assets" / "jobs" / "text_embeddings.parquet")
    own = stored["title__embedding"].iloc[7]
    assert vectors.similar("jobs", own, k=1)["row_id"].tolist() == ["r0007"]
    assert vectors.similar("jobs", own, k=1, exclude_row_id="r0007")["row_id"].iloc[0] != "r0007"

    frame.loc[3, "title"] = "beekeeper"
    frame.to_csv(csv, index=False)
    second = materialize(defs, instance, 'key:"jobs/*" and (group:data or group:embeddings)')
    assert second.success
    meta = _metadata(second, "jobs/vector_index")
    assert meta["lance_table_version"] > v1 and vectors.version("jobs") == meta["lance_table_version"]
    assert (meta["rows_inserted"], meta["rows_updated"], meta["rows_deleted"]) == (0, 1, 0)
    assert vectors.similar("jobs", "apiarist, keeps bees", k=1)["row_id"].tolist() == ["r0003"]

    frame.drop(index=[10, 11]).to_csv(csv, index=False)
    third = materialize(defs, instance, 'key:"jobs/*" and (group:data or group:embeddings)')
    assert third.success
    meta3 = _metadata(third, "jobs/vector_index")
    assert meta3["rows_deleted"] == 2 and meta3["dagster/row_count"] == 78


def test_ann_index_is_built_once_the_table_is_large_enough(home: Path, instance, pipelines: Path, tmp_path: Path):
    csv, frame = write_text_spec(pipelines, tmp_path, rows=300)
    defs = build_definitions(pipelines)
    resources = {**defs.resources, "vectors": VectorIndexResource(home=str(home), ann_min_rows=256)}
    every = [*defs.assets, *defs.asset_checks]
    result = dg.materialize(every, selection='key:"jobs/*" and (group:data or group:embeddings)', resources=resources, instance=instance)
    assert result.success
    meta = _metadata(result, "jobs/vector_index")
    assert meta["ann_index"] != "none (exact scan)"
    vectors = VectorIndexResource(home=str(home), ann_min_rows=256)
    assert vectors.similar("jobs", "chief pharmacist", k=1)["text"].tolist() == ["chief pharmacist"]

    frame.loc[0, "title"] = "zookeeper"
    frame.to_csv(csv, index=False)
    again = dg.materialize(every, selection='key:"jobs/*" and (group:data or group:embeddings)', resources=resources, instance=instance)
    meta2 = _metadata(again, "jobs/vector_index")
    assert meta2["ann_index"] == meta["ann_index"] and meta2["lance_table_version"] > meta["lance_table_version"]
    assert vectors.similar("jobs", "zookeeper", k=1)["row_id"].tolist() == ["r0000"]


def test_errors_name_the_spec_and_column(home: Path, instance, pipelines: Path, tmp_path: Path):
    vectors = VectorIndexResource(home=str(home))
    with pytest.raises(VectorIndexError, match="jobs: no vector index.*materialize jobs/vector_index"):
        vectors.similar("jobs", "nurse")
    write_text_spec(pipelines, tmp_path, rows=60, texts=titles(60))
    assert materialize(build_definitions(pipelines), instance, 'key:"jobs/*" and (group:data or group:embeddings)').success
    with pytest.raises(VectorIndexError, match="no text column 'notes'"):
        vectors.similar("jobs", "nurse", column="notes")
    with pytest.raises(VectorIndexError, match="dimension 3 does not fit.*384"):
        vectors.similar("jobs", np.ones(3))


def test_spec_whose_only_feature_is_text_gets_an_index(home: Path, instance, pipelines: Path, tmp_path: Path):
    """No other fields to show a reviewer: the index still holds every row, with empty fields."""
    write_text_spec(pipelines, tmp_path, rows=60, features={"text": ["title"]})
    result = materialize(build_definitions(pipelines), instance, 'key:"jobs/*" and (group:data or group:embeddings)')
    assert result.success
    hits = VectorIndexResource(home=str(home)).similar("jobs", titles(60)[5], k=1)
    assert len(hits) == 1 and json.loads(hits.iloc[0]["fields"]) == {}
