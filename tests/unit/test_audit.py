"""The audit log on its own: chaining, tamper detection naming the row, retention, outcomes, concurrent writers."""

import sqlite3
from pathlib import Path
import pytest
from core.audit import AuditError, AuditStore, default_audit_url, input_hash, redact


def record(i: int, variant: str = "champion", version: str = "1", **over) -> dict:
    inputs = {"income": 1000.0 + i, "purpose": "car", "title": f"engineer {i}"}
    return {"decision_id": f"d-{i:05d}", "spec": "loans", "model_name": "loans", "model_version": version,
            "variant": variant, "inputs": inputs, "probability": 0.01 * (i % 100), "decision": int(i % 3 == 0),
            "threshold": 0.5, "top_factors": [{"feature": "income", "contribution": -0.1}],
            "similar_cases": ["r1", "r2"], "latency_ms": 1.5, "key_id": "ops", **over}


@pytest.fixture
def store(tmp_path: Path) -> AuditStore:
    return AuditStore(default_audit_url(str(tmp_path)))


def test_append_chains_and_reads_back(store: AuditStore, tmp_path: Path):
    assert store.latest_seq() == 0 and store.verify().ok
    written = store.append([record(i) for i in range(5)]) + store.append([record(5, variant="shadow")])
    assert [r.seq for r in written] == [1, 2, 3, 4, 5, 6]
    assert written[0].prev_hash == "0" * 64 and all(b.prev_hash == a.record_hash for a, b in zip(written, written[1:]))
    assert (tmp_path / "audit" / "audit.db").is_file()
    again = store.get("d-00002")
    assert again == written[2] and again.inputs["title"] == "engineer 2" and again.top_factors[0]["feature"] == "income"
    assert again.input_hash == input_hash(record(2)["inputs"]) and again.key_id == "ops"
    assert [r.seq for r in store.read_after(2, limit=2)] == [3, 4]
    assert [r.seq for r in store.read_after(0, variants=("shadow",))] == [6]
    assert store.latest_seq() == 6 and store.latest_seq("loans") == 6 and store.latest_seq("other") == 0
    assert [r.decision_id for r in store.find(variant="shadow")] == ["d-00005"]
    assert len(store.find(model_version="1", limit=3)) == 3
    assert store.find(since="2000-01-01T00:00:00", until="2000-01-02T00:00:00") == []
    v = store.verify()
    assert v.ok and v.checked == 6 and v.problems == []
    # Reopening the same file continues the chain.
    assert AuditStore(store.url).append([record(7)])[0].seq == 7 and AuditStore(store.url).verify().ok


def test_bad_records_are_refused_whole(store: AuditStore):
    with pytest.raises(AuditError, match="variant 'blue'"):
        store.append([record(1), record(2, variant="blue")])
    with pytest.raises(AuditError, match="lacks model_version"):
        store.append([record(3, model_version=None)])
    assert store.latest_seq() == 0


def _sql(store: AuditStore, statement: str, *args) -> None:
    path = store.url.split(":///", 1)[1]
    with sqlite3.connect(path) as conn:
        conn.execute(statement, args)


def test_edited_record_is_named(store: AuditStore):
    store.append([record(i) for i in range(10)])
    _sql(store, "UPDATE audit_decisions SET probability = 0.01, decision = 0 WHERE decision_id = ?", "d-00006")
    v = store.verify()
    assert not v.ok and v.checked == 10
    assert len(v.problems) == 1 and "seq 7 (decision d-00006)" in v.problems[0] and "edited" in v.problems[0]


def test_edited_inputs_of_a_record_are_named(store: AuditStore):
    store.append([record(i) for i in range(4)])
    _sql(store, "UPDATE audit_decisions SET inputs = replace(inputs, 'car', 'boat') WHERE seq = 2")
    assert any("seq 2 (decision d-00001)" in p for p in store.verify().problems)


def test_removed_record_is_named(store: AuditStore):
    store.append([record(i) for i in range(10)])
    _sql(store, "DELETE FROM audit_decisions WHERE seq = 4")
    problems = store.verify().problems
    assert any("seq 4..4 missing before seq 5 (decision d-00004)" in p for p in problems), problems
    assert any("seq 5 (decision d-00004): prev_hash" in p for p in problems), problems


def test_removed_newest_records_are_detected(store: AuditStore):
    store.append([record(i) for i in range(5)])
    _sql(store, "DELETE FROM audit_decisions WHERE seq >= 4")
    problems = store.verify().problems
    assert problems == ["seq 4..5 missing at the end of the chain (the newest records were removed)"]


def test_reordered_records_are_named(store: AuditStore):
    store.append([record(i) for i in range(6)])
    # Swap the contents of rows 2 and 3 (everything but seq), as someone reordering history would.
    _sql(store, "UPDATE audit_decisions SET seq = -2 WHERE seq = 2")
    _sql(store, "UPDATE audit_decisions SET seq = 2 WHERE seq = 3")
    _sql(store, "UPDATE audit_decisions SET seq = 3 WHERE seq = -2")
    problems = store.verify().problems
    assert any(p.startswith("seq 2 (decision d-00002)") for p in problems), problems
    assert any(p.startswith("seq 3 (decision d-00001)") for p in problems), problems


def test_outcomes_live_beside_the_chain(store: AuditStore):
    store.append([record(i) for i in range(3)])
    store.record_outcome("d-00001", 1)
    store.record_outcome("d-00002", 0, at="2026-01-01T00:00:00Z")
    store.record_outcome("d-00002", 1)  # a correction replaces the earlier outcome
    assert store.outcomes(["d-00000", "d-00001", "d-00002"]) == {"d-00001": 1, "d-00002": 1}
    # Every outcome is also an event in arrival order (corrections too), the drift sensor's feed.
    spec = record(0)["spec"]
    assert [seq for _, seq in store.outcome_events_after(0, spec)] == [2, 3, 3]
    first_id = store.outcome_events_after(0, spec)[0][0]
    assert [seq for _, seq in store.outcome_events_after(first_id, spec)] == [3, 3]
    assert store.outcome_events_after(0, "another_spec") == []
    assert store.outcome_count(spec, 1, 3) == 2 and store.outcome_count(spec, 3, 3) == 1
    assert store.verify().ok
    with pytest.raises(AuditError, match="no decision 'nope'"):
        store.record_outcome("nope", 1)


def test_retention_prunes_the_old_prefix_and_the_rest_verifies(store: AuditStore):
    old = [record(i, time=f"2020-01-0{i + 1}T00:00:00.000000Z") for i in range(3)]
    store.append(old + [record(3), record(4)])
    store.record_outcome("d-00001", 1)
    assert store.prune(older_than_days=183) == 3
    assert [r.seq for r in store.read_after(0)] == [4, 5]
    assert store.outcomes(["d-00001"]) == {}
    assert store.outcome_events_after(0, record(0)["spec"]) == []
    v = store.verify()
    assert v.ok and v.checked == 2
    assert store.prune(older_than_days=183) == 0
    # A hole punched after pruning is still detected.
    _sql(store, "DELETE FROM audit_decisions WHERE seq = 4")
    assert not store.verify().ok


def test_redaction_keeps_the_hash_of_the_raw_inputs():
    raw = {"income": 52000.0, "title": "nurse", "zip": None}
    assert redact(raw, ["title", "zip"]) == {"income": 52000.0, "title": "<redacted>", "zip": None}
    assert input_hash(raw) != input_hash(redact(raw, ["title"]))


