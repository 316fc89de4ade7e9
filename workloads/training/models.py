"""The network a run trains, chosen by the config's `model`; each kind says how to build, feed, fold and export it.

- `mlp`: workloads/tabular_mlp.build_mlp over the prepared feature matrix (the default).
- `text_finetune`: the spec's sentence encoder fine-tuned together with an MLP head (workloads/training/text.py).
- `"module.path:factory"`: a user's own `torch.nn.Module`, `factory(n_inputs, settings)`, mapping a float tensor
  of shape (batch, n_inputs) to one logit per row. The asset copies the module's source into the run folder
  (`model_file`); it is loaded from that file (never by name from the import path), checked before the engine
  starts, and exported beside the weights, so the source that trained is the source that serves
  (docs/byo-model.md).

A problem with the user's module is a `ModelError` naming the file and what was expected; the workload exits
with it before any step (`__main__`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from pathlib import Path
from typing import Any

from core.train_config import MLP, TrainConfig, TrainConfigError

WEIGHTS = "model.safetensors"
EVAL_CHUNK = 8192


def last_linear(hidden: list[int]) -> str:
    """State-dict prefix of build_mlp's output layer (Linear, ReLU, Dropout per hidden layer, then Linear)."""
    return str(3 * len(hidden))


class ModelError(TrainConfigError):
    """The configured network cannot be built or fed; the message names the file and what was expected."""


class Network:
    """One kind of network: the module DeepSpeed trains and what the loop, calibration and export need of it."""

    kind = MLP
    has_frozen = False

    def __init__(self, cfg: TrainConfig, data: dict[str, Any]) -> None:
        self.cfg = cfg
        self.data = data
        self.in_features = int(data["x_train"].shape[1])
        self.module = self.build()

    # --- building ------------------------------------------------------------------------------------------------

    def build(self) -> Any:
        """A new module on the CPU in fp32 (its initial weights come from the torch seed)."""
        from workloads.training.layers import checkpointed_mlp
        from workloads.tabular_mlp import build_mlp

        net = build_mlp(self.in_features, self.cfg.hidden, self.cfg.dropout)
        return checkpointed_mlp(net) if self.cfg.activation_checkpointing else net

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups, each with `lr_scale`: its peak rate over `learning_rate`."""
        return [{"params": [p for p in self.module.parameters() if p.requires_grad], "lr_scale": 1.0}]

    def trained_keys(self) -> set[str]:
        """State-dict keys whose values training changes (snapshotted as the best weights, exported from them)."""
        return set(self.module.state_dict())

    def base_state(self) -> dict[str, Any]:
        """Values of every other state-dict key, as they were before training (nothing here: all of it trains)."""
        return {}

    # --- feeding -------------------------------------------------------------------------------------------------

    def rows(self, split: str) -> int:
        return len(self.data[f"x_{split}"])

    def inputs(self, split: str, idx: Any, device: Any, dtype: Any) -> tuple[Any, ...]:
        """The module's positional inputs for rows `idx` (a tensor of row numbers) of `split`."""
        x = self.tensors[split]
        return (x[idx].to(device, dtype),)

    @property
    def tensors(self) -> dict[str, Any]:
        import torch

        if not hasattr(self, "_tensors"):
            self._tensors = {s: torch.from_numpy(self.data[f"x_{s}"]) for s in ("train", "val")}
        return self._tensors

    def to_device(self, device: Any, dtype: Any) -> None:
        """Keep the inputs on the accelerator: gathering a batch on the host each step costs more than the step."""
        self._tensors = {s: t.to(device, dtype) for s, t in self.tensors.items()}

    def eval_chunk(self) -> int:
        return EVAL_CHUNK

    # --- calibration and export ----------------------------------------------------------------------------------

    @property
    def fold_prefix(self) -> str | None:
        """State-dict prefix of the output Linear layer Platt scaling folds into; None serves it as its own step."""
        return last_linear(self.cfg.hidden)

    def cpu_logits(self, weights: dict[str, Any], split: str = "val") -> Any:
        """Logits of a fresh CPU fp32 module holding `weights` for the rows of `split`, in eval mode (numpy)."""
        import numpy as np
        import torch

        net = self.build()
        net.load_state_dict(weights)
        net.eval()
        n, chunk = self.rows(split), self.eval_chunk()
        with torch.inference_mode():
            out = [net(*self.inputs(split, torch.arange(i, min(i + chunk, n)), "cpu", torch.float32)).reshape(-1)
                   .double() for i in range(0, n, chunk)]
        return torch.cat(out).numpy() if out else np.zeros(0)

    def architecture(self) -> dict[str, Any]:
        """What workloads/model_code.py needs to rebuild the network (the manifest's `architecture`)."""
        return {"kind": MLP, "in_features": self.in_features, "hidden": list(self.cfg.hidden),
                "dropout": self.cfg.dropout}

    def export(self, weights: dict[str, Any], folder: Path) -> dict[str, Any]:
        """Write the network's files into `folder`; returns its architecture."""
        import json

        from safetensors.torch import save_file

        arch = self.architecture()
        save_file(weights, str(folder / WEIGHTS), metadata={"architecture": json.dumps(arch)})
        return arch


class FactoryNetwork(Network):
    """A user's `factory(n_inputs, settings) -> nn.Module`, loaded from the module file the asset copied."""

    kind = "factory"

    def build(self) -> Any:
        import torch

        module_name, factory_name = self.cfg.factory or ("", "")
        path = Path(self.cfg.model_file)
        where = f"{path} (training.model {self.cfg.model!r})"
        fn = getattr(self.load_module(module_name, path, where), factory_name, None)
        if not callable(fn):
            raise ModelError(f"{where}: the module has no function {factory_name!r}; define "
                             f"{factory_name}(n_inputs: int, settings: dict) -> torch.nn.Module")
        try:
            net = fn(self.in_features, dict(self.cfg.model_settings))
        except Exception as exc:
            raise ModelError(f"{where}: {factory_name}({self.in_features}, {dict(self.cfg.model_settings)!r}) raised "
                             f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(net, torch.nn.Module):
            raise ModelError(f"{where}: {factory_name} returned {type(net).__name__}; expected a torch.nn.Module")
        if not any(p.requires_grad for p in net.parameters()):
            raise ModelError(f"{where}: the module from {factory_name} has no trainable parameters")
        if self.cfg.activation_checkpointing:
            enable = getattr(net, "gradient_checkpointing_enable", None)
            if not callable(enable):
                raise ModelError(f"{where}: deepspeed.activation_checkpointing is on, but the module from "
                                 f"{factory_name} has no gradient_checkpointing_enable() method to make its forward "
                                 "recompute activations; define one, or turn activation_checkpointing off")
            enable()
        self.check_output(net, factory_name, where)
        return net

    @staticmethod
    def load_module(module_name: str, path: Path, where: str) -> Any:
        if not path.is_file():
            raise ModelError(f"{where}: no such file; the asset copies the module there before training")
        # A name of our own: the user's module never shadows, or is shadowed by, an imported one.
        spec = importlib.util.spec_from_file_location(f"intelligentops_model_{module_name.replace('.', '_')}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise ModelError(f"{where}: importing it failed with {type(exc).__name__}: {exc}") from exc
        return module

    def check_output(self, net: Any, factory_name: str, where: str) -> None:
        """One forward pass on two training rows: one finite float logit per row, or the error says what came."""
        import torch

        x = torch.from_numpy(self.data["x_train"][:2])
        net.eval()
        try:
            with torch.no_grad():
                out = net(x)
        except Exception as exc:
            raise ModelError(f"{where}: the module from {factory_name} failed on a float tensor of shape "
                             f"{tuple(x.shape)} (batch, n_inputs): {type(exc).__name__}: {exc}") from exc
        finally:
            net.train()
        shape = tuple(getattr(out, "shape", ()))
        if not isinstance(out, torch.Tensor) or shape not in ((len(x),), (len(x), 1)):
            raise ModelError(f"{where}: the module from {factory_name} maps a float tensor of shape {tuple(x.shape)} "
                             f"to {type(out).__name__} of shape {shape}; expected one logit per row, shape "
                             f"({len(x)},) or ({len(x)}, 1)")
        if not out.is_floating_point():
            raise ModelError(f"{where}: the module from {factory_name} returns {out.dtype} logits; expected floats")

    @property
    def fold_prefix(self) -> str | None:
        return None  # a user's network may do anything after its last layer: Platt is served as its own step

    def architecture(self) -> dict[str, Any]:
        module_name, factory_name = self.cfg.factory or ("", "")
        path = Path(self.cfg.model_file)
        return {"kind": "factory", "in_features": self.in_features, "module": module_name, "factory": factory_name,
                "file": path.name, "settings": dict(self.cfg.model_settings),
                "file_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}

    def export(self, weights: dict[str, Any], folder: Path) -> dict[str, Any]:
        arch = super().export(weights, folder)
        shutil.copyfile(self.cfg.model_file, folder / arch["file"])
        return arch
