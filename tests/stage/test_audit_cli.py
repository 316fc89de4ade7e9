"""The insider's attacks on the real store files, each caught by the real `python -m orchestration.decisions
--verify` (a subprocess) naming the first bad seq; the decisions CLI decrypting an applicant's fields for who holds
the key, and refusing clearly without it."""

from __future__ import annotations

from pathlib import Path

import pytest
from audit_support import (cli, delete_and_renumber, edit_record_and_rehash, flip_outcome_and_rehash, head_row,
                           record, truncate_and_restore_head)

from core.audit import AuditStore, default_audit_url


def served_store(home: Path) -> tuple[AuditStore, dict]:
    """The store as the code location opens it (AuditResource: keys in <home>/keys), 30 decisions, 3 outcomes."""
    from resources import resources_for
    from resources.settings import Settings

    store = resources_for(Settings.from_env({"INTELLIGENTOPS_HOME": str(home)}))["audit"].store()
    store._checkpointer.interval = 0  # a checkpoint per commit, so the test needs no sleep
    saved: dict = {}
    for b in range(6):
        store.append([record(b * 5 + i) for i in range(5)])
        if b == 2:
            saved = head_row(store)
    store.record_outcome("d-00003", 1, key_id="lender")
    store.record_outcome("d-00004", 0, key_id="lender")
    store.record_outcome("d-00005", 1, key_id="servicer")
    return store, saved


ATTACKS = {
    "edit a record and recompute the hashes and head": (
        lambda store, saved: edit_record_and_rehash(store, 7, probability=0.99, decision=1), "FIRST BAD SEQ: 7",
        "seq 7 (decision d-00006) does not match its MAC"),
    "truncate the tail and put an older head back": (
        lambda store, saved: truncate_and_restore_head(store, saved), "FIRST BAD SEQ: 16",
        "seq 16..30 missing at the end of the decisions chain"),
    "flip an outcome and recompute the outcome chain": (
        lambda store, saved: flip_outcome_and_rehash(store, 2), "FIRST BAD OUTCOME EVENT: 2",
        "outcome event 2 (decision seq 5, d-00004) does not match its MAC"),
    "delete a record from the middle and close the gap": (
        lambda store, saved: delete_and_renumber(store, 12), "FIRST BAD SEQ: 12",
        "seq 12 (decision d-00012) does not match its MAC"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_each_insider_attack_fails_verification_naming_the_first_bad_seq(tmp_path: Path, attack: str):
    home = tmp_path / "home"
    store, saved = served_store(home)
    before = cli(home, "--verify")
    assert before.returncode == 0 and "verifies: 30 records, 3 outcome events" in before.stdout, before.stdout
    tamper, first, problem = ATTACKS[attack]
    tamper(store, saved)
    after = cli(home, "--verify")
    assert after.returncode == 1, after.stdout + after.stderr
    assert "does NOT verify" in after.stdout and first in after.stdout and problem in after.stdout, after.stdout


def test_an_old_unkeyed_store_still_verifies_and_says_so(tmp_path: Path):
    home = tmp_path / "home"
    AuditStore(default_audit_url(str(home))).append([record(i) for i in range(12)])  # written before keys
    out = cli(home, "--verify")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "verifies: 12 records" in out.stdout
    assert "rule: decisions: 12 verified under the old unkeyed rule" in out.stdout


def test_the_cli_shows_decrypted_inputs_to_the_key_holder_and_a_clear_error_without_the_key(tmp_path: Path):
    home = tmp_path / "home"
    served_store(home)
    shown = cli(home, "d-00003")
    assert shown.returncode == 0, shown.stderr
    assert "title: 'engineer 3'" in shown.stdout and "state: 'Wyoming'" in shown.stdout
    assert "income: value 1003.0" in shown.stdout

    auditor = tmp_path / "auditor"  # the MAC key only: verifies the log, cannot read applicants
    auditor.mkdir(mode=0o700)
    (auditor / "audit-mac.key").write_bytes((home / "keys" / "audit-mac.key").read_bytes())
    (auditor / "audit-mac.key").chmod(0o600)
    sealed = cli(home, "d-00003", keys=auditor)
    assert sealed.returncode == 1
    assert f"no key file {auditor / 'audit-enc.key'}" in sealed.stderr
    assert "engineer 3" not in sealed.stdout and "aes256gcm:" not in sealed.stdout + sealed.stderr
    assert "decision: 1 = POSITIVE" in sealed.stdout  # what is not secret is still shown
    as_json = cli(home, "d-00003", "--json", keys=auditor)
    assert as_json.returncode == 1 and "audit-enc.key" in as_json.stderr and "aes256gcm:" not in as_json.stdout
    assert cli(home, "--verify", keys=auditor).returncode == 0


def test_an_outcome_correction_needs_a_reason_and_is_kept_beside_the_first(tmp_path: Path):
    home = tmp_path / "home"
    served_store(home)
    assert cli(home, "d-00010", "--outcome", "1").returncode == 0
    refused = cli(home, "d-00010", "--outcome", "0")
    assert refused.returncode == 1 and "a different outcome is a correction: send it with a reason" in refused.stderr
    assert cli(home, "d-00010", "--outcome", "0", "--reason", "repaid after all").returncode == 0
    shown = cli(home, "d-00010").stdout
    assert "(correction: repaid after all; outcome event 5)" in shown
    assert "label by rule: first: 1, latest: 0, unanimous: none (disputed)" in shown
