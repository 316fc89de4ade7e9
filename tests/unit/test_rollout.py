"""The pieces of a rollout that need no model: the spec's policy and its errors, the serving chain (recorded,
verified, tampering named), the split in force and where a step begins and ends, audit-only fields kept out of the
model and sealed on the record, and the sensor's milestones."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import yaml
from loans_support import spec as loans_spec
from rollout_support import begin_rollout, store

from assets.rollout import decision_milestone
from assets.spec import SpecError, load_spec
from core.audit import AuditError, AuditStore
from core.rollout import rollout_state, split_in_force, step_partition, step_window
from core.server_config import ServerConfigError, parse_server_config
from workloads.serving.decoding import InvalidRequest, audit_columns, validate_columns


def _load(tmp_path: Path, rollout) -> object:
    path = tmp_path / "loans.yaml"
    path.write_text(yaml.safe_dump(loans_spec(deployment={"rollout": rollout})))
    return load_spec(path).spec.deployment.rollout


def test_the_rollout_policy_is_direct_by_default_and_a_bad_step_is_named(tmp_path: Path):
    assert _load(tmp_path, "direct") is None
    policy = _load(tmp_path, {"steps": [{"mode": "shadow", "decisions": 500},
                                        {"mode": "canary", "share": 0.1, "decisions": 100, "min_outcomes": 30}]})
    assert [s.label for s in policy.steps] == ["shadow", "canary10"] and policy.analysis.alpha == 0.05
    for bad, said in (({"steps": [{"mode": "canary", "decisions": 100}]}, "a canary step needs a share"),
                      ({"steps": [{"mode": "shadow", "decisions": 100, "share": 0.2}]}, "a shadow step takes no share"),
                      ({"steps": []}, "deployment.rollout.steps"),
                      ("gradual", "expected 'direct' or a mapping with steps"),
                      ({"steps": [{"mode": "shadow", "decisions": 100, "wait": 3}]},
                       "unknown key 'deployment.rollout.steps.0.wait'")):
        with pytest.raises(SpecError, match="loans.yaml") as err:
            _load(tmp_path, bad)
        assert said in str(err.value)


def test_every_change_of_who_serves_is_chained_and_an_edited_or_removed_event_is_named(tmp_path: Path):
    s = store(tmp_path)
    s.record_serving_event("loans", "promote", "gates", "every gate passed", mode="champion", champion="1",
                           evidence={"run_id": "r1"})
    begin_rollout(s, "1", "2", "shadow")
    s.record_serving_event("loans", "rollback", "ana@example.com", "complaints", mode="champion", champion="1",
                           rollout="v2", step=1, evidence={"rolled_back": "2"})
    with pytest.raises(AuditError, match="needs a reason"):
        s.record_serving_event("loans", "hold", "ana@example.com", " ")
    assert [e.kind for e in s.serving_events("loans")] == ["promote", "rollout", "rollback"]
    assert s.latest_serving_event("loans").actor == "ana@example.com"
    check = s.verify()
    assert check.ok and check.serving_events_checked == 3, check.problems
    assert any(r.startswith("serving: every serving event from 1 under the keyed rule") for r in check.rules)
    s.flush_checkpoints()

    db = sqlite3.connect(tmp_path / "audit.db")
    db.execute("UPDATE audit_serving_events SET actor = 'someone else' WHERE id = 3")
    db.commit()
    problems = " ".join(s.verify().problems)
    assert "serving event 3 (rollback by someone else" in problems and "the event was edited" in problems
    db.execute("DELETE FROM audit_serving_events WHERE id = 2")
    db.commit()
    assert "serving events 2..2 missing before serving event 3" in " ".join(s.verify().problems)


def test_the_split_in_force_and_where_each_step_begins_and_ends(tmp_path: Path):
    s = store(tmp_path)
    assert split_in_force(None, "shadow", 0.1).challenger is None  # no event: the config, @challenger
    s.append([{"decision_id": "d0", "spec": "loans", "model_name": "loans", "model_version": "1",
               "variant": "champion", "inputs": {}, "probability": 0.2, "decision": 0, "threshold": 0.5}])
    begin_rollout(s, "1", "2", "shadow")
    s.record_serving_event("loans", "applied", "server x", "switched", mode="shadow", champion="1", challenger="2",
                           evidence={"control_event": 1})  # it took effect after seq 1 ...
    s.append([{"decision_id": f"d{i}", "spec": "loans", "model_name": "loans", "model_version": "1",
               "variant": "champion", "inputs": {}, "probability": 0.2, "decision": 0, "threshold": 0.5}
              for i in range(1, 5)])
    s.record_serving_event("loans", "hold", "ana", "look first", mode="shadow", champion="1", challenger="2",
                           rollout="v2", step=1)
    step2 = begin_rollout(s, "1", "2", "canary", share=0.1, step=2)
    state = rollout_state(s.latest_serving_event("loans"))
    assert (state.rollout, state.step, state.held, state.challenger) == ("v2", 2, False, "2")
    split = split_in_force(step2, "champion", 0.0)
    assert (split.mode, split.share, split.challenger) == ("canary", 0.1, "2")
    first = step_window(s.serving_events("loans"), "v2", 1)
    assert (first.after_seq, first.last_seq, first.ended_by.id) == (1, 5, step2.id)  # a hold does not end it
    assert step_window(s.serving_events("loans"), "v2", 2).last_seq is None
    assert step_partition("v2", 2, type("S", (), {"label": "canary10"})()) == "v2-2-canary10"
    s.record_serving_event("loans", "rollback", "sensor", "harm", mode="champion", champion="1", rollout="v2", step=2)
    assert rollout_state(s.latest_serving_event("loans")) is None
    assert split_in_force(s.latest_serving_event("loans"), "canary", 0.5).mode == "champion"


CONFIG = {"spec": "loans", "tracking_uri": "sqlite:///m.db", "audit_url": "sqlite:///a.db", "keys_dir": "/k",
          "numeric": {"income": [0, 1e6]}, "categorical": {"purpose": None}, "audit_fields": ["region"]}


def test_audit_only_fields_never_reach_the_model_and_are_refused_where_they_cannot_be_sealed():
    cfg = parse_server_config(CONFIG, "test")
    columns = {"income": [50_000.0, 60_000.0], "purpose": ["car", "home"], "region": ["south", None]}
    audit = audit_columns(columns, cfg)
    assert audit == [{"region": "south"}, {}] and "region" not in columns
    assert all(set(row) == {"income", "purpose"} for row in validate_columns(columns, cfg))
    with pytest.raises(InvalidRequest, match="audit-only field 'region' row 0"):
        audit_columns({"income": [1.0], "purpose": ["car"], "region": ["x" * 65]}, cfg)
    with pytest.raises(InvalidRequest, match=r"unknown field\(s\) \['age'\].*audit-only fields \['region'\]"):
        validate_columns({"income": [1.0], "purpose": ["car"], "age": [30]}, cfg)
    with pytest.raises(ServerConfigError, match="audit_fields are stored only encrypted"):
        parse_server_config({**CONFIG, "keys_dir": None}, "test")
    with pytest.raises(ServerConfigError, match=r"audit_fields: \['income'\] are feature columns"):
        parse_server_config({**CONFIG, "audit_fields": ["income"]}, "test")


def test_audit_only_fields_are_sealed_with_the_inputs_and_an_unkeyed_log_refuses_them(tmp_path: Path):
    s = store(tmp_path)
    rec = {"decision_id": "d1", "spec": "loans", "model_name": "loans", "model_version": "1", "variant": "champion",
           "inputs": {"income": 1.0}, "probability": 0.2, "decision": 0, "threshold": 0.5,
           "audit_fields": {"region": "Southampton-unique-marker"}}
    s.append([rec])
    assert s.get("d1").audit_fields == {"region": "Southampton-unique-marker"}
    assert s.verify().ok
    for f in tmp_path.glob("audit.db*"):
        assert b"Southampton-unique-marker" not in f.read_bytes()
    plain = AuditStore(f"sqlite:///{tmp_path / 'plain.db'}")
    with pytest.raises(AuditError, match="audit-only fields are stored only encrypted"):
        plain.append([{**rec, "decision_id": "d2"}])


def test_the_sensor_analyses_at_a_quarter_half_and_whole_multiples_of_what_a_step_needs():
    assert [decision_milestone(n, 200) for n in (0, 49, 50, 100, 199, 200, 399, 400, 900)] == \
        [0, 0, 50, 100, 100, 200, 200, 400, 800]
    assert [decision_milestone(n, 20) for n in (9, 10, 19, 20)] == [0, 10, 10, 20]  # no quarter under ten
