"""Outcomes are evidence: every report kept with its key and reason, the spec's rule picks the training label,
and a key whose reports contradict the model far beyond its measured error is flagged and left out."""

import random
from pathlib import Path

import pandas as pd
import pytest
from audit_support import SPEC, keyed_store, record
from loans_support import spec as loans_spec

from assets.data import outcome_rows
from assets.outcome_trust import flagged
from assets.spec import PipelineSpec
from core.audit import OutcomeConflict, OutcomeReport, UnknownDecision
from core.audit.outcomes import OutcomeEvidence, apply_rule, binomial_sf, key_bursts


@pytest.fixture
def store(tmp_path: Path):
    s = keyed_store(tmp_path)
    s.append([record(i) for i in range(6)])
    return s


def test_a_second_outcome_is_kept_beside_the_first_as_a_correction_with_its_reason(store):
    store.record_outcomes([OutcomeReport("d-00001", 0)], key_id="lender")
    with pytest.raises(OutcomeConflict, match="already has outcome 0; .* send it with a reason"):
        store.record_outcomes([OutcomeReport("d-00001", 1)], key_id="collector")  # a silent overwrite: refused
    (event,) = store.record_outcomes([OutcomeReport("d-00001", 1, "defaulted after the grace period")], "collector")
    history = store.outcome_history("d-00001")
    assert [(e.outcome, e.key_id, e.reason, e.correction) for e in history] == [
        (0, "lender", None, False), (1, "collector", "defaulted after the grace period", True)]
    assert history[-1].id == event and history[0].at <= history[1].at
    assert {r: store.outcomes(["d-00001"], rule=r) for r in ("first", "latest", "unanimous")} == {
        "first": {"d-00001": 0}, "latest": {"d-00001": 1}, "unanimous": {}}
    assert store.verify().ok


def test_a_retried_report_is_recorded_once_and_agreement_from_another_key_is_kept(store):
    first = store.record_outcomes([OutcomeReport("d-00002", 1)], "lender")
    assert store.record_outcomes([OutcomeReport("d-00002", 1)], "lender") == first  # a retry
    store.record_outcomes([OutcomeReport("d-00002", 1)], "servicer")
    assert [e.key_id for e in store.outcome_history("d-00002")] == ["lender", "servicer"]
    assert store.outcomes(["d-00002"]) == {"d-00002": 1}


def test_a_bad_batch_records_nothing_and_names_the_item(store):
    with pytest.raises(UnknownDecision, match=r"outcomes\[1\]: no decision 'nope'"):
        store.record_outcomes([OutcomeReport("d-00001", 1), OutcomeReport("nope", 0)], "lender")
    with pytest.raises(UnknownDecision, match=r"outcomes\[0\]: no decision 'd-00001' of model 'other'"):
        store.record_outcomes([OutcomeReport("d-00001", 1)], "lender", spec="other")
    with pytest.raises(Exception, match=r"outcomes\[0\].outcome must be 0 or 1"):
        store.record_outcomes([OutcomeReport("d-00001", 2)], "lender")
    with pytest.raises(Exception, match="at most 500 characters"):
        store.record_outcomes([OutcomeReport("d-00001", 1, "x" * 501)], "lender")
    assert store.outcome_events_after(0, SPEC) == []


def test_rules_and_excluded_keys():
    from core.audit import OutcomeEvent

    def ev(i, did, outcome, key):
        return OutcomeEvent(i, did, 1, SPEC, outcome, "t", key, None, False)

    events = [ev(1, "a", 1, "k1"), ev(2, "a", 0, "k2"), ev(3, "b", 0, "k2"), ev(4, "c", 1, "k1"), ev(5, "c", 1, "k2")]
    assert apply_rule(events, "first") == {"a": 1, "b": 0, "c": 1}
    assert apply_rule(events, "latest") == {"a": 0, "b": 0, "c": 1}
    assert apply_rule(events, "unanimous") == {"b": 0, "c": 1}
    assert apply_rule(events, "unanimous", exclude_key_ids=["k2"]) == {"a": 1, "c": 1}


def test_binomial_tail():
    assert binomial_sf(0, 10, 0.3) == 1.0 and binomial_sf(11, 10, 0.3) == 0.0
    assert binomial_sf(10, 10, 0.5) == pytest.approx(0.5 ** 10)
    assert binomial_sf(3, 10, 0.2) == pytest.approx(0.3222004736, rel=1e-9)


def honest_and_poisoned(n: int = 300, seed: int = 3) -> list[OutcomeEvidence]:
    """Outcomes that follow the calibrated probabilities (an honest key), and a key that reports the opposite of
    every confident decision it touches (a burst of poisoned labels)."""
    rng = random.Random(seed)
    out: list[OutcomeEvidence] = []
    for i in range(n):
        p = rng.choice([0.03, 0.08, 0.15, 0.6, 0.9, 0.95])
        decision = int(p >= 0.5)
        out.append(OutcomeEvidence("honest", f"h{i}", int(rng.random() < p), p, decision, "1"))
        out.append(OutcomeEvidence("mallory", f"m{i}", 1 - decision, p, decision, "1"))
    # A key with too few reports to judge is never flagged.
    out += [OutcomeEvidence("newcomer", f"n{i}", 1, 0.05, 0, "1") for i in range(5)]
    return out


def test_a_contradicting_burst_from_one_key_is_flagged_and_a_normal_key_is_not():
    bursts = {b.key_id: b for b in key_bursts(honest_and_poisoned(), {"1": 0.22})}
    assert bursts["mallory"].flagged and bursts["mallory"].share == 1.0 and bursts["mallory"].p_value < 1e-30
    assert not bursts["honest"].flagged and bursts["honest"].share < 0.22
    assert not bursts["newcomer"].flagged and bursts["newcomer"].confident == 5
    assert "key mallory" in bursts["mallory"].describe() and "FLAGGED" in bursts["mallory"].describe()
    # Many honest keys: none is flagged by chance (the level is shared across keys).
    many = [OutcomeEvidence(f"k{k}", e.decision_id, e.outcome, e.probability, e.decision, "1")
            for k in range(20) for e in honest_and_poisoned(100, seed=k) if e.key_id == "honest"]
    assert flagged(key_bursts(many, {"1": 0.22})) == []


def test_the_training_feed_takes_the_spec_rule_and_leaves_a_flagged_key_out(store, tmp_path: Path):
    from assets.outcome_trust import outcome_key_bursts

    source = pd.DataFrame({"loan_id": ["L1", "L2"], "income": [1.0, 2.0], "debt_ratio": [1.0, 2.0],
                           "purpose": ["car", "home"], "region": ["north", "south"], "outcome": ["default", "repaid"]})
    served = [{**record(100 + i), "inputs": {"income": 5000.0 + i, "debt_ratio": 10.0, "purpose": "car"},
               "probability": 0.05, "decision": 0} for i in range(60)]
    store.append(served)
    ids = [r["decision_id"] for r in served]
    store.record_outcomes([OutcomeReport(d, 0) for d in ids[:30]], "lender")  # agrees with the model
    store.record_outcomes([OutcomeReport(d, 1) for d in ids[30:]], "mallory")  # contradicts every one
    store.record_outcomes([OutcomeReport(ids[0], 1, "disputed by the collector")], "collector")

    def rows(rule: str, exclude: tuple[str, ...] = ()) -> pd.DataFrame:
        spec = PipelineSpec.model_validate(loans_spec(monitoring={"outcome_rule": rule}))
        return outcome_rows(spec, source, store, exclude)[0]

    assert len(rows("unanimous")) == 59 and len(rows("first")) == 60 and len(rows("latest")) == 60
    assert (rows("latest").set_index("loan_id").loc[f"decision:{ids[0]}", "outcome"]) == "default"
    assert rows("first").set_index("loan_id").loc[f"decision:{ids[0]}", "outcome"] == "repaid"
    excluded = tuple(flagged(outcome_key_bursts(None, store, SPEC)))
    assert excluded == ("mallory",)
    kept = rows("unanimous", excluded)
    assert len(kept) == 29 and set(kept["outcome"]) == {"repaid"}
    assert set(kept["income"]) == {5000.0 + i for i in range(1, 30)}  # decrypted inputs, not ciphertext
