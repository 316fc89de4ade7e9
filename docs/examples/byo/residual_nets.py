"""A network of your own for intelligentops (docs/byo-model.md): a residual MLP with layer norm.

Name it in a spec as `training.model: "residual_nets:make_net"` with this file beside the spec. The workload calls
`make_net(n_inputs, settings)` with the width of the prepared feature vector (standardized numbers, one-hot
categories, text embeddings) and the spec's `training.model_settings`; the module maps a float tensor of shape
(batch, n_inputs) to one logit per row. This file travels with every model version it trains and is what the
server runs, so it imports installed libraries only.
"""

import torch.nn as nn


class ResidualNet(nn.Module):
    def __init__(self, n_inputs: int, width: int, blocks: int, dropout: float) -> None:
        super().__init__()
        self.inp = nn.Linear(n_inputs, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Dropout(dropout))
            for _ in range(blocks))
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h).squeeze(-1)  # shape (batch,); (batch, 1) works too


def make_net(n_inputs: int, settings: dict) -> nn.Module:
    return ResidualNet(n_inputs, int(settings.get("width", 64)), int(settings.get("blocks", 2)),
                       float(settings.get("dropout", 0.1)))
