"""Tells a person where to look after `make run`: the champion, the report, the MLflow run, the UI.

    python -m orchestration.where credit_risk

Reads the Dagster instance in $DAGSTER_HOME and the MLflow store under $INTELLIGENTOPS_HOME; changes nothing.
"""

from __future__ import annotations

import sys

import dagster as dg

from core.names import CHAMPION
from core.registry import RegistryUnreachable
from resources.mlflow import MlflowResource
from resources.settings import intelligentops_home


def _latest(instance: dg.DagsterInstance, spec: str, asset: str) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey([spec, asset]))
    if event is None or event.asset_materialization is None:
        return {}
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def main(spec: str) -> int:
    instance = dg.DagsterInstance.get()
    home = intelligentops_home()
    mlflow = MlflowResource(home=home)
    evaluation = _latest(instance, spec, "model_evaluation")
    report = _latest(instance, spec, "compliance_report")
    print(f"\n{spec}:")
    try:
        champion = mlflow.alias_version(spec, CHAMPION)
    except RegistryUnreachable as exc:
        print(f"  champion model:     unknown: {exc}")
    else:
        if champion is None:
            print("  champion model:     none yet (a blocking gate failed, or the pipeline has not run)")
        else:
            print(f"  champion model:     version {champion.version} (MLflow model '{spec}', alias {CHAMPION})")
    if evaluation:
        print(f"  latest evaluation:  version {evaluation.get('model_version')}, test AUC "
              f"{evaluation.get('test_auc', 'n/a')}")
    if report:
        print(f"  failed gates:       {report.get('failed_gates', 'n/a')}")
        print(f"  compliance report:  {report.get('report')}")
        print(f"                      {report.get('report_html')}")
    if evaluation.get("mlflow_run_id"):
        print(f"  MLflow run:         {evaluation['mlflow_run_id']}; browse with")
        print(f"                      .venv/bin/mlflow ui --backend-store-uri {mlflow.resolved_tracking_uri()}")
    deployment = _latest(instance, spec, "deployment")
    if deployment.get("endpoint"):
        print(f"  serving:            {deployment['endpoint']} (v2: /v2/models/{spec}/infer, v1: /v1/models/{spec}:predict)")
        print(f"  decisions:          .venv/bin/python -m orchestration.decisions --find --spec {spec}; "
              "--verify checks the audit chain")
    print("  Dagster UI:         make ui, then http://127.0.0.1:3000 (Assets, prefix "
          f"{spec}); state under {home}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "credit_risk"))
