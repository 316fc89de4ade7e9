"""Shared fixtures: a private $INTELLIGENTOPS_HOME per test, a real Dagster instance, spec helpers."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import pytest

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
    (home / "dagster").mkdir(exist_ok=True)
    with dg.instance_for_test(temp_dir=str(home / "dagster")) as inst:
        yield inst


@pytest.fixture
def pipelines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty pipelines folder, set as $INTELLIGENTOPS_PIPELINES; add specs with write_spec()."""
    d = tmp_path / "pipelines"
    d.mkdir()
    monkeypatch.setenv("INTELLIGENTOPS_PIPELINES", str(d))
    return d


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL 16 server (pgserver wheel) for the whole session; stopped and checked gone at the end."""
    from pg_support import start_postgres

    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()
