"""Secrets kept outside the data they protect: one folder of named key files (Dagster-free).

The folder is `$INTELLIGENTOPS_KEYS_DIR` (read in resources/settings.py), else `<home>/keys/`; the server and the
workloads get its path from their config files, never the key bytes. Locally it is created with mode 0700 and
each key file with mode 0600, the mode set before any byte is written; on a cluster it is a mounted Kubernetes
Secret (give it `defaultMode: 0400`). A key file that group or others may read is refused, naming the file.

    audit-mac.key   HMAC-SHA256: the audit chain, its checkpoints and the keyed input hashes (core/audit/)
    audit-enc.key   AES-256-GCM: applicant fields at rest in the audit log (core/audit/)

A secret file holds its bytes as hex on one line (so it can be pasted into a Secret). Creating one is exclusive:
two processes that create the same key at once end up with the one that reached the folder first.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

__all__ = ["KeyFileError", "KeyInsecure", "KeyMissing", "check_private", "ensure_folder", "keys_dir",
           "load_or_create_secret", "load_secret", "read_private", "write_private_exclusive"]

FOLDER_MODE = 0o700
FILE_MODE = 0o600


class KeyFileError(RuntimeError):
    """A key that cannot be used; the message names the file and says what to do."""


class KeyMissing(KeyFileError):
    """The key file does not exist."""


class KeyInsecure(KeyFileError):
    """The key file may be read by group or others."""


def keys_dir(home: str, override: str | None = None) -> Path:
    """The keys folder: `override` (INTELLIGENTOPS_KEYS_DIR) when given, else `<home>/keys`."""
    if override:
        return Path(override).expanduser().resolve()
    if "://" in home:
        raise KeyFileError(f"the home {home} is not a local folder, so it cannot hold keys: set "
                        "INTELLIGENTOPS_KEYS_DIR to a local folder (on Kubernetes, a mounted Secret)")
    return Path(home) / "keys"


def ensure_folder(folder: Path | str) -> Path:
    """Create the keys folder (mode 0700) if it is missing; an existing one is left as it is (a mounted Secret)."""
    folder = Path(folder)
    if not folder.is_dir():
        folder.mkdir(parents=True, mode=FOLDER_MODE, exist_ok=True)
        os.chmod(folder, FOLDER_MODE)  # mkdir's mode is filtered by the umask; the folder must be exactly 0700
    return folder


def check_private(path: Path | str) -> None:
    """Refuse a key file that group or others may read or write (a Secret mounted with the default 0644 too)."""
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyInsecure(f"key file {path} is readable by others (mode {stat.S_IMODE(mode):04o}): run "
                          f"`chmod 600 {path}` (on Kubernetes mount the Secret with defaultMode: 0400)")


def read_private(path: Path | str) -> bytes:
    """The bytes of a key file after checking that only its owner may read it."""
    path = Path(path)
    if not path.is_file():
        raise KeyMissing(f"no key file {path}: point INTELLIGENTOPS_KEYS_DIR (or the server config's keys_dir) "
                         "at the folder that holds it (the server's keys folder, or the mounted Secret)")
    check_private(path)
    return path.read_bytes()


def write_private_exclusive(path: Path | str, data: bytes) -> bool:
    """Write `data` to `path` (mode 0600, set before any byte) unless the file exists; True when this call wrote
    it. The bytes go to a temporary file that is hard-linked into place, so a reader never sees half a key and a
    concurrent creator never replaces one."""
    path = Path(path)
    ensure_folder(path.parent)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # O_CREAT's mode is filtered by the umask; say it exactly
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)


def _decode(path: Path, raw: bytes, nbytes: int) -> bytes:
    try:
        key = bytes.fromhex(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise KeyFileError(f"key file {path} is not hex text; it should hold {nbytes} bytes as {2 * nbytes} hex "
                        "digits (delete it only if nothing was ever written with it)") from None
    if len(key) != nbytes:
        raise KeyFileError(f"key file {path} holds {len(key)} bytes; expected {nbytes}")
    return key


def load_secret(folder: Path | str, name: str, nbytes: int = 32) -> bytes:
    """The key `name` in `folder`; KeyMissing (naming the file) when it is not there."""
    path = Path(folder) / name
    return _decode(path, read_private(path), nbytes)


def load_or_create_secret(folder: Path | str, name: str, nbytes: int = 32) -> bytes:
    """The key `name` in `folder`, created (random, mode 0600) when it is not there yet."""
    path = Path(folder) / name
    if not path.exists():
        try:
            write_private_exclusive(path, (secrets.token_bytes(nbytes).hex() + "\n").encode())
        except OSError as exc:
            raise KeyFileError(f"cannot create key file {path} ({exc.strerror or exc}): make the folder writable, or "
                            f"put {name} there yourself ({nbytes} random bytes as hex, mode 0600)") from None
    return load_secret(folder, name, nbytes)
