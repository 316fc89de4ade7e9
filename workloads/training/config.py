"""The command line and the environment on top of a config file: what one launch of the workload runs with.

Layers, each over the one before: the TrainConfig defaults (core/train_config.py), the `--config` JSON file, the
test hooks from the environment (`INTELLIGENTOPS_TRAIN_KILL_AT_STEP`, `_KILL_RANK`, `_STEP_DELAY_S`), then one
`--<field>` flag per TrainConfig field (`--max-steps 300`, `--hidden '[8]'`: a JSON value, or the text as it is).
Last, with `INTELLIGENTOPS_CHECKPOINT_DIR` set (a pod's mounted volume) and a `checkpoint_subdir`, checkpoints go
to `$INTELLIGENTOPS_CHECKPOINT_DIR/<checkpoint_subdir>`. The result is validated once, with the schema the asset
validated against when it wrote the file; a problem is a TrainConfigError naming the file and the key.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from core.train_config import (
    CHECKPOINT_DIR_ENV,
    KILL_AT_STEP_ENV,
    KILL_RANK_ENV,
    STEP_DELAY_ENV,
    TrainConfig,
    read_values,
)

HOOKS = {"kill_at_step": KILL_AT_STEP_ENV, "kill_rank": KILL_RANK_ENV, "step_delay_s": STEP_DELAY_ENV}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(description: str = "Train a spec's network with DeepSpeed.") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workloads.training", description=description)
    parser.add_argument("--config", help="JSON file of TrainConfig fields (written by the model_checkpoint asset)")
    # DeepSpeed's launcher passes --local_rank=N unless told --no_local_rank; LOCAL_RANK says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    for name, info in TrainConfig.model_fields.items():
        text = info.annotation is str
        parser.add_argument(flag(name), dest=name, default=None, metavar="TEXT" if text else "JSON",
                            help=None if text else "a JSON value")
    return parser


def _value(name: str, raw: str) -> Any:
    """Text fields take the text; every other field a JSON value (falling back to the text: `--monitor auc`)."""
    if TrainConfig.model_fields[name].annotation is str:
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def config_from_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> TrainConfig:
    """The config of this launch: file, environment hooks, flags (see the module docstring)."""
    env = os.environ if environ is None else environ
    ns = build_parser().parse_args(argv)
    values: dict[str, Any] = read_values(ns.config) if ns.config else {}
    sources = [ns.config] if ns.config else []
    hooks = {name: env[var] for name, var in HOOKS.items() if env.get(var)}
    values.update(hooks)
    sources += [f"${HOOKS[name]}" for name in hooks]
    flags = {name: _value(name, getattr(ns, name)) for name in TrainConfig.model_fields if getattr(ns, name) is not None}
    values.update(flags)
    if flags:
        sources.append("the command line")
    if env.get(CHECKPOINT_DIR_ENV) and values.get("checkpoint_subdir"):
        values["checkpoint_dir"] = str(Path(env[CHECKPOINT_DIR_ENV]) / values["checkpoint_subdir"])
        sources.append(f"${CHECKPOINT_DIR_ENV}")
    return TrainConfig.build(values, " + ".join(sources) or "the command line")
