"""MlflowResource on SQLite under a temporary home: experiments, registration, aliases, loading without pickle."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest

from resources.mlflow import MlflowResource

MODEL_CODE = '''
import mlflow
from mlflow.pyfunc import PythonModel


class Doubler(PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input * 2


mlflow.models.set_model(Doubler())
'''


def test_defaults_live_under_home(home: Path) -> None:
    ml = MlflowResource(home=str(home))
    assert ml.resolved_tracking_uri() == f"sqlite:///{home}/mlflow/mlflow.db"
    assert ml.artifact_location() == (home / "mlflow" / "artifacts").as_uri()
    server = MlflowResource(home=str(home), tracking_uri="http://mlflow:5000")
    assert server.artifact_location() is None
    assert server.run_link("3", "abc") == "http://mlflow:5000/#/experiments/3/runs/abc"


def _log_doubler(ml: MlflowResource, code: Path) -> str:
    client = ml.client()
    run = client.create_run(ml.experiment_id("toy"))
    source = ml.log_pyfunc(run.info.run_id, python_model=str(code), pip_requirements=["mlflow"])
    client.set_terminated(run.info.run_id)
    return source, run.info.run_id


def test_experiment_register_alias_and_load_without_pickle(home: Path, tmp_path: Path) -> None:
    ml = MlflowResource(home=str(home))
    exp = ml.experiment_id("toy")
    assert ml.experiment_id("toy") == exp
    code = tmp_path / "doubler.py"
    code.write_text(MODEL_CODE)
    source, run_id = _log_doubler(ml, code)
    v1 = ml.register(source, "toy", run_id, {"dataset_hash": "abc"})
    v2 = ml.register(source, "toy", run_id, {"dataset_hash": "def"})
    assert (v1, v2) == ("1", "2")
    assert ml.alias_version("toy", "challenger") is None
    ml.set_alias("toy", "challenger", v1)
    assert ml.get_version("toy", "challenger").tags["dataset_hash"] == "abc"
    ml.set_alias("toy", "challenger", v2)
    assert str(ml.alias_version("toy", "challenger").version) == "2"
    model = ml.load_model("toy", "challenger")
    assert model.predict(pd.DataFrame({"a": [1.0, 2.0]}))["a"].tolist() == [2.0, 4.0]
    assert not list((home / "mlflow" / "artifacts").rglob("*.pkl"))
    with pytest.raises(ValueError, match="exactly one of"):
        ml.load_model("toy")


def test_two_stores_from_many_threads_touch_no_global_state(tmp_path: Path, monkeypatch) -> None:
    """The server calls the resource from request threads: no call may read or set mlflow's global URIs."""
    from mlflow.tracking._tracking_service import utils as tracking_utils

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = (tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI"))
    code = tmp_path / "doubler.py"
    code.write_text(MODEL_CODE)
    stores = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        ml = MlflowResource(home=str(tmp_path / name))
        source, run_id = _log_doubler(ml, code)
        ml.set_alias("toy", "champion", ml.register(source, "toy", run_id, {"store": name}))
        stores.append((name, ml))

    def work(name: str, ml: MlflowResource) -> str:
        model = ml.load_model("toy", "champion")
        assert model.predict(pd.DataFrame({"a": [1.0]}))["a"].tolist() == [2.0]
        return ml.get_version("toy", "champion").tags["store"]

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(work, name, ml) for name, ml in stores * 4]
        seen = [f.result() for f in futures]
    assert seen == ["a", "b"] * 4
    assert (tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")) == before
