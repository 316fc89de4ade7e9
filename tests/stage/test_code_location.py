"""The code location as Dagster's own tools load it: workspace.yaml, pyproject, dagster.yaml, errors from a subprocess."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from resources.settings import Settings, SettingsError
from support import PIPELINES, REPO


def test_workspace_and_pyproject_name_the_module():
    workspace = yaml.safe_load((REPO / "workspace.yaml").read_text())
    target = workspace["load_from"][0]["python_module"]
    assert target["module_name"] == "orchestration.definitions"
    assert target["attribute"] == "defs"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["tool"]["dagster"]["module_name"] == "orchestration.definitions"
    # `defs` is lazy (@dg.definitions); what Dagster loads from it is the whole code location.
    env = {**os.environ, "PYTHONPATH": str(REPO), "DAGSTER_HOME": str(REPO / ".intelligentops" / "dagster")}
    out = subprocess.run([sys.executable, "-m", "dagster", "asset", "list", "-m", target["module_name"],
                          "-a", target["attribute"]], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "credit_risk/champion_model" in out.stdout.split()


def test_dagster_yaml_is_location_independent_and_loads(tmp_path: Path):
    text = (REPO / "dagster.yaml").read_text()
    assert "/" not in "".join(line.split("#")[0] for line in text.splitlines() if "env:" not in line
                              and "module:" not in line), "dagster.yaml must not hold a path"
    home = tmp_path / "dagster"
    home.mkdir()
    (home / "dagster.yaml").write_text(text)
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    probe = ("import dagster as dg; i = dg.DagsterInstance.get(); "
             "print(i.run_monitoring_enabled, i.run_retries_enabled, type(i.run_storage).__name__, "
             "i.get_concurrency_config().pool_config.default_pool_limit)")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    monitoring, retries, storage, pool_limit = out.stdout.split()
    assert (monitoring, retries, storage, pool_limit) == ("True", "True", "SqliteRunStorage", "1")
    assert (home / "history" / "runs.db").exists()


def test_bad_spec_fails_code_location_with_file_and_key(tmp_path: Path):
    (tmp_path / "typo.yaml").write_text((PIPELINES / "credit_scoring.yaml").read_text().replace("target:", "targt:"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "INTELLIGENTOPS_PIPELINES": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "dagster", "asset", "list", "-m", "orchestration.definitions"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "typo.yaml" in out.stderr and "unknown key 'targt'" in out.stderr


def test_every_setting_error_names_its_variable(tmp_path: Path):
    """The environment is read in one place, and a bad value says which variable to fix."""
    with pytest.raises(SettingsError, match="INTELLIGENTOPS_DEPLOYMENT='cloud'"):
        Settings.from_env({"INTELLIGENTOPS_DEPLOYMENT": "cloud"})
    from resources.settings import KubernetesSettings

    with pytest.raises(SettingsError, match="INTELLIGENTOPS_K8S_GPUS='two' is not a whole number"):
        KubernetesSettings.from_env({"INTELLIGENTOPS_K8S_GPUS": "two"})
    with pytest.raises(SettingsError, match="INTELLIGENTOPS_K8S_NODE_SELECTOR: 'gpu' is not key=value"):
        KubernetesSettings.from_env({"INTELLIGENTOPS_K8S_NODE_SELECTOR": "gpu"})
    env = {"INTELLIGENTOPS_HOME": str(tmp_path / "h"), "INTELLIGENTOPS_PIPELINES": str(PIPELINES),
           "INTELLIGENTOPS_K8S_NUM_NODES": "0", "INTELLIGENTOPS_DEPLOYMENT": "kubernetes"}
    out = subprocess.run([sys.executable, "-m", "dagster", "asset", "list", "-m", "orchestration.definitions"],
                         cwd=REPO, env={**os.environ, **env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and "INTELLIGENTOPS_K8S_NUM_NODES=0 must be at least 1" in out.stderr
