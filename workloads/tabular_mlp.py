"""The network: an MLP over the preprocessed feature vector, one logit out (P(positive) after a sigmoid).

Shared by workloads/training and the registered pyfunc (shipped beside model_code.py), so the weights in
model.safetensors always load into the same architecture.
"""

from __future__ import annotations

from collections.abc import Sequence


def build_mlp(in_features: int, hidden: Sequence[int], dropout: float):
    import torch.nn as nn

    layers: list = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
        width = h
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)
