"""Platt calibration, fitted on the validation logits at export and folded into the network's last Linear layer.

A Platt scaling `sigmoid(a*z + b)` folded as `w' = a*w`, `b' = a*b0 + b` makes the exported network's sigmoid the
calibrated probability, so whatever loads `model.safetensors` needs no change. The fit is recorded in
`result.json` and the model's `manifest.json` (`calibration`).
"""

from __future__ import annotations

from typing import Any

from core.train_config import TrainConfig
from workloads.training.metrics import log_loss


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


def last_linear(hidden: list[int]) -> str:
    """State-dict prefix of build_mlp's output layer (Linear, ReLU, Dropout per hidden layer, then Linear)."""
    return str(3 * len(hidden))


def fold_platt(weights: dict[str, Any], hidden: list[int], a: float, b: float) -> dict[str, Any]:
    """Weights whose logit is a * logit + b: the output layer scaled by a, its bias moved by b."""
    name = last_linear(hidden)
    folded = dict(weights)
    w, b0 = weights[f"{name}.weight"], weights[f"{name}.bias"]
    folded[f"{name}.weight"] = (w.double() * a).to(w.dtype).contiguous()
    folded[f"{name}.bias"] = (b0.double() * a + b).to(b0.dtype).contiguous()
    return folded


def network_logits(weights: dict[str, Any], in_features: int, hidden: list[int], x: Any) -> Any:
    """The network's logits for the rows of x (numpy), on CPU in float32, in eval mode (no dropout)."""
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


def calibrate(cfg: TrainConfig, weights: dict[str, Any], in_features: int, x_val: Any,
              y_val: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Platt-scaled weights and the record of the fit (or the unchanged weights and why not)."""
    import numpy as np

    if not cfg.calibrate:
        return weights, {"method": "none", "reason": "calibrate is off"}
    y = np.asarray(y_val)
    if len(y) == 0 or y.min() == y.max():
        return weights, {"method": "none", "reason": "the validation split lacks one of the classes"}
    z = network_logits(weights, in_features, cfg.hidden, x_val)
    a, b = fit_platt(z, y)
    if a <= 0:
        # Folding a negative slope would turn the network's ranking upside down on the strength of the
        # validation rows alone; a network that ranks backwards is left as it is, for the gates to see.
        return weights, {"method": "none", "reason": f"the fitted slope a={a:.4f} is not positive: the network's "
                         "scores do not rise with the positive rate on the validation split", "a": a, "b": b}
    before = 1.0 / (1.0 + np.exp(-z))
    after = 1.0 / (1.0 + np.exp(-(a * z + b)))
    record = {"method": "platt", "fitted_on": "validation", "rows": int(len(y)), "a": a, "b": b,
              "folded_into": f"{last_linear(cfg.hidden)} (the output Linear layer)",
              "val_log_loss_before": log_loss(y, before), "val_log_loss_after": log_loss(y, after),
              "val_mean_probability_before": float(before.mean()),
              "val_mean_probability_after": float(after.mean()), "val_positive_rate": float(y.mean())}
    return fold_platt(weights, cfg.hidden, a, b), record
