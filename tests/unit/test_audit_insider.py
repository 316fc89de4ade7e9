"""An insider with write access to the database but not the keys folder, on the real SQLite file: each attack
recomputes every plain hash it can, and verification still names the first bad seq. (The same attacks through
the real `python -m orchestration.decisions --verify` are in tests/stage/test_audit_cli.py.)"""

import json
import sqlite3
from pathlib import Path

import pytest
from audit_support import (db_path, delete_and_renumber, edit_record_and_rehash, flip_outcome_and_rehash, head_row,
                           keyed_store, record, sql, truncate_and_restore_head)

from core.audit import AuditError, AuditKeyError, AuditKeys, AuditStore, default_audit_url


@pytest.fixture
def written(tmp_path: Path) -> tuple[AuditStore, dict]:
    """30 decisions in six commits (the head after the third saved, as an insider could), three outcomes."""
    store = keyed_store(tmp_path)
    saved = {}
    for b in range(6):
        store.append([record(b * 5 + i) for i in range(5)])
        if b == 2:
            saved = head_row(store)
    store.record_outcome("d-00003", 1, key_id="lender")
    store.record_outcome("d-00004", 0, key_id="lender")
    store.record_outcome("d-00005", 1, key_id="servicer")
    assert store.verify().ok and store.verify().checkpoints_checked > 0
    return store, saved


def fresh(store: AuditStore) -> AuditStore:
    """The store as a verifier opens it later, in another process."""
    return AuditStore(store.url, AuditKeys.load(Path(store.keys.folder)))


def test_an_edited_record_with_its_hashes_and_head_recomputed_is_named(written):
    store, _ = written
    edit_record_and_rehash(store, 7, probability=0.99, decision=1)
    v = fresh(store).verify()
    assert not v.ok and v.first_bad_seq == 7
    assert v.problems[0].startswith("seq 7 (decision d-00006) does not match its MAC")


def test_a_truncated_tail_with_an_authentic_old_head_put_back_is_named(written):
    store, saved = written
    truncate_and_restore_head(store, saved)  # the head row is one the server really wrote: its MAC verifies
    v = fresh(store).verify()
    assert not v.ok and v.first_bad_seq == 16
    assert "seq 16..30 missing at the end of the decisions chain" in v.problems[0]
    assert "says seq 30 existed" in v.problems[0]


def test_a_flipped_outcome_with_the_outcome_chain_recomputed_is_named(written):
    store, _ = written
    flip_outcome_and_rehash(store, 2)
    v = fresh(store).verify()
    assert not v.ok and v.first_bad_outcome_event == 2 and v.first_bad_seq is None
    assert v.problems[0].startswith("outcome event 2 (decision seq 5, d-00004) does not match its MAC")


def test_a_record_deleted_from_the_middle_and_the_gap_closed_is_named(written):
    store, _ = written
    delete_and_renumber(store, 12)
    v = fresh(store).verify()
    assert not v.ok and v.first_bad_seq == 12 and v.problems[0].startswith("seq 12 (decision d-00012)")


def test_a_writer_refuses_to_extend_a_rolled_back_head_and_later_writes_are_still_caught(written):
    store, saved = written
    truncate_and_restore_head(store, saved)
    with pytest.raises(AuditError, match="behind the 30 this process committed: the log was truncated"):
        store.append([record(100)])
    other = fresh(store)  # a process that never saw seq 30 writes on: its records have valid MACs
    other.append([record(101 + i) for i in range(20)])
    v = fresh(store).verify()
    assert not v.ok and v.first_bad_seq == 16
    assert any("rewritten after seq 15 (the last checkpoint it still matches)" in p for p in v.problems)


def test_a_head_that_fails_its_mac_is_not_extended(written):
    store, _ = written
    sql(store, "UPDATE audit_head SET seq = 29, hash = (SELECT record_hash FROM audit_decisions WHERE seq = 29) "
               "WHERE id = 1")
    sql(store, "DELETE FROM audit_decisions WHERE seq = 30")
    with pytest.raises(AuditError, match="does not match its MAC: it was rewritten"):
        fresh(store).append([record(100)])
    assert fresh(store).verify().first_bad_seq == 30


def test_a_downgrade_to_the_unkeyed_rule_is_named(written):
    """Mark the store unkeyed, drop every MAC and rewrite a record: the old rule alone would pass it."""
    store, _ = written
    sql(store, "UPDATE audit_head SET format = 1, keyed_from = NULL, mac = NULL")
    sql(store, "UPDATE audit_decisions SET mac = NULL")
    edit_record_and_rehash(store, 9, probability=0.5)
    v = fresh(store).verify()
    assert not v.ok and v.first_bad_seq == 1
    assert "an authenticated checkpoint says seq 1: the head was rewritten to downgrade the log" in v.problems[0]


def test_a_forged_or_foreign_checkpoint_is_named(written, tmp_path: Path):
    store, _ = written
    line = json.loads(store.checkpoint_path.read_text().splitlines()[-1])
    with open(store.checkpoint_path, "a") as fh:
        fh.write(json.dumps({**line, "seq": 31, "hash": "f" * 64}) + "\n")
    v = fresh(store).verify()
    assert not v.ok and any("checkpoint's MAC does not verify" in p and "line" in p for p in v.problems)
    assert v.first_bad_seq is None  # a forged checkpoint proves nothing about the records


def test_verifying_with_another_key_says_so(written, tmp_path: Path):
    store, _ = written
    v = AuditStore(store.url, AuditKeys.load(tmp_path / "other").created()).verify()
    assert not v.ok and any("was written under audit-mac.key id" in p for p in v.problems)


def test_an_old_unkeyed_store_still_verifies_says_so_and_is_keyed_from_its_next_record(tmp_path: Path):
    old = AuditStore(default_audit_url(str(tmp_path)))  # how every store was written before keys
    old.append([record(i) for i in range(8)])
    old.record_outcome("d-00002", 1)
    keys = AuditKeys.load(tmp_path / "keys")
    v = AuditStore(old.url, keys).verify()
    assert v.ok and v.rules[0].startswith("decisions: 8 verified under the old unkeyed rule")
    assert not (tmp_path / "keys").exists()  # reading makes no key
    upgraded = AuditStore(old.url, keys, checkpoint_interval=0)
    upgraded.append([record(8), record(9)])
    upgraded.record_outcome("d-00009", 0)
    v = upgraded.verify()
    assert v.ok and v.checked == 10
    assert v.rules[0] == ("decisions: seq 1..8 under the old unkeyed rule (written before the store was keyed), "
                          f"seq 9 on under the keyed rule (HMAC-SHA256, audit-mac.key id {upgraded.keys.mac_id})")
    assert "outcome event 1..1 under the old unkeyed rule" in v.rules[1]
    with pytest.raises(AuditKeyError, match="is keyed .* open it with its keys folder"):
        AuditStore(old.url).append([record(10)])  # an unkeyed writer cannot add plain rows any more
    # Rewriting an old record (hashes recomputed) breaks the link the first keyed record authenticates.
    edit_record_and_rehash(upgraded, 3, probability=0.77)
    v = AuditStore(old.url, AuditKeys.load(tmp_path / "keys")).verify()
    assert v.first_bad_seq == 9 and v.problems[0].startswith("seq 9 (decision d-00008) does not match its MAC")


def test_a_store_from_before_the_new_columns_and_the_outcome_chain_is_migrated(tmp_path: Path):
    old = AuditStore(default_audit_url(str(tmp_path)))
    old.append([record(i) for i in range(4)])
    with sqlite3.connect(db_path(old)) as conn:  # back to the schema of the first audit log
        for column in ("mac",):
            conn.execute(f"ALTER TABLE audit_decisions DROP COLUMN {column}")
        for column in ("format", "keyed_from", "key_id", "enc_key_id", "mac"):
            conn.execute(f"ALTER TABLE audit_head DROP COLUMN {column}")
        conn.execute("DELETE FROM audit_head WHERE id = 2")
        conn.execute("DROP TABLE audit_outcome_events")
        conn.execute("CREATE TABLE audit_outcomes (decision_id VARCHAR(64) PRIMARY KEY, outcome INTEGER NOT NULL, "
                     "at VARCHAR(40) NOT NULL)")
        conn.execute("INSERT INTO audit_outcomes VALUES ('d-00001', 1, '2025-01-01T00:00:00Z')")
    store = AuditStore(old.url, AuditKeys.load(tmp_path / "keys"))
    assert store.outcomes(["d-00001"]) == {"d-00001": 1}  # the old latest-outcome table became the events' start
    v = store.verify()
    assert v.ok and v.checked == 4 and any("events up to 1 were recorded before outcomes were chained" in r
                                           for r in v.rules)
    store.append([record(4)])
    store.record_outcome("d-00004", 1)
    assert store.verify().ok


def test_retention_keeps_working_with_the_authenticated_anchor(tmp_path: Path):
    store = keyed_store(tmp_path)
    store.append([record(i, time=f"2020-01-0{i + 1}T00:00:00.000000Z") for i in range(3)])
    store.append([record(3), record(4)])
    store.record_outcome("d-00001", 1)
    assert store.prune(older_than_days=183) == 3
    v = fresh(store).verify()
    assert v.ok and v.checked == 2, v.problems
    assert all(json.loads(line)["seq"] >= json.loads(line)["anchor_seq"] or json.loads(line)["chain"] == "outcomes"
               for line in store.checkpoint_path.read_text().splitlines())
    # Moving the anchor to hide more of the chain needs the head's MAC.
    sql(store, "DELETE FROM audit_decisions WHERE seq = 4")
    sql(store, "UPDATE audit_head SET anchor_seq = 4, anchor_hash = (SELECT prev_hash FROM audit_decisions "
               "WHERE seq = 5) WHERE id = 1")
    v = fresh(store).verify()
    assert not v.ok and any("head row (seq 5) does not match its MAC" in p for p in v.problems)
