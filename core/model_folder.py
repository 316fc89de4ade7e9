"""A registered model version's folder: every file covered by one manifest, the folder signed, checked as a whole.

MLflow writes the folder (`mlflow.pyfunc.save_model`): `MLmodel` (which chooses the loader), the model code
(`model_code.py`), `code/` (the transform and the network it imports), `artifacts/` (weights, preprocessing, the
model's own `artifacts/manifest.json` with its architecture, `encoder.json` and any encoder folder), the
environment files (`requirements.txt`, `conda.yaml`, `python_env.yaml`) and the input examples. Before any of it
reaches the registry, registration seals the folder (`seal`):

1. `manifest.json` at the top lists the sha256 of every file below it, dot-files included; its own digest becomes
   the version's `manifest_sha256` tag and the public key's fingerprint its `signing_key_sha256` tag.
2. `model.sig` signs every file but itself, `manifest.json` included, with the model-signing key
   (core/signing.py). The manifest cannot list the signature made after it, and the signature does not sign
   itself: those are the only two exemptions, and nothing else in the folder is exempt from either.

`model_folder_problems` checks both, at registration (on the registry's copy), in the integrity gate and at every
inference-server load (the server's cached copy included): every file against the manifest (a missing, changed
or extra file is named), the manifest against the tag, and the signature against the trusted public key (a
version signed by another key, or not at all, is refused). The signature is what a registry writer cannot forge;
the manifest names the file that differs. Dagster-free: the server runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.files import sha256_file
from core.manifest import MANIFEST, ManifestError, manifest_problems, read_manifest, write_manifest
from core.signing import SIGNATURE, SigningError, SigningKeys, sign_folder, verify_folder

# What the folder's manifest does not list: the signature made after it.
UNLISTED = (SIGNATURE,)


class ModelFolderError(RuntimeError):
    """A model folder that fails its manifest, its tag or its signature; the message names the first problem."""


@dataclass(frozen=True)
class Seal:
    manifest_sha256: str
    signing_key_sha256: str
    files: int


def seal(folder: Path, keys: SigningKeys) -> Seal:
    """Write the folder's manifest (every file, dot-files too), then sign the folder; returns the two tags."""
    folder = Path(folder)
    (folder / SIGNATURE).unlink(missing_ok=True)
    manifest = write_manifest(folder, unlisted=UNLISTED, hidden=True, signature=SIGNATURE,
                              signing_key_sha256=keys.fingerprint)
    sign_folder(folder, keys.private_key)
    return Seal(manifest_sha256=sha256_file(folder / MANIFEST), signing_key_sha256=keys.fingerprint,
                files=len(manifest["files"]))


@dataclass(frozen=True)
class FolderCheck:
    """What checking a model folder found: every problem (each naming the file or the key), the signature's own
    verdict among them, and how many files its manifest lists."""

    problems: list[str]
    signature_problem: str | None
    files_listed: int

    @property
    def signature_verified(self) -> bool:
        return self.signature_problem is None


def check_model_folder(folder: Path, public_key: Path | None, expected_manifest_sha256: str | None) -> FolderCheck:
    """The folder against its manifest, the manifest against the version's tag, the signature against the key."""
    folder = Path(folder)
    problems = manifest_problems(folder, UNLISTED, hidden=True)
    try:
        listed = len(read_manifest(folder)["files"])
    except ManifestError:
        listed = 0
    if not expected_manifest_sha256:
        problems.append("the version has no manifest_sha256 tag, so its manifest cannot be tied to the registration")
    elif (folder / MANIFEST).is_file() and sha256_file(folder / MANIFEST) != expected_manifest_sha256:
        problems.append(f"{MANIFEST}: sha256 {sha256_file(folder / MANIFEST)[:16]}... is not the "
                        f"{expected_manifest_sha256[:16]}... registered with the version: the manifest was replaced")
    signature_problem = None
    if public_key is None:
        signature_problem = ("no public key to check the signature with (signing_public_key): refusing an "
                             "unverifiable version")
    else:
        try:
            verify_folder(folder, Path(public_key))
        except SigningError as exc:
            signature_problem = str(exc)
    if signature_problem:
        problems.append(signature_problem)
    return FolderCheck(problems=problems, signature_problem=signature_problem, files_listed=listed)


def model_folder_problems(folder: Path, public_key: Path | None, expected_manifest_sha256: str | None) -> list[str]:
    """Every way the folder fails its seal (empty when it passes), each naming the file or the key."""
    return check_model_folder(folder, public_key, expected_manifest_sha256).problems


def verify_model_folder(folder: Path, public_key: Path | None, expected_manifest_sha256: str | None) -> int:
    """The number of files verified; `ModelFolderError` naming the first problem (and how many more) otherwise."""
    check = check_model_folder(folder, public_key, expected_manifest_sha256)
    if check.problems:
        more = f" (and {len(check.problems) - 1} more)" if len(check.problems) > 1 else ""
        raise ModelFolderError(f"{Path(folder)}: {check.problems[0]}{more}")
    return check.files_listed
