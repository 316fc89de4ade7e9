"""One manifest format and one strictness for every folder the project writes and later trusts.

`manifest.json` in a folder holds `{"algorithm": "sha256", "files": {<relative POSIX path>: <sha256>}, ...}`
plus whatever the writer adds beside `files` (a model's architecture and calibration, say). Verification is
strict in one way everywhere: every file listed must be present with that digest, and every file present must
be listed; a missing, changed or extra file is an error that names it. Only the folder's own top-level
`manifest.json` and dot-files (markers such as `.complete` that a cache writes after verifying) are not listed;
a folder that must hide nothing (a registered model's) is written and checked with `hidden=True`, which lists
dot-files too, and may name other top-level files that are not listed (`unlisted`, e.g. the `model.sig` that
signs the manifest, which cannot list what is made after it). A manifest.json below the top is a file like any
other.

Used for: the trained model (training's export; the registered version's whole folder at registration, in the
integrity gate and at every server load: core/model_folder.py), the drift detector bundles, and training
checkpoints' completion markers.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

from core.files import atomic_write_json_local, sha256_file

MANIFEST = "manifest.json"
ALGORITHM = "sha256"


class ManifestError(ValueError):
    """A folder does not match its manifest; the message names the folder and the first file that differs."""


def listed_files(folder: Path, unlisted: Collection[str] = (), hidden: bool = False) -> list[Path]:
    """Every file a manifest of `folder` must list: all files below it but its top-level manifest, the top-level
    names in `unlisted`, and (unless `hidden`) dot-files."""
    folder = Path(folder)
    skip = {MANIFEST, *unlisted}
    found = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if not p.is_file() or rel.as_posix() in skip:
            continue
        if not hidden and any(part.startswith(".") for part in rel.parts):
            continue
        found.append(p)
    return sorted(found)


def digests(folder: Path, unlisted: Collection[str] = (), hidden: bool = False) -> dict[str, str]:
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in listed_files(folder, unlisted, hidden)}


def write_manifest(folder: Path, *, unlisted: Collection[str] = (), hidden: bool = False,
                   **extra: Any) -> dict[str, Any]:
    """Hash every file of `folder` and write `manifest.json` atomically; returns what was written."""
    if "files" in extra or "algorithm" in extra:
        raise ValueError("write_manifest: 'files' and 'algorithm' are the manifest's own keys")
    manifest = {"algorithm": ALGORITHM, "files": digests(folder, unlisted, hidden), **extra}
    atomic_write_json_local(Path(folder) / MANIFEST, manifest)
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest, so the files in {path.parent} cannot be verified")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in files.items()):
            raise TypeError("'files' is not a map of path to sha256")
    except (ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"{path}: unreadable manifest ({exc})") from None
    if manifest.get("algorithm", ALGORITHM) != ALGORITHM:
        raise ManifestError(f"{path}: algorithm {manifest.get('algorithm')!r}; only {ALGORITHM} is read")
    return manifest


def manifest_problems(folder: Path, unlisted: Collection[str] = (), hidden: bool = False) -> list[str]:
    """Every way `folder` differs from its manifest (empty when it matches), each naming the file."""
    folder = Path(folder)
    try:
        expected = read_manifest(folder)["files"]
    except ManifestError as exc:
        return [str(exc)]
    present = {p.relative_to(folder).as_posix() for p in listed_files(folder, unlisted, hidden)}
    problems = []
    for rel, digest in sorted(expected.items()):
        if rel not in present:
            problems.append(f"{rel}: listed in {MANIFEST} but missing")
        elif (actual := sha256_file(folder / rel)) != digest:
            problems.append(f"{rel}: sha256 {actual[:16]}... does not match {MANIFEST} ({digest[:16]}...): the "
                            "file was changed after the manifest was written")
    for rel in sorted(present - set(expected)):
        problems.append(f"{rel}: not listed in {MANIFEST}: a file was added after the manifest was written")
    return problems


def verify_manifest(folder: Path, expected_sha256: str | None = None, unlisted: Collection[str] = (),
                    hidden: bool = False) -> dict[str, Any]:
    """The manifest of `folder`, after checking it strictly; raise `ManifestError` naming what differs.

    `expected_sha256`, when given, is the digest the manifest file itself must have (a registry tag, say), so
    a manifest rewritten together with the files it lists is refused too.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if expected_sha256 is not None:
        actual = sha256_file(folder / MANIFEST)
        if actual != expected_sha256:
            raise ManifestError(f"{folder / MANIFEST}: sha256 {actual[:16]}... is not the {expected_sha256[:16]}... "
                                "recorded for it: the manifest was replaced")
    problems = manifest_problems(folder, unlisted, hidden)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ManifestError(f"{folder}: {problems[0]}{more}")
    return manifest
