"""Training that fits the data it is given (issue 12): the step budget, the learning-rate schedule, class
weighting, Platt calibration folded into the network, and the spec's training section and the workload's config
as one schema with one set of defaults."""

from __future__ import annotations
import json
import math
from pathlib import Path
import numpy as np
import pytest
from support import REPO
from assets.spec import Compliance, DeepSpeedSettings, PipelineSpec, Training, load_spec
from core import train_config
from core.train_config import TrainConfig, TrainConfigError, TrainSettings
from workloads.tabular_mlp import build_mlp
from workloads.training import schedule
from workloads.training.calibration import calibrate, fit_platt, fold_platt, network_logits
from workloads.training.models import Network, last_linear
from workloads.training.config import config_from_args
from workloads.training.metrics import log_loss
from workloads.training.schedule import lr_at, plan_budget, positive_weight


def _cfg(**values) -> TrainConfig:
    return TrainConfig(data="d", output_dir="o", checkpoint_dir="c", **values)


# --- the budget ---------------------------------------------------------------------------------------------


def test_budget_scales_with_rows_within_bounds() -> None:
    cfg = _cfg()
    small, medium, large = (plan_budget(cfg, n, world=2) for n in (300, 7_000, 300_000))
    # A few hundred rows: small micro-batches (at most 5% of a rank's rows, never under 8), many passes.
    assert small.micro_batch_size == 8 and small.micro_steps_per_epoch == 19
    assert small.max_steps == 760 and small.eval_every_steps == 15
    # Credit_risk's size: the configured 128-row micro-batch is under 5% of a rank's rows, so it stays.
    assert medium.micro_batch_size == 128 and medium.max_steps == 40 * medium.micro_steps_per_epoch
    # A few hundred thousand: the configured micro-batch, the budget capped, evaluations every ~100 steps.
    assert large.micro_batch_size == 128 and large.max_steps == schedule.AUTO_MAX_MAX_STEPS == 5000
    assert large.eval_every_steps == 100
    for b in (small, medium, large):
        assert 1 <= b.min_steps <= b.max_steps and b.eval_every_steps <= b.micro_steps_per_epoch
        assert schedule.AUTO_MIN_MAX_STEPS <= b.max_steps <= schedule.AUTO_MAX_MAX_STEPS
        assert b.warmup_steps == round(0.05 * b.max_steps)
    # Tiny data still gets the floor of the budget.
    assert plan_budget(cfg, 60, world=1).max_steps == schedule.AUTO_MIN_MAX_STEPS


def test_budget_settings_win_and_epochs_cap_the_passes() -> None:
    b = plan_budget(_cfg(max_steps=1), 5_000, world=2)
    assert (b.max_steps, b.min_steps, b.eval_every_steps) == (1, 1, 1)  # the crippled setting is honoured
    b = plan_budget(_cfg(max_steps=300, min_steps=200, eval_every_steps=7), 5_000)
    assert (b.max_steps, b.min_steps, b.eval_every_steps) == (300, 200, 7)
    b = plan_budget(_cfg(epochs=3, micro_batch_size=32, min_steps=400), 240, world=1)
    assert b.micro_batch_size == 12 and b.max_steps == 3 * b.micro_steps_per_epoch == 60
    assert b.min_steps == 60  # the epochs cap cut max_steps below min_steps: min_steps follows it down
    b = plan_budget(_cfg(epochs=2, gradient_accumulation_steps=4), 8_000, world=2)
    assert b.max_steps == 2 * b.micro_steps_per_epoch // 4
    with pytest.raises(ValueError, match="3 training rows cannot be shared by 4 ranks"):
        plan_budget(_cfg(), 3, world=4)


def test_config_refuses_a_budget_that_makes_no_sense(tmp_path: Path) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"data": "d", "output_dir": "o", "checkpoint_dir": "c", "max_steps": 0}))
    with pytest.raises(TrainConfigError, match="key 'max_steps' = 0: Input should be greater than or equal to 1"):
        config_from_args(["--config", str(cfg)], environ={})
    with pytest.raises(TrainConfigError, match="key 'max_batch_fraction' = 2: Input should be less than or equal to 1"):
        config_from_args(["--config", str(cfg), "--max-steps", "5", "--max-batch-fraction", "2"], environ={})
    with pytest.raises(TrainConfigError, match=r"min_steps \(10\) is above max_steps \(5\)"):
        config_from_args(["--config", str(cfg), "--max-steps", "5", "--min-steps", "10"], environ={})
    ok = config_from_args(["--config", str(cfg), "--max-steps", "5", "--class-weighting", "false"], environ={})
    assert ok.max_steps == 5 and ok.class_weighting is False and ok.calibrate is True


# --- the learning-rate schedule -----------------------------------------------------------------------------


def test_lr_warms_up_linearly_then_decays_along_a_cosine_to_the_floor() -> None:
    lr = [lr_at(s, 1e-3, 10, 110, 0.05) for s in range(1, 111)]
    assert lr[0] == pytest.approx(1e-4) and lr[4] == pytest.approx(5e-4) and lr[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lr[:10], lr[1:10], strict=False))  # rising through the warmup
    decay = lr[9:]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))  # never rising after it
    assert lr[59] == pytest.approx(0.05e-3 + 0.95e-3 * 0.5)  # half way: the cosine's midpoint
    assert lr[-1] == pytest.approx(0.05e-3)  # the floor at max_steps
    assert lr_at(500, 1e-3, 10, 110, 0.05) == pytest.approx(0.05e-3)  # and after it
    assert lr_at(1, 1e-3, 0, 100, 0.0) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 100)))


# --- class weighting ----------------------------------------------------------------------------------------


def test_positive_weight_lifts_the_rare_class_half_way_to_balance() -> None:
    import torch
    import torch.nn.functional as F

    y = np.array([1.0] * 3 + [0.0] * 97, dtype=np.float32)
    w = positive_weight(y)
    assert w == pytest.approx(math.sqrt(97 / 3))
    logits = torch.zeros(100, requires_grad=True)
    F.binary_cross_entropy_with_logits(logits, torch.from_numpy(y), pos_weight=torch.tensor(w)).backward()
    # At p = 0.5 each positive pulls sqrt(97/3) times as hard as a negative pushes: the positives' share of
    # the gradient goes from 3/100 to the geometric middle between that and balance.
    pull, push = -float(logits.grad[y == 1].sum()), float(logits.grad[y == 0].sum())
    assert pull / push == pytest.approx(math.sqrt(3 / 97), rel=1e-5)
    assert positive_weight(np.ones(5)) == positive_weight(np.zeros(5)) == 1.0


# --- calibration --------------------------------------------------------------------------------------------


def test_platt_fit_recovers_a_known_scaling() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 20_000)
    y = rng.random(20_000) < 1 / (1 + np.exp(-(0.4 * z - 1.0)))
    a, b = fit_platt(z, y)
    assert a == pytest.approx(0.4, abs=0.03) and b == pytest.approx(-1.0, abs=0.05)
    with pytest.raises(ValueError, match="both classes"):
        fit_platt(z[:10], np.ones(10))


def test_folded_network_gives_the_platt_scaled_probabilities() -> None:
    import torch

    torch.manual_seed(0)
    hidden = [16, 8]
    net = build_mlp(5, hidden, 0.1)
    weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
    x = np.random.default_rng(1).normal(size=(400, 5)).astype(np.float32)
    z = network_logits(weights, 5, hidden, x)
    a, b = 0.37, -1.25
    folded = fold_platt(weights, last_linear(hidden), a, b)
    assert set(folded) == set(weights) and all(folded[k].dtype == weights[k].dtype for k in weights)
    assert [k for k in weights if not torch.equal(folded[k], weights[k])] == ["6.weight", "6.bias"]
    served = build_mlp(5, hidden, 0.1)  # what the served pyfunc does: build, load, sigmoid
    served.load_state_dict(folded)
    served.eval()
    with torch.inference_mode():
        p_served = torch.sigmoid(served(torch.from_numpy(x)).squeeze(-1)).double().numpy()
    np.testing.assert_allclose(p_served, 1 / (1 + np.exp(-(a * z + b))), rtol=0, atol=1e-6)


def test_calibrate_fits_on_validation_and_records_it() -> None:
    import torch

    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3_000, 3)).astype(np.float32)
    net = build_mlp(3, [4], 0.0)
    weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
    # An overconfident network: its logits (spread 10) are five times what the labels say (spread 2).
    scale = 10.0 / float(np.std(network_logits(weights, 3, [4], x)))
    weights["3.weight"] *= scale
    weights["3.bias"] *= scale
    z = network_logits(weights, 3, [4], x)
    y = (rng.random(3_000) < 1 / (1 + np.exp(-z / 5.0))).astype(np.float32)
    cfg = _cfg(hidden=[4])
    network = Network(cfg, {"x_train": x, "x_val": x})
    folded, record = calibrate(cfg, network, weights, y)
    assert record["method"] == "platt" and record["rows"] == 3_000
    assert record["a"] == pytest.approx(0.2, abs=0.05) and abs(record["b"]) < 0.2
    assert record["val_log_loss_after"] < record["val_log_loss_before"] - 0.05
    p = 1 / (1 + np.exp(-network_logits(folded, 3, [4], x)))
    assert log_loss(y, p) == pytest.approx(record["val_log_loss_after"], abs=1e-6)
    off, why = calibrate(cfg.model_copy(update={"calibrate": False}), network, weights, y)
    assert off is weights and why == {"method": "none", "reason": "calibrate is off"}
    flipped, why = calibrate(cfg, network, weights, 1.0 - y)  # a network that ranks backwards stays so
    assert flipped is weights and why["method"] == "none" and why["a"] < 0 and "not positive" in why["reason"]
    _, why = calibrate(cfg, network, weights, np.zeros(3_000, np.float32))
    assert why["method"] == "none" and "lacks one of the classes" in why["reason"]


# --- the spec's training section is the workload's config ----------------------------------------------------


def test_the_spec_and_the_workload_config_share_one_set_of_defaults(tmp_path: Path) -> None:
    """Each setting is declared once, in core.train_config: the spec's Training inherits it and so does the
    workload's TrainConfig, so a default changed there changes on both sides of the process boundary."""
    from assets.training import NOT_WORKLOAD_SETTINGS as not_passed, workload_config

    assert issubclass(Training, TrainSettings) and issubclass(TrainConfig, TrainSettings)
    assert DeepSpeedSettings is train_config.DeepSpeedSettings and issubclass(TrainConfig, DeepSpeedSettings)
    assert not_passed == {"deepspeed", "launcher", "nproc_per_node", "num_nodes", "max_categories", "keep_runs",
                         "window"}
    # No spec module declares a setting of its own: every shared field is the one TrainSettings declares.
    for key in TrainSettings.model_fields:
        assert key in Training.__pydantic_fields__ and key not in Training.__annotations__, key
    for key, value in Training().model_dump(mode="json").items():
        if key in not_passed:
            continue
        spec_field, config_field = Training.model_fields[key], TrainConfig.model_fields[key]
        assert key in TrainSettings.model_fields, f"training.{key} has no TrainSettings field"
        assert (spec_field.default, spec_field.metadata) == (config_field.default, config_field.metadata), key
        assert value == TrainConfig.model_fields[key].get_default(call_default_factory=True), key
    assert Training().deepspeed.model_dump() == {k: TrainConfig.model_fields[k].default
                                                 for k in DeepSpeedSettings.model_fields}
    assert Compliance().max_auc_below_baseline == 0.02

    # What the asset hands the workload is exactly such a config, and the workload reads back the same one.
    spec = load_spec(REPO / "pipelines" / "credit_scoring.yaml").spec
    config = workload_config(spec, data="d.npz", output_dir="o", checkpoint_dir="c")
    assert config.zero_stage == spec.training.deepspeed.zero_stage and config.seed == spec.split.seed
    assert config.hidden == spec.training.hidden and config.max_steps == spec.training.max_steps
    config.write(tmp_path / "config.json")
    assert TrainConfig.read(tmp_path / "config.json") == config
    assert config_from_args(["--config", str(tmp_path / "config.json")], environ={}) == config
    for path in sorted((REPO / "pipelines").glob("*.yaml")) + sorted((REPO / "benchmarks" / "specs").glob("*.yaml")):
        load_spec(path)  # shipped and benchmark specs load


def test_the_asset_refuses_a_config_the_workload_would_refuse() -> None:
    from assets.training import workload_config

    spec = load_spec(REPO / "pipelines" / "credit_scoring.yaml").spec
    with pytest.raises(TrainConfigError, match="spec 'credit_scoring', training: key 'output_dir' is required"):
        workload_config(spec, data="d.npz", checkpoint_dir="c")
    with pytest.raises(TrainConfigError, match="key 'backend' = 'mpi': Input should be 'auto', 'gloo' or 'nccl'"):
        workload_config(spec, data="d.npz", output_dir="o", checkpoint_dir="c", backend="mpi")


def test_min_steps_above_max_steps_is_refused_with_both_numbers() -> None:
    base = {"name": "toy", "source": {"kind": "file", "path": "x.csv"}, "target": {"column": "y", "positive": [1]},
            "features": {"numeric": ["a"]}}
    with pytest.raises(ValueError, match=r"min_steps \(10\) is above max_steps \(5\)"):
        PipelineSpec.model_validate({**base, "training": {"min_steps": 10, "max_steps": 5}})
