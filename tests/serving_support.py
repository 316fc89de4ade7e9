"""A small registered model with a text feature, for the serving and deployment tests.

`build_registered_model(root)` materializes the existing graph through `<spec>/registered_model` for a
300-row spec (numeric, categorical and a job-title text column) in a fresh home, then sets alias `champion`
and the `operating_threshold` tag the way model_evaluation and champion_model would.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from support import failure_text, materialize, write_spec

SPEC = "serve_loans"
TITLES = ["nurse", "software engineer", "teacher", "truck driver", "sales manager", "accountant", "cashier",
          "electrician", "warehouse associate", "registered nurse"]


def loans(n: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    debt = rng.uniform(0, 40, n).round(1)
    income = rng.lognormal(10.5, 0.4, n).round(0)
    title = rng.choice(TITLES, n)
    risk = (debt / 40 - (np.log(income) - 10.5) + rng.normal(0, 0.15, n) + 0.2 * np.isin(title, TITLES[6:])) > 0.6
    return pd.DataFrame({"loan_id": [f"L{i:05d}" for i in range(n)], "income": income, "debt_ratio": debt,
                         "purpose": rng.choice(["car", "home", "education"], n), "region": rng.choice(["n", "s"], n),
                         "title": title, "outcome": np.where(risk, "default", "repaid")})


def spec_dict(**over) -> dict:
    s = {
        "name": SPEC,
        "source": {"kind": "file", "path": "loans.csv"},
        "id_column": "loan_id",
        "target": {"column": "outcome", "positive": ["default"]},
        "features": {"numeric": ["income", "debt_ratio"], "categorical": ["purpose"], "text": ["title"]},
        "sensitive": ["region"],
        "training": {"epochs": 2, "hidden": [8], "checkpoint_every_steps": 50, "learning_rate": 0.01,
                     "nproc_per_node": 1},
        "deployment": {"slo_p99_ms": 2000, "smoke_requests": 20},
    }
    s.update(over)
    return s


@dataclass(frozen=True)
class Registered:
    home: Path
    pipelines: Path
    tracking_uri: str
    version: str


def set_env(home: Path, pipelines: Path) -> dict[str, str | None]:
    saved = {k: os.environ.get(k) for k in ("INTELLIGENTOPS_HOME", "INTELLIGENTOPS_PIPELINES", "DAGSTER_HOME")}
    os.environ["INTELLIGENTOPS_HOME"] = str(home)
    os.environ["INTELLIGENTOPS_PIPELINES"] = str(pipelines)
    return saved


def restore_env(saved: dict[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def build_registered_model(root: Path, instance: dg.DagsterInstance, **over) -> Registered:
    from mlflow import MlflowClient

    from orchestration.definitions import build_definitions

    home, pipelines = root / "home", root / "pipelines"
    home.mkdir(parents=True, exist_ok=True)
    pipelines.mkdir(parents=True, exist_ok=True)
    loans().to_csv(pipelines / "loans.csv", index=False)
    write_spec(pipelines, spec_dict(**over))
    defs = build_definitions(pipelines)
    target = dg.AssetKey([SPEC, "registered_model"])
    result = materialize(defs, instance, dg.AssetSelection.assets(target).upstream()
                         | dg.AssetSelection.assets(dg.AssetKey([SPEC, "vector_index"])))
    assert result.success, failure_text(result)
    tracking = f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking)
    version = str(client.get_model_version_by_alias(SPEC, "challenger").version)
    client.set_model_version_tag(SPEC, version, "operating_threshold", "0.4")
    client.set_registered_model_alias(SPEC, "champion", version)
    return Registered(home=home, pipelines=pipelines, tracking_uri=tracking, version=version)


def registered_module(tmp_path_factory, name: str, after=None, **over) -> Iterator[Registered]:
    """The body of a module-scoped `registered` fixture: the module's own version (spec overrides `over`), trained
    on its own instance, with the module's environment set while it runs; `after(reg, instance)` runs on that
    instance once the version is registered."""
    root = tmp_path_factory.mktemp(name)
    saved = set_env(root / "home", root / "pipelines")
    (root / "home" / "dagster").mkdir(parents=True)
    try:
        with dg.instance_for_test(temp_dir=str(root / "home" / "dagster")) as instance:
            reg = build_registered_model(root, instance, **over)
            if after is not None:
                after(reg, instance)
            yield reg
    finally:
        restore_env(saved)


_SHARED: dict[str, Registered] = {}


def lent_registered(tmp_path_factory) -> Iterator[Registered]:
    """The body of a module-scoped `registered` fixture for a module that only reads the registry (a server's
    tests: each server keeps its audit chain and keys in its own folder): the default version, trained once per
    session and lent to each such module, with the module's environment set while it runs."""
    if "default" not in _SHARED:
        built = registered_module(tmp_path_factory, "lent")
        _SHARED["default"] = next(built)
        built.close()  # the instance is closed and the environment restored; the files stay
    reg = _SHARED["default"]
    saved = set_env(reg.home, reg.pipelines)
    os.environ["DAGSTER_HOME"] = str(reg.home / "dagster")
    try:
        yield reg
    finally:
        restore_env(saved)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """The real server (`python -m workloads.serving`) as a process on loopback, on the registered model, with
    the deployment's own config (assets/deployment.server_config) changed by `overrides`. One worker process unless
    `workers` says more (then `proc` is the supervisor and `worker_pids()` its workers)."""

    def __init__(self, reg: Registered, tmp: Path, name: str, workers: int = 1, **overrides):
        from assets.deployment import server_config
        from assets.profile import load_profile
        from assets.spec import load_spec
        from core.server_config import write_server_config
        from resources.storage import StorageResource

        home = str(reg.home)
        loaded = load_spec(reg.pipelines / f"{SPEC}.yaml")
        self.audit_url = overrides.pop("audit_url", None) or f"sqlite:///{tmp / name}-audit.db"
        config, self.smoke_key = server_config(loaded, home, reg.tracking_uri, self.audit_url,
                                               load_profile(StorageResource(home=home), loaded.spec))
        self.operator_key = (reg.home / SPEC / "deployment" / "operator.key").read_text().strip()
        self.config = config.replace(port=free_port(), poll_seconds=0.5, workers=workers, **overrides)
        self.config_path = tmp / f"{name}.json"
        write_server_config(self.config_path, self.config)
        self.url = f"{'https' if self.config.tls else 'http'}://127.0.0.1:{self.config.port}"
        self.log = tmp / f"{name}.log"
        self.proc = None

    def client_kwargs(self) -> dict:
        """httpx arguments that reach this server (its CA trusted, the client certificate presented)."""
        return {"verify": self.config.tls.client_context()} if self.config.tls else {}

    def start(self, wait: bool = True) -> "Server":
        import subprocess
        import sys
        import time

        import httpx

        repo = Path(__file__).resolve().parents[1]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "workloads.serving", "--config",
                                          str(self.config_path)], cwd=repo, stdout=log, stderr=subprocess.STDOUT)
        if wait:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, self.log.read_text()[-3000:]
                try:
                    if httpx.get(f"{self.url}/v2/health/ready", timeout=1, **self.client_kwargs()).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            raise AssertionError(f"server not ready: {self.log.read_text()[-3000:]}")
        return self

    def worker_pids(self) -> list[int]:
        """The supervisor's live worker processes (none for a single-process server)."""
        import psutil

        return [c.pid for c in psutil.Process(self.proc.pid).children() if c.status() != psutil.STATUS_ZOMBIE]

    def stop(self) -> None:
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def store(self):
        """The server's audit store, opened with the server's keys (decrypts inputs, verifies MACs)."""
        from core.audit import AuditKeys, AuditStore

        return AuditStore(self.audit_url, AuditKeys.load(self.config.keys_dir) if self.config.keys_dir else None)
