"""The same code on a real PostgreSQL 16 (pgserver wheel): Dagster storage from deploy/dagster-postgres.yaml,
MLflow's backend store, two runs writing to one instance at once, a sensor tick, and the kubernetes deployment
with local stand-ins for the cluster (this Postgres, a folder for the shared ReadWriteMany volume).

The audit log and the drift sensor are not in main yet: the sensor tick here is a small sensor defined in this
file, evaluated with `dg.build_sensor_context` against the Postgres instance.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import yaml
from support import REPO, copy_shipped, materialize, write_spec

from assets import naming
from orchestration.definitions import build_definitions
from resources.launchers import TrainRequest
from resources.mlflow import MlflowResource
from resources.settings import Settings

PG_DAGSTER_YAML = REPO / "deploy" / "dagster-postgres.yaml"
HELM_VALUES = REPO / "deploy" / "helm" / "values.yaml"
_names = itertools.count()

MODEL_CODE = '''
import mlflow
from mlflow.pyfunc import PythonModel


class Doubler(PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input * 2


mlflow.models.set_model(Doubler())
'''


def fresh_database(postgres, prefix: str) -> tuple[str, str]:
    name = f"{prefix}_{os.getpid()}_{next(_names)}"
    return name, postgres.create_database(name)


def postgres_dagster_home(folder: Path, url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A $DAGSTER_HOME holding the shipped Postgres dagster.yaml, its DAGSTER_PG_URL pointed at `url`."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(PG_DAGSTER_YAML, folder / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_PG_URL", url)
    monkeypatch.setenv("DAGSTER_HOME", str(folder))
    return folder


def tiny_spec_files(pipelines: Path, names: list[str]) -> None:
    rng = np.random.default_rng(0)
    n = 200
    frame = pd.DataFrame({
        "loan_id": [f"L{i:04d}" for i in range(n)],
        "income": rng.lognormal(10, 0.4, n).round(0),
        "debt_ratio": rng.uniform(0, 40, n).round(1),
        "purpose": rng.choice(["car", "home"], n),
        "region": rng.choice(["north", "south"], n),
        "outcome": rng.choice(["default", "repaid"], n, p=[0.3, 0.7]),
    })
    frame.to_csv(pipelines / "loans.csv", index=False)
    for name in names:
        write_spec(pipelines, {
            "name": name, "source": {"kind": "file", "path": "loans.csv"}, "id_column": "loan_id",
            "target": {"column": "outcome", "positive": ["default"]},
            "features": {"numeric": ["income", "debt_ratio"], "categorical": ["purpose"]},
            "sensitive": ["region"], "validation": {"min_rows": 50},
        })


def test_mlflow_artifacts_never_in_the_current_directory(tmp_path: Path) -> None:
    home = tmp_path / "home"
    under_home = (home / "mlflow" / "artifacts").as_uri()
    for uri in ("postgresql+psycopg2://u:p@db/mlflow", "mysql://u@db/mlflow", "sqlite:////x/mlflow.db", None):
        assert MlflowResource(home=str(home), tracking_uri=uri).artifact_location() == under_home, uri
    for uri in ("http://mlflow:5000", "https://mlflow.example.com"):
        assert MlflowResource(home=str(home), tracking_uri=uri).artifact_location() is None, uri
    chosen = MlflowResource(home=str(home), tracking_uri="postgresql://db/mlflow", artifact_root=str(tmp_path / "a"))
    assert chosen.artifact_location() == (tmp_path / "a").as_uri()
    bucket = MlflowResource(home=str(home), tracking_uri="postgresql://db/mlflow", artifact_root="s3://b/mlflow")
    assert bucket.artifact_location() == "s3://b/mlflow"
    env = {"INTELLIGENTOPS_HOME": str(home), "INTELLIGENTOPS_MLFLOW_ARTIFACTS": "s3://b/mlflow"}
    assert Settings.from_env(env).mlflow_artifacts == "s3://b/mlflow"
    assert Settings.from_env({"INTELLIGENTOPS_HOME": str(home)}).mlflow_artifacts is None


def test_a_stopped_server_is_gone() -> None:
    """What the session fixture relies on: stop() leaves no postmaster and no data folder behind."""
    from pg_support import start_postgres

    server = start_postgres()
    try:
        assert server.running()
        assert server.query("postgres", "select 1") == [(1,)]
    finally:
        server.stop()
    assert not server.running() and not server.folder.exists()


def test_instance_from_shipped_postgres_yaml(postgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, url = fresh_database(postgres, "dagster")
    dagster_home = postgres_dagster_home(tmp_path / "dagster", url, monkeypatch)
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        from dagster._core.run_coordinator import QueuedRunCoordinator
        from dagster_postgres import PostgresRunStorage

        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        queue = instance.get_concurrency_config().run_queue_config
        assert queue.max_concurrent_runs == 8
        assert queue.tag_concurrency_limits == [{"key": naming.SPEC_TAG, "value": {"applyLimitPerUniqueValue": True},
                                                 "limit": 1}]
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        assert not instance.nux_enabled
    monkeypatch.delenv("DAGSTER_PG_URL")
    with pytest.raises(Exception, match="DAGSTER_PG_URL"):
        dg.DagsterInstance.from_config(str(dagster_home))


def test_data_stage_sensor_tick_and_registry_on_postgres(postgres, home: Path, pipelines: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _, dagster_url = fresh_database(postgres, "dagster")
    mlflow_db, mlflow_url = fresh_database(postgres, "mlflow")
    dagster_home = postgres_dagster_home(home / "dagster", dagster_url, monkeypatch)
    copy_shipped(pipelines, "credit_scoring")
    # The working directory is not the home: nothing may land in it (MLflow's ./mlruns default).
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)

    defs = build_definitions(pipelines)
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        result = materialize(defs, instance, 'key:"credit_scoring/*" and group:data')
        assert result.success
        assert all(c.passed for c in result.get_asset_check_evaluations())
        splits_key = naming.asset_key("credit_scoring", naming.TRAINING_SPLITS)
        (event,) = instance.fetch_materializations(splits_key, limit=10).records
        assert event.run_id == result.run_id
        assert instance.get_run_by_id(result.run_id).status == dg.DagsterRunStatus.SUCCESS
        raw = instance.get_latest_materialization_event(naming.asset_key("credit_scoring", naming.RAW_DATASET))
        assert raw.asset_materialization.metadata["dagster/row_count"].value == 4454

        # A sensor tick reading the Postgres event log: new splits request a run of the pipeline, once.
        pipeline_job = naming.job_name("credit_scoring", "pipeline")

        @dg.sensor(job_name=pipeline_job)
        def retrain_on_new_splits(context: dg.SensorEvaluationContext):
            records = context.instance.fetch_materializations(splits_key, limit=1).records
            latest = records[0] if records else None
            if latest is None or str(latest.storage_id) == context.cursor:
                return dg.SkipReason("no new training splits")
            context.update_cursor(str(latest.storage_id))
            return dg.RunRequest(run_key=f"splits-{latest.storage_id}", tags={naming.SPEC_TAG: "credit_scoring"})

        tick = dg.build_sensor_context(instance=instance, sensor_name="retrain_on_new_splits")
        data = retrain_on_new_splits.evaluate_tick(tick)
        assert [r.run_key for r in data.run_requests] == [f"splits-{event.storage_id}"]
        again = dg.build_sensor_context(instance=instance, cursor=data.cursor)
        assert retrain_on_new_splits.evaluate_tick(again).skip_message == "no new training splits"

    # MLflow's backend store on the same server; the model's files under the home.
    mlflow = defs.resources["mlflow"]
    assert mlflow.resolved_tracking_uri() == mlflow_url
    code = tmp_path / "doubler.py"
    code.write_text(MODEL_CODE)
    client = mlflow.client()
    run = client.create_run(mlflow.experiment_id("credit_scoring"))
    source = mlflow.log_pyfunc(run.info.run_id, python_model=str(code), pip_requirements=["mlflow"])
    client.set_terminated(run.info.run_id)
    version = mlflow.register(source, "credit_scoring", run_id=run.info.run_id, tags={"dataset_hash": "abc"})
    mlflow.set_alias("credit_scoring", naming.CHALLENGER, version)
    assert mlflow.get_version("credit_scoring", naming.CHALLENGER).tags["dataset_hash"] == "abc"
    model = mlflow.load_model("credit_scoring", alias=naming.CHALLENGER)
    assert model.predict(pd.DataFrame({"x": [1.5]}))["x"].tolist() == [3.0]
    assert source.startswith((home / "mlflow" / "artifacts").as_uri())
    assert any((home / "mlflow" / "artifacts").rglob("MLmodel"))
    assert not (cwd / "mlruns").exists() and list(cwd.iterdir()) == []

    assert postgres.query(mlflow_db, "select name, version from model_versions") == [("credit_scoring", int(version))]


def test_two_runs_at_once_on_one_instance(postgres, home: Path, pipelines: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes each run a spec's data job against the same Postgres instance at the same time."""
    _, url = fresh_database(postgres, "dagster")
    dagster_home = postgres_dagster_home(home / "dagster", url, monkeypatch)
    tiny_spec_files(pipelines, ["loans_a", "loans_b"])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-m", "dagster", "job", "execute", "-m", "orchestration.definitions",
                               "-j", naming.job_name(name, "data")], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name in ("loans_a", "loans_b")]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]

    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        runs = instance.get_runs()
        assert sorted(r.job_name for r in runs) == ["loans_a__data", "loans_b__data"]
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        for run in runs:
            spec = run.job_name.split("__")[0]
            mats = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
            keys = {r.event_log_entry.dagster_event.asset_key.to_user_string() for r in mats}
            assert keys == {f"{spec}/{a}" for a in (naming.RAW_DATASET, naming.VALIDATED_DATASET,
                                                     naming.TRAINING_SPLITS)}
            checks = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
            assert len(checks.records) == 6
        assert (home / "assets" / "loans_a" / "training_splits.parquet").exists()
        assert (home / "assets" / "loans_b" / "training_splits.parquet").exists()


def helm_code_location_env() -> dict[str, str]:
    """The environment deploy/helm/values.yaml gives the code location (and so the run pods)."""
    values = yaml.safe_load(HELM_VALUES.read_text())
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    return {e["name"]: e["value"] for e in deployment["env"]}


def test_kubernetes_deployment_with_local_stand_ins(postgres, tmp_path: Path, pipelines: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The Helm values' environment, with the cluster's services replaced by stand-ins on this machine:
    the shared ReadWriteMany volume by a folder, Postgres by pgserver. The code location loads as Dagster loads
    it, binds the kubernetes column of the resource matrix, and the data stage runs in a separate process."""
    from resources.k8s import K8sPodLauncher, TrainJobLauncher

    cluster_env = helm_code_location_env()
    assert cluster_env["INTELLIGENTOPS_DEPLOYMENT"] == "kubernetes"
    shared_volume = tmp_path / "shared"  # stands in for the PVC mounted at the same path in every pod
    shared_volume.mkdir()
    assert not cluster_env["INTELLIGENTOPS_HOME"].startswith(("s3://", "gs://")), "the home is the shared volume"
    _, url = fresh_database(postgres, "dagster")
    _, mlflow_url = fresh_database(postgres, "mlflow")
    for k, v in cluster_env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("INTELLIGENTOPS_HOME", str(shared_volume))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)  # the MLflow server on a cluster; its store here
    copy_shipped(pipelines, "credit_scoring")
    dagster_home = postgres_dagster_home(shared_volume / "dagster", url, monkeypatch)

    defs = build_definitions()
    dg.Definitions.validate_loadable(defs)
    res = defs.resources
    assert isinstance(res["launcher"], K8sPodLauncher) and isinstance(res["trainjob_launcher"], TrainJobLauncher)
    assert res["launcher"].checkpoint_claim == cluster_env["INTELLIGENTOPS_K8S_CHECKPOINT_PVC"]
    assert res["storage"].local_dir("credit_scoring", "training") == shared_volume / "credit_scoring" / "training"
    assert res["mlflow"].artifact_location() == (shared_volume / "mlflow" / "artifacts").as_uri()
    launcher = res["launcher"].process_config_and_initialize()  # resolves the image from its dg.EnvVar
    pod = launcher.render_pod_manifest(TrainRequest(spec_name="credit_scoring", args=["--epochs", "1"], env={},
                                                    extras={}, nproc_per_node=1), {})
    assert pod["spec"]["containers"][0]["image"] == cluster_env["INTELLIGENTOPS_TRAIN_IMAGE"]

    job = naming.job_name("credit_scoring", "data")
    proc = subprocess.run([sys.executable, "-m", "dagster", "job", "execute", "-m", "orchestration.definitions",
                           "-j", job], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        (run,) = instance.get_runs()
        assert run.job_name == job and run.status == dg.DagsterRunStatus.SUCCESS
        assert instance.get_latest_materialization_event(naming.asset_key("credit_scoring", naming.TRAINING_SPLITS))
    assert (shared_volume / "assets" / "credit_scoring" / "training_splits.parquet").exists()
    assert (shared_volume / "credit_scoring" / "validation" / "rejected_rows.parquet").exists()


def test_helm_values_mount_the_shared_home_in_every_pod() -> None:
    """The code location's env, volumes and mounts (which the run pods inherit) form a valid Pod whose home is
    the ReadWriteMany claim of deploy/k8s/home-pvc.yaml, mounted at the path INTELLIGENTOPS_HOME names."""
    import kubernetes_validate

    values = yaml.safe_load(HELM_VALUES.read_text())
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["includeConfigInLaunchedRuns"]["enabled"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "code-location"},
           "spec": {"containers": [{"name": "user-code", "image": "img:1", "env": deployment["env"],
                                    "volumeMounts": deployment["volumeMounts"],
                                    "resources": deployment["resources"]}],
                    "volumes": deployment["volumes"]}}
    for version in ("1.29.0", kubernetes_validate.utils.latest_version()):
        kubernetes_validate.validate(pod, version, strict=True)
    env = helm_code_location_env()
    (mount,) = [m for m in deployment["volumeMounts"] if m["mountPath"] == env["INTELLIGENTOPS_HOME"]]
    (volume,) = [v for v in deployment["volumes"] if v["name"] == mount["name"]]
    pvc = yaml.safe_load((REPO / "deploy" / "k8s" / "home-pvc.yaml").read_text())
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert env["MLFLOW_TRACKING_URI"].startswith("http"), "on a cluster MLflow is a server"
    mlflow_docs = list(yaml.safe_load_all((REPO / "deploy" / "k8s" / "mlflow.yaml").read_text()))
    (service,) = [d for d in mlflow_docs if d["kind"] == "Service"]
    assert env["MLFLOW_TRACKING_URI"] == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"


def test_audit_log_on_postgres_chains_from_two_writers_and_names_an_edited_record(postgres, tmp_path: Path) -> None:
    """The decision log's second backend: the same keyed store on PostgreSQL (a cluster's INTELLIGENTOPS_AUDIT_URL),
    two writers sharing one keys folder (a mounted Secret) keep one chain; applicant fields are ciphertext in the
    database; an outcome correction needs a reason; an edited record, its hashes recomputed, is named."""
    import threading
    import uuid

    import sqlalchemy as sa

    from core.audit import AuditKeys, AuditStore, OutcomeConflict
    from core.audit.records import row_hash

    name, url = fresh_database(postgres, "audit")
    keys = AuditKeys.load(tmp_path / "keys").created()
    stores = [AuditStore(url, keys, checkpoints=tmp_path / f"server{i}.checkpoints.jsonl") for i in range(2)]

    def write(store: AuditStore) -> None:
        for _ in range(10):
            store.append([{"decision_id": uuid.uuid4().hex, "spec": "loans", "model_name": "loans",
                           "model_version": "1", "variant": "champion",
                           "inputs": {"income": 1.0, "purpose": "car-purchase", "title": "quarry-foreman"},
                           "probability": 0.3, "decision": 0, "threshold": 0.5} for _ in range(5)])

    threads = [threading.Thread(target=write, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    verified = stores[0].verify()
    assert verified.ok and verified.checked == 100 and "every seq from 1 under the keyed rule" in verified.rules[0]
    assert [r.seq for r in stores[1].read_after(0, limit=1000)] == list(range(1, 101))
    assert stores[1].get(stores[0].read_after(0, limit=1)[0].decision_id).inputs["title"] == "quarry-foreman"
    stored = postgres.query(name, "SELECT inputs, top_factors FROM audit_decisions")
    # Ciphertext is base64, which has no '-' and no '"': a hyphenated value or a JSON key in it is plain text.
    assert len(stored) == 100 and all(i.startswith("aes256gcm:") for i, _ in stored)
    assert not any(p in i for i, _ in stored for p in ("quarry-foreman", "car-purchase", '"income"'))
    victim = stores[0].read_after(41, limit=1)[0]
    stores[0].record_outcome(victim.decision_id, 1, key_id="lender")
    assert stores[1].outcomes([victim.decision_id]) == {victim.decision_id: 1}
    with pytest.raises(OutcomeConflict):
        stores[1].record_outcome(victim.decision_id, 0, key_id="collector")
    stores[1].record_outcome(victim.decision_id, 0, key_id="collector", reason="repaid")  # from the other connection
    assert [seq for _, seq in stores[0].outcome_events_after(0, victim.spec)] == [victim.seq, victim.seq]
    assert stores[0].outcome_count(victim.spec, 1, 100) == 1
    assert stores[0].outcomes([victim.decision_id], rule="latest") == {victim.decision_id: 0}
    for store in stores:
        store.flush_checkpoints()
    assert stores[1].verify(anchors=stores[0].checkpoints()[0]).ok

    # The insider edits the record and recomputes every plain hash after it, and the head.
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE audit_decisions SET probability = 0.99 WHERE seq = :s"), {"s": victim.seq})
        prev = conn.execute(sa.text("SELECT record_hash FROM audit_decisions WHERE seq = :s"),
                            {"s": victim.seq - 1}).scalar()
        for row in conn.execute(sa.text("SELECT * FROM audit_decisions WHERE seq >= :s ORDER BY seq"),
                                {"s": victim.seq}).mappings().all():
            new = row_hash({**row, "prev_hash": prev})
            conn.execute(sa.text("UPDATE audit_decisions SET prev_hash = :p, record_hash = :h WHERE seq = :s"),
                         {"p": prev, "h": new, "s": row["seq"]})
            prev = new
        conn.execute(sa.text("UPDATE audit_head SET hash = :h WHERE id = 1"), {"h": prev})
    engine.dispose()
    broken = stores[1].verify(anchors=stores[0].checkpoints()[0])
    assert not broken.ok and broken.first_bad_seq == victim.seq
    assert broken.problems[0].startswith(f"seq {victim.seq} (decision {victim.decision_id}) does not match its MAC")
