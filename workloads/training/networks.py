"""Which network a run trains: the config's `model` (mlp, text_finetune or "module.path:factory")."""

from __future__ import annotations

from typing import Any

from core.train_config import MLP, TEXT_FINETUNE, TrainConfig
from workloads.training.models import FactoryNetwork, Network
from workloads.training.text import TextNetwork


def network_for(cfg: TrainConfig, data: dict[str, Any]) -> Network:
    """The network the config names, built on the CPU in fp32 (a ModelError names what is wrong with it)."""
    if cfg.model == MLP:
        return Network(cfg, data)
    if cfg.model == TEXT_FINETUNE:
        return TextNetwork(cfg, data)
    return FactoryNetwork(cfg, data)
