"""The training workload's plain parts: features, AUC, checkpoint selection (core's manifest, strictly), pruning,
the config read from a file, the environment and flags, and a config error as a clean exit."""

from __future__ import annotations
import json
import os
import re
import sys
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
from assets.features import FeatureError, build_feature_frame, fit_preprocessing, transform
from assets.spec import PipelineSpec
from assets.training import TrainingError, training_key, verify_model_dir
from core.manifest import MANIFEST, write_manifest
from core.train_config import TrainConfig, TrainConfigError
from workloads.training import __main__ as entry
from workloads.training.checkpoints import complete_checkpoints, mark_complete, prune
from workloads.training.config import config_from_args
from workloads.training.metrics import roc_auc


# --- features -------------------------------------------------------------------------------------------------


def _frames():
    validated = pd.DataFrame({
        "row_id": ["a", "b", "c", "d", "e"], "label": [0, 1, 0, 1, 0],
        "x": [1.0, 3.0, np.nan, 100.0, 5.0],
        "color": ["red", "red", "blue", None, "green"],
        "title": ["nurse", "driver", "", "teacher", "nurse"],
    })
    splits = pd.DataFrame({"row_id": ["e", "d", "c", "b", "a"],
                           "split": ["validation", "test", "train", "train", "train"]})
    embeddings = pd.DataFrame({"row_id": ["c", "a", "b", "d", "e"],
                               "title__embedding": [np.array([0.0, 1.0], np.float32), [1.0, 0.0], [0.5, 0.5],
                                                    [0.2, 0.8], [1.0, 0.0]]})
    return validated, splits, embeddings


def test_feature_builder_joins_embeddings_and_fits_on_train_only() -> None:
    validated, splits, embeddings = _frames()
    frame = build_feature_frame(validated, splits, ["x"], ["color"], ["title"], embeddings, "toy")
    assert frame.set_index("row_id").loc["c", "title__embedding"].tolist() == [0.0, 1.0]
    train = frame[frame["split"] == "train"]
    prep = fit_preprocessing(train, ["x"], ["color"], ["title"], max_categories=1)
    # Train rows a, b, c only: x = 1, 3, NaN -> median 2; the 100 in the test row never moves the statistics.
    assert prep["numeric"]["x"]["median"] == 2.0 and prep["numeric"]["x"]["mean"] == 2.0
    assert prep["categorical"]["color"]["categories"] == ["red"]
    assert prep["embeddings"]["title"] == {"column": "title__embedding", "dim": 2}
    x = transform(frame.set_index("row_id").loc[["c", "d"]].reset_index(), prep)
    assert x.dtype == np.float32 and x.shape == (2, prep["n_features"]) == (2, 6)
    # c: x missing -> imputed 2 -> standardized 0, indicator 1; color blue -> other; embedding appended.
    assert x[0].tolist() == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    # d: x = 100 -> far above the train mean; color None -> other.
    assert x[1][0] > 10 and x[1][2:4].tolist() == [0.0, 1.0]
    assert json.loads(json.dumps(prep)) == prep  # plain JSON, no pickle


def test_transform_in_slices_equals_the_whole_float64_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    """A million rows are converted a slice at a time into one float32 matrix; the numbers must be exactly those
    of building every block in float64 and casting once (what training, evaluation and serving always used)."""
    import assets.features as features

    rng = np.random.default_rng(3)
    n = 1000
    frame = pd.DataFrame({"x": np.where(rng.random(n) < 0.1, np.nan, rng.normal(50, 20, n)),
                          "color": rng.choice(["red", "blue", "green", None], n),
                          "title__embedding": [rng.normal(size=4).astype(np.float32) for _ in range(n)]})
    prep = fit_preprocessing(frame, ["x"], ["color"], ["title"], max_categories=2)
    st = prep["numeric"]["x"]
    x = frame["x"].to_numpy()
    cats = prep["categorical"]["color"]["categories"]
    onehot = np.zeros((n, len(cats) + 1))
    onehot[np.arange(n), [cats.index(c) if c in cats else len(cats) for c in frame["color"].map(features._category)]] = 1
    expected = np.concatenate([((np.where(np.isnan(x), st["median"], x) - st["mean"]) / st["std"])[:, None],
                               np.isnan(x)[:, None].astype(float), onehot,
                               np.stack(frame["title__embedding"].to_numpy()).astype(np.float64)], axis=1)
    monkeypatch.setattr(features, "EMBED_CHUNK", 7)  # 143 slices, the last one short
    got = transform(frame, prep)
    assert got.dtype == np.float32 and np.array_equal(got, expected.astype(np.float32))
    with pytest.raises(FeatureError, match="describes 9 features but says n_features is 8"):
        transform(frame, {**prep, "n_features": 8})


def test_explanations_in_slices_equal_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test split's explanations are computed a slice of rows at a time (200,000 rows x every feature's
    occluded copy would be gigabytes); each row's factors are those of one pass over every row."""
    import torch

    import assets.features
    import workloads.model_code as model_code

    monkeypatch.setitem(sys.modules, "intelligentops_features", assets.features)  # the name the model ships it as
    rng = np.random.default_rng(4)
    n = 300
    frame = pd.DataFrame({"x": rng.normal(size=n), "color": rng.choice(["red", "blue"], n)})
    prep = fit_preprocessing(frame, ["x"], ["color"])
    model = model_code.TabularMLPModel()
    model.preprocessing, model._block_cache, model._onnx_network = prep, None, None
    torch.manual_seed(0)
    model.net = torch.nn.Sequential(torch.nn.Linear(prep["n_features"], 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x = torch.from_numpy(transform(frame, prep))
    with torch.inference_mode():
        probability = torch.sigmoid(model.net(x).squeeze(-1)).double().numpy()
    whole = model._explain(frame, x, probability, 2)
    monkeypatch.setattr(model_code, "EXPLAIN_BYTES", 2 * prep["n_features"] * 4 * 13)  # 13 rows a slice
    sliced = model._explain(frame, x, probability, 2)
    assert len(sliced) == n
    for one, other in zip(sliced, whole, strict=True):  # a slice's forward pass may round differently in the 7th digit
        a, b = json.loads(one), json.loads(other)
        assert {f["feature"]: f["value"] for f in a} == {f["feature"]: f["value"] for f in b} and len(a) == 2
        assert {f["feature"]: pytest.approx(f["contribution"], abs=2e-5) for f in a} == \
            {f["feature"]: f["contribution"] for f in b}


def test_feature_builder_names_what_is_missing() -> None:
    validated, splits, embeddings = _frames()
    with pytest.raises(FeatureError, match="toy: 1 rows have no title__embedding .*'e'"):
        build_feature_frame(validated, splits, ["x"], ["color"], ["title"], embeddings[embeddings.row_id != "e"],
                            "toy")
    with pytest.raises(FeatureError, match="toy: 1 validated rows have no split .*'a'"):
        build_feature_frame(validated, splits[splits.row_id != "a"], ["x"], ["color"], spec_name="toy")
    prep = fit_preprocessing(validated, ["x"], ["color"])
    with pytest.raises(FeatureError, match="numeric feature column 'x' is missing"):
        transform(validated.drop(columns=["x"]), prep)


def test_training_key_changes_with_data_and_settings_but_not_with_the_launcher() -> None:
    base = {"name": "toy", "source": {"kind": "file", "path": "x.csv"}, "target": {"column": "y", "positive": [1]},
            "features": {"numeric": ["a"]}}
    spec = PipelineSpec.model_validate(base)
    same = PipelineSpec.model_validate({**base, "training": {"launcher": "trainjob"}})
    other = PipelineSpec.model_validate({**base, "training": {"epochs": 2}})
    assert training_key(spec, "d1", "s1") == training_key(same, "d1", "s1")
    assert len({training_key(spec, "d1", "s1"), training_key(spec, "d2", "s1"), training_key(spec, "d1", "s2"),
                training_key(other, "d1", "s1")}) == 4


# --- workload helpers -----------------------------------------------------------------------------------------


def test_roc_auc_matches_sklearn_with_ties() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = np.round(rng.random(500) + 0.3 * y, 1)  # many ties
    assert roc_auc(y, p) == pytest.approx(roc_auc_score(y, p))
    assert np.isnan(roc_auc(np.ones(3), np.arange(3)))


def _fake_checkpoint(root: Path, tag: str, world: int = 2, complete: bool = True) -> Path:
    """A tag folder as save_checkpoint leaves it: DeepSpeed's files, then (when complete) the manifest."""
    d = root / tag
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(os.urandom(256))
    (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(os.urandom(128))
    if complete:
        mark_complete(d, step=int(tag.removeprefix("global_step").removesuffix(".final")), world_size=world)
    return d


def test_newest_complete_checkpoint_wins_and_every_other_is_named(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path, "global_step10")
    _fake_checkpoint(tmp_path, "global_step20")
    cut_off = _fake_checkpoint(tmp_path, "global_step30", complete=False)
    truncated = _fake_checkpoint(tmp_path, "global_step25")
    (truncated / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    flipped = _fake_checkpoint(tmp_path, "global_step22")
    data = bytearray((flipped / "mp_rank_00_model_states.pt").read_bytes())
    data[0] ^= 0xFF
    (flipped / "mp_rank_00_model_states.pt").write_bytes(bytes(data))
    missing = _fake_checkpoint(tmp_path, "global_step24")
    (missing / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    extra = _fake_checkpoint(tmp_path, "global_step26")
    (extra / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"a rank's late write")
    other_world = _fake_checkpoint(tmp_path, "global_step40", world=4)
    _fake_checkpoint(tmp_path, "global_step20.final")
    warnings: list[str] = []
    assert complete_checkpoints(tmp_path, 2, warnings.append) == ["global_step20.final", "global_step20",
                                                                 "global_step10"]
    assert len(warnings) == 6, warnings
    for d, why in ((cut_off, f"no {MANIFEST} (the save was cut off"),
                   (truncated, "mp_rank_00_model_states.pt: sha256"), (flipped, "mp_rank_00_model_states.pt: sha256"),
                   (missing, "zero_pp_rank_0_mp_rank_00_optim_states.pt: listed in manifest.json but missing"),
                   (extra, "zero_pp_rank_1_mp_rank_00_optim_states.pt: not listed in manifest.json"),
                   (other_world, "written by 4 ranks and this run has 2")):
        assert any(w.startswith(f"skipping checkpoint {d}: ") and why in w for w in warnings), (d, warnings)
    # The completion marker is core's manifest, with the save's step and world size beside the files.
    manifest = json.loads((tmp_path / "global_step20" / MANIFEST).read_text())
    assert manifest["algorithm"] == "sha256" and manifest["world_size"] == 2 and manifest["step"] == 20
    assert set(manifest["files"]) == {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"}


def test_prune_keeps_the_newest_complete(tmp_path: Path) -> None:
    for step in (5, 10, 15, 20):
        _fake_checkpoint(tmp_path, f"global_step{step}")
    _fake_checkpoint(tmp_path, "global_step3", complete=False)
    _fake_checkpoint(tmp_path, "global_step25", complete=False)  # a save in progress is never pruned
    prune(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step15", "global_step20", "global_step25"]


def _config_file(path: Path, **values) -> Path:
    path.write_text(json.dumps({"data": "d.npz", "output_dir": "o", "checkpoint_dir": "c", **values}))
    return path


def test_config_from_file_flags_and_environment(tmp_path: Path) -> None:
    cfg_file = _config_file(tmp_path / "c.json", epochs=3)
    cfg = config_from_args(["--config", str(cfg_file), "--epochs", "5", "--hidden", "[8]", "--precision", "bf16",
                            "--monitor", "auc", "--run-name", "123", "--zero-stage", "3"], environ={})
    assert (cfg.epochs, cfg.hidden, cfg.precision, cfg.monitor, cfg.run_name, cfg.data, cfg.zero_stage) == (
        5, [8], "bf16", "auc", "123", "d.npz", 3)
    pod = config_from_args(["--config", str(cfg_file), "--checkpoint-subdir", "toy/k1"], environ={})
    assert pod.checkpoint_dir == "c"
    # Set by the Kubernetes launchers: checkpoints on the pod's mounted volume.
    pod = config_from_args(["--config", str(cfg_file), "--checkpoint-subdir", "toy/k1"],
                           environ={"INTELLIGENTOPS_CHECKPOINT_DIR": "/checkpoints"})
    assert pod.checkpoint_dir == "/checkpoints/toy/k1"
    # The test hooks come from the environment, over the file; a flag still wins.
    hooks = {"INTELLIGENTOPS_TRAIN_KILL_AT_STEP": "7", "INTELLIGENTOPS_TRAIN_KILL_RANK": "0",
             "INTELLIGENTOPS_TRAIN_STEP_DELAY_S": "0.5"}
    hooked = config_from_args(["--config", str(_config_file(tmp_path / "h.json", kill_at_step=0))], environ=hooks)
    assert (hooked.kill_at_step, hooked.kill_rank, hooked.step_delay_s) == (7, 0, 0.5)
    assert config_from_args(["--config", str(cfg_file), "--kill-at-step", "3"], environ=hooks).kill_at_step == 3
    # DeepSpeed's launcher passes --local_rank=N to the program: accepted, not a config field.
    assert config_from_args(["--local_rank=1", "--config", str(cfg_file)], environ={}) == config_from_args(
        ["--config", str(cfg_file)], environ={})


def test_config_errors_name_the_file_and_the_key(tmp_path: Path) -> None:
    typo = _config_file(tmp_path / "typo.json", epoch=3)
    with pytest.raises(TrainConfigError, match=f"^{re.escape(str(typo))}: unknown key 'epoch'$"):
        config_from_args(["--config", str(typo)], environ={})
    bad = _config_file(tmp_path / "bad.json", max_steps=0)
    with pytest.raises(TrainConfigError, match=f"^{re.escape(str(bad))}: key 'max_steps' = 0: Input should be greater than or equal"):
        TrainConfig.read(bad)
    with pytest.raises(TrainConfigError, match=r"\$INTELLIGENTOPS_TRAIN_KILL_AT_STEP: key 'kill_at_step' = 'soon'"):
        config_from_args(["--config", str(_config_file(tmp_path / "ok.json"))],
                         environ={"INTELLIGENTOPS_TRAIN_KILL_AT_STEP": "soon"})
    with pytest.raises(TrainConfigError, match="key 'output_dir' is required .*--output-dir"):
        config_from_args(["--data", "d.npz", "--checkpoint-dir", "c"], environ={})
    with pytest.raises(TrainConfigError, match=f"{re.escape(str(tmp_path / 'none.json'))}: cannot read the training config"):
        TrainConfig.read(tmp_path / "none.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(TrainConfigError, match="list.json: a training config is a JSON object"):
        TrainConfig.read(tmp_path / "list.json")


def test_a_config_error_is_a_clean_exit_that_names_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RANK", "0")  # as a launcher would set it: main() sets up no process group of its own
    monkeypatch.delenv("DAGSTER_PIPES_CONTEXT", raising=False)
    typo = _config_file(tmp_path / "c.json", learning_rat=0.1)
    assert entry.main(["--config", str(typo)]) == 2
    err = capsys.readouterr().err
    assert f"ERROR: workloads.training: {typo}: unknown key 'learning_rat'" in err and "Traceback" not in err


def test_the_rank_comes_from_whichever_launcher_started_the_process() -> None:
    assert entry.global_rank({"RANK": "3", "OMPI_COMM_WORLD_RANK": "1"}) == 3  # torchrun, deepspeed
    assert entry.global_rank({"OMPI_COMM_WORLD_RANK": "1"}) == 1  # mpirun (Kubeflow Trainer's DeepSpeed runtime)
    assert entry.global_rank({}) is None  # no launcher: main() makes this process the only rank


def test_verify_model_dir_names_the_tampered_file(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    write_manifest(tmp_path)
    verify_model_dir("toy", tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"other")
    with pytest.raises(TrainingError, match="toy: .*model.safetensors: sha256 .* does not match manifest.json"):
        verify_model_dir("toy", tmp_path)


def test_preprocessing_survives_json_round_trip_in_column_order():
    """The served model reads preprocessing.json: its matrix must equal the one training saw, column for column."""
    import json as _json

    import numpy as _np
    import pandas as _pd

    from assets.features import dumps, fit_preprocessing, transform

    frame = _pd.DataFrame({"zeta": [1.0, 2.0, None, 4.0], "alpha": [10.0, 0.0, 5.0, 7.0],
                           "mid": ["b", "a", None, "b"], "aaa": ["x", "y", "x", "x"]})
    prep = fit_preprocessing(frame, ["zeta", "alpha"], ["mid", "aaa"])
    assert _np.array_equal(transform(frame, prep), transform(frame, _json.loads(dumps(prep))))
