"""Every environment variable the code location reads, read here and nowhere else.

A bad value fails with the variable's name and what it accepts. The composition root reads the settings once
per load (`Settings.from_env()`); tests build them for any pipelines folder and deployment in-process. The
workloads (python -m workloads.training, -m workloads.serving) run elsewhere and take their configuration from files or arguments instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENTS = ("local", "kubernetes")


class SettingsError(ValueError):
    """An environment variable with a value the project cannot use; the message names the variable."""


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def env_int(name: str, default: int, environ: Mapping[str, str] | None = None, minimum: int = 0) -> int:
    raw = _env(environ).get(name, "")
    if raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a whole number; set it to one (default {default})") from None
    if value < minimum:
        raise SettingsError(f"{name}={value} must be at least {minimum}")
    return value


def env_list(name: str, environ: Mapping[str, str] | None = None) -> list[str]:
    """A comma-separated list; empty items are dropped."""
    return [p.strip() for p in _env(environ).get(name, "").split(",") if p.strip()]


def env_pairs(name: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """`key=value,key2=value2`."""
    out: dict[str, str] = {}
    for item in env_list(name, environ):
        if "=" not in item:
            raise SettingsError(f"{name}: {item!r} is not key=value (expected e.g. {name}=pool=gpu,zone=a)")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def intelligentops_home(environ: Mapping[str, str] | None = None) -> str:
    """`$INTELLIGENTOPS_HOME` (a folder, or an object-store URL on a cluster), else `.intelligentops/` in the repo."""
    raw = _env(environ).get("INTELLIGENTOPS_HOME", "")
    if raw:
        return raw if "://" in raw else str(Path(raw).expanduser().resolve())
    return str(REPO_ROOT / ".intelligentops")


def pipelines_dir(environ: Mapping[str, str] | None = None) -> Path:
    """`$INTELLIGENTOPS_PIPELINES`, else `pipelines/` at the repository root."""
    raw = _env(environ).get("INTELLIGENTOPS_PIPELINES", "")
    return Path(raw).expanduser().resolve() if raw else REPO_ROOT / "pipelines"


def keys_folder(environ: Mapping[str, str] | None = None) -> str | None:
    """`$INTELLIGENTOPS_KEYS_DIR` (a local folder, on a cluster a mounted Secret), else None: `<home>/keys`."""
    raw = _env(environ).get("INTELLIGENTOPS_KEYS_DIR", "").strip()
    if not raw:
        return None
    if "://" in raw:
        raise SettingsError(f"INTELLIGENTOPS_KEYS_DIR={raw!r} is not a local folder; keys are read from files "
                            "(on Kubernetes, mount a Secret and name its folder)")
    return str(Path(raw).expanduser().resolve())


@dataclass(frozen=True)
class KubernetesSettings:
    """`INTELLIGENTOPS_K8S_*`: where and how training pods run (deploy/README.md lists each one)."""

    namespace: str = "intelligentops"
    gpus: int = 1
    service_account: str = "intelligentops-train"
    checkpoint_claim: str | None = None
    checkpoint_url: str | None = None
    home_claim: str | None = None
    node_selector: dict[str, str] = field(default_factory=dict)
    env_secrets: list[str] = field(default_factory=list)
    num_nodes: int = 2

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KubernetesSettings:
        env = _env(environ)
        return cls(
            namespace=env.get("INTELLIGENTOPS_K8S_NAMESPACE") or "intelligentops",
            gpus=env_int("INTELLIGENTOPS_K8S_GPUS", 1, env),
            service_account=env.get("INTELLIGENTOPS_K8S_TRAIN_SERVICE_ACCOUNT") or "intelligentops-train",
            checkpoint_claim=env.get("INTELLIGENTOPS_K8S_CHECKPOINT_PVC") or None,
            checkpoint_url=env.get("INTELLIGENTOPS_K8S_CHECKPOINT_URL") or None,
            home_claim=env.get("INTELLIGENTOPS_K8S_HOME_PVC") or None,
            node_selector=env_pairs("INTELLIGENTOPS_K8S_NODE_SELECTOR", env),
            env_secrets=env_list("INTELLIGENTOPS_K8S_ENV_SECRETS", env),
            num_nodes=env_int("INTELLIGENTOPS_K8S_NUM_NODES", 2, env, minimum=1),
        )


@dataclass(frozen=True)
class Settings:
    """What one load of the code location is configured with."""

    home: str
    pipelines: Path
    deployment: str = "local"
    mlflow_tracking_uri: str | None = None
    audit_url: str | None = None
    # Artifacts of MLflow experiments when tracking is on a database; default <home>/mlflow/artifacts.
    mlflow_artifacts: str | None = None
    # The folder of secrets kept outside the data they protect (the audit log's keys); default <home>/keys.
    keys_dir: str | None = None

    def __post_init__(self) -> None:
        if self.deployment not in DEPLOYMENTS:
            raise SettingsError(f"INTELLIGENTOPS_DEPLOYMENT={self.deployment!r}; expected one of "
                                f"{', '.join(DEPLOYMENTS)}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = _env(environ)
        deployment = env.get("INTELLIGENTOPS_DEPLOYMENT") or "local"
        return cls(home=intelligentops_home(env), pipelines=pipelines_dir(env), deployment=deployment,
                   mlflow_tracking_uri=env.get("MLFLOW_TRACKING_URI") or None,
                   audit_url=env.get("INTELLIGENTOPS_AUDIT_URL") or None,
                   mlflow_artifacts=env.get("INTELLIGENTOPS_MLFLOW_ARTIFACTS") or None,
                   keys_dir=keys_folder(env))
