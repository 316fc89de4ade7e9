"""Activation checkpointing for the MLP: the same layers and state-dict keys, activations recomputed in backward.

`checkpointed_mlp(build_mlp(...))` keeps every child of the `nn.Sequential` under its name ("0", "1", ...), so
its weights load into the plain `build_mlp` the served model builds. Each hidden block (Linear, ReLU, Dropout)
is one checkpointed segment; `use_reentrant=False` keeps gradients flowing to the parameters even though the
input rows themselves need no gradient.
"""

from __future__ import annotations

from typing import Any


def checkpointed_mlp(net: Any) -> Any:
    """A copy of the `nn.Sequential` `net` whose forward recomputes each hidden block's activations in backward."""
    import torch.nn as nn
    from torch.utils.checkpoint import checkpoint

    class CheckpointedSequential(nn.Sequential):
        def forward(self, x: Any) -> Any:
            layers = list(self)
            for start in range(0, len(layers) - 1, 3):
                block = nn.Sequential(*layers[start:start + 3])
                x = checkpoint(block, x, use_reentrant=False) if self.training else block(x)
            return layers[-1](x)

    return CheckpointedSequential(*net)
