"""Version loading and verification: the versions the registry aliases point to, checked before they serve.

A version is loaded by alias (`@champion`, and `@challenger` for a canary or shadow policy) from the MLflow
registry, its files downloaded once into the model cache and, at every load (a cached copy too), checked as a
whole (core/model_folder.py): every file of the model folder (MLmodel, the model code, code/, artifacts/, the
environment files) against the folder's manifest, the manifest against the version's `manifest_sha256` tag,
and the folder's `model.sig` against the public key the config names (`signing_public_key`). A missing, changed
or extra file, an unsigned version or one signed by another key is refused, naming the file or the key; it
needs an `operating_threshold` tag to decide at. MLflow is told never to unpickle, and Python never to write
bytecode into the cache (a `__pycache__` there would be an unlisted file). `ServedVersions` polls the aliases and
the split in force (workloads/serving/split.py; at once on SIGHUP); a moved alias or a new split is loaded and
verified beside the serving versions and handed to the scoring loop as one `ServedSplit` reference; a refused
version leaves the serving ones in place, and says why in the log and in /intelligentops/status (`last_error`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.names import CHALLENGER, CHAMPION, DETECTORS_TAG, MANIFEST_TAG, THRESHOLD_TAG
from core.ood import OodError
from core.rollout import split_in_force
from core.server_config import ServerConfig
from workloads.serving.metrics import Metrics
from workloads.serving.split import ServedSplit

log = logging.getLogger("intelligentops.serving")


class ServingRefused(RuntimeError):
    """The server refuses to serve: a version fails its checks, or the registry has no champion or cannot be
    reached. The message says which and what to do."""


@dataclass(frozen=True)
class ServedVersion:
    """One loaded, verified model version."""

    version: str
    threshold: float
    python_model: Any
    run_id: str | None
    manifest_sha256: str
    ood: Any = None  # core.ood.OodDetector, or None: this version has none
    runtime: str = "pytorch"  # which path each network serves on and why (the version's onnx.json)

    def score(self, frame, explain: int):
        """(probabilities, top factors per row, the out-of-distribution verdict: core.ood.OodScores or None)
        for a frame of raw feature values."""
        import torch

        pm = self.python_model
        params = {"explain": explain} if explain else None
        # The pyfunc may have been loaded on another thread; autograd state is per thread.
        with torch.inference_mode():
            if self.ood is not None:
                out, x = pm.predict_with_inputs(frame, params)
            else:
                out, x = pm.predict(None, frame, params=params), None
        probability = out["probability"].to_numpy(dtype="float64")
        factors = [json.loads(v) for v in out["top_factors"]] if explain and "top_factors" in out else None
        return probability, factors, None if x is None else self.ood.score(x)


def verify_model_files(model_root: Path, expected_manifest_sha: str | None, public_key: str | None,
                       label: str) -> str:
    """Check the version's whole folder against its manifest, the tag and the signature; the manifest's digest."""
    from core.model_folder import ModelFolderError, verify_model_folder

    if not expected_manifest_sha:
        raise ServingRefused(f"{label} has no tag {MANIFEST_TAG}, so its files cannot be checked: refusing to serve")
    if not public_key:
        raise ServingRefused(f"{label}: the server config names no signing_public_key, so the version's signature "
                             "cannot be checked: refusing to serve (the deployment asset fills it from the keys "
                             "folder)")
    try:
        verify_model_folder(model_root, Path(public_key), expected_manifest_sha)
    except ModelFolderError as exc:
        raise ServingRefused(f"{label}: {exc}: refusing to serve") from None
    return expected_manifest_sha


def _threshold(tags: dict[str, str], cfg: ServerConfig, version: str, label: str) -> float:
    raw = tags.get(THRESHOLD_TAG)
    if raw is None:
        raise ServingRefused(f"{label} has no tag '{THRESHOLD_TAG}', so no decision can be made from its scores: "
                             f"materialize {cfg.spec}/model_evaluation for it (it sets the tag), or set it by hand "
                             f"with MlflowClient().set_model_version_tag({cfg.spec!r}, {version!r}, "
                             f"'{THRESHOLD_TAG}', '0.5')")
    try:
        threshold = float(raw)
    except ValueError:
        raise ServingRefused(f"{label}: tag {THRESHOLD_TAG} = {raw!r} is not a number") from None
    if not 0.0 <= threshold <= 1.0:
        raise ServingRefused(f"{label}: tag {THRESHOLD_TAG} = {threshold} is outside [0, 1]")
    return threshold


def _download(client, cfg: ServerConfig, version: str) -> Path:
    """The version's files in the model cache, downloaded once (a marker file says the copy is complete)."""
    import mlflow

    cache = Path(cfg.model_cache or Path.home() / ".cache" / "intelligentops" / cfg.spec) / f"v{version}"
    if (cache / ".complete").is_file():
        return cache
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Resolved through this client, never mlflow's process-wide default store.
    uri = client.get_model_version_download_uri(cfg.spec, version)
    if uri.startswith("models:/m-"):  # MLflow 3: the version points at a logged model
        uri = client.get_logged_model(uri.split("/", 1)[1]).artifact_location
    mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp))
    (tmp / ".complete").write_text(version)
    try:
        os.replace(tmp, cache)
    except OSError:  # another server process finished the same download first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (cache / ".complete").is_file():
            raise
    return cache


def load_version(client, cfg: ServerConfig, version: str) -> ServedVersion:
    """Download, verify and load one version of the spec's model; refuse one without an operating threshold."""
    # The server never unpickles: a model from code loads without it, anything else is refused.
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
    # Importing the model's code must not write __pycache__ into the verified folder: the next load would find
    # an unlisted file there (and a planted .pyc is exactly what the manifest exists to catch).
    sys.dont_write_bytecode = True
    import mlflow

    label = f"model {cfg.spec!r} version {version}"
    mv = client.get_model_version(cfg.spec, version)
    tags = dict(mv.tags or {})
    threshold = _threshold(tags, cfg, version, label)
    cache = _download(client, cfg, version)
    found = sorted(cache.rglob("MLmodel"), key=lambda p: len(p.parts))
    if not found:
        raise ServingRefused(f"{label}: no MLmodel file in {cache}")
    model_root = found[0].parent
    try:
        digest = verify_model_files(model_root, tags.get(MANIFEST_TAG), cfg.signing_public_key, label)
    except ServingRefused as exc:
        raise ServingRefused(f"{exc} (files cached at {cache}; if the registry's copy is intact, delete that "
                             "folder to fetch it again)") from None
    ood = load_ood_detector(cfg, version, tags.get(DETECTORS_TAG), mv.run_id, label)
    pyfunc = mlflow.pyfunc.load_model(str(model_root))
    python_model = pyfunc.unwrap_python_model()
    if ood is not None and not hasattr(python_model, "predict_with_inputs"):
        log.warning("%s: its model code predates predict_with_inputs; served without its out-of-distribution "
                    "detector", label)
        ood = None
    runtime = getattr(python_model, "runtime", "encoder and network: pytorch (model code predates onnx.json)")
    log.info("%s: %s", label, runtime)
    return ServedVersion(version=str(version), threshold=threshold, python_model=python_model,
                         run_id=mv.run_id, manifest_sha256=digest, ood=ood, runtime=runtime)


def load_ood_detector(cfg: ServerConfig, version: str, expected: str | None, run_id: str | None,
                      label: str) -> Any:
    """The version's out-of-distribution detector from its verified detector bundle; None when it has none."""
    from core.manifest import ManifestError, verify_manifest
    from core.ood import OOD_FOLDER, load_ood

    if not expected or not run_id:
        log.warning("%s has no %s tag: served without an out-of-distribution detector (re-evaluate it to fit one)",
                    label, DETECTORS_TAG)
        return None
    cache = Path(cfg.model_cache or Path.home() / ".cache" / "intelligentops" / cfg.spec) / \
        f"v{version}-detectors-{expected[:16]}"
    bundle = cache / "drift_detectors"
    if not (cache / ".complete").is_file():
        import mlflow

        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="drift_detectors", dst_path=str(tmp),
                                                tracking_uri=cfg.tracking_uri)
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ServingRefused(f"{label}: its detector bundle (run {run_id}, drift_detectors/) cannot be "
                                 f"downloaded ({type(exc).__name__}: {exc}): refusing to serve") from None
        (tmp / ".complete").write_text(version)
        try:
            os.replace(tmp, cache)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    try:
        verify_manifest(bundle, expected_sha256=expected)
    except ManifestError as exc:
        raise ServingRefused(f"{label}: its detector bundle: {exc}: refusing to serve (files cached at {cache}; if "
                             "the registry's copy is intact, delete that folder to fetch it again)") from None
    if not (bundle / OOD_FOLDER).is_dir():
        log.warning("%s: its detector bundle has no out-of-distribution detector (evaluated before it existed)",
                    label)
        return None
    try:
        return load_ood(bundle / OOD_FOLDER)
    except OodError as exc:
        raise ServingRefused(f"{label}: {exc}: refusing to serve") from None


NAMES_IT = "tracking_uri/registry_uri in the server config"


class ServedVersions:
    """The versions serving now and how traffic is split between them (`served`, swapped by one reference): the
    champion by alias, the challenger as the split in force names it. `split_source` gives the split in force
    (workloads/serving/split.py); without one, the config's policy and the `@challenger` alias."""

    def __init__(self, cfg: ServerConfig, metrics: Metrics, split_source=None):
        from core.registry import RegistryUnreachable, connect, shown_uri

        self.cfg, self.metrics = cfg, metrics
        self.registry_uri = shown_uri(cfg.registry_uri or cfg.tracking_uri)
        try:
            self.client = connect(cfg.tracking_uri, cfg.registry_uri, names_it=NAMES_IT)
        except RegistryUnreachable as exc:
            raise ServingRefused(str(exc)) from None
        self.split_source = split_source
        self.served: ServedSplit | None = None
        self.last_error: str | None = None
        self.poll_now = threading.Event()
        self.stop = threading.Event()
        # Refreshed with the aliases, after them (the notice template's, workloads/serving/notices.py).
        self.followers: list[Callable[[], bool]] = []

    @property
    def current(self) -> dict[str, ServedVersion]:
        return self.served.versions if self.served is not None else {}

    @property
    def alias_versions(self) -> dict[str, str]:
        return {alias: v.version for alias, v in self.current.items()}

    def alias_version(self, alias: str) -> str | None:
        """The version `alias` points to; None when it points nowhere. A registry that does not answer is an
        error that names it, never mistaken for a missing alias."""
        from core.registry import RegistryUnreachable, version_by_alias

        try:
            found = version_by_alias(self.client, self.cfg.spec, alias, self.cfg.registry_uri or self.cfg.tracking_uri,
                                     names_it=NAMES_IT)
        except RegistryUnreachable as exc:
            raise ServingRefused(str(exc)) from None
        return None if found is None else str(found.version)

    def refresh(self) -> bool:
        """Load what the split in force and the aliases name now; keep serving the old split if a version of the new
        one fails to load."""
        if self.split_source is not None:
            split, event = self.split_source()
        else:
            split, event = split_in_force(None, self.cfg.mode, self.cfg.canary_share), None
        wanted = {CHAMPION: self.alias_version(CHAMPION)}
        if split.needs_challenger:
            wanted[CHALLENGER] = split.challenger or self.alias_version(CHALLENGER)
        if wanted[CHAMPION] is None:
            raise ServingRefused(f"model {self.cfg.spec!r} has no '{CHAMPION}' alias in the registry at "
                                 f"{self.registry_uri}: materialize {self.cfg.spec}/champion_model first")
        changed = False
        # A version the split no longer names leaves it (a rolled-back challenger is not kept loaded).
        new = {alias: v for alias, v in self.current.items() if alias in wanted}
        for alias, version in wanted.items():
            if version is None:
                new.pop(alias, None)
                continue
            current = new.get(alias)
            if current is not None and current.version == version:
                continue
            reuse = next((v for v in new.values() if v.version == version), None)
            loaded = reuse or load_version(self.client, self.cfg, version)
            self.warm(loaded)
            new[alias] = loaded
            changed = True
            log.info("%s: alias %s -> version %s (threshold %.4f)", self.cfg.spec, alias, version, loaded.threshold)
        old = self.served
        if changed or old is None or set(new) != set(old.versions) or (old.mode, old.share) != (split.mode, split.share) \
                or (old.event.id if old.event else None) != (event.id if event else None):
            self.served = ServedSplit(mode=split.mode, share=split.share, versions=new, event=event)  # one swap
            for alias, v in new.items():
                self.metrics.serving.labels(alias=alias).set(float(v.version))
            changed = True
        for follow in self.followers:
            changed = follow() or changed
        return changed

    def warm(self, version: ServedVersion) -> None:
        """Score one typical row so the first real request pays no lazy loading (e.g. the text encoder)."""
        import pandas as pd

        row: dict[str, Any] = {}
        for col, bounds in self.cfg.numeric.items():
            row[col] = (bounds[0] + bounds[1]) / 2 if bounds else 0.0
        for col, allowed in self.cfg.categorical.items():
            row[col] = allowed[0] if allowed else None
        for col in self.cfg.text:
            row[col] = ""
        frame = pd.DataFrame([row], columns=self.cfg.features)
        try:  # a detector that does not fit this version's inputs is refused here, not on the first request
            version.score(frame, self.cfg.explain_top or 1)
        except OodError as exc:
            raise ServingRefused(f"model {self.cfg.spec!r} version {version.version}: its out-of-distribution "
                                 f"detector cannot score its inputs ({exc}): refusing to serve") from None

    def watch(self) -> None:
        """Poll the aliases every `poll_seconds` (or at once when `poll_now` is set) until `stop`."""
        while not self.stop.is_set():
            self.poll_now.wait(self.cfg.poll_seconds)
            self.poll_now.clear()
            try:
                self.refresh()
                self.last_error = None
            except Exception as exc:  # keep serving what we have; say why on /intelligentops/status
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.metrics.swap_failures.inc()
                log.error("%s: alias refresh failed, still serving %s: %s", self.cfg.spec, self.alias_versions,
                          self.last_error)
