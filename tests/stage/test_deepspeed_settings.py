"""Every `training.deepspeed` combination that runs on this CPU, in one two-rank torchrun launch.

ZeRO stage 0-3 x precision (fp32, bf16, fp16 with dynamic loss scaling) x optimizer offload (stages 1-3) x
parameter offload (stage 3), with gradient accumulation and activation checkpointing taking both values across
the stages; plus a user's factory and text_finetune under ZeRO-3. Each runs a few steps on a tiny table twice: once
straight, once interrupted after a checkpoint and resumed from its shards (tests/deepspeed_matrix.py). The
exported model is one consolidated safetensors file that loads into the plain network and predicts what the run
reported; a resumed run exports the very weights the straight one did. A combination this CPU cannot run
(fp16 where the processor lacks it) must be refused with the key named, never attempted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from support import REPO

pytestmark = pytest.mark.slow

STOP_AT, MAX_STEPS = 4, 6
FACTORY = '''
import torch.nn as nn


class Residual(nn.Module):
    def __init__(self, n_inputs, width):
        super().__init__()
        self.inp = nn.Linear(n_inputs, width)
        self.block = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.block(h))


def make_net(n_inputs, settings):
    return Residual(n_inputs, settings["width"])
'''


def fp16_on_this_cpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


def engine_cases() -> list[dict]:
    cases = []
    for stage in (0, 1, 2, 3):
        for precision in ("fp32", "bf16", "fp16"):
            for offload_optimizer in (("none",) if stage == 0 else ("none", "cpu")):
                for offload_param in (("none", "cpu") if stage == 3 else ("none",)):
                    cases.append({"zero_stage": stage, "precision": precision, "offload_optimizer": offload_optimizer,
                                  "offload_param": offload_param})
    for i, case in enumerate(cases):
        case["gradient_accumulation_steps"] = 1 + i % 2
        case["activation_checkpointing"] = (i // 2) % 2 == 0
    return cases


def write_data(folder: Path) -> dict[str, str]:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(320, 6)).astype(np.float32)
    y = (x[:, 0] - 0.5 * x[:, 1] + 0.3 * rng.normal(size=320) > 0).astype(np.float32)
    np.savez(folder / "data.npz", x_train=x[64:], y_train=y[64:], x_val=x[:64], y_val=y[:64])
    titles = np.array(["truck driver", "nurse", "senior welder", "teacher", "", "night guard", "accountant",
                       "lead cook"])[rng.integers(0, 8, 160)]
    risky = np.isin(titles, ["truck driver", "senior welder", "night guard", "lead cook"])
    yt = (risky + 0.4 * x[:160, 0] + 0.3 * rng.normal(size=160) > 0.5).astype(np.float32)
    np.savez(folder / "text.npz", x_train=x[32:160, :2], y_train=yt[32:], x_val=x[:32, :2], y_val=yt[:32],
             t_train=titles[32:, None], t_val=titles[:32, None])
    (folder / "residual.py").write_text(FACTORY)
    return {"data": str(folder / "data.npz"), "text": str(folder / "text.npz"), "factory": str(folder / "residual.py")}


def common_settings(data: str) -> dict:
    return {"data": data, "hidden": [16, 8], "dropout": 0.0, "learning_rate": 0.01, "micro_batch_size": 16,
            "max_batch_fraction": 1.0, "max_steps": MAX_STEPS, "min_steps": MAX_STEPS, "eval_every_steps": 3,
            "checkpoint_every_steps": 2, "checkpoint_min_seconds": 0, "backend": "gloo", "stop_at": STOP_AT}


def launch(root: Path, cases: dict, nproc: int) -> dict:
    for name, case in cases.items():
        case["folder"] = str(root / name)
    (root / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "HF_HUB_OFFLINE": "1"}
    env.pop("DAGSTER_PIPES_CONTEXT", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), str(REPO / "tests" / "deepspeed_matrix.py"), str(root / "cases.json"),
                           str(root / "out.json")], env=env, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"cases": json.loads((root / "cases.json").read_text()), "out": json.loads((root / "out.json").read_text())}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("deepspeed")
    files = write_data(root)
    common = common_settings(files["data"])
    cases = {f"z{c['zero_stage']}-{c['precision']}-opt_{c['offload_optimizer']}-param_{c['offload_param']}":
             {**common, **c} for c in engine_cases()}
    cases["auto"] = dict(common)
    cases["factory-z3"] = {**common, "model": "residual:make_net", "model_file": files["factory"],
                           "model_settings": {"width": 12}, "zero_stage": 3, "offload_param": "cpu"}
    cases["text_finetune-z3-bf16"] = {**common, "data": files["text"], "model": "text_finetune",
                                      "encoder_trainable_layers": 1, "zero_stage": 3, "precision": "bf16",
                                      "activation_checkpointing": True, "micro_batch_size": 8, "hidden": [8]}
    return launch(root, cases, nproc=2)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One rank: where the loop runs the forward and backward passes itself (stage 0, fp32), and ZeRO-1 through
    the engine for comparison (on one rank the same optimizer, so the same model)."""
    root = tmp_path_factory.mktemp("one_rank")
    common = common_settings(write_data(root)["data"])
    return launch(root, {"auto": dict(common),
                         "z0-fp32-accumulating": {**common, "zero_stage": 0, "precision": "fp32",
                                                  "gradient_accumulation_steps": 2, "activation_checkpointing": True},
                         "z1-fp32": {**common, "zero_stage": 1, "precision": "fp32"}}, nproc=1)

def exported_probabilities(model_dir: Path, data: dict) -> np.ndarray:
    """The exported files alone, as the served model reads them: the manifest's architecture and the weights."""
    import torch
    from safetensors.torch import load_file

    from workloads.tabular_mlp import build_mlp

    manifest = json.loads((model_dir / "manifest.json").read_text())
    arch, calibration = manifest["architecture"], manifest["calibration"]
    assert arch["kind"] == "mlp"
    net = build_mlp(arch["in_features"], arch["hidden"], 0.0)
    net.load_state_dict(load_file(str(model_dir / "model.safetensors")))  # strict: every tensor whole
    net.eval()
    with torch.inference_mode():
        z = net(torch.from_numpy(data["x_val"])).reshape(-1).double().numpy()
    assert calibration.get("folded", True)
    return 1 / (1 + np.exp(-z))


def test_every_engine_combination_trains_resumes_and_exports_one_consolidated_model(matrix: dict) -> None:
    data = dict(np.load(matrix["cases"]["auto"]["data"]))
    ran = []
    for name, case in matrix["cases"].items():
        if name.startswith(("factory", "text_finetune")):
            continue
        outcome = matrix["out"][name]
        if case.get("precision") == "fp16" and not fp16_on_this_cpu():
            assert "precision: fp16 cannot run on this CPU" in outcome.get("refused", ""), (name, outcome)
            continue
        assert "refused" not in outcome, (name, outcome)
        straight, resumed = outcome["straight"], outcome["resumed"]
        assert straight["steps"] == resumed["steps"] == MAX_STEPS, name
        assert straight["resumed_from_step"] == 0 and resumed["resumed_from_step"] == STOP_AT, name
        assert straight["world_size"] == 2 and straight["network"] == "mlp"
        # What ran, as the MLflow run records it: the resolved stage and precision next to the setting.
        engine = straight["engine"]
        assert (straight["zero_stage"], straight["precision"]) == (
            case.get("zero_stage", 0) if case.get("zero_stage", "auto") != "auto" else 0,
            case.get("precision", "fp32") if case.get("precision", "auto") != "auto" else "fp32"), name
        for key in ("offload_optimizer", "offload_param", "gradient_accumulation_steps", "activation_checkpointing"):
            assert engine[key] == case.get(key, {"offload_optimizer": "none", "offload_param": "none",
                                                 "gradient_accumulation_steps": 1,
                                                 "activation_checkpointing": False}[key]), (name, key)
        plain = straight["zero_stage"] == 0 and straight["precision"] == "fp32"
        assert engine["gradient_clipping_by"] == ("torch" if plain else "deepspeed"), name
        # Two ranks reduce their gradients: the engine's backward always runs; its forward only where it has work.
        assert (engine["forward_by"], engine["backward_by"]) == ("module" if plain else "deepspeed", "deepspeed")
        # One consolidated fp32 file, whatever the shards: it loads whole and predicts what the run reported.
        straight_p = exported_probabilities(Path(straight["weights_path"]).parent, data)
        np.testing.assert_allclose(straight_p, straight["validation_probabilities"], rtol=0, atol=1e-6, err_msg=name)
        # Resumed from the interrupted run's shards: the same model as the straight run.
        resumed_p = exported_probabilities(Path(resumed["weights_path"]).parent, data)
        np.testing.assert_allclose(resumed_p, straight_p, rtol=0, atol=1e-6, err_msg=name)
        ran.append(name)
    stages = {matrix["cases"][n].get("zero_stage", "auto") for n in ran}
    assert stages == {"auto", 0, 1, 2, 3} and len(ran) >= 19


def test_one_rank_skips_the_engines_forward_and_backward_and_learns_what_the_engine_would(one_rank: dict) -> None:
    data = dict(np.load(one_rank["cases"]["auto"]["data"]))
    probabilities = {}
    for name in ("auto", "z0-fp32-accumulating", "z1-fp32"):
        straight, resumed = one_rank["out"][name]["straight"], one_rank["out"][name]["resumed"]
        assert straight["world_size"] == 1 and resumed["resumed_from_step"] == STOP_AT, name
        fast = straight["zero_stage"] == 0
        assert (straight["engine"]["forward_by"], straight["engine"]["backward_by"]) == (
            ("module", "torch") if fast else ("deepspeed", "deepspeed")), name
        probabilities[name] = exported_probabilities(Path(straight["weights_path"]).parent, data)
        np.testing.assert_allclose(probabilities[name], straight["validation_probabilities"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(exported_probabilities(Path(resumed["weights_path"]).parent, data),
                                   probabilities[name], rtol=0, atol=1e-6, err_msg=name)
    # The loop's own forward, backward and clipping train the model the full engine path trains.
    np.testing.assert_allclose(probabilities["auto"], probabilities["z1-fp32"], rtol=0, atol=1e-5)


def test_a_users_module_under_zero3_with_parameter_offload(matrix: dict) -> None:
    import importlib.util

    import torch
    from safetensors.torch import load_file

    case, outcome = matrix["cases"]["factory-z3"], matrix["out"]["factory-z3"]
    straight, resumed = outcome["straight"], outcome["resumed"]
    assert straight["network"] == "factory" and straight["zero_stage"] == 3 and resumed["resumed_from_step"] == STOP_AT
    model_dir = Path(straight["weights_path"]).parent
    arch = json.loads((model_dir / "manifest.json").read_text())["architecture"]
    assert (arch["kind"], arch["module"], arch["factory"], arch["file"], arch["settings"]) == (
        "factory", "residual", "make_net", "residual.py", {"width": 12})
    assert (model_dir / "residual.py").read_text() == FACTORY  # the source that trained travels with the weights
    spec = importlib.util.spec_from_file_location("exported_residual", model_dir / "residual.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = dict(np.load(case["data"]))
    probabilities = []
    for run in (straight, resumed):
        net = module.make_net(arch["in_features"], arch["settings"])
        net.load_state_dict(load_file(run["weights_path"]))
        net.eval()
        calibration = run["calibration"]
        assert calibration["method"] == "platt" and calibration["folded"] is False
        with torch.inference_mode():
            z = net(torch.from_numpy(data["x_val"])).reshape(-1).double().numpy()
        probabilities.append(1 / (1 + np.exp(-(calibration["a"] * z + calibration["b"]))))
        np.testing.assert_allclose(probabilities[-1], run["validation_probabilities"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(probabilities[1], probabilities[0], rtol=0, atol=1e-6)


def test_text_finetune_under_zero3_in_bf16_exports_an_encoder_that_serves_what_training_computed(
        matrix: dict) -> None:
    import torch
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    from workloads.tabular_mlp import build_mlp

    case, outcome = matrix["cases"]["text_finetune-z3-bf16"], matrix["out"]["text_finetune-z3-bf16"]
    straight, resumed = outcome["straight"], outcome["resumed"]
    assert (straight["network"], straight["zero_stage"], straight["precision"]) == ("text_finetune", 3, "bf16")
    assert resumed["resumed_from_step"] == STOP_AT and resumed["steps"] == MAX_STEPS
    data = dict(np.load(case["data"]))
    for run in (straight, resumed):
        model_dir = Path(run["weights_path"]).parent
        arch = json.loads((model_dir / "manifest.json").read_text())["architecture"]
        assert arch["kind"] == "text_finetune" and arch["encoder"] == "encoder"
        encoder = SentenceTransformer(str(model_dir / "encoder"), device="cpu", local_files_only=True)
        assert encoder.max_seq_length == arch["encoder_max_tokens"]
        vectors = encoder.encode([str(t) for t in data["t_val"][:, 0]], convert_to_numpy=True,
                                 normalize_embeddings=True)
        head = build_mlp(arch["in_features"], arch["hidden"], arch["dropout"])
        head.load_state_dict(load_file(str(model_dir / "model.safetensors")))
        head.eval()
        with torch.inference_mode():
            x = torch.from_numpy(np.concatenate([data["x_val"], vectors], axis=1).astype(np.float32))
            p = torch.sigmoid(head(x).reshape(-1)).double().numpy()
        np.testing.assert_allclose(p, run["validation_probabilities"], rtol=0, atol=1e-5)
