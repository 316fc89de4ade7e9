"""model_checkpoint and registered_model on real components: torchrun + DeepSpeed on CPU (gloo), MLflow on
SQLite under a temporary $INTELLIGENTOPS_HOME."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from core.manifest import MANIFEST, verify_manifest
from support import failure_text, materialize
from training_support import SPEC_NAME, write_small_spec

CHECKPOINT = dg.AssetKey([SPEC_NAME, "model_checkpoint"])
REGISTERED = dg.AssetKey([SPEC_NAME, "registered_model"])
KILL_ENV = "INTELLIGENTOPS_TRAIN_KILL_AT_STEP"

pytestmark = pytest.mark.slow


def _defs() -> dg.Definitions:
    from orchestration.definitions import build_definitions

    return build_definitions()


def _metadata(result: dg.ExecuteInProcessResult, key: dg.AssetKey) -> dict[str, Any]:
    [event] = [e for e in result.get_asset_materialization_events() if e.materialization.asset_key == key]
    return {k: getattr(v, "value", v) for k, v in event.materialization.metadata.items()}


def _checkpoint_tags(home: Path) -> tuple[Path, list[str]]:
    [key_dir] = list((home / SPEC_NAME / "training" / "checkpoints").iterdir())
    complete = sorted(d.name for d in key_dir.iterdir() if (d / MANIFEST).exists())
    return key_dir, complete


def test_small_spec_trains_and_registers_a_challenger(home: Path, instance, pipelines: Path, tmp_path: Path) -> None:
    from resources.mlflow import MlflowResource

    write_small_spec(pipelines, tmp_path / "data")
    result = materialize(_defs(), instance, f'key:"{SPEC_NAME}/*" and (group:data or group:training)')
    assert result.success
    ck = _metadata(result, CHECKPOINT)
    reg = _metadata(result, REGISTERED)
    validated_meta = _metadata(result, dg.AssetKey([SPEC_NAME, "validated_dataset"]))
    splits_meta = _metadata(result, dg.AssetKey([SPEC_NAME, "training_splits"]))

    assert ck["resumed_from_step"] == 0 and ck["steps"] > 0 and ck["epochs"] >= 1
    assert ck["best_val_auc"] > 0.75
    final = verify_manifest(Path(ck["checkpoint_path"]))  # the final checkpoint, vouched for by core's manifest
    assert final["world_size"] == 2 and final["step"] == ck["steps"]
    model_dir = Path(ck["model_dir"])
    manifest = verify_manifest(model_dir)
    assert set(manifest["files"]) == {"model.safetensors", "preprocessing.json", "result.json"}
    assert manifest["files"]["model.safetensors"] == ck["weights_sha256"]

    ml = MlflowResource(home=str(home))
    assert ml.resolved_tracking_uri() == f"sqlite:///{home}/mlflow/mlflow.db"
    version = ml.get_version(SPEC_NAME, "challenger")
    assert str(version.version) == reg["model_version"] == "1"
    tags = version.tags
    assert tags["dataset_hash"] == validated_meta["content_hash"]
    assert tags["splits_hash"] == splits_meta["splits_hash"]
    assert tags["embeddings_version"] == "none"
    assert tags["checkpoint_sha256"] == ck["weights_sha256"]
    assert len(tags["spec_hash"]) == 64 and tags["code_revision"]

    # The training run got its params once and one batch of metrics per evaluation.
    client = ml.client()
    run = client.get_run(ck["mlflow_run_id"])
    # What ran, next to what the spec asked: "auto" resolves to stage 0 and fp32 for this small network on a CPU.
    params = run.data.params
    assert (params["zero_stage"], params["zero_stage_setting"], params["world_size"]) == ("0", "auto", "2")
    assert (params["precision"], params["precision_setting"], params["network"]) == ("fp32", "auto", "mlp")
    assert params["gradient_clipping_by"] == "torch" and params["offload_optimizer"] == "none"
    assert json.loads(params["deepspeed_config"])["zero_optimization"] == {"stage": 0}
    result = json.loads((model_dir / "result.json").read_text())
    assert len(client.get_metric_history(run.info.run_id, "val_auc")) == result["evaluations"] >= 1
    assert result["calibration"]["method"] == "platt" and manifest["calibration"] == result["calibration"]

    # Served from the registry with pickle refused: raw validated values in, probabilities out.
    validated = pd.read_parquet(home / "assets" / SPEC_NAME / "validated_dataset.parquet")
    splits = pd.read_parquet(home / "assets" / SPEC_NAME / "training_splits.parquet")
    test = validated[splits["split"].to_numpy() == "test"]
    model = ml.load_model(SPEC_NAME, "challenger")
    out = model.predict(test[["income", "debt", "age", "home", "purpose"]])
    assert list(out.columns) == ["probability"] and len(out) == len(test)
    assert out["probability"].between(0, 1).all()
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(test["label"], out["probability"]) > 0.75
    artifacts = list((home / "mlflow" / "artifacts").rglob("*"))
    assert not [p for p in artifacts if p.suffix in (".pkl", ".pickle", ".cloudpickle", ".pt")]


def test_sigkilled_rank_then_next_materialization_resumes(home: Path, instance, pipelines: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    write_small_spec(pipelines, tmp_path / "data")
    defs = _defs()
    monkeypatch.setenv(KILL_ENV, "7")  # rank 1 SIGKILLs itself after optimizer step 7; checkpoints every 4
    failed = materialize(defs, instance, dg.AssetSelection.keys(CHECKPOINT).upstream())
    assert not failed.success
    assert "next materialization resumes" in failure_text(failed)
    assert not [e for e in failed.get_asset_materialization_events()
                if e.materialization.asset_key == CHECKPOINT]
    _, complete = _checkpoint_tags(home)
    assert complete == ["global_step4"]
    assert not (home / "assets" / SPEC_NAME / "model_checkpoint.json").exists()

    monkeypatch.delenv(KILL_ENV)
    resumed = materialize(defs, instance, dg.AssetSelection.keys(CHECKPOINT, REGISTERED))
    assert resumed.success
    ck = _metadata(resumed, CHECKPOINT)
    assert ck["resumed_from_step"] == 4
    assert ck["steps"] > 7
    assert Path(ck["model_dir"], "model.safetensors").is_file()
    assert _metadata(resumed, REGISTERED)["model_version"] == "1"


def test_corrupted_checkpoint_is_skipped_with_a_warning(home: Path, instance, pipelines: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    write_small_spec(pipelines, tmp_path / "data")
    defs = _defs()
    monkeypatch.setenv(KILL_ENV, "9")
    assert not materialize(defs, instance, dg.AssetSelection.keys(CHECKPOINT).upstream()).success
    key_dir, complete = _checkpoint_tags(home)
    assert complete == ["global_step4", "global_step8"]
    victim = key_dir / "global_step8" / "mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated, marker left in place

    monkeypatch.delenv(KILL_ENV)
    resumed = materialize(defs, instance, dg.AssetSelection.keys(CHECKPOINT))
    assert resumed.success
    assert _metadata(resumed, CHECKPOINT)["resumed_from_step"] == 4
    warnings = [r.user_message for r in instance.all_logs(resumed.run_id)
                if r.level == logging.WARNING and "skipping checkpoint" in r.user_message]
    assert any(str(key_dir / "global_step8") in w and "mp_rank_00_model_states.pt" in w for w in warnings), warnings


class _RunsCode:
    """Unpickling this runs a shell command: what a planted checkpoint file would do under torch.load(weights_only=False)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_tampered_checkpoints_are_named_skipped_and_never_unpickled(home: Path, instance, pipelines: Path,
                                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import torch

    from workloads.training.checkpoints import mark_complete

    write_small_spec(pipelines, tmp_path / "data")
    defs = _defs()
    monkeypatch.setenv(KILL_ENV, "13")
    assert not materialize(defs, instance, dg.AssetSelection.keys(CHECKPOINT).upstream()).success
    key_dir, complete = _checkpoint_tags(home)
    assert complete == ["global_step12", "global_step4", "global_step8"]
    marker = tmp_path / "code-ran"
    # step 12: a model file replaced by a pickle that runs code; the manifest is stale, so it names the file.
    torch.save({"module": _RunsCode(marker)}, key_dir / "global_step12" / "mp_rank_00_model_states.pt")
    # step 8: an extra file dropped beside intact ones.
    (key_dir / "global_step8" / "extra_states.pt").write_bytes(b"not listed")
    # step 4: the same planted pickle, with the manifest rewritten to match it: weights-only loading refuses it.
    torch.save({"module": _RunsCode(marker)}, key_dir / "global_step4" / "mp_rank_00_model_states.pt")
    mark_complete(key_dir / "global_step4", step=4, world_size=2)

    monkeypatch.delenv(KILL_ENV)
    resumed = materialize(defs, instance, dg.AssetSelection.keys(CHECKPOINT))
    assert resumed.success, failure_text(resumed)
    assert _metadata(resumed, CHECKPOINT)["resumed_from_step"] == 0  # nothing usable: a fresh start
    assert not marker.exists(), "a tampered checkpoint was unpickled and ran code"
    warnings = [r.user_message for r in instance.all_logs(resumed.run_id)
                if r.level == logging.WARNING and "skipping checkpoint" in r.user_message]
    step12 = [w for w in warnings if str(key_dir / "global_step12") in w]
    assert any("mp_rank_00_model_states.pt: sha256" in w and "does not match manifest.json" in w for w in step12), warnings
    assert any(str(key_dir / "global_step8") in w and "extra_states.pt: not listed in manifest.json" in w
               for w in warnings), warnings
    step4 = [w for w in warnings if str(key_dir / "global_step4") in w]
    assert any("failed to load" in w and "Weights only load failed" in w for w in step4), warnings


def test_model_checkpoint_and_registered_model_shape(pipelines: Path, home: Path, tmp_path: Path) -> None:
    write_small_spec(pipelines, tmp_path / "data")
    graph = _defs().resolve_asset_graph()
    ck, reg = graph.get(CHECKPOINT), graph.get(REGISTERED)
    assert ck.group_name == reg.group_name == "training"
    assert ck.pools == {"training"}
    assert graph.get(CHECKPOINT).parent_keys == {dg.AssetKey([SPEC_NAME, "validated_dataset"]),
                                                 dg.AssetKey([SPEC_NAME, "training_splits"])}
    assert CHECKPOINT in reg.parent_keys
    assert np.all([len(graph.get(k).kinds) <= 3 for k in (CHECKPOINT, REGISTERED)])


def test_old_run_folders_are_pruned_newest_kept(tmp_path: Path) -> None:
    """Run folders (prepared data, exported model) pile up per materialization; the newest `keep` stay."""
    import os
    import time

    from assets.training import prune_runs

    runs = tmp_path / "runs"
    for i in range(6):
        (runs / f"run{i}").mkdir(parents=True)
        (runs / f"run{i}" / "data.npz").write_bytes(b"x")
        stamp = time.time() - 100 + i
        os.utime(runs / f"run{i}", (stamp, stamp))
    current = runs / "run0"  # the run that just finished is kept even when it is the oldest folder
    removed = prune_runs(runs, keep=3, current=current)
    assert sorted(d.name for d in runs.iterdir()) == ["run0", "run4", "run5"]
    assert sorted(d.name for d in removed) == ["run1", "run2", "run3"]


def test_a_window_embedded_on_two_runtimes_is_refused_not_mixed(instance) -> None:
    """Months of text_embeddings embedded on different runtimes (an ONNX graph, PyTorch) never train together."""
    from types import SimpleNamespace

    from assets.naming import TEXT_EMBEDDINGS, asset_key
    from assets.training import TrainingError, recorded_embeddings_graph

    key, graph = asset_key("jobs", TEXT_EMBEDDINGS), "3e" * 32
    for month, digest in (("2018-01", graph), ("2018-02", graph), ("2018-03", "none")):
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=key, partition=month,
                                                                    metadata={"graph_sha256": digest}))
    spec = SimpleNamespace(name="jobs")
    assert recorded_embeddings_graph(instance, spec, ["2018-01", "2018-02"]) == graph
    with pytest.raises(TrainingError, match=r"jobs: text_embeddings months were embedded on different runtimes .*"
                                            r"'2018-03': 'none'.*materialize text_embeddings again for every month"):
        recorded_embeddings_graph(instance, spec, ["2018-01", "2018-02", "2018-03"])
