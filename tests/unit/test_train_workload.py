"""The training workload's plain parts and one real single-rank run: features, AUC, checkpoint selection,
config parsing, export and resume of a finished run; and that the code location stays light."""

from __future__ import annotations
import json
import os
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
from support import load_workload
from assets.features import FeatureError, build_feature_frame, fit_preprocessing, transform
from assets.spec import PipelineSpec
from assets.training import TrainingError, training_key, verify_model_dir
from core.manifest import write_manifest

train = load_workload("train")


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
    assert train.roc_auc(y, p) == pytest.approx(roc_auc_score(y, p))
    assert np.isnan(train.roc_auc(np.ones(3), np.arange(3)))


def _fake_checkpoint(root: Path, tag: str, world: int = 2, marker: bool = True) -> Path:
    d = root / tag
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(os.urandom(256))
    (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(os.urandom(128))
    if marker:
        files = {p.name: {"size": p.stat().st_size, "sha256": train.sha256_file(p)} for p in d.iterdir()}
        (d / train.MARKER).write_text(json.dumps({"step": 0, "world_size": world, "files": files}))
    return d


def test_newest_complete_checkpoint_wins_and_every_other_is_named(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path, "global_step10")
    _fake_checkpoint(tmp_path, "global_step20")
    cut_off = _fake_checkpoint(tmp_path, "global_step30", marker=False)
    truncated = _fake_checkpoint(tmp_path, "global_step25")
    (truncated / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    flipped = _fake_checkpoint(tmp_path, "global_step22")
    data = bytearray((flipped / "mp_rank_00_model_states.pt").read_bytes())
    data[0] ^= 0xFF
    (flipped / "mp_rank_00_model_states.pt").write_bytes(bytes(data))
    other_world = _fake_checkpoint(tmp_path, "global_step40", world=4)
    _fake_checkpoint(tmp_path, "global_step20.final")
    warnings: list[str] = []
    assert train.complete_checkpoints(tmp_path, 2, warnings.append) == ["global_step20.final", "global_step20",
                                                                       "global_step10"]
    text = "\n".join(warnings)
    for d, why in ((cut_off, "no COMPLETE.json"), (truncated, "truncated"), (flipped, "corrupted"),
                   (other_world, "written by 4 ranks")):
        assert any(str(d) in w and why in w for w in warnings), text


def test_prune_keeps_the_newest_complete(tmp_path: Path) -> None:
    for step in (5, 10, 15, 20):
        _fake_checkpoint(tmp_path, f"global_step{step}")
    _fake_checkpoint(tmp_path, "global_step3", marker=False)
    train.prune(tmp_path, 2, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step15", "global_step20"]


def test_config_from_file_and_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"data": "d.npz", "output_dir": "o", "checkpoint_dir": "c", "epochs": 3}))
    cfg = train.TrainConfig.from_args(["--config", str(cfg_file), "--epochs", "5", "--hidden", "[8]",
                                       "--bf16", "false"])
    assert (cfg.epochs, cfg.hidden, cfg.bf16, cfg.data) == (5, [8], "false", "d.npz")
    pod = train.TrainConfig.from_args(["--config", str(cfg_file), "--checkpoint-subdir", "toy/k1"])
    assert pod.checkpoint_dir == "c"
    monkeypatch.setenv("INTELLIGENTOPS_CHECKPOINT_DIR", "/checkpoints")  # set by the Kubernetes launchers
    pod = train.TrainConfig.from_args(["--config", str(cfg_file), "--checkpoint-subdir", "toy/k1"])
    assert pod.checkpoint_dir == "/checkpoints/toy/k1"
    cfg_file.write_text(json.dumps({"data": "d", "output_dir": "o", "checkpoint_dir": "c", "epoch": 3}))
    with pytest.raises(SystemExit, match="unknown config key"):
        train.TrainConfig.from_args(["--config", str(cfg_file)])


def test_verify_model_dir_names_the_tampered_file(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    write_manifest(tmp_path)
    verify_model_dir("toy", tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"other")
    with pytest.raises(TrainingError, match="toy: .*model.safetensors: sha256 .* does not match manifest.json"):
        verify_model_dir("toy", tmp_path)


# --- one real run, by hand: python workloads/train.py (one rank, no launcher, no Dagster) --------------------


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
