"""MlflowResource on SQLite under a temporary home: experiments, registration, aliases, loading without pickle."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

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


def test_experiment_register_alias_and_load_without_pickle(home: Path, tmp_path: Path) -> None:
    ml = MlflowResource(home=str(home))
    exp = ml.experiment_id("toy")
    assert ml.experiment_id("toy") == exp
    code = tmp_path / "doubler.py"
    code.write_text(MODEL_CODE)
    with ml.activated() as mlflow, mlflow.start_run(experiment_id=exp):
        info = mlflow.pyfunc.log_model(name="model", python_model=str(code), pip_requirements=["mlflow"])
    v1 = ml.register(info.model_uri, "toy", {"dataset_hash": "abc"})
    v2 = ml.register(info.model_uri, "toy", {"dataset_hash": "def"})
    assert (v1, v2) == ("1", "2")
    ml.set_alias("toy", "challenger", v1)
    assert ml.get_version("toy", "challenger").tags["dataset_hash"] == "abc"
    ml.set_alias("toy", "challenger", v2)
    assert str(ml.get_version("toy").version) == "2"
    model = ml.load_model("toy", "challenger")
    assert model.predict(pd.DataFrame({"a": [1.0, 2.0]}))["a"].tolist() == [2.0, 4.0]
    assert not list((home / "mlflow" / "artifacts").rglob("*.pkl"))


def test_activated_leaves_no_global_state_behind(home: Path, monkeypatch) -> None:
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = tracking_utils._tracking_uri
    with MlflowResource(home=str(home)).activated() as m:
        assert m.get_tracking_uri().startswith(f"sqlite:///{home}")
    assert tracking_utils._tracking_uri == before
    assert "MLFLOW_TRACKING_URI" not in __import__("os").environ
    assert not mlflow.tracking._tracking_service.utils.is_tracking_uri_set() or before
