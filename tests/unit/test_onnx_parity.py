"""The ONNX Runtime path of a version (assets/onnx_parity.py, resources/onnx_export.py, core/onnx_runtime.py) on
the real MiniLM and a real pyfunc folder saved by MLflow: the export passes its parity checks and serves, a check
that fails leaves the version on PyTorch and says so, and a tampered .onnx is refused by the folder's seal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.onnx_runtime import ENCODER_INT8, MIN_COSINE, PARITY_FILE

ROLES = ["software engineer", "registered nurse", "truck driver", "teacher", "warehouse associate", "sales manager",
         "accountant", "cashier", "project manager", "electrician", "owner", "customer service representative"]
LEVELS = ["", "senior ", "lead ", "assistant "]


def frame(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    titles = [f"{rng.choice(LEVELS)}{rng.choice(ROLES)}" for _ in range(rows)]
    amount = rng.uniform(500, 5000, rows).round(0)
    label = ((amount > 2500) ^ np.array(["nurse" in t or "driver" in t for t in titles])).astype(int)
    return pd.DataFrame({"amount": amount, "grade": rng.choice(["a", "b", "c"], rows), "title": titles, "label": label})


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A pyfunc folder as registration saves it, before its runtime is chosen: a small MLP over an amount, a
    category and MiniLM's vectors of a job title (weights trained a few steps so the AUC means something)."""
    import mlflow
    import torch
    from safetensors.torch import save_file

    from assets.features import embedding_column, fit_preprocessing, transform
    from assets.training import model_code, stage_version_artifacts
    from resources.embedder import encode, encoder_description, resolve_model
    from workloads.tabular_mlp import build_mlp

    root = tmp_path_factory.mktemp("onnx")
    ref = resolve_model(None, "onnx_test")
    train = frame(300, 1)
    train[embedding_column("title")] = list(encode(ref, list(train["title"]), 64))
    prep = fit_preprocessing(train, ["amount"], ["grade"], ["title"])
    torch.manual_seed(0)
    net = build_mlp(prep["n_features"], [16], 0.0)
    x, y = torch.from_numpy(transform(train, prep)), torch.tensor(train["label"].to_numpy(), dtype=torch.float32)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(60):
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(net(x).squeeze(-1), y).backward()
        optimizer.step()
    model_dir, staging, code = root / "model", root / "staging", root / "code"
    for folder in (model_dir, staging, code):
        folder.mkdir()
    save_file(net.eval().state_dict(), str(model_dir / "model.safetensors"))
    (model_dir / "preprocessing.json").write_text(json.dumps(prep))
    (staging / "encoder.json").write_text(json.dumps(encoder_description(ref, 64)))
    manifest = {"architecture": {"kind": "mlp", "in_features": prep["n_features"], "hidden": [16], "dropout": 0.0}}
    artifacts = stage_version_artifacts("onnx_test", model_dir, manifest, staging, {"encoder": str(staging / "encoder.json")})
    mlflow.pyfunc.save_model(path=str(root / "saved"), artifacts=artifacts, **model_code(code))
    return root / "saved"


def rows() -> tuple[list[str], pd.DataFrame, np.ndarray]:
    val, test = frame(120, 2), frame(200, 3)
    return sorted(set(val["title"])), test[["amount", "grade", "title"]], test["label"].to_numpy()


def version(saved: Path, tmp_path: Path, **bounds: float) -> tuple[Path, dict]:
    from assets.onnx_parity import choose_runtime

    folder = tmp_path / "version"
    shutil.copytree(saved, folder)
    return folder, choose_runtime(folder, *rows(), **bounds)


def load(folder: Path):
    import mlflow

    return mlflow.pyfunc.load_model(str(folder)).unwrap_python_model()


def test_the_exported_encoder_and_network_pass_parity_and_serve_on_onnx(saved, tmp_path):
    from core.manifest import verify_manifest

    folder, parity = version(saved, tmp_path)
    encoder, network = parity["encoder"], parity["network"]
    assert encoder["path"] == "onnx-int8", encoder
    assert encoder["cosine"] >= MIN_COSINE and encoder["auc_delta"] <= 0.002
    assert encoder["tried"]["onnx-int8"]["megabytes"] < 30  # the INT8 graph, a quarter of fp32's 90 MB
    assert network["max_diff"] <= 1e-5, network
    artifacts = folder / "artifacts"
    assert json.loads((artifacts / PARITY_FILE).read_text()) == parity
    assert (artifacts / ENCODER_INT8).is_file() and not (artifacts / "encoder.onnx").exists()
    verify_manifest(artifacts)  # the chosen files are listed in the artifacts' manifest, the others gone
    assert not list(folder.rglob("__pycache__"))

    served, reference = load(folder), load(saved)
    assert served.runtime.startswith(f"encoder: onnx-int8 (cosine {encoder['cosine']:.4f}")
    assert reference.runtime.startswith("encoder: pytorch")
    _, test, _ = rows()
    p = served.predict(None, test, params={"explain": 2})
    q = reference.predict(None, test, params={"explain": 2})
    # INT8 moves single scores (up to ~0.08 on this small, overfit net); the checks bound the ranking (AUC).
    assert np.abs(p["probability"].to_numpy() - q["probability"].to_numpy()).mean() < 0.02
    assert [json.loads(f)[0]["feature"] for f in p["top_factors"]][:5]  # explanations run on the ONNX path too


def test_a_failing_parity_check_serves_on_pytorch_and_says_why(saved, tmp_path):
    from assets.onnx_parity import check_results

    folder, parity = version(saved, tmp_path, min_cosine=1.01, max_diff=0.0)
    encoder, network = parity["encoder"], parity["network"]
    assert encoder["path"] == network["path"] == "pytorch"
    assert "onnx-int8: onnx cosine 0." in encoder["reason"] and "< 1.01" in encoder["reason"]
    assert "onnx-fp32: onnx cosine" in encoder["reason"]
    assert not list((folder / "artifacts").glob("*.onnx"))  # nothing unchecked travels with the version
    served = load(folder)
    assert served._onnx_encoder is None and served._onnx_network is None
    assert served.runtime.startswith("encoder: pytorch (onnx-int8: onnx cosine 0.")
    assert "network: pytorch (onnx logits differ by" in served.runtime or "not faster" in served.runtime
    _, test, _ = rows()
    np.testing.assert_allclose(served.predict(None, test)["probability"], load(saved).predict(None, test)["probability"],
                               rtol=0, atol=1e-12)
    results = check_results(parity, has_text=True)
    assert [r.passed for r in results] == [False, False]
    assert results[0].metadata["reason"].text == encoder["reason"]


def test_a_tampered_onnx_graph_is_refused_by_the_seal(saved, tmp_path):
    from core.model_folder import ModelFolderError, seal, verify_model_folder
    from core.signing import signing_keys

    folder, parity = version(saved, tmp_path)
    assert parity["encoder"]["path"] == "onnx-int8"
    keys = signing_keys(tmp_path / "keys", create=True)
    sealed = seal(folder, keys)
    verify_model_folder(folder, keys.public_key, sealed.manifest_sha256)
    graph = folder / "artifacts" / ENCODER_INT8
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in a weight: a backdoored encoder would look like this
    graph.write_bytes(bytes(data))
    with pytest.raises(ModelFolderError, match=f"artifacts/{ENCODER_INT8}: sha256"):
        verify_model_folder(folder, keys.public_key, sealed.manifest_sha256)


# --- a frozen encoder: the version carries the graph text_embeddings embedded with (zero skew) ----------------


def carried(saved: Path, tmp_path: Path, runtime, graph: Path | None) -> tuple[Path, dict]:
    """The saved folder with an encoder.json naming `runtime` (as registration writes it), its runtime chosen."""
    from assets.onnx_parity import choose_runtime
    from resources.embedder import encoder_description, resolve_model

    folder = tmp_path / "version"
    shutil.copytree(saved, folder)
    description = encoder_description(resolve_model(None, "onnx_test"), 64, runtime)
    (folder / "artifacts" / "encoder.json").write_text(json.dumps(description))
    return folder, choose_runtime(folder, *rows(), graph=graph)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """text_embeddings' runtime for the shipped MiniLM: its INT8 graph, exported and checked into a home."""
    from resources.embedder import encoder_runtime, resolve_model

    graphs = tmp_path_factory.mktemp("home") / "embedding_cache" / "onnx"
    return encoder_runtime(resolve_model(None, "onnx_test"), "auto", rows()[0], graphs)


def test_the_version_serves_the_very_graph_text_embeddings_used(saved, tmp_path, embedded):
    from core.files import sha256_file
    from core.manifest import verify_manifest
    from resources.embedder import encode, resolve_model

    assert embedded.path == "onnx-int8"
    folder, parity = carried(saved, tmp_path, embedded, embedded.graph)
    encoder = parity["encoder"]
    assert encoder["path"] == "onnx-int8" and encoder["source"] == "text_embeddings", encoder
    assert list(encoder["tried"]) == ["onnx-int8"]  # nothing exported again, nothing else tried
    assert encoder["cosine"] >= MIN_COSINE and encoder["auc_delta"] <= 0.002  # the checks still run and report
    served_graph = folder / "artifacts" / ENCODER_INT8
    assert served_graph.read_bytes() == embedded.graph.read_bytes()  # byte-identical: zero skew
    assert encoder["graph_sha256"] == embedded.graph_sha256 == sha256_file(served_graph)
    verify_manifest(folder / "artifacts")

    served = load(folder)
    assert served.runtime.startswith("encoder: onnx-int8")
    texts = ["night nurse", "senior software engineer", "welder"]
    training = encode(resolve_model(None, "onnx_test"), texts, 64, embedded)  # as text_embeddings computed them
    for text, vector in zip(texts, training, strict=True):  # as the server computes one request's text
        np.testing.assert_allclose(served._onnx_encoder.encode([text])[0], vector, rtol=0, atol=1e-6)


def test_a_carried_graph_other_than_encoder_json_names_is_refused(saved, tmp_path, embedded):
    from assets.onnx_parity import CarriedGraphError

    other = tmp_path / "other" / ENCODER_INT8
    other.parent.mkdir()
    data = bytearray(embedded.graph.read_bytes())
    data[len(data) // 3] ^= 0x01
    other.write_bytes(bytes(data))
    from core.files import sha256_file

    with pytest.raises(CarriedGraphError, match=rf"sha256 {sha256_file(other)}, but encoder.json records "
                                                rf"{embedded.graph_sha256}"):
        carried(saved, tmp_path, embedded, other)


def test_pytorch_training_vectors_give_a_version_that_serves_pytorch(saved, tmp_path):
    from resources.embedder import EncoderRuntime

    folder, parity = carried(saved, tmp_path, EncoderRuntime("pytorch", reason="embeddings.runtime: pytorch"), None)
    assert parity["encoder"]["path"] == "pytorch" and parity["encoder"]["source"] == "text_embeddings"
    reason = parity["encoder"]["reason"]
    assert "training's vectors came from the PyTorch encoder (embeddings.runtime: pytorch)" in reason
    assert not list((folder / "artifacts").glob("encoder*.onnx"))
    served = load(folder)
    assert served._onnx_encoder is None and served.runtime.startswith("encoder: pytorch (training's vectors came")
