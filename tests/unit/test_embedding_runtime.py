"""text_embeddings' runtime (resources/embedder.py encoder_runtime) on the real MiniLM: the encoder's own ONNX graph,
exported once into the home, checked against PyTorch, re-hashed on every load; `embeddings.runtime: pytorch`
opts out; the vector cache never mixes the two."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.files import sha256_file
from core.onnx_runtime import ENCODER_INT8, MIN_COSINE
from resources.embedder import (GRAPH_CHOICE, EmbeddingCache, EmbeddingModelError, cached_runtime, embed_with_cache,
                                encode, encoder_runtime, resolve_model)

TEXTS = [f"{level}{role}" for level in ("", "senior ", "lead ", "assistant ")
         for role in ("software engineer", "registered nurse", "truck driver", "teacher", "cashier", "owner",
                      "electrician", "warehouse associate at a very large regional distribution center")]


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> Path:
    """<home>/embedding_cache/onnx after text_embeddings exported and checked the shipped MiniLM once."""
    folder = tmp_path_factory.mktemp("home") / "embedding_cache" / "onnx"
    encoder_runtime(resolve_model(None, "t"), "auto", TEXTS, folder)
    return folder


def test_auto_embeds_with_the_checked_int8_graph_exported_once(graphs: Path):
    ref = resolve_model(None, "t")
    runtime = encoder_runtime(ref, "auto", TEXTS, graphs)
    folder = graphs / ref.weights_hash
    assert runtime.path == "onnx-int8" and runtime.graph == folder / ENCODER_INT8
    assert runtime.graph_sha256 == sha256_file(runtime.graph) and runtime.cosine >= MIN_COSINE
    assert runtime.texts == len(set(TEXTS))
    assert sorted(p.name for p in folder.iterdir()) == [GRAPH_CHOICE, ENCODER_INT8]  # fp32 not kept
    assert not [p for p in graphs.iterdir() if p.name.startswith(".")]  # no half-written folder left
    stamp = runtime.graph.stat().st_mtime_ns
    assert encoder_runtime(ref, "auto", ["other texts"], graphs) == runtime  # decided once per encoder
    assert runtime.graph.stat().st_mtime_ns == stamp

    onnx, torch = encode(ref, TEXTS, 8, runtime), encode(ref, TEXTS, 8)
    cosine = (onnx * torch).sum(axis=1)
    assert cosine.mean() >= MIN_COSINE and not np.allclose(onnx, torch, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(onnx, axis=1), 1.0, atol=1e-5)
    # One text per run on the INT8 graph: a text's vector does not depend on its batch-mates, so the server
    # (one request's text) computes the vector training saw.
    alone = np.stack([encode(ref, [t], 8, runtime)[0] for t in TEXTS[:4]])
    np.testing.assert_allclose(onnx[:4], alone, rtol=0, atol=1e-6)


def test_pytorch_runtime_gives_pytorch_vectors_and_a_cache_of_its_own(graphs: Path, tmp_path: Path):
    ref = resolve_model(None, "t")
    pytorch = encoder_runtime(ref, "pytorch", TEXTS, tmp_path / "unused")
    assert pytorch.path == "pytorch" and pytorch.cache_suffix == "" and not (tmp_path / "unused").exists()
    assert pytorch.describe() == {"path": "pytorch", "reason": "embeddings.runtime: pytorch"}
    onnx = encoder_runtime(ref, "auto", TEXTS, graphs)
    assert onnx.cache_suffix == f"-onnx-int8-{onnx.graph_sha256[:16]}"

    # The two runtimes' vectors live in two cache folders: a cache never answers with the other's vectors.
    caches = {r.path: EmbeddingCache(tmp_path / f"cache{r.cache_suffix}") for r in (pytorch, onnx)}
    runs = {path: embed_with_cache(ref, TEXTS, caches[path], 8, r) for path, r in
            (("pytorch", pytorch), ("onnx-int8", onnx))}
    np.testing.assert_allclose(runs["pytorch"].vectors, encode(ref, TEXTS, 8), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(runs["onnx-int8"].vectors, encode(ref, TEXTS, 8, onnx))
    assert runs["onnx-int8"].texts_embedded == runs["pytorch"].texts_embedded == len(set(TEXTS))
    with pytest.raises(EmbeddingModelError, match="embeddings.runtime 'gpu'"):
        encoder_runtime(ref, "gpu", TEXTS, graphs)


def test_a_tampered_cached_graph_is_refused_not_used(graphs: Path, tmp_path: Path):
    import shutil

    ref = resolve_model(None, "t")
    copy = tmp_path / "onnx"
    shutil.copytree(graphs, copy)
    graph = copy / ref.weights_hash / ENCODER_INT8
    recorded = sha256_file(graph)
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped weight byte: a backdoored encoder would look like this
    graph.write_bytes(bytes(data))
    for ask in (lambda: encoder_runtime(ref, "auto", TEXTS, copy), lambda: cached_runtime(ref, "auto", copy)):
        with pytest.raises(EmbeddingModelError, match=rf"{ENCODER_INT8}: sha256 {sha256_file(graph)}, but .* "
                                                      rf"recorded {recorded} .* not used\. Delete"):
            ask()
    # Registration never exports: without text_embeddings' decision there is no graph to carry.
    with pytest.raises(EmbeddingModelError, match="materialize text_embeddings again"):
        cached_runtime(ref, "auto", tmp_path / "empty")
