"""The audit log's secrets: which keys, what they authenticate and encrypt, and how (Dagster-free).

Two keys live outside the database, in the keys folder (core/keys.py):

- `audit-mac.key` (HMAC-SHA256). Sub-keys derived from it (HMAC of a label) authenticate each record of the
  decision chain and of the outcome chain, the chain heads and the checkpoints kept outside the store, and key
  the input hashes (so a redacted field with few possible values cannot be recovered by hashing candidates).
- `audit-enc.key` (AES-256-GCM). The applicant's fields (`inputs`) and the top factors (which quote their
  values) are encrypted together, into the `inputs` column (the `top_factors` column says so); the associated
  data binds the ciphertext to its decision id, so a ciphertext moved to another row does not decrypt.

A reader that needs a record's inputs but lacks `audit-enc.key` (or holds another one) gets them as
`SealedInputs`: any use raises `AuditKeyError`, which names the key file. Ciphertext is never handed out as data.
Verifying the chain needs only `audit-mac.key`: an auditor can check the log without reading applicants' data.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from core.audit.records import AuditError
from core.keys import KeyFileError, KeyMissing, load_or_create_secret, load_secret

MAC_KEY_FILE = "audit-mac.key"
ENC_KEY_FILE = "audit-enc.key"
SEAL_PREFIX = "aes256gcm:"  # a sealed column's text; plain JSON never starts like this
SEALED_WITH_INPUTS = SEAL_PREFIX + "with-inputs"  # top_factors: sealed in the inputs column's ciphertext
NONCE_BYTES = 12


class AuditKeyError(AuditError):
    """A key the audit log needs is missing or is not the one it was written with; the message names the file."""


def _keyed(key: bytes, label: bytes) -> hmac.HMAC:
    """HMAC-SHA256 keyed with a sub-key derived from `key` for one purpose (`label`)."""
    return hmac.new(hmac.new(key, label, hashlib.sha256).digest(), digestmod=hashlib.sha256)


def _fingerprint(key: bytes) -> str:
    """A public name for a key (not the key): which key wrote a store, so a wrong one is named, not guessed."""
    return hmac.new(key, b"intelligentops key id", hashlib.sha256).hexdigest()[:16]


def _optional(folder: Path, name: str) -> bytes | None:
    try:
        return load_secret(folder, name)
    except KeyMissing:
        return None
    except KeyFileError as exc:
        raise AuditKeyError(str(exc)) from None


@dataclass(frozen=True)
class AuditKeys:
    """The audit log's keys from one folder; either may be absent (a verifier needs only the MAC key)."""

    folder: Path
    mac: bytes | None = None
    enc: bytes | None = None

    @classmethod
    def load(cls, folder: Path | str) -> AuditKeys:
        """The keys present in `folder` (a key file readable by others is refused, naming it)."""
        folder = Path(folder)
        return cls(folder=folder, mac=_optional(folder, MAC_KEY_FILE), enc=_optional(folder, ENC_KEY_FILE))

    def created(self) -> AuditKeys:
        """These keys with the missing ones created (mode 0600, in a folder of mode 0700)."""
        try:
            return AuditKeys(folder=self.folder, mac=self.mac or load_or_create_secret(self.folder, MAC_KEY_FILE),
                             enc=self.enc or load_or_create_secret(self.folder, ENC_KEY_FILE))
        except KeyFileError as exc:
            raise AuditKeyError(str(exc)) from None

    @property
    def mac_path(self) -> Path:
        return self.folder / MAC_KEY_FILE

    @property
    def enc_path(self) -> Path:
        return self.folder / ENC_KEY_FILE

    @property
    def mac_id(self) -> str | None:
        return _fingerprint(self.mac) if self.mac else None

    @property
    def enc_id(self) -> str | None:
        return _fingerprint(self.enc) if self.enc else None


class Sealed:
    """Stands in for a record's encrypted field when it cannot be decrypted: any use raises, naming the key."""

    def __init__(self, message: str):
        self._message = message

    def _refuse(self, *_a: Any, **_k: Any) -> NoReturn:
        raise AuditKeyError(self._message)

    __getitem__ = __iter__ = __len__ = __contains__ = get = items = keys = values = copy = _refuse
    __bool__ = _refuse

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sealed) and other._message == self._message

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<sealed: {self._message}>"


class SealedInputs(Sealed, dict):  # type: ignore[misc]
    """A record's inputs that this reader cannot decrypt (a dict to the type checker; unusable in fact). It holds
    one entry naming the problem, so C code that reads a dict's storage directly sees that, never applicant data."""

    def __init__(self, message: str):
        super().__init__(message)
        dict.__setitem__(self, "<sealed>", message)


class SealedList(Sealed, list):  # type: ignore[misc]
    """A record's top factors that this reader cannot decrypt."""

    def __init__(self, message: str):
        super().__init__(message)
        list.append(self, f"<sealed: {message}>")


class Cipher:
    """MACs, keyed hashes and sealing under one store's keys; methods that need a missing key raise, naming it."""

    def __init__(self, keys: AuditKeys | None):
        self.keys = keys
        mac = keys.mac if keys else None
        # Keyed once; each MAC copies the keyed state (cheaper than keying HMAC again per record).
        self._chain = _keyed(mac, b"audit chain v1") if mac else None
        self._inputs = _keyed(mac, b"audit input hash v1") if mac else None
        self._aead = None
        if keys is not None and keys.enc:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            self._aead = AESGCM(keys.enc)

    # --- which keys there are ---
    @property
    def can_mac(self) -> bool:
        return self._chain is not None

    @property
    def can_seal(self) -> bool:
        return self._aead is not None

    def missing(self, which: str) -> AuditKeyError:
        if self.keys is None:
            return AuditKeyError(f"{which} is needed and this reader was given no keys folder: give the store its "
                                 "keys (INTELLIGENTOPS_KEYS_DIR, or the server config's keys_dir)")
        path = self.keys.mac_path if which == MAC_KEY_FILE else self.keys.enc_path
        return AuditKeyError(f"no key file {path}: point INTELLIGENTOPS_KEYS_DIR (or the server config's keys_dir) "
                             "at the folder the server writes the audit log with")

    # --- authentication ---
    def mac(self, kind: str, text: str) -> str:
        """HMAC-SHA256 of `kind` and `text` under the chain key (kinds keep a record's MAC from passing as a head's)."""
        if self._chain is None:
            raise self.missing(MAC_KEY_FILE)
        h = self._chain.copy()
        h.update(f"{kind}\n{text}".encode())
        return h.hexdigest()

    def mac_ok(self, kind: str, text: str, tag: str | None) -> bool:
        return tag is not None and hmac.compare_digest(self.mac(kind, text), tag)

    def input_hash(self, plain_sha256: str) -> str:
        """The keyed input hash: HMAC of the sha256 of the raw inputs, so candidates cannot be hashed and compared."""
        if self._inputs is None:
            raise self.missing(MAC_KEY_FILE)
        h = self._inputs.copy()
        h.update(plain_sha256.encode())
        return h.hexdigest()

    # --- encryption ---
    @staticmethod
    def _aad(decision_id: str, column: str) -> bytes:
        return f"intelligentops audit v1\n{column}\n{decision_id}".encode()

    def seal(self, text: str, decision_id: str, column: str) -> str:
        if self._aead is None:
            raise self.missing(ENC_KEY_FILE)
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, text.encode(), self._aad(decision_id, column))
        return SEAL_PREFIX + base64.b64encode(nonce + sealed).decode("ascii")

    def unseal(self, stored: str, decision_id: str, column: str, seq: int) -> str:
        """The plain text of a sealed column; AuditKeyError (naming the key file) when it cannot be had."""
        if self._aead is None:
            raise AuditKeyError(f"the {column} of seq {seq} (decision {decision_id}) are encrypted and cannot be "
                                f"read: {self.missing(ENC_KEY_FILE)}")
        from cryptography.exceptions import InvalidTag  # a function-level import: the code location never pays it

        try:
            raw = binascii.a2b_base64(stored[len(SEAL_PREFIX):], strict_mode=True)
            return self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], self._aad(decision_id, column)).decode()
        except (InvalidTag, ValueError, binascii.Error):
            raise AuditKeyError(
                f"the {column} of seq {seq} (decision {decision_id}) do not decrypt under "
                f"{self.keys.enc_path if self.keys else ENC_KEY_FILE}: another key wrote them, or they were altered "
                "or moved from another record (run python -m orchestration.decisions --verify)") from None


def is_sealed(stored: str) -> bool:
    return stored.startswith(SEAL_PREFIX)
