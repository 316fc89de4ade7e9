"""Shared fixtures: a private $INTELLIGENTOPS_HOME per test, a real Dagster instance, spec helpers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import dagster as dg
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PIPELINES = REPO / "pipelines"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh $INTELLIGENTOPS_HOME for this test; nothing is shared with other tests or the user's."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("INTELLIGENTOPS_HOME", str(h))
    return h


@pytest.fixture
def instance(home: Path):
    """A real (SQLite) Dagster instance in a temporary folder."""
    with dg.instance_for_test(temp_dir=str(home / "dagster")) as inst:
        yield inst


@pytest.fixture
def pipelines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty pipelines folder, set as $INTELLIGENTOPS_PIPELINES; add specs with write_spec()."""
    d = tmp_path / "pipelines"
    d.mkdir()
    monkeypatch.setenv("INTELLIGENTOPS_PIPELINES", str(d))
    return d


def shipped_spec(name: str) -> dict:
    return yaml.safe_load((PIPELINES / f"{name}.yaml").read_text())


def write_spec(folder: Path, spec: dict, file_name: str | None = None) -> Path:
    path = folder / (file_name or f"{spec['name']}.yaml")
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def copy_shipped(folder: Path, *names: str) -> None:
    for n in names:
        shutil.copy(PIPELINES / f"{n}.yaml", folder / f"{n}.yaml")


def materialize(defs: dg.Definitions, instance, selection: str | dg.AssetSelection, raise_on_error: bool = False,
                run_config: dict | None = None) -> dg.ExecuteInProcessResult:
    """Materialize a selection of `defs` (assets plus their checks) on a real instance."""
    sel = dg.AssetSelection.from_string(selection) if isinstance(selection, str) else selection
    all_defs = [*defs.assets, *(defs.asset_checks or [])]
    return dg.materialize(all_defs, selection=sel, resources=defs.resources, instance=instance,
                          raise_on_error=raise_on_error, run_config=run_config)
