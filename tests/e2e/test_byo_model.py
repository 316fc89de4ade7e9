"""Bring your own model: the docs' worked example module beside a spec, through every stage to the running server.

The spec names `training.model: "residual_nets:make_net"` (docs/examples/byo/residual_nets.py, copied next to
it as a user would). The real graph trains it with DeepSpeed under torchrun (ZeRO-2 on two CPU ranks), registers
it with its module's source, evaluates it, passes the eight gates, promotes it and deploys the real server. The
server's probabilities for the validation rows must equal what the training workload computed for them (1e-5);
the version's copy of the module is covered by its manifest, and a changed copy is refused before it runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
from byo_support import (copy_example_module, metadata, served_probabilities, smoke_key, through_deployment,
                         training_result, validation_rows, write_byo_spec)

from core.manifest import verify_manifest
from resources.mlflow import MlflowResource

pytestmark = pytest.mark.slow
NAME = "byo_residual"
NUMERIC = ["income", "debt_ratio", "age"]
FEATURES = [*NUMERIC, "purpose"]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory):
    from orchestration.definitions import build_definitions
    from resources.servers import LocalServerLauncher

    root = tmp_path_factory.mktemp("byo")
    home, pipelines = root / "home", root / "pipelines"
    (home / "dagster").mkdir(parents=True)
    pipelines.mkdir()
    module = copy_example_module(pipelines)
    write_byo_spec(pipelines, NAME, rows=2400, training={
        "model": "residual_nets:make_net", "model_settings": {"width": 32, "blocks": 2, "dropout": 0.1},
        "deepspeed": {"zero_stage": 2}, "nproc_per_node": 2, "checkpoint_every_steps": 100})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INTELLIGENTOPS_HOME", str(home))
        mp.setenv("INTELLIGENTOPS_PIPELINES", str(pipelines))
        with dg.instance_for_test(temp_dir=str(home / "dagster")) as instance:
            try:
                result = through_deployment(build_definitions(pipelines), instance, NAME)
                yield {"home": home, "module": module, "result": result}
            finally:
                LocalServerLauncher(home=str(home)).stop(NAME)


def test_the_users_network_passes_every_gate_and_becomes_champion(deployed: dict) -> None:
    result = deployed["result"]
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    gates = ("fairness", "performance", "baseline", "explainability", "robustness", "data_governance", "integrity",
             "documentation")
    assert {g: checks[g].passed for g in gates} == dict.fromkeys(gates, True), {
        g: checks[g].description for g in gates if not checks[g].passed}
    assert checks["smoke_decision"].passed and checks["latency_slo"].passed
    checkpoint = metadata(result, NAME, "model_checkpoint")
    registered = metadata(result, NAME, "registered_model")
    assert metadata(result, NAME, "champion_model")["champion_version"] == registered["model_version"]
    assert (checkpoint["world_size"], checkpoint["zero_stage"]) == (2, 2)
    run = MlflowResource(home=str(deployed["home"])).client().get_run(checkpoint["mlflow_run_id"])
    assert (run.data.params["network"], run.data.params["model"]) == ("factory", "residual_nets:make_net")
    assert json.loads(run.data.params["model_settings"].replace("'", '"')) == {"width": 32, "blocks": 2,
                                                                              "dropout": 0.1}


def test_the_server_answers_what_training_computed(deployed: dict) -> None:
    home, result = deployed["home"], deployed["result"]
    trained = training_result(metadata(result, NAME, "model_checkpoint")["model_dir"])
    rows = validation_rows(home, NAME, FEATURES)
    expected = np.asarray(trained["validation_probabilities"])
    assert len(rows) == len(expected) > 300
    assert trained["calibration"]["method"] == "platt" and trained["calibration"]["folded"] is False
    endpoint = metadata(result, NAME, "deployment")["endpoint"]
    served = served_probabilities(endpoint, NAME, rows, NUMERIC, smoke_key(home, NAME))
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-5)


def test_the_version_carries_the_module_and_refuses_a_changed_copy(deployed: dict, tmp_path: Path) -> None:
    import mlflow.pyfunc

    home = deployed["home"]
    ml = MlflowResource(home=str(home))
    version = ml.get_version(NAME, "champion")
    local = ml.download_version(NAME, version.version)
    artifacts = local / "artifacts"
    manifest = verify_manifest(artifacts)  # the module is listed, and matches
    assert (artifacts / "residual_nets.py").read_bytes() == deployed["module"].read_bytes()
    assert manifest["architecture"]["file"] == "residual_nets.py" and "residual_nets.py" in manifest["files"]

    # The attack: a version whose module was edited after registration (say, to leak every request) never runs it.
    tampered = tmp_path / "tampered"
    shutil.copytree(local, tampered)
    with (tampered / "artifacts" / "residual_nets.py").open("a") as fh:
        fh.write("\nraise SystemExit('this line must never run')\n")
    with pytest.raises(Exception, match=r"network module residual_nets.py has sha256 .* refusing to run it"):
        mlflow.pyfunc.load_model(str(tampered))
