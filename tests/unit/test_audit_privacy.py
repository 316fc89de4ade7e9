"""Private at rest: applicant fields encrypted in the store's files, keyed input hashes, files created 0600, and a
reader without the encryption key gets an error naming the key file, never ciphertext as data."""

import os
import stat
from pathlib import Path

import pytest
from audit_support import SPEC, keyed_store, raw_bytes, record, sql

from core.audit import AuditKeyError, AuditKeys, AuditStore, default_audit_url, input_hash, redact
from core.audit.traffic import record_features

STATES = ["Alabama", "Alaska", "Arizona", "Arkansas", "California", "Colorado", "Connecticut", "Delaware",
          "Florida", "Georgia", "Hawaii", "Idaho", "Illinois", "Indiana", "Iowa", "Kansas", "Kentucky", "Louisiana",
          "Maine", "Maryland", "Wyoming"]


def applicant(i: int) -> dict:
    """Values that cannot occur in a SQLite file by chance."""
    return {**record(i), "inputs": {"title": f"pediatric-nurse-{i:04d}", "employer": f"Zorblax Widgets {i}",
                                    "income": 71234.5 + i, "state": "Wyoming"},
            "top_factors": [{"feature": "title", "value": f"pediatric-nurse-{i:04d}", "contribution": 0.3}]}


def test_the_database_files_hold_no_applicant_field_in_plain_text(tmp_path: Path):
    store = keyed_store(tmp_path)
    for b in range(5):
        store.append([applicant(b * 20 + i) for i in range(20)])
    assert store.get("d-00007").inputs["title"] == "pediatric-nurse-0007"  # the holder of the key reads it
    raw = raw_bytes(store)
    assert len(raw) > 10_000
    for needle in (b"pediatric-nurse", b"Zorblax", b"71241.5", b"Wyoming"):
        assert needle not in raw, needle
    # The same records in a plain store (a store written before keys) do show them: the grep can see.
    plain = AuditStore(default_audit_url(str(tmp_path / "plain")))
    plain.append([applicant(i) for i in range(20)])
    assert b"pediatric-nurse" in raw_bytes(plain) and b"Zorblax" in raw_bytes(plain)


def test_a_redacted_field_cannot_be_recovered_by_hashing_candidates(tmp_path: Path):
    """The attack on the unkeyed hash: for each candidate value, hash the known fields with it and compare."""
    raw = applicant(3)["inputs"]
    known = redact(raw, ["state"])

    def guess(stored_hash: str) -> str | None:
        for state in STATES:
            if input_hash({**known, "state": state}) == stored_hash:
                return state
        return None

    for store, recovered in ((AuditStore(default_audit_url(str(tmp_path / "plain"))), "Wyoming"),
                             (keyed_store(tmp_path / "keyed"), None)):
        store.append([{**applicant(3), "input_hash": input_hash(raw), "inputs": known}])
        stored = store.get("d-00003")
        assert stored.inputs["state"] == "<redacted>"
        assert guess(stored.input_hash) == recovered
        assert stored.input_hash == store.input_hash(raw)  # who holds the key can still prove the inputs


def test_store_files_are_created_0600_even_under_an_open_umask(tmp_path: Path):
    old = os.umask(0)
    try:
        store = keyed_store(tmp_path)
        store.append([record(1)])
        store.record_outcome("d-00001", 1)
    finally:
        os.umask(old)
    folder = tmp_path / "audit"
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["audit.checkpoints.jsonl", "audit.db", "audit.db-shm", "audit.db-wal"]
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {f: 0o600 for f in files}
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "keys").iterdir()} == {0o600}


def test_a_store_created_world_readable_before_is_made_private_when_opened(tmp_path: Path):
    store = AuditStore(default_audit_url(str(tmp_path)))
    store.append([record(1)])
    db = Path(store.url.split(":///", 1)[1])
    db.chmod(0o644)
    AuditStore(store.url)
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_a_reader_without_the_encryption_key_gets_an_error_naming_it(tmp_path: Path):
    store = keyed_store(tmp_path)
    store.append([applicant(1)])
    verifier_keys = tmp_path / "auditor"  # holds only the MAC key: may verify, may not read applicants
    verifier_keys.mkdir(mode=0o700)
    (verifier_keys / "audit-mac.key").write_bytes((tmp_path / "keys" / "audit-mac.key").read_bytes())
    (verifier_keys / "audit-mac.key").chmod(0o600)
    reader = AuditStore(store.url, AuditKeys.load(verifier_keys))
    rec = reader.get("d-00001")
    assert rec.decision == applicant(1)["decision"] and rec.probability == applicant(1)["probability"]
    for use in (lambda: rec.inputs["title"], lambda: list(rec.inputs.items()), lambda: rec.top_factors[0],
                lambda: record_features(rec, ["title"])):
        with pytest.raises(AuditKeyError, match=rf"no key file {verifier_keys / 'audit-enc.key'}"):
            use()
    assert not (verifier_keys / "audit-enc.key").exists()  # a keyed store never gets a new key minted
    assert reader.verify().ok  # the MAC key alone verifies the log
    with pytest.raises(AuditKeyError, match="audit-enc.key"):
        reader.append([record(2)])


def test_a_ciphertext_moved_to_another_record_does_not_decrypt(tmp_path: Path):
    """Swapping two applicants' encrypted fields: the associated data binds each to its decision id."""
    store = keyed_store(tmp_path)
    store.append([applicant(1), applicant(2)])
    sql(store, "UPDATE audit_decisions SET inputs = (SELECT inputs FROM audit_decisions WHERE seq = 2) WHERE seq = 1")
    with pytest.raises(AuditKeyError, match=r"seq 1 \(decision d-00001\) do not decrypt.*moved from another record"):
        store.get("d-00001").inputs.get("title")
    assert store.verify().first_bad_seq == 1


def test_traffic_readers_get_decrypted_inputs(tmp_path: Path):
    from core.audit.traffic import all_traffic

    store = keyed_store(tmp_path)
    store.append([applicant(i) for i in range(3)])
    assert [record_features(r, ["title", "state"]) for r in all_traffic(store, SPEC)] == [
        {"title": f"pediatric-nurse-{i:04d}", "state": "Wyoming"} for i in range(3)]
