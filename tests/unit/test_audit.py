"""The audit log on its own: chaining, tamper detection naming the row, retention, outcomes, concurrent writers.

Every test runs on a keyed store (the default: keys in a folder outside the database) and on a plain one (a
store written before keys, which must keep working and verifying under its old rule)."""

from pathlib import Path

import pytest
from audit_support import keyed_store, record, sql

from core.audit import AuditError, AuditStore, default_audit_url, input_hash, redact


@pytest.fixture(params=["keyed", "plain"])
def store(request, tmp_path: Path) -> AuditStore:
    if request.param == "keyed":
        return keyed_store(tmp_path)
    return AuditStore(default_audit_url(str(tmp_path)))


def keyed(store: AuditStore) -> bool:
    return store.keys is not None


def test_append_chains_and_reads_back(store: AuditStore, tmp_path: Path):
    assert store.latest_seq() == 0 and store.verify().ok
    written = store.append([record(i) for i in range(5)]) + store.append([record(5, variant="shadow")])
    assert [r.seq for r in written] == [1, 2, 3, 4, 5, 6]
    assert written[0].prev_hash == "0" * 64 and all(b.prev_hash == a.record_hash for a, b in zip(written, written[1:]))
    assert (tmp_path / "audit" / "audit.db").is_file()
    again = store.get("d-00002")
    assert again == written[2] and again.inputs["title"] == "engineer 2" and again.top_factors[0]["feature"] == "income"
    assert again.input_hash == store.input_hash(record(2)["inputs"]) and again.key_id == "ops"
    assert (again.input_hash == input_hash(record(2)["inputs"])) is not keyed(store)  # keyed: not the plain sha256
    assert [r.seq for r in store.read_after(2, limit=2)] == [3, 4]
    assert [r.seq for r in store.read_after(0, variants=("shadow",))] == [6]
    assert store.latest_seq() == 6 and store.latest_seq("loans") == 6 and store.latest_seq("other") == 0
    assert [r.decision_id for r in store.find(variant="shadow")] == ["d-00005"]
    assert len(store.find(model_version="1", limit=3)) == 3
    assert store.find(since="2000-01-01T00:00:00", until="2000-01-02T00:00:00") == []
    v = store.verify()
    assert v.ok and v.checked == 6 and v.problems == [] and v.first_bad_seq is None
    # Reopening the same file continues the chain.
    reopened = keyed_store(tmp_path) if keyed(store) else AuditStore(store.url)
    assert reopened.append([record(7)])[0].seq == 7 and reopened.verify().ok


def test_bad_records_are_refused_whole(store: AuditStore):
    with pytest.raises(AuditError, match="variant 'blue'"):
        store.append([record(1), record(2, variant="blue")])
    with pytest.raises(AuditError, match="lacks model_version"):
        store.append([record(3, model_version=None)])
    assert store.latest_seq() == 0


def test_edited_record_is_named(store: AuditStore):
    store.append([record(i) for i in range(10)])
    sql(store, "UPDATE audit_decisions SET probability = 0.01, decision = 0 WHERE decision_id = ?", "d-00006")
    v = store.verify()
    assert not v.ok and v.checked == 10 and v.first_bad_seq == 7
    assert "seq 7 (decision d-00006)" in v.problems[0] and "edited" in v.problems[0]


def test_edited_inputs_of_a_record_are_named(store: AuditStore):
    store.append([record(i) for i in range(4)])
    # Plain: the text is there to edit. Keyed: the ciphertext is edited blind (a byte flipped).
    sql(store, "UPDATE audit_decisions SET inputs = replace(inputs, 'car', 'boat') WHERE seq = 2")
    sql(store, "UPDATE audit_decisions SET inputs = substr(inputs, 1, 40) || 'AAAA' || substr(inputs, 45) "
               "WHERE seq = 2 AND inputs LIKE 'aes256gcm:%'")
    v = store.verify()
    assert v.first_bad_seq == 2 and any("seq 2 (decision d-00001)" in p for p in v.problems)


def test_removed_record_is_named(store: AuditStore):
    store.append([record(i) for i in range(10)])
    sql(store, "DELETE FROM audit_decisions WHERE seq = 4")
    v = store.verify()
    assert v.first_bad_seq == 4
    assert any("seq 4..4 missing before seq 5 (decision d-00004)" in p for p in v.problems), v.problems
    assert any("seq 5 (decision d-00004): prev_hash" in p for p in v.problems), v.problems


def test_removed_newest_records_are_detected(store: AuditStore):
    store.append([record(i) for i in range(5)])
    sql(store, "DELETE FROM audit_decisions WHERE seq >= 4")
    v = store.verify()
    assert v.first_bad_seq == 4
    assert v.problems[0] == "seq 4..5 missing at the end of the chain (the newest records were removed)"


def test_reordered_records_are_named(store: AuditStore):
    store.append([record(i) for i in range(6)])
    # Swap the contents of rows 2 and 3 (everything but seq), as someone reordering history would.
    sql(store, "UPDATE audit_decisions SET seq = -2 WHERE seq = 2")
    sql(store, "UPDATE audit_decisions SET seq = 2 WHERE seq = 3")
    sql(store, "UPDATE audit_decisions SET seq = 3 WHERE seq = -2")
    v = store.verify()
    assert v.first_bad_seq == 2
    assert any(p.startswith("seq 2 (decision d-00002)") for p in v.problems), v.problems
    assert any(p.startswith("seq 3 (decision d-00001)") for p in v.problems), v.problems


def test_outcomes_are_a_chain_of_their_own(store: AuditStore):
    store.append([record(i) for i in range(3)])
    store.record_outcome("d-00001", 1, key_id="lender")
    store.record_outcome("d-00002", 0, at="2026-01-01T00:00:00Z", key_id="lender")
    store.record_outcome("d-00002", 1, reason="the first report was a typo", key_id="lender")
    assert store.outcomes(["d-00000", "d-00001", "d-00002"], rule="latest") == {"d-00001": 1, "d-00002": 1}
    # Every outcome is an event in arrival order (corrections too), the drift sensor's feed.
    spec = record(0)["spec"]
    assert [seq for _, seq in store.outcome_events_after(0, spec)] == [2, 3, 3]
    first_id = store.outcome_events_after(0, spec)[0][0]
    assert [seq for _, seq in store.outcome_events_after(first_id, spec)] == [3, 3]
    assert store.outcome_events_after(0, "another_spec") == []
    assert store.outcome_count(spec, 1, 3) == 2 and store.outcome_count(spec, 3, 3) == 1
    v = store.verify()
    assert v.ok and v.outcome_events_checked == 3 and v.checked == 3  # the decision chain is untouched
    with pytest.raises(AuditError, match="no decision 'nope'"):
        store.record_outcome("nope", 1)


def test_retention_prunes_the_old_prefix_and_the_rest_verifies(store: AuditStore):
    old = [record(i, time=f"2020-01-0{i + 1}T00:00:00.000000Z") for i in range(3)]
    store.append(old + [record(3), record(4)])
    store.record_outcome("d-00001", 1)
    store.record_outcome("d-00004", 0)
    assert store.prune(older_than_days=183) == 3
    assert [r.seq for r in store.read_after(0)] == [4, 5]
    assert store.outcomes(["d-00001"]) == {} and store.outcomes(["d-00004"]) == {"d-00004": 0}
    assert [seq for _, seq in store.outcome_events_after(0, record(0)["spec"])] == [5]
    v = store.verify()
    assert v.ok and v.checked == 2 and v.outcome_events_checked == 1, v.problems
    assert store.prune(older_than_days=183) == 0
    store.append([record(5)])
    store.record_outcome("d-00005", 1)
    assert store.verify().ok
    # A hole punched after pruning is still detected.
    sql(store, "DELETE FROM audit_decisions WHERE seq = 4")
    assert store.verify().first_bad_seq == 4


def test_redaction_keeps_the_hash_of_the_raw_inputs():
    raw = {"income": 52000.0, "title": "nurse", "zip": None}
    assert redact(raw, ["title", "zip"]) == {"income": 52000.0, "title": "<redacted>", "zip": None}
    assert input_hash(raw) != input_hash(redact(raw, ["title"]))


def test_a_redacted_field_is_redacted_in_the_top_factors_too(store: AuditStore):
    raw = record(1)["inputs"]
    rec = {**record(1), "input_hash": input_hash(raw), "inputs": redact(raw, ["title"]),
           "top_factors": [{"feature": "title", "value": raw["title"], "contribution": 0.2},
                           {"feature": "income", "value": raw["income"], "contribution": 0.1}]}
    store.append([rec])
    got = store.get("d-00001")
    assert got.inputs["title"] == "<redacted>" and got.top_factors[0]["value"] == "<redacted>"
    assert got.top_factors[1]["value"] == raw["income"]
    assert got.input_hash == store.input_hash(raw)  # the hash still covers the raw values
