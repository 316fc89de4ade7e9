"""A registry that cannot be reached is not a model without a champion: the error names the registry's URI
(password hidden) instead of sending a person to materialize champion_model."""

from __future__ import annotations

import socket
from pathlib import Path

import dagster as dg
import pytest
from support import write_spec

from assets.rollout_state import expected_versions
from assets.spec import load_spec
from core.registry import RegistryUnreachable, shown_uri
from resources.mlflow import MlflowResource

SPEC = {"name": "loans", "source": {"kind": "file", "path": "loans.csv"},
        "target": {"column": "outcome", "positive": ["default"]}, "features": {"numeric": ["income"]}}


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def no_http_retries(monkeypatch):
    # MLflow retries a refused connection for minutes by default; the answer does not change.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def test_a_missing_model_or_alias_is_none_and_a_set_alias_is_its_version(tmp_path: Path):
    ml = MlflowResource(home=str(tmp_path))
    assert ml.alias_version("loans", "champion") is None  # no such model
    client = ml.client()
    client.create_registered_model("loans")
    assert ml.alias_version("loans", "champion") is None  # the model, but no alias
    run = client.create_run(ml.experiment_id("loans"))
    version = client.create_model_version("loans", f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias("loans", "champion", version.version)
    assert str(ml.alias_version("loans", "champion").version) == str(version.version)


def test_a_registry_server_that_refuses_connections_is_unreachable_and_named(tmp_path: Path, closed_port: int):
    uri = f"http://ops:hunter2@127.0.0.1:{closed_port}"
    ml = MlflowResource(home=str(tmp_path), tracking_uri=uri)
    with pytest.raises(RegistryUnreachable) as raised:
        ml.alias_version("loans", "champion")
    message = str(raised.value)
    assert f"the MLflow registry at http://ops:***@127.0.0.1:{closed_port} is unreachable" in message
    assert "hunter2" not in message and "materialize" not in message
    assert ml.shown_registry_uri() == f"http://ops:***@127.0.0.1:{closed_port}"


def test_a_registry_uri_of_no_known_scheme_is_unreachable_not_empty(tmp_path: Path):
    uri = "postgres+nodriver://admin:s3cret@db.internal/mlflow"
    with pytest.raises(RegistryUnreachable, match=r"registry at postgres\+nodriver://admin:\*\*\*@db.internal/mlflow "
                                                  "is unreachable") as raised:
        MlflowResource(home=str(tmp_path), tracking_uri=uri).alias_version("loans", "champion")
    assert "s3cret" not in str(raised.value)


def test_a_database_that_cannot_be_opened_is_unreachable(tmp_path: Path):
    uri = "sqlite:////proc/no-such-folder/mlflow.db"
    with pytest.raises(RegistryUnreachable, match="registry at sqlite:////proc/no-such-folder/mlflow.db is "
                                                  "unreachable .*No such file or directory"):
        MlflowResource(home=str(tmp_path), tracking_uri=uri).alias_version("loans", "champion")


def test_the_deployment_says_materialize_only_when_the_alias_is_really_missing(tmp_path: Path, closed_port: int):
    spec = load_spec(write_spec(tmp_path, SPEC)).spec
    with pytest.raises(dg.Failure, match="no model version has alias 'champion' in the registry at sqlite:///.*; "
                                         "materialize loans/champion_model"):
        expected_versions(spec, MlflowResource(home=str(tmp_path / "home")), None)  # the champion is asked first
    down = MlflowResource(home=str(tmp_path / "home"), tracking_uri=f"http://127.0.0.1:{closed_port}")
    with pytest.raises(RegistryUnreachable, match=f"registry at http://127.0.0.1:{closed_port} is unreachable"):
        expected_versions(spec, down, None)


def test_uris_without_a_password_are_shown_as_they_are():
    assert shown_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    assert shown_uri("postgresql://mlflow@db:5432/mlflow") == "postgresql://mlflow@db:5432/mlflow"
    assert shown_uri("postgresql://mlflow:pw@db:5432/mlflow") == "postgresql://mlflow:***@db:5432/mlflow"
