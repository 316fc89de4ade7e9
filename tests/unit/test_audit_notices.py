"""The notice on the audit log: its template version and keyed hash in the chain, its text sealed with the inputs,
an edit named by --verify's walk, and stores written before these fields still verifying (core/audit/)."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

from audit_support import db_path, edit_record_and_rehash, keyed_store, raw_bytes, record

from core.audit import AuditStore

NOTICE = "Notice about your application\n1. Your debt is too high compared with your income\nJob title: nurse Wyoming\n"


def noticed(i: int) -> dict:
    return record(i, decision=1, notice=NOTICE.replace("nurse", f"nurse {i}"), notice_template_version="3",
                  notice_sha256=hashlib.sha256(NOTICE.replace("nurse", f"nurse {i}").encode()).hexdigest())


def test_the_notice_is_sealed_hashed_with_the_key_and_read_back_by_the_key_holder(tmp_path: Path):
    store = keyed_store(tmp_path)
    store.append([noticed(1), record(2)])
    got = store.get("d-00001")
    assert got.notice == NOTICE.replace("nurse", "nurse 1") and got.notice_template_version == "3"
    plain = hashlib.sha256(got.notice.encode()).hexdigest()
    assert got.notice_sha256 == store.notice_hash(got.notice) != plain  # keyed: candidates cannot be hashed
    assert store.get("d-00002").notice is None and store.get("d-00002").notice_sha256 is None
    assert b"nurse 1" not in raw_bytes(store) and b"too high compared" not in raw_bytes(store)
    assert store.verify().ok


def test_a_changed_notice_version_or_a_removed_notice_hash_is_named(tmp_path: Path):
    for change in ({"notice_template_version": "2"}, {"notice_sha256": None}):
        home = tmp_path / str(len(change) + len(str(change)))
        store = keyed_store(home)
        store.append([noticed(i) for i in range(1, 6)])
        edit_record_and_rehash(store, 3, **change)
        check = store.verify()
        assert not check.ok and check.first_bad_seq == 3, (change, check.problems)


def test_a_store_written_before_notice_fields_still_verifies_and_takes_notices_after(tmp_path: Path):
    store = keyed_store(tmp_path)
    store.append([record(i) for i in range(1, 4)])
    with sqlite3.connect(db_path(store)) as conn:  # the table as it was before this change
        for column in ("notice", "notice_sha256", "notice_template_version"):
            conn.execute(f"ALTER TABLE audit_decisions DROP COLUMN {column}")
    store.engine.dispose()
    reopened = AuditStore(store.url, store.keys, checkpoint_interval=0)  # migrates: the columns come back empty
    assert reopened.verify().ok
    reopened.append([noticed(4)])
    check = reopened.verify()
    assert check.ok, check.problems
    assert reopened.get("d-00004").notice_template_version == "3" and reopened.get("d-00001").notice is None


def test_an_unkeyed_store_keeps_the_plain_hash(tmp_path: Path):
    store = AuditStore(f"sqlite:///{tmp_path / 'plain.db'}")
    store.append([noticed(1)])
    got = store.get("d-00001")
    assert got.notice_sha256 == hashlib.sha256(got.notice.encode()).hexdigest() == store.notice_hash(got.notice)
    assert store.verify().ok
