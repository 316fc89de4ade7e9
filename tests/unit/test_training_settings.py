"""`training.model` and `training.deepspeed`: validated when the spec loads, errors naming the file and the key;
a user's factory that cannot train fails before the first step, naming its file and what was expected."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from support import shipped_spec, write_spec

from assets.spec import SpecError, load_spec
from core.train_config import (AUTO_ZERO_MIN_PARAMS, DeepSpeedSettings, TrainConfig, accelerator_problems,
                               resolve_precision, resolve_zero_stage)
from workloads.training import __main__ as entry
from workloads.training.models import FactoryNetwork, ModelError


def _spec(tmp_path: Path, spec_name: str = "credit_risk", **training) -> Path:
    spec = shipped_spec(spec_name)
    spec["training"] = training
    return write_spec(tmp_path, spec)


@pytest.mark.parametrize(("training", "message"), [
    ({"deepspeed": {"zero_stage": 4}}, r"'training\.deepspeed\.zero_stage': Input should be 'auto', 0, 1, 2 or 3"),
    ({"deepspeed": {"offload_param": "cpu", "zero_stage": 2}}, r"offload_param: cpu partitions parameters, which only "
                                                               r"ZeRO stage 3 does; set zero_stage: 3 \(it is 2\)"),
    ({"deepspeed": {"offload_optimizer": "cpu"}}, r"offload_optimizer: cpu needs ZeRO stage 1, 2 or 3 named in "
                                                  r"zero_stage \(it is 'auto'\)"),
    ({"deepspeed": {"offload_optimizer": "nvme", "zero_stage": 3}}, r"'training\.deepspeed\.offload_optimizer': "
                                                                    r"Input should be 'none' or 'cpu'"),
    ({"deepspeed": {"precision": "fp8"}}, r"'training\.deepspeed\.precision': Input should be 'auto', 'fp32', 'bf16'"),
    ({"deepspeed": {"loss_scale": 1024, "precision": "bf16"}}, r"loss_scale and initial_scale_power scale fp16 "
                                                               r"losses, but precision is 'bf16'"),
    ({"deepspeed": {"gradient_accumulation_steps": 0}}, r"'training\.deepspeed\.gradient_accumulation_steps'"),
    ({"deepspeed": {"activation_checkpoint": True}}, r"unknown key 'training\.deepspeed\.activation_checkpoint'"),
    ({"model": "resnet"}, r"'training\.model': .*'resnet' is not a model: use mlp, text_finetune, or "
                          r"\"module\.path:factory\""),
    ({"model_settings": {"width": 3}}, r"model_settings are passed to a model factory .* but model is 'mlp'"),
    ({"encoder_learning_rate": 1e-4}, r"encoder_learning_rate applies to model: text_finetune only"),
    ({"model": "text_finetune", "encoder_trainable_layers": 0}, r"'training\.encoder_trainable_layers'"),
])
def test_training_mistakes_name_the_file_and_the_key(tmp_path: Path, training: dict, message: str) -> None:
    path = _spec(tmp_path, **training)
    with pytest.raises(SpecError, match=message) as err:
        load_spec(path)
    assert str(err.value).startswith(f"{path}: ")


def test_text_finetune_needs_a_text_feature(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="training.model: text_finetune fine-tunes the text encoder, but features.text "
                                        "is empty"):
        load_spec(_spec(tmp_path, "credit_scoring", model="text_finetune"))
    loaded = load_spec(_spec(tmp_path, model="text_finetune", encoder_trainable_layers=1))
    assert loaded.spec.training.model == "text_finetune" and loaded.model_module() is None


def test_a_factory_module_is_found_next_to_the_spec_then_on_the_python_path(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=re.escape(f"names module 'my_models', but there is no my_models.py next to "
                                                  f"the spec ({tmp_path / 'my_models.py'}) or on the Python path")):
        load_spec(_spec(tmp_path, model="my_models:make_net"))
    (tmp_path / "my_models.py").write_text("def make_net(n, settings): ...\n")
    loaded = load_spec(_spec(tmp_path, model="my_models:make_net", model_settings={"width": 8}))
    assert loaded.model_module() == tmp_path / "my_models.py"
    assert loaded.spec.training.factory == ("my_models", "make_net")
    (tmp_path / "nets").mkdir()
    (tmp_path / "nets" / "deep.py").write_text("def build(n, settings): ...\n")
    assert load_spec(_spec(tmp_path, model="nets.deep:build")).model_module() == tmp_path / "nets" / "deep.py"
    # Not beside the spec: the Python path, searched without importing the module or its package.
    assert load_spec(_spec(tmp_path, model="workloads.tabular_mlp:build_mlp")).model_module().name == "tabular_mlp.py"
    with pytest.raises(SpecError, match=r"'workloads' is a package .*name a module file"):
        load_spec(_spec(tmp_path, model="workloads:build"))


def test_engine_settings_resolve_for_what_runs() -> None:
    assert resolve_zero_stage("auto", AUTO_ZERO_MIN_PARAMS - 1) == 0
    assert resolve_zero_stage("auto", AUTO_ZERO_MIN_PARAMS) == 2
    assert resolve_zero_stage(3, 10) == 3
    assert (resolve_precision("auto", bf16_supported=True), resolve_precision("auto", bf16_supported=False)) == (
        "bf16", "fp32")
    assert resolve_precision("fp16", bf16_supported=True) == "fp16"
    fp16 = DeepSpeedSettings(precision="fp16", loss_scale=0, initial_scale_power=12)
    # A processor without fp16 (DeepSpeed's CPU accelerator asks it) refuses fp16, naming the key and the remedy.
    assert accelerator_problems(fp16, "CPU", fp16_supported=False, bf16_supported=True) == [
        "precision: fp16 cannot run on this CPU (DeepSpeed's CPU accelerator reports no fp16 support); use "
        "precision: bf16 or fp32 here, or train on a GPU"]
    assert accelerator_problems(fp16, "CPU", fp16_supported=True, bf16_supported=True) == []
    assert "precision: bf16 cannot run" in accelerator_problems(DeepSpeedSettings(precision="bf16"), "CUDA", True,
                                                                False)[0]


# --- a user's factory that cannot train -----------------------------------------------------------------------

BAD_FACTORIES = {
    "import": ("import not_a_module_anywhere\n", r"importing it failed with ModuleNotFoundError: No module named "
                                                 r"'not_a_module_anywhere'"),
    "missing": ("def other(n, settings):\n    pass\n", r"the module has no function 'make_net'; define "
                                                       r"make_net\(n_inputs: int, settings: dict\) -> torch.nn.Module"),
    "raises": ("def make_net(n, settings):\n    return settings['width']\n",
               r"make_net\(4, \{\}\) raised KeyError: 'width'"),
    "not_module": ("def make_net(n, settings):\n    return [n]\n", r"make_net returned list; expected a "
                                                                    r"torch.nn.Module"),
    "shape": ("import torch.nn as nn\ndef make_net(n, settings):\n    return nn.Linear(n, 3)\n",
              r"maps a float tensor of shape \(2, 4\) to Tensor of shape \(2, 3\); expected one logit per row, shape "
              r"\(2,\) or \(2, 1\)"),
    "frozen": ("import torch.nn as nn\ndef make_net(n, settings):\n    net = nn.Linear(n, 1)\n"
               "    net.requires_grad_(False)\n    return net\n", r"has no trainable parameters"),
    "checkpointing": ("import torch.nn as nn\ndef make_net(n, settings):\n    return nn.Linear(n, 1)\n",
                      r"activation_checkpointing is on, but the module from make_net has no "
                      r"gradient_checkpointing_enable\(\) method"),
}


def _factory_config(tmp_path: Path, source: str, **extra) -> TrainConfig:
    (tmp_path / "nets.py").write_text(source)
    x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x_train=x, y_train=(x[:, 0] > 0).astype(np.float32), x_val=x, y_val=x[:, 0] > 0)
    return TrainConfig(data=str(tmp_path / "data.npz"), output_dir=str(tmp_path / "out"),
                       checkpoint_dir=str(tmp_path / "ckpt"), model="nets:make_net",
                       model_file=str(tmp_path / "nets.py"), **extra)


@pytest.mark.parametrize("case", sorted(BAD_FACTORIES))
def test_a_bad_factory_fails_before_training_naming_its_file(tmp_path: Path, case: str) -> None:
    source, message = BAD_FACTORIES[case]
    cfg = _factory_config(tmp_path, source, activation_checkpointing=case == "checkpointing")
    x = np.load(cfg.data)["x_train"]
    with pytest.raises(ModelError, match=message) as err:
        FactoryNetwork(cfg, {"x_train": x, "x_val": x})
    assert str(err.value).startswith(f"{tmp_path / 'nets.py'} (training.model 'nets:make_net'): ")


def test_the_workload_exits_cleanly_on_a_bad_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("DAGSTER_PIPES_CONTEXT", raising=False)
    cfg = _factory_config(tmp_path, BAD_FACTORIES["shape"][0])
    cfg.write(tmp_path / "config.json")
    assert entry.main(["--config", str(tmp_path / "config.json")]) == 2
    err = capsys.readouterr().err
    assert f"ERROR: workloads.training: {tmp_path / 'nets.py'} (training.model 'nets:make_net'): " in err
    assert "expected one logit per row" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "ckpt").exists()


def test_new_settings_travel_through_the_config_file(tmp_path: Path) -> None:
    cfg = TrainConfig(data="d.npz", output_dir="o", checkpoint_dir="c", model="text_finetune",
                      encoder_trainable_layers=1, encoder_learning_rate=1e-4, zero_stage=3, offload_param="cpu",
                      offload_optimizer="cpu", precision="fp16", loss_scale=128, gradient_accumulation_steps=4,
                      activation_checkpointing=True, gradient_clipping=0.5, checkpoint_min_seconds=0)
    cfg.write(tmp_path / "c.json")
    assert TrainConfig.read(tmp_path / "c.json") == cfg
    assert json.loads((tmp_path / "c.json").read_text())["offload_param"] == "cpu"
