"""File digests and atomic writes on local paths (Dagster-free; the object-store variant is resources.storage).

`workloads/model_code.py` keeps its own sha256 helper on purpose: it ships alone inside the MLflow model.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write_local(path: Path | str, data: bytes, mode: int | None = None) -> None:
    """Write all of `data` or nothing: a temporary file beside the target, flushed to disk, renamed over it.

    `mode` (e.g. 0o600) is set on the temporary file before any byte is written, so a secret is never readable
    by others, not even for an instant.
    """
    local = Path(path)
    local.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{local.name}.", suffix=".tmp", dir=local.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, local)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_bytes(obj: Any) -> bytes:
    """The project's JSON file format: indented, keys sorted, anything unknown as its str()."""
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()


def atomic_write_json_local(path: Path | str, obj: Any, mode: int | None = None) -> None:
    atomic_write_local(path, json_bytes(obj), mode=mode)
