"""One manifest format and one strictness for every folder the project writes and later trusts.

`manifest.json` in a folder holds `{"algorithm": "sha256", "files": {<relative POSIX path>: <sha256>}, ...}`
plus whatever the writer adds beside `files` (a model's architecture and calibration, say). Verification is
strict in one way everywhere: every file listed must be present with that digest, and every file present must
be listed; a missing, changed or extra file is an error that names it. Only the manifest itself and dot-files
(markers such as `.complete` that a cache writes after verifying) are not listed.

Used for: the trained model (training's export, registration, the integrity gate, every server load), the
drift detector bundles, and training checkpoints' completion markers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.files import atomic_write_json_local, sha256_file

MANIFEST = "manifest.json"
ALGORITHM = "sha256"


class ManifestError(ValueError):
    """A folder does not match its manifest; the message names the folder and the first file that differs."""


def listed_files(folder: Path) -> list[Path]:
    """Every file a manifest of `folder` must list: all regular files below it but the manifest and dot-files."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.name != MANIFEST and not any(part.startswith(".")
                                                                    for part in p.relative_to(folder).parts))


def digests(folder: Path) -> dict[str, str]:
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in listed_files(folder)}


def write_manifest(folder: Path, **extra: Any) -> dict[str, Any]:
    """Hash every file of `folder` and write `manifest.json` atomically; returns what was written."""
    if "files" in extra or "algorithm" in extra:
        raise ValueError("write_manifest: 'files' and 'algorithm' are the manifest's own keys")
    manifest = {"algorithm": ALGORITHM, "files": digests(folder), **extra}
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


def manifest_problems(folder: Path) -> list[str]:
    """Every way `folder` differs from its manifest (empty when it matches), each naming the file."""
    folder = Path(folder)
    try:
        expected = read_manifest(folder)["files"]
    except ManifestError as exc:
        return [str(exc)]
    present = {p.relative_to(folder).as_posix() for p in listed_files(folder)}
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


def verify_manifest(folder: Path, expected_sha256: str | None = None) -> dict[str, Any]:
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
    problems = manifest_problems(folder)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ManifestError(f"{folder}: {problems[0]}{more}")
    return manifest
