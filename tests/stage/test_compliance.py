"""Evaluation, blocking compliance gates and gated promotion, end to end on real components.

Real torchrun + DeepSpeed on CPU, MLflow on SQLite under a temporary home, a real Dagster instance.
"""

from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from loans_support import PROMOTION, loans, spec
from support import failure_text, materialize, write_spec

from orchestration.definitions import build_definitions
from resources.mlflow import MlflowResource

pytestmark = pytest.mark.slow
def setup(pipelines: Path, frame: pd.DataFrame, **over) -> dg.Definitions:
    frame.to_csv(pipelines / "loans.csv", index=False)
    write_spec(pipelines, spec(**over))
    return build_definitions(pipelines)


def checks(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {c.check_name: c for c in result.get_asset_check_evaluations()
            if c.asset_key == dg.AssetKey(["loans", "compliance_report"])}


def alias(home: Path, name: str) -> str | None:
    try:
        return str(MlflowResource(home=str(home)).get_version("loans", name).version)
    except Exception:
        return None


def test_promotion_regression_approval_and_rollback(home: Path, pipelines: Path, instance):
    defs = setup(pipelines, loans())
    first = materialize(defs, instance, PROMOTION)
    assert first.success, failure_text(first)
    assert all(c.passed for c in checks(first).values()), {n: c.description for n, c in checks(first).items()}
    assert alias(home, "champion") == "1" and alias(home, "previous") is None
    meta = {m.asset_key.path[-1]: m.materialization.metadata for m in first.get_asset_materialization_events()}
    assert meta["model_evaluation"]["test_auc"].value > 0.8
    assert Path(meta["model_evaluation"]["plot_roc"].value).is_file()
    # The plots and per-group rates show in the UI itself, not as paths to go and find.
    assert meta["model_evaluation"]["roc_plot"].value.startswith("![roc, version 1](data:image/png;base64,")
    assert "| region | north |" in meta["model_evaluation"]["group_rates"].value
    report = Path(meta["compliance_report"]["report"].value).read_text()
    assert "## Fairness findings" in report and "Fairness gate: passed" in report

    assert "Performance against a reference" in report and "logistic regression" in report

    # A crippled model (one optimizer step at a tiny learning rate) is worse than the champion on the same
    # rows, and worse than a logistic regression on the same inputs: both gates refuse it with the numbers.
    defs = setup(pipelines, loans(), training={"max_steps": 1, "hidden": [2], "learning_rate": 1e-6,
                                               "checkpoint_every_steps": 20},
                 compliance={"intended_purpose": "Test lending model.", "min_group_size": 20, "min_auc": 0.0})
    second = materialize(defs, instance, PROMOTION)
    assert not second.success
    perf = checks(second)["performance"]
    assert not perf.passed and "below champion v1's" in perf.description
    baseline = checks(second)["baseline"]
    assert not baseline.passed
    assert "below logistic_regression's" in baseline.description or "below gradient_boosting's" in baseline.description
    assert "tolerance 0.02" in baseline.description and "training settings" in baseline.description
    assert alias(home, "challenger") == "2" and alias(home, "champion") == "1"
    assert not any(m.asset_key.path[-1] == "champion_model" for m in second.get_asset_materialization_events())

    # Without an approver, promoting v2 on its own is refused and says how to approve.
    refused = materialize(defs, instance, 'key:"loans/champion_model"')
    assert not refused.success
    assert "failed gates ['baseline', 'performance']" in failure_text(refused) and "approver" in failure_text(refused)
    assert alias(home, "champion") == "1"

    # A named approver with a reason may promote over a failed performance gate; the report says so.
    approved = materialize(defs, instance, 'key:"loans/champion_model"', run_config={
        "ops": {"loans__champion_model": {"config": {"approver": "ana@example.com", "reason": "pilot on 5%"}}}})
    assert approved.success, failure_text(approved)
    assert alias(home, "champion") == "2" and alias(home, "previous") == "1"
    tags = MlflowResource(home=str(home)).get_version("loans", "champion").tags
    assert tags["approved_by"] == "ana@example.com" and tags["overridden_gates"] == "baseline,performance"
    report2 = (home / "loans" / "compliance" / "v2" / "report.md").read_text()
    assert "Manual approval" in report2 and "ana@example.com" in report2 and "pilot on 5%" in report2

    # Rollback moves champion back to the previous version and records who and why on the run.
    job = defs.resolve_job_def("loans__rollback")
    rolled = job.execute_in_process(instance=instance, run_config={"ops": {"loans__rollback_champion": {
        "config": {"actor": "oncall@example.com", "reason": "complaints about v2"}}}})
    assert rolled.success
    assert alias(home, "champion") == "1"
    run = instance.get_run_by_id(rolled.run_id)
    assert run.tags["intelligentops/rollback_actor"] == "oncall@example.com"
    latest = instance.get_latest_materialization_event(dg.AssetKey(["loans", "champion_model"]))
    assert latest.asset_materialization.metadata["champion_version"].value == "1"
    rolled_tags = MlflowResource(home=str(home)).client().get_model_version("loans", "2").tags
    assert rolled_tags["rolled_back_by"] == "oncall@example.com"


def test_biased_model_fails_fairness_and_is_not_promoted(home: Path, pipelines: Path, instance):
    defs = setup(pipelines, loans(biased=True),
                 features={"numeric": ["income", "debt_ratio"], "categorical": ["purpose", "region"]},
                 compliance={"intended_purpose": "Biased variant for the fairness gate.", "min_group_size": 20,
                             "allow_sensitive_inputs": True})
    result = materialize(defs, instance, PROMOTION)
    assert not result.success
    fairness = checks(result)["fairness"]
    assert not fairness.passed
    assert "region: demographic parity difference" in fairness.description and "> 0.1" in fairness.description
    # Sensitive inputs were allowed by this spec, so governance passes and fairness alone blocks.
    assert checks(result)["data_governance"].passed
    assert alias(home, "challenger") == "1" and alias(home, "champion") is None
    report = (home / "loans" / "compliance" / "v1" / "report.md").read_text()
    assert "Fairness gate: FAILED: region: demographic parity difference" in report


def test_sensitive_input_without_permission_fails_governance(home: Path, pipelines: Path, instance):
    defs = setup(pipelines, loans(), features={"numeric": ["income", "debt_ratio"],
                                               "categorical": ["purpose", "region"]})
    result = materialize(defs, instance, PROMOTION)
    assert not result.success
    gov = checks(result)["data_governance"]
    assert not gov.passed and "sensitive columns ['region'] are model inputs" in gov.description


def test_tampered_weights_fail_integrity_and_cannot_be_approved(home: Path, pipelines: Path, instance):
    defs = setup(pipelines, loans())
    assert materialize(defs, instance, f'{PROMOTION} and not key:"loans/champion_model"').success
    weights = list((home / "mlflow").rglob("model.safetensors"))
    assert weights, "the registered model's weights are stored under the home"
    for w in weights:
        data = bytearray(w.read_bytes())
        data[-8:] = bytes(8)  # flip the last bytes of the tensors
        w.write_bytes(bytes(data))
    result = materialize(defs, instance, 'key:"loans/model_evaluation" or key:"loans/compliance_report"')
    assert not result.success
    integrity = checks(result)["integrity"]
    assert not integrity.passed
    assert "sha256" in integrity.description
    approved = materialize(defs, instance, 'key:"loans/champion_model"', run_config={
        "ops": {"loans__champion_model": {"config": {"approver": "ana@example.com", "reason": "ship it"}}}})
    assert not approved.success
    assert "cannot be overridden" in failure_text(approved)
    assert alias(home, "champion") is None
