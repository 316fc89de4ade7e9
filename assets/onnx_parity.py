"""Which path a version serves each network on, ONNX Runtime or PyTorch, decided when the version is built.

Registration (assets/training.py) calls `choose_runtime` on the model folder MLflow saved, before sealing it:
the version's own pyfunc is loaded from that folder (its PyTorch encoder and network, exactly what serving
loads), both are exported to ONNX (resources/onnx_export.py) and checked against it:

- a frozen encoder (training.model mlp or a factory) is not exported again: training's vectors came from the
  runtime its encoder.json names (text_embeddings' choice, resources/embedder.py), so the version carries that
  graph, its bytes checked against encoder.json's sha256 (a mismatch refuses the version), or serves PyTorch
  when training's vectors came from PyTorch: no train/serve skew. The checks below still run on that graph;
- a fine-tuned encoder (text_finetune, trained on PyTorch) is exported, INT8 first, then fp32: mean cosine
  similarity to the PyTorch encoder >= MIN_COSINE on the validation split's texts, and the model's AUC on the
  test split through the ONNX encoder within MAX_AUC_DELTA of the PyTorch path's; the first that passes both
  serves, else PyTorch (its skew is bounded by these checks, not zero);
- network: logits within MAX_NETWORK_DIFF of PyTorch's on the test matrix, and faster on one thread at batch 1
  and 16; else PyTorch.

Here, not at model_evaluation, because the outcome travels inside the version: the chosen .onnx files and the
parity file (onnx.json, figures and reasons) are written into its artifacts and sealed with the rest of the
folder, so the server verifies them like every other file and cannot run an unchecked graph. A version that
fails the checks still registers and serves, on PyTorch, and says so (its onnx.json, the server's log and
status, registered_model's checks, which do not block).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from core.lazy import np, pd
from core.onnx_runtime import (ENCODER_FP32, ENCODER_INT8, ENCODER_PATHS, MAX_AUC_DELTA, MAX_COSINE_TEXTS,
                               MAX_NETWORK_DIFF, MIN_COSINE, NETWORK_FILE, PARITY_FILE, PARITY_FORMAT, PYTORCH,
                               OnnxEncoder, OnnxNetwork)

ENCODER_CHECK = "onnx_encoder_parity"
NETWORK_CHECK = "onnx_network_parity"


def _auc(y: np.ndarray, p: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if len(set(y.tolist())) == 2 else None


def _probabilities(model: Any, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    out, x = model.predict_with_inputs(frame)
    return out["probability"].to_numpy(dtype=np.float64), x


class CarriedGraphError(RuntimeError):
    """The graph a version would carry is not the one encoder.json says training's vectors came from."""


def _carry(artifacts: Path, runtime: dict[str, Any], graph: Path | None) -> str:
    """Copy the graph text_embeddings embedded with into the version's artifacts and check its bytes against
    encoder.json's sha256 (a mismatch refuses the version, naming both); returns its file name."""
    from core.files import sha256_file

    name = ENCODER_PATHS[runtime["path"]]
    if graph is None or not Path(graph).is_file():
        raise CarriedGraphError(f"encoder.json says training's vectors came from the {runtime['path']} graph "
                                f"{runtime['graph_sha256']}, but no such graph was given to carry ({graph}); "
                                "materialize text_embeddings again, then train")
    shutil.copyfile(graph, artifacts / name)
    actual = sha256_file(artifacts / name)
    if actual != runtime["graph_sha256"]:
        (artifacts / name).unlink()
        raise CarriedGraphError(f"{graph}: sha256 {actual}, but encoder.json records {runtime['graph_sha256']} for "
                                "the graph training's vectors came from; the version is not registered. Materialize "
                                "text_embeddings again, then train")
    return name


def encoder_choice(model: Any, artifacts: Path, texts: list[str], test: pd.DataFrame, y: np.ndarray,
                   base_auc: float | None, base_p: np.ndarray, min_cosine: float = MIN_COSINE,
                   max_auc_delta: float = MAX_AUC_DELTA, graph: Path | None = None) -> dict[str, Any]:
    """The encoder half of the parity file. A frozen encoder whose encoder.json names the runtime training's
    vectors came from serves that: its graph (`graph`, text_embeddings' cached file) carried byte for byte, or
    PyTorch when training embedded on PyTorch. Otherwise (text_finetune, an encoder.json without a runtime) the
    version's own encoder is exported, INT8 then fp32. The cosine and AUC checks run on either."""
    from resources.onnx_export import OnnxExportError, cosine, export_encoder, quantize_int8

    settings = dict(model._encode_settings)
    described = json.loads((artifacts / "encoder.json").read_text()) if (artifacts / "encoder.json").is_file() else {}
    runtime = described.get("runtime") if not described.get("fine_tuned") else None
    if runtime is not None and runtime["path"] == PYTORCH:
        return {"path": PYTORCH, "source": "text_embeddings", "tried": {},
                "reason": f"training's vectors came from the PyTorch encoder ({runtime.get('reason', '')})"}
    if runtime is not None:
        candidates = {runtime["path"]: _carry(artifacts, runtime, graph)}
        tokenizing = {k: runtime[k] for k in ("max_seq_length", "do_lower_case")}
    else:
        candidates = ENCODER_PATHS
        try:
            tokenizing = export_encoder(model._encoder, artifacts / ENCODER_FP32,
                                        normalize=bool(settings.get("normalize_embeddings")))
            quantize_int8(artifacts / ENCODER_FP32, artifacts / ENCODER_INT8)
        except OnnxExportError as exc:
            return {"path": PYTORCH, "reason": str(exc), "tried": {}}
    folder = model._encoder_folder
    if not (folder / "tokenizer.json").is_file():
        return {"path": PYTORCH, "reason": f"the encoder folder {folder} has no tokenizer.json (a fast tokenizer) "
                                           "to tokenize with outside PyTorch", "tried": {}}
    reference = model._encoder.encode(texts, batch_size=model._batch_size, convert_to_numpy=True,
                                      show_progress_bar=False, **settings)
    tried, chosen = {}, None
    for path, file in candidates.items():
        encoder = OnnxEncoder(artifacts / file, folder / "tokenizer.json", **tokenizing)
        similarity = cosine(encoder.encode(texts, model._batch_size), reference)
        figures: dict[str, Any] = {"cosine": round(float(similarity.mean()), 6),
                                   "cosine_min": round(float(similarity.min()), 6), "texts": len(texts),
                                   "megabytes": round((artifacts / file).stat().st_size / 1e6, 1)}
        tried[path] = figures
        if figures["cosine"] < min_cosine:
            figures["reason"] = f"onnx cosine {figures['cosine']:.4f} < {min_cosine}"
            continue
        model.use_runtime({"encoder": {"path": path, **tokenizing}, "network": {"path": PYTORCH}})
        p, _ = _probabilities(model, test)
        if base_auc is not None:
            figures["auc_delta"] = round(abs(_auc(y, p) - base_auc), 6)
        else:  # one class in the test split: no AUC, so the scores themselves are held to the bound
            figures["auc_delta"] = round(float(np.abs(p - base_p).max()), 6) if len(p) else 0.0
        if figures["auc_delta"] > max_auc_delta:
            figures["reason"] = f"test AUC delta {figures['auc_delta']:.4f} > {max_auc_delta}"
            continue
        chosen = path
        break
    model.use_runtime({"encoder": {"path": PYTORCH}, "network": {"path": PYTORCH}})
    source = {"source": "text_embeddings", "graph_sha256": runtime["graph_sha256"]} if runtime else \
        {"source": "exported"}
    if chosen is None:
        return {"path": PYTORCH, "reason": "; ".join(f"{k}: {v['reason']}" for k, v in tried.items()), "tried": tried,
                **source}
    return {"path": chosen, "file": ENCODER_PATHS[chosen], **tokenizing, **{k: tried[chosen][k] for k in
                                                                             ("cosine", "auc_delta")},
            "tried": tried, **source}


def network_choice(model: Any, artifacts: Path, x: np.ndarray, max_diff: float = MAX_NETWORK_DIFF) -> dict[str, Any]:
    """Export the version's network, compare its logits on `x` and time it; the network half of the parity file."""
    import torch

    from resources.onnx_export import OnnxExportError, export_network, milliseconds

    try:
        export_network(model.net, x.shape[1], artifacts / NETWORK_FILE)
    except OnnxExportError as exc:
        return {"path": PYTORCH, "reason": str(exc)}
    onnx = OnnxNetwork(artifacts / NETWORK_FILE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as one server worker runs it
    try:
        with torch.inference_mode():
            tensor = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            diff = float(np.abs(model.net(tensor).numpy() - onnx(x)).max()) if len(x) else 0.0
            rows = np.resize(np.asarray(x, dtype=np.float32), (16, x.shape[1])) if len(x) else \
                np.zeros((16, x.shape[1]), dtype=np.float32)
            figures = {"max_diff": diff}
            for n in (1, 16):
                batch, t = rows[:n], torch.from_numpy(rows[:n].copy())
                figures[f"torch_ms_{n}"] = round(milliseconds(lambda: model.net(t)), 4)
                figures[f"onnx_ms_{n}"] = round(milliseconds(lambda: onnx(batch)), 4)
    finally:
        torch.set_num_threads(threads)
    if diff > max_diff:
        return {"path": PYTORCH, "reason": f"onnx logits differ by {diff:.1e} > {max_diff:.0e}", **figures}
    slower = [n for n in (1, 16) if figures[f"onnx_ms_{n}"] >= figures[f"torch_ms_{n}"]]
    if slower:
        return {"path": PYTORCH, "reason": f"onnx not faster at batch {slower[0]} ({figures[f'onnx_ms_{slower[0]}']} "
                                           f"vs {figures[f'torch_ms_{slower[0]}']} ms)", **figures}
    return {"path": "onnx", "file": NETWORK_FILE, **figures}


def choose_runtime(folder: Path, texts: list[str], test: pd.DataFrame, y: np.ndarray, graph: Path | None = None,
                   **bounds: float) -> dict[str, Any]:
    """Export (or, for a frozen encoder, carry `graph`: encoder_choice) and check the networks of the pyfunc saved
    in `folder`, keep the chosen .onnx files in its artifacts with onnx.json, and list them in the artifacts'
    manifest. Returns the parity file's content.
    `bounds` (min_cosine, max_auc_delta, max_diff) exist for tests that force a failing check."""
    from mlflow.pyfunc import load_model

    from core.manifest import read_manifest, write_manifest

    artifacts = folder / "artifacts"
    writes_bytecode = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # importing the model's code must not leave __pycache__ in the folder it seals
    try:
        model = load_model(str(folder)).unwrap_python_model()
    finally:
        sys.dont_write_bytecode = writes_bytecode
    base_p, x = _probabilities(model, test)
    base_auc = _auc(y, base_p)
    encoder: dict[str, Any] = {"path": PYTORCH, "reason": "the model has no text features"}
    if model._encoder is not None:
        encoder = encoder_choice(model, artifacts, texts, test, y, base_auc, base_p, graph=graph,
                                 **{k: v for k, v in bounds.items() if k in ("min_cosine", "max_auc_delta")})
    network = network_choice(model, artifacts, x, **{k: v for k, v in bounds.items() if k == "max_diff"})
    parity = {"format": PARITY_FORMAT, "encoder": encoder, "network": network,
              "bounds": {"min_cosine": bounds.get("min_cosine", MIN_COSINE),
                         "max_auc_delta": bounds.get("max_auc_delta", MAX_AUC_DELTA),
                         "max_network_diff": bounds.get("max_diff", MAX_NETWORK_DIFF)},
              "test_rows": len(test), "test_auc_pytorch": base_auc}
    keep = {encoder.get("file"), network.get("file")}
    for name in (ENCODER_FP32, ENCODER_INT8, NETWORK_FILE):
        if name not in keep:
            (artifacts / name).unlink(missing_ok=True)
    (artifacts / PARITY_FILE).write_text(json.dumps(parity, indent=2, sort_keys=True))
    for cache in folder.rglob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)
    inner = read_manifest(artifacts)
    write_manifest(artifacts, **{k: v for k, v in inner.items() if k not in ("files", "algorithm")})
    return parity


def parity_rows(spec: Any, validated: pd.DataFrame, splits: pd.DataFrame) -> tuple[list[str], pd.DataFrame, np.ndarray]:
    """The validation split's distinct cleaned texts (at most MAX_COSINE_TEXTS), and the test split's raw
    feature rows and labels, for choose_runtime."""
    from assets.features import clean_text
    from assets.naming import LABEL, ROW_ID, SPLIT

    ids = validated[ROW_ID].astype(str)
    split = splits.assign(**{ROW_ID: splits[ROW_ID].astype(str)}).set_index(ROW_ID)[SPLIT]
    which = ids.map(split)
    val = validated[which.eq("validation").to_numpy()]
    texts = sorted({clean_text(v) for c in spec.features.text for v in val[c]})[:MAX_COSINE_TEXTS]
    test = validated[which.eq("test").to_numpy()].reset_index(drop=True)
    return texts, test[spec.features.all], test[LABEL].to_numpy()


def check_results(parity: dict[str, Any], has_text: bool) -> list[Any]:
    """registered_model's checks (not blocking: a failing version serves on PyTorch) with the parity figures."""
    import dagster as dg

    results = []
    parts = [(ENCODER_CHECK, parity["encoder"])] if has_text else []
    for name, half in parts + [(NETWORK_CHECK, parity["network"])]:
        figures = {k: v for k, v in half.items() if isinstance(v, (int, float, str)) and k != "file"}
        if "tried" in half:
            figures["tried"] = dg.MetadataValue.json(half["tried"])
        results.append(dg.AssetCheckResult(check_name=name, passed=half["path"] != PYTORCH,
                                           severity=dg.AssetCheckSeverity.WARN, metadata=figures))
    return results
