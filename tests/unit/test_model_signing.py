"""The model-signing key pair and a sealed model folder (core/signing.py, core/model_folder.py), attacked file by file
on a folder shaped like a registered version's, without MLflow."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from core.manifest import listed_files, verify_manifest, write_manifest
from core.model_folder import ModelFolderError, check_model_folder, seal, verify_model_folder
from core.signing import PRIVATE_KEY, PUBLIC_KEY, SigningError, fingerprint, signing_keys


def model_folder(root: Path) -> Path:
    folder = root / "model"
    for rel, text in {"MLmodel": "python_function:\n  loader_module: mlflow.pyfunc.model\n",
                      "model_code.py": "import mlflow\n", "code/tabular_mlp.py": "def build_mlp(): ...\n",
                      "artifacts/manifest.json": '{"algorithm": "sha256", "files": {}}',
                      "artifacts/encoder.json": '{"name": "minilm"}', "requirements.txt": "mlflow\n",
                      "conda.yaml": "name: x\n"}.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    return folder


@pytest.fixture
def keys(tmp_path):
    return signing_keys(tmp_path / "keys", create=True)


def test_the_pair_is_created_once_with_its_modes_and_its_fingerprint_is_the_der_digest(tmp_path, keys):
    from cryptography.hazmat.primitives import serialization

    folder = tmp_path / "keys"
    assert os.stat(folder).st_mode & 0o777 == 0o700
    assert os.stat(folder / PRIVATE_KEY).st_mode & 0o777 == 0o600
    key = serialization.load_pem_public_key((folder / PUBLIC_KEY).read_bytes())
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert keys.fingerprint == fingerprint(folder / PUBLIC_KEY) == hashlib.sha256(der).hexdigest()
    assert key.curve.name == "secp256r1"
    again = signing_keys(folder, create=True)
    assert again.fingerprint == keys.fingerprint  # loaded, not replaced


def test_a_readable_private_key_a_mismatched_pair_and_a_missing_secret_are_refused(tmp_path, keys):
    private = tmp_path / "keys" / PRIVATE_KEY
    private.chmod(0o644)
    with pytest.raises(SigningError, match=f"readable by group or others .* run `chmod 600 {private}`"):
        signing_keys(tmp_path / "keys", create=True)
    private.chmod(0o600)
    other = signing_keys(tmp_path / "other", create=True)
    (tmp_path / "keys" / PUBLIC_KEY).write_bytes(other.public_key.read_bytes())
    with pytest.raises(SigningError, match="is not the public key of"):
        signing_keys(tmp_path / "keys", create=True)
    with pytest.raises(SigningError, match=f"{tmp_path / 'secret' / PRIVATE_KEY}: no model-signing private key.*openssl"):
        signing_keys(tmp_path / "secret", create=False)  # a mounted Secret is never filled in by us


def test_a_sealed_folder_verifies_and_every_tampering_is_named(tmp_path, keys):
    folder = model_folder(tmp_path)
    sealed = seal(folder, keys)
    assert verify_model_folder(folder, keys.public_key, sealed.manifest_sha256) == sealed.files == 7
    assert sealed.signing_key_sha256 == keys.fingerprint
    cases = {
        "MLmodel": lambda f: (f / "MLmodel").write_text("python_function:\n  loader_module: evil\n"),
        "code/tabular_mlp.py": lambda f: (f / "code/tabular_mlp.py").write_text("import os\n"),
        "artifacts/manifest.json": lambda f: (f / "artifacts/manifest.json").write_text("{}"),
        "code/.hidden.pyc": lambda f: (f / "code/.hidden.pyc").write_bytes(b"\0"),
        "requirements.txt": lambda f: (f / "requirements.txt").unlink(),
    }
    for named, tamper in cases.items():
        copy = tmp_path / f"case-{named.replace('/', '_')}"
        shutil.copytree(folder, copy)
        tamper(copy)
        check = check_model_folder(copy, keys.public_key, sealed.manifest_sha256)
        assert any(p.startswith(f"{named}:") for p in check.problems), (named, check.problems)
        assert not check.signature_verified and named in check.signature_problem, (named, check.signature_problem)
        with pytest.raises(ModelFolderError, match=named.replace(".", r"\.")):
            verify_model_folder(copy, keys.public_key, sealed.manifest_sha256)


def test_a_folder_resealed_by_another_key_or_unsigned_or_unpinned_is_refused(tmp_path, keys):
    folder = model_folder(tmp_path)
    sealed = seal(folder, keys)
    other = signing_keys(tmp_path / "other", create=True)
    resealed = seal(folder, other)  # a registry writer with a key of their own rewrites manifest and signature
    check = check_model_folder(folder, keys.public_key, resealed.manifest_sha256)
    assert check.problems == [check.signature_problem]
    assert f"not a valid signature by the trusted key {keys.public_key}" in check.signature_problem
    assert "manifest was replaced" in " ".join(check_model_folder(folder, other.public_key,
                                                                  sealed.manifest_sha256).problems)
    (folder / "model.sig").unlink()
    with pytest.raises(ModelFolderError, match=r"the version is not signed \(no model.sig\)"):
        verify_model_folder(folder, other.public_key, resealed.manifest_sha256)
    with pytest.raises(ModelFolderError, match="no public key to check the signature with"):
        verify_model_folder(folder, None, resealed.manifest_sha256)
    with pytest.raises(ModelFolderError, match="no manifest_sha256 tag"):
        verify_model_folder(folder, other.public_key, None)


def test_the_manifest_lists_nested_manifests_and_keeps_its_old_rules_by_default(tmp_path):
    folder = model_folder(tmp_path)
    (folder / ".complete").write_text("1")
    write_manifest(folder)
    names = {p.relative_to(folder).as_posix() for p in listed_files(folder)}
    assert "artifacts/manifest.json" in names and ".complete" not in names and "manifest.json" not in names
    verify_manifest(folder)
    hidden = {p.relative_to(folder).as_posix() for p in listed_files(folder, unlisted=("model.sig",), hidden=True)}
    assert hidden == names | {".complete"}
