"""The model supply chain, attacked: a registered version's whole folder sealed (manifest + model-signing signature)
and every tampering with it refused, naming the file, by the upstream CLI, the integrity gate and the inference
server (in the registry and in the server's own cache), while the version already serving keeps serving.

One small model with a text feature is trained and registered once for the module (tests/serving_support.py);
each tampered version is a new registry version whose folder is a changed copy of the real one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from serving_support import SPEC, registered_module

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
ROW = {"income": 52000.0, "debt_ratio": 12.5, "purpose": "car", "title": "registered nurse"}
CLI = Path(sys.executable).parent / "model_signing"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    yield from registered_module(tmp_path_factory, "supply")


@pytest.fixture(scope="module")
def client(registered):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=registered.tracking_uri)


@pytest.fixture(scope="module")
def public_key(registered) -> Path:
    return registered.home / "keys" / "model-signing.pub"


@pytest.fixture(scope="module")
def original(registered, tmp_path_factory) -> Path:
    """The registry's copy of the trained version's folder."""
    from resources.mlflow import MlflowResource

    return MlflowResource(home=str(registered.home)).download_version(SPEC, registered.version,
                                                                       tmp_path_factory.mktemp("original"))


def new_version(client, registered, original: Path, tmp: Path, tamper: Callable[[Path], None] | None = None,
                tags: Callable[[Path], dict] | None = None) -> str:
    """A new registry version whose folder is a copy of the trained one, changed by `tamper` before upload."""
    folder = tmp / f"copy-{time.monotonic_ns()}" / "model"
    shutil.copytree(original, folder)
    if tamper is not None:
        tamper(folder)
    first = client.get_model_version(SPEC, registered.version)
    run = client.create_run(client.get_run(first.run_id).info.experiment_id).info.run_id
    client.log_artifacts(run, str(folder), "model")
    source = f"{client.get_run(run).info.artifact_uri}/model"
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = registered.tracking_uri  # never a stray ./mlflow.db
    try:
        mv = client.create_model_version(SPEC, source, run_id=run,
                                         tags={**first.tags, **(tags(folder) if tags else {})})
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    return str(mv.version)


def append(rel: str, text: str = "\n# changed\n") -> Callable[[Path], None]:
    def tamper(folder: Path) -> None:
        with (folder / rel).open("a") as fh:
            fh.write(text)
    return tamper


def add(rel: str) -> Callable[[Path], None]:
    def tamper(folder: Path) -> None:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text("import os  # runs when the model's code is imported\n")
    return tamper


def remove(rel: str) -> Callable[[Path], None]:
    return lambda folder: (folder / rel).unlink()


def server_cfg(registered, tmp: Path, public_key: Path | None, **over):
    from core.server_config import ServerConfig

    settings = {"audit_url": "unused", "text": ["title"], "model_cache": str(tmp / "models"),
                "signing_public_key": str(public_key) if public_key else None, **over}
    return ServerConfig(spec=SPEC, tracking_uri=registered.tracking_uri, **settings)


def test_a_registered_version_is_sealed_and_verifies_with_the_upstream_cli(registered, client, original, public_key,
                                                                          tmp_path):
    import json

    from cryptography.hazmat.primitives import serialization

    from core.files import sha256_file

    manifest = json.loads((original / "manifest.json").read_text())
    listed = set(manifest["files"])
    # Every file that is loaded or run is listed: the loader's choice, the code, the environment, the artifacts.
    for rel in ("MLmodel", "model_code.py", "code/tabular_mlp.py", "code/intelligentops_features.py",
                "artifacts/model.safetensors", "artifacts/preprocessing.json", "artifacts/manifest.json",
                "artifacts/encoder.json", "requirements.txt", "conda.yaml", "python_env.yaml"):
        assert rel in listed, rel
    on_disk = {p.relative_to(original).as_posix() for p in original.rglob("*") if p.is_file()}
    assert on_disk == listed | {"manifest.json", "model.sig"}
    tags = client.get_model_version(SPEC, registered.version).tags
    assert tags["manifest_sha256"] == sha256_file(original / "manifest.json")
    der = serialization.load_pem_public_key(public_key.read_bytes()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert tags["signing_key_sha256"] == hashlib.sha256(der).hexdigest() == manifest["signing_key_sha256"]
    private = registered.home / "keys" / "model-signing.key"
    assert private.stat().st_mode & 0o777 == 0o600

    done = subprocess.run([str(CLI), "verify", "key", "--signature", str(original / "model.sig"), "--public_key",
                           str(public_key), str(original)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Verification succeeded" in done.stdout + done.stderr, done.stderr
    changed = tmp_path / "changed"
    shutil.copytree(original, changed)
    append("MLmodel")(changed)
    done = subprocess.run([str(CLI), "verify", "key", "--signature", str(changed / "model.sig"), "--public_key",
                           str(public_key), str(changed)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "MLmodel" in done.stdout + done.stderr


TAMPERED = {
    "MLmodel": (append("MLmodel", "\nloader_module: mlflow.sklearn\n"), "MLmodel: sha256"),
    "model code": (append("model_code.py"), "model_code.py: sha256"),
    "code/ file": (append("code/tabular_mlp.py"), "code/tabular_mlp.py: sha256"),
    "encoder.json": (append("artifacts/encoder.json", " "), "artifacts/encoder.json: sha256"),
    "added file": (add("code/sitecustomize.py"), "code/sitecustomize.py: not listed in manifest.json"),
    "removed file": (remove("requirements.txt"), "requirements.txt: listed in manifest.json but missing"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_tampered_registry_copy_is_refused_at_load_and_by_the_integrity_gate(case, registered, client, original,
                                                                              public_key, tmp_path):
    from assets.evaluation import verify_integrity
    from resources.mlflow import MlflowResource
    from workloads.serving.versions import ServingRefused, load_version

    tamper, named = TAMPERED[case]
    version = new_version(client, registered, original, tmp_path, tamper)
    with pytest.raises(ServingRefused, match="refusing to serve") as err:
        load_version(client, server_cfg(registered, tmp_path, public_key), version)
    assert named in str(err.value), str(err.value)
    local = MlflowResource(home=str(registered.home)).download_version(SPEC, version, tmp_path / "gate")
    integrity = verify_integrity(local, client.get_model_version(SPEC, version), public_key)
    assert any(named in p for p in integrity.problems), integrity.problems
    assert not integrity.signature_verified


def test_a_tampered_cached_copy_is_refused_at_the_next_load(registered, client, original, public_key, tmp_path):
    from workloads.serving.versions import ServingRefused, load_version

    version = new_version(client, registered, original, tmp_path)
    cfg = server_cfg(registered, tmp_path, public_key)
    assert load_version(client, cfg, version).version == version  # downloaded, verified, cached
    cached = next((tmp_path / "models").rglob("MLmodel")).parent
    assert not list(cached.rglob("__pycache__")), "loading wrote bytecode into the verified folder"
    for rel, named in (("code/intelligentops_features.py", "code/intelligentops_features.py: sha256"),
                       ("artifacts/encoder.json", "artifacts/encoder.json: sha256")):
        saved = (cached / rel).read_bytes()
        append(rel, " ")(cached)
        with pytest.raises(ServingRefused, match="refusing to serve") as err:
            load_version(client, cfg, version)
        assert named in str(err.value) and "delete that folder to fetch it again" in str(err.value)
        (cached / rel).write_bytes(saved)
    assert load_version(client, cfg, version).version == version


def test_unsigned_or_signed_by_another_key_is_refused(registered, client, original, public_key, tmp_path):
    from core.files import sha256_file
    from core.model_folder import seal
    from core.signing import signing_keys
    from workloads.serving.versions import ServingRefused, load_version

    cfg = server_cfg(registered, tmp_path, public_key)
    # Someone who can write to the registry re-seals a changed folder with a key of their own and fixes the tag.
    other = signing_keys(tmp_path / "other-keys", create=True)
    resealed = new_version(client, registered, original, tmp_path,
                           lambda f: (append("code/tabular_mlp.py")(f), seal(f, other)),
                           tags=lambda f: {"manifest_sha256": sha256_file(f / "manifest.json"),
                                           "signing_key_sha256": other.fingerprint})
    with pytest.raises(ServingRefused, match="not a valid signature by the trusted key") as err:
        load_version(client, cfg, resealed)
    assert str(public_key) in str(err.value)
    unsigned = new_version(client, registered, original, tmp_path, remove("model.sig"))
    with pytest.raises(ServingRefused, match=r"the version is not signed \(no model.sig\)"):
        load_version(client, cfg, unsigned)
    # A server whose config names no public key trusts nothing.
    with pytest.raises(ServingRefused, match="names no signing_public_key"):
        load_version(client, server_cfg(registered, tmp_path, None), registered.version)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


KEY = "supply-chain-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _start(registered, tmp: Path, name: str, public_key: Path) -> tuple[subprocess.Popen, str, Path]:
    import json

    from core.server_config import write_server_config

    port = _free_port()
    keys = tmp / f"{name}-keys.json"
    keys.write_text(json.dumps({"keys": [{"id": "ops", "sha256": hashlib.sha256(KEY.encode()).hexdigest(),
                                          "models": [SPEC], "scopes": ["predict", "explain", "read"]}]}))
    cfg = server_cfg(registered, tmp, public_key, port=port, poll_seconds=0.5,
                     audit_url=f"sqlite:///{tmp / name}-audit.db", numeric={"income": None, "debt_ratio": None},
                     categorical={"purpose": None}, similar_cases=0, api_keys_file=str(keys))
    write_server_config(tmp / f"{name}.json", cfg)
    log = tmp / f"{name}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "workloads.serving", "--config", str(tmp / f"{name}.json")],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}", log


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _status(url: str) -> dict:
    return httpx.get(f"{url}/intelligentops/status", headers=AUTH, timeout=5).json()


def test_the_server_keeps_serving_the_last_good_version_and_says_why(registered, client, original, public_key,
                                                                     tmp_path):
    good = registered.version
    proc, url, log = _start(registered, tmp_path, "server", public_key)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        cases = [(new_version(client, registered, original, tmp_path, append("MLmodel")), "MLmodel: sha256"),
                 (new_version(client, registered, original, tmp_path, append("artifacts/encoder.json", " ")),
                  "artifacts/encoder.json: sha256"),
                 (new_version(client, registered, original, tmp_path, remove("model.sig")), "is not signed")]
        for bad, named in cases:
            client.set_registered_model_alias(SPEC, "champion", bad)
            deadline = time.monotonic() + 60
            while named not in (_status(url).get("last_error") or ""):
                assert time.monotonic() < deadline, (_status(url), log.read_text()[-3000:])
                time.sleep(0.3)
            status = _status(url)
            assert status["versions"]["champion"]["version"] == good
            assert f"version {bad}" in status["last_error"]
            answer = httpx.post(f"{url}/v1/models/{SPEC}:predict", json={"instances": [ROW]}, headers=AUTH,
                                timeout=30)
            assert answer.status_code == 200 and answer.json()["predictions"][0]["model_version"] == good
            assert named in log.read_text()
        client.set_registered_model_alias(SPEC, "champion", good)
        deadline = time.monotonic() + 60
        while _status(url).get("last_error"):
            assert time.monotonic() < deadline, _status(url)
            time.sleep(0.3)
    finally:
        client.set_registered_model_alias(SPEC, "champion", good)
        _stop(proc)


def test_a_server_refuses_to_start_on_a_tampered_champion_naming_the_file(registered, client, original, public_key,
                                                                          tmp_path):
    bad = new_version(client, registered, original, tmp_path, append("code/tabular_mlp.py"))
    client.set_registered_model_alias(SPEC, "champion", bad)
    try:
        proc, _, log = _start(registered, tmp_path, "fresh", public_key)
        assert proc.wait(180) == 2, log.read_text()[-3000:]
        last = log.read_text().strip().splitlines()[-1]
        assert "code/tabular_mlp.py: sha256" in last and "refusing to serve" in last, last
    finally:
        client.set_registered_model_alias(SPEC, "champion", registered.version)


def test_evaluation_never_runs_the_code_of_a_tampered_challenger(registered, client, original, public_key, tmp_path):
    import logging

    import pandas as pd

    from assets.checks.gates import evaluate_gates
    from assets.evaluation import evaluate
    from assets.spec import load_spec
    from resources.mlflow import MlflowResource
    from resources.storage import StorageResource

    marker = tmp_path / "code-ran"
    bad = new_version(client, registered, original, tmp_path,
                      append("model_code.py", f"\nimport pathlib; pathlib.Path({str(marker)!r}).touch()\n"))
    client.set_registered_model_alias(SPEC, "challenger", bad)
    try:
        spec = load_spec(registered.pipelines / f"{SPEC}.yaml").spec
        assets = registered.home / "assets" / SPEC
        ev = evaluate(spec, MlflowResource(home=str(registered.home)), StorageResource(home=str(registered.home)),
                      pd.read_parquet(assets / "validated_dataset.parquet"),
                      pd.read_parquet(assets / "training_splits.parquet"),
                      pd.read_parquet(assets / "text_embeddings.parquet"), logging.getLogger("test"))
    finally:
        client.set_registered_model_alias(SPEC, "challenger", registered.version)
    assert not marker.exists(), "the integrity gate's evaluation imported a tampered model_code.py"
    assert not ev.loaded and not ev.integrity.signature_verified
    gates = {g.name: g for g in evaluate_gates(ev, spec)}
    assert not gates["integrity"].passed and "model_code.py: sha256" in gates["integrity"].summary
    assert "not evaluated" in gates["performance"].summary
