"""The model-signing key pair, and signatures over a model folder with OpenSSF `model-signing` (key mode, offline).

The pair lives in the keys folder (`$INTELLIGENTOPS_KEYS_DIR`, default `$INTELLIGENTOPS_HOME/keys/`; see
docs/pipelines.md): `model-signing.key`, an ECDSA P-256 private key (PEM, PKCS#8, mode 0600, refused when group or
others can read it) and `model-signing.pub`, its public key (PEM). Registration signs each version's model folder
with the private key; the integrity gate and the inference server verify with the public key alone. Locally the
pair is created on first use; on a cluster the folder is a mounted Secret and a missing key is an error that says
how to make one.

`model.sig` is a Sigstore bundle as `model_signing sign key` writes it: a signed statement of the sha256 of every
file in the folder except `model.sig` itself (nothing else is left out: dot-files and git files are signed too),
so anyone can check a version with the upstream CLI and the public key:

    model_signing verify key --signature MODEL_DIR/model.sig --public_key model-signing.pub MODEL_DIR

The key's fingerprint (`fingerprint`) is the sha256 of its DER SubjectPublicKeyInfo, the same as
`openssl pkey -pubin -in model-signing.pub -outform DER | sha256sum`. Dagster-free; `model_signing` and
`cryptography` are imported inside the functions.
"""

from __future__ import annotations

import hashlib
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from core.files import atomic_write_local

SIGNATURE = "model.sig"
PRIVATE_KEY = "model-signing.key"
PUBLIC_KEY = "model-signing.pub"


class SigningError(RuntimeError):
    """A key that cannot be used, or a folder whose signature does not verify; the message names the file."""


@dataclass(frozen=True)
class SigningKeys:
    """Where the pair is, and the public key's fingerprint."""

    private_key: Path
    public_key: Path
    fingerprint: str


def fingerprint(public_key: Path) -> str:
    """sha256 of the public key's DER SubjectPublicKeyInfo (what `openssl pkey -pubin -outform DER` writes)."""
    from cryptography.hazmat.primitives import serialization

    key = _read_public(public_key)
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _read_public(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise SigningError(f"{path}: no model-signing public key there; copy model-signing.pub from the keys folder "
                           "of the code location that registers the models") from None
    except ValueError as exc:
        raise SigningError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise SigningError(f"{path}: not an ECDSA P-256 public key; model signing uses P-256")
    return key


def _check_private_mode(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SigningError(f"{path}: the model-signing private key is readable by group or others (mode {mode:o}); "
                           f"run `chmod 600 {path}`")


def _write_pair(folder: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    # The public key first: a private key alone is never left behind as the newest file.
    atomic_write_local(folder / PUBLIC_KEY, public, mode=0o644)
    atomic_write_local(folder / PRIVATE_KEY, private, mode=0o600)


def signing_keys(folder: Path, create: bool) -> SigningKeys:
    """The pair in `folder`, created when absent and `create` (a local home); refuses a private key others can
    read, a public key that is not the private key's, and (without `create`) a missing key, naming the file."""
    from cryptography.hazmat.primitives import serialization

    folder = Path(folder)
    private, public = folder / PRIVATE_KEY, folder / PUBLIC_KEY
    if not private.is_file():
        if not create:
            raise SigningError(
                f"{private}: no model-signing private key. On a cluster, make the pair once and store it in the "
                "keys Secret: `openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out "
                f"{PRIVATE_KEY}; openssl ec -in {PRIVATE_KEY} -pubout -out {PUBLIC_KEY}`")
        if public.exists():
            raise SigningError(f"{public} exists without its private key {private}: restore the private key, or "
                               "move the public key away to make a new pair (versions signed by the old key will "
                               "then be refused)")
        _write_pair(folder)
    _check_private_mode(private)
    try:
        key = serialization.load_pem_private_key(private.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{private}: not an unencrypted PEM private key ({exc})") from None
    derived = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    if not public.is_file():
        atomic_write_local(public, key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), mode=0o644)
    stated = _read_public(public).public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    if stated != derived:
        raise SigningError(f"{public} is not the public key of {private}: put the matching pair in {folder}")
    return SigningKeys(private_key=private, public_key=public, fingerprint=hashlib.sha256(derived).hexdigest())


def sign_folder(folder: Path, private_key: Path) -> Path:
    """Write `folder/model.sig`: model-signing's signature over every file of `folder` but the signature."""
    from model_signing import hashing, signing

    folder = Path(folder)
    _check_private_mode(Path(private_key))
    (folder / SIGNATURE).unlink(missing_ok=True)
    config = signing.Config().use_elliptic_key_signer(private_key=Path(private_key))
    config.set_hashing_config(hashing.Config().set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=False))
    config.sign(folder, folder / SIGNATURE)
    return folder / SIGNATURE


def verify_folder(folder: Path, public_key: Path) -> None:
    """Check `folder/model.sig` against `public_key` and every file of `folder`; `SigningError` names what
    differs (a file changed, added or missing, a signature by another key, or no signature)."""
    from model_signing import hashing, verifying

    folder = Path(folder)
    signature = folder / SIGNATURE
    if not signature.is_file():
        raise SigningError(f"{signature}: the version is not signed (no {SIGNATURE})")
    _read_public(public_key)
    config = verifying.Config().use_elliptic_key_verifier(public_key=Path(public_key))
    config.set_hashing_config(hashing.Config().set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=False))
    try:
        config.verify(folder, signature)
    except Exception as exc:  # model-signing raises ValueError and its own errors, each naming what differs
        raise SigningError(f"{signature}: {_plain(str(exc), public_key)}") from None


def _plain(message: str, public_key: Path) -> str:
    """model-signing's verdict in a sentence that names the files (its own message prints raw digests)."""
    changed = re.findall(r"Hash mismatch for \\?'([^'\\]+)\\?'", message)
    extra = re.search(r"Extra files found in model '[^']*': ([^\]\"]+)", message)
    missing = re.search(r"Missing files in model '[^']*': ([^\]\"]+)", message)
    parts = []
    if changed:
        parts.append(f"changed after signing: {', '.join(changed)}")
    if extra:
        parts.append(f"not signed (added after signing): {extra.group(1).strip(' ,')}")
    if missing:
        parts.append(f"signed but missing: {missing.group(1).strip(' ,')}")
    if parts:
        return "the signature does not match the folder: " + "; ".join(parts)
    return (f"not a valid signature by the trusted key {public_key} (fingerprint "
            f"{fingerprint(public_key)[:16]}...): {' '.join(message.split())[:400]}")
