"""Platt calibration, fitted on the validation logits at export and folded into the network's last Linear layer.

A Platt scaling `sigmoid(a*z + b)` folded as `w' = a*w`, `b' = a*b0 + b` makes the exported network's sigmoid the
calibrated probability, so whatever loads `model.safetensors` needs no change (the MLP, text_finetune's head).
A user's own network may do anything after its last layer, so there the fit is not folded: the record says
`"folded": false` and the served model applies `a*z + b` to the network's logit itself (workloads/model_code.py).
The fit is recorded in `result.json` and the model's `manifest.json` (`calibration`).
"""

from __future__ import annotations

from typing import Any

from core.train_config import TrainConfig
from workloads.training.metrics import log_loss
from workloads.training.models import Network


def fit_platt(logits: Any, y: Any, iterations: int = 100) -> tuple[float, float]:
    """(a, b) minimizing the log loss of sigmoid(a * logit + b) on the labels (Newton's method).

    Labels are Platt's smoothed targets ((n+ + 1)/(n+ + 2) and 1/(n- + 2)), which keep a separable validation
    split from driving `a` to infinity.
    """
    import numpy as np

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64) > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("Platt scaling needs both classes in the validation split")
    t = np.where(y, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    a, b = 1.0, float(np.log((n_pos + 1.0) / (n_neg + 1.0)))
    x = np.stack([z, np.ones_like(z)], axis=1)

    def loss(a_: float, b_: float) -> float:
        s = a_ * z + b_
        return float(np.sum(np.logaddexp(0.0, s) - t * s))

    current = loss(a, b)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(a * z + b)))
        grad = x.T @ (p - t)
        hess = (x * (p * (1 - p))[:, None]).T @ x + 1e-9 * np.eye(2)
        da, db = np.linalg.solve(hess, grad)
        step = 1.0
        while step > 1e-8:  # backtracking keeps every Newton step a descent step
            na, nb = a - step * da, b - step * db
            new = loss(na, nb)
            if new <= current:
                break
            step /= 2
        else:
            break
        converged = abs(current - new) < 1e-12 * max(1.0, abs(current))
        a, b, current = na, nb, new
        if converged:
            break
    return float(a), float(b)


def network_logits(weights: dict[str, Any], in_features: int, hidden: list[int], x: Any) -> Any:
    """An MLP's logits for the rows of x (numpy), on CPU in float32, in eval mode (no dropout)."""
    import numpy as np
    import torch

    from workloads.tabular_mlp import build_mlp

    net = build_mlp(in_features, hidden, 0.0)
    net.load_state_dict(weights)
    net.eval()
    with torch.inference_mode():
        out = [net(torch.from_numpy(np.ascontiguousarray(x[i:i + 8192], dtype=np.float32))).squeeze(-1).double()
               for i in range(0, len(x), 8192)]
    return torch.cat(out).numpy() if out else np.zeros(0)


def fold_platt(weights: dict[str, Any], prefix: str, a: float, b: float) -> dict[str, Any]:
    """Weights whose logit is a * logit + b: the output layer `prefix` scaled by a, its bias moved by b."""
    folded = dict(weights)
    w, b0 = weights[f"{prefix}.weight"], weights[f"{prefix}.bias"]
    folded[f"{prefix}.weight"] = (w.double() * a).to(w.dtype).contiguous()
    folded[f"{prefix}.bias"] = (b0.double() * a + b).to(b0.dtype).contiguous()
    return folded


def calibrate(cfg: TrainConfig, network: Network, weights: dict[str, Any],
              y_val: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Platt-scaled weights (or the unchanged weights and a record to apply) and the record of the fit."""
    import numpy as np

    if not cfg.calibrate:
        return weights, {"method": "none", "reason": "calibrate is off"}
    y = np.asarray(y_val)
    if len(y) == 0 or y.min() == y.max():
        return weights, {"method": "none", "reason": "the validation split lacks one of the classes"}
    z = network.cpu_logits(weights, "val")
    a, b = fit_platt(z, y)
    if a <= 0:
        # Folding a negative slope would turn the network's ranking upside down on the strength of the
        # validation rows alone; a network that ranks backwards is left as it is, for the gates to see.
        return weights, {"method": "none", "reason": f"the fitted slope a={a:.4f} is not positive: the network's "
                         "scores do not rise with the positive rate on the validation split", "a": a, "b": b}
    before = 1.0 / (1.0 + np.exp(-z))
    after = 1.0 / (1.0 + np.exp(-(a * z + b)))
    prefix = network.fold_prefix
    record = {"method": "platt", "fitted_on": "validation", "rows": int(len(y)), "a": a, "b": b,
              "folded": prefix is not None,
              "folded_into": f"{prefix} (the output Linear layer)" if prefix is not None
              else "not folded: the served model applies a * logit + b",
              "val_log_loss_before": log_loss(y, before), "val_log_loss_after": log_loss(y, after),
              "val_mean_probability_before": float(before.mean()),
              "val_mean_probability_after": float(after.mean()), "val_positive_rate": float(y.mean())}
    return (fold_platt(weights, prefix, a, b) if prefix is not None else weights), record


def probabilities(network: Network, weights: dict[str, Any], calibration: dict[str, Any]) -> Any:
    """What the exported model says for the validation rows: P(positive), calibration applied (numpy)."""
    import numpy as np

    z = network.cpu_logits(weights, "val")
    if calibration.get("method") == "platt" and calibration.get("folded") is False:
        z = calibration["a"] * z + calibration["b"]
    return 1.0 / (1.0 + np.exp(-z))
