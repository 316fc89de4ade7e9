"""The compliance gates as pure functions of a model evaluation and the spec's thresholds.

Each gate says which number broke which threshold. The same verdicts feed the blocking asset checks, the
compliance report and the promotion decision, so the three can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from assets.evidence import Evaluation, Robustness
from assets.spec import PipelineSpec

GATES: dict[str, str] = {
    "fairness": "Demographic parity and equalized odds differences per sensitive feature within thresholds.",
    "performance": "Test AUC above the floor, and no regression beyond tolerance against the champion.",
    "baseline": "Test AUC at most compliance.max_auc_below_baseline under the better of logistic regression and "
                "gradient boosting, fitted on the same train split and features and scored on the same rows.",
    "explainability": "Global permutation importance recorded; every test decision has its top factors.",
    "robustness": "Scores stable under small numeric perturbations and under a missing text field; a black-box "
                  "evasion attack and a model-extraction attack within their limits (EU AI Act Art. 15).",
    "data_governance": "Lineage resolves to the validated data and splits; sensitive columns are not inputs.",
    "integrity": "Every file of the version matches its manifest and its model-signing signature by the trusted key; "
                 "the weights are the checkpoint's; the model loads without pickle.",
    "documentation": "The compliance report exists and every section is filled.",
}
# Approval may override any gate but these: a model whose bytes are not the trained ones never serves.
NOT_OVERRIDABLE = {"integrity"}


@dataclass(frozen=True)
class GateOutcome:
    name: str
    passed: bool
    summary: str
    details: tuple[str, ...] = ()


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def fairness_gate(ev: Evaluation, spec: PipelineSpec) -> GateOutcome:
    c = spec.compliance
    broken: list[str] = []
    notes: list[str] = []
    for feature, s in ev.slices.items():
        dpd, eod = s.demographic_parity_difference, s.equalized_odds_difference
        rates = {g: r.selection_rate for g, r in s.groups.items() if r.measured and r.selection_rate is not None}
        if s.too_small:
            notes.append(f"{feature}: groups {s.too_small} too small to measure (< {c.min_group_size} rows "
                         "or one class only)")
        if dpd is None:
            notes.append(f"{feature}: fewer than two measurable groups; parity not measurable")
            continue
        if dpd > c.max_demographic_parity_difference:
            hi = max(rates, key=rates.get)
            lo = min(rates, key=rates.get)
            broken.append(f"{feature}: demographic parity difference {dpd:.3f} > {c.max_demographic_parity_difference}"
                          f" (selection rate {hi} {rates[hi]:.3f} vs {lo} {rates[lo]:.3f})")
        if eod is not None and eod > c.max_equalized_odds_difference:
            broken.append(f"{feature}: equalized odds difference {eod:.3f} > {c.max_equalized_odds_difference}")
        notes.append(f"{feature}: DPD {_fmt(dpd)}, EOD {_fmt(eod)}")
    if broken:
        return GateOutcome("fairness", False, "; ".join(broken), tuple(notes))
    return GateOutcome("fairness", True, "; ".join(notes) or "no sensitive features declared", tuple(notes))


def performance_gate(ev: Evaluation, spec: PipelineSpec) -> GateOutcome:
    c = spec.compliance
    auc = ev.test.auc
    broken, notes = [], [f"test AUC {auc:.3f} (floor {c.min_auc})"]
    if not auc >= c.min_auc:
        broken.append(f"test AUC {auc:.3f} is below the floor {c.min_auc}")
    champ = ev.champion
    if champ:
        gap = champ.test.auc - auc
        notes.append(f"champion v{champ.version} AUC {champ.test.auc:.3f} on the same {champ.test.rows} rows")
        if gap > c.max_auc_regression:
            broken.append(f"test AUC {auc:.3f} is {gap:.3f} below champion v{champ.version}'s "
                          f"{champ.test.auc:.3f} on the same rows (tolerance {c.max_auc_regression})")
    return GateOutcome("performance", not broken, "; ".join(broken or notes), tuple(notes))


def baseline_gate(ev: Evaluation, spec: PipelineSpec) -> GateOutcome:
    tolerance = spec.compliance.max_auc_below_baseline
    if not ev.baselines:
        return GateOutcome("baseline", False, "no baseline was scored for this version, so it was compared with nothing")
    best = max(ev.baselines, key=lambda b: b.auc)
    scores = ", ".join(f"{b.name} {b.auc:.3f}" for b in ev.baselines)
    gap = best.auc - ev.test.auc
    if gap > tolerance:
        return GateOutcome("baseline", False, (
            f"test AUC {ev.test.auc:.3f} is {gap:.3f} below {best.name}'s {best.auc:.3f} on the same test rows "
            f"(tolerance {tolerance}; baselines: {scores}); the network is underfitted or misconfigured: look at the "
            "training settings (training.max_steps, learning_rate, hidden) before promoting it"))
    return GateOutcome("baseline", True, f"test AUC {ev.test.auc:.3f} against baselines {scores} (tolerance {tolerance})")


def explainability_gate(ev: Evaluation, spec: PipelineSpec) -> GateOutcome:
    importance = ev.importance
    rows = ev.explanations.rows if ev.explanations else 0
    with_factors = ev.explanations.with_factors if ev.explanations else 0
    broken = []
    missing = [f for f in spec.features.all if f not in importance]
    if missing:
        broken.append(f"no global importance for features {missing}")
    if rows == 0 or with_factors < rows:
        broken.append(f"{rows - with_factors} of {rows} test decisions have no per-decision explanation")
    top = ", ".join(k for k, _ in sorted(importance.items(), key=lambda kv: -kv[1])[:3])
    return GateOutcome("explainability", not broken,
                       "; ".join(broken) or f"top features {top}; {rows} decisions explained")


def robustness_gate(ev: Evaluation, spec: PipelineSpec) -> GateOutcome:
    c = spec.compliance
    r = ev.robustness
    broken, notes = [], []
    if r is None or r.empty:
        return GateOutcome("robustness", False, "no robustness evidence recorded")
    if r.numeric_noise is not None:
        n = r.numeric_noise
        notes.append(f"numeric noise: mean score shift {n.mean_abs_shift:.4f}")
        if n.mean_abs_shift > c.max_prediction_shift:
            broken.append(f"mean score shift {n.mean_abs_shift:.4f} under {n.relative_noise:.0%} numeric "
                          f"noise > {c.max_prediction_shift}")
    if r.missing_text is not None:
        t = r.missing_text
        notes.append(f"missing text: mean score shift {t.mean_abs_shift:.4f}")
        if not t.all_finite:
            broken.append("a missing text field gives non-finite scores")
        if t.mean_abs_shift > c.max_missing_text_shift:
            broken.append(f"mean score shift {t.mean_abs_shift:.4f} with text missing > {c.max_missing_text_shift}")
    _attack_verdicts(r, spec, broken, notes)
    return GateOutcome("robustness", not broken, "; ".join(broken or notes))


def _attack_verdicts(r: Robustness, spec: PipelineSpec, broken: list[str], notes: list[str]) -> None:
    """The black-box attacks' figures against the spec's limits (assets/attacks.py); missing evidence fails."""
    c = spec.compliance
    why = f" ({r.attack_error})" if r.attack_error else ""
    e = r.evasion
    if e is not None:
        notes.append(f"evasion: {e.success_rate:.0%} of {e.rows} applicants flipped within {e.epsilon:g} std and "
                     f"{e.query_budget} queries")
        if e.success_rate > c.max_evasion_success:
            broken.append(f"evasion: {e.success_rate:.0%} of {e.rows} test applicants had their decision flipped by a "
                          f"change of at most {e.epsilon:g} standard deviations of {', '.join(e.features)} within "
                          f"{e.query_budget} queries each (limit compliance.max_evasion_success "
                          f"{c.max_evasion_success:.0%}): the decision is fragile; look at the training data and "
                          "settings before promoting it")
    elif spec.features.numeric:
        broken.append(f"no evasion evidence recorded{why}")
    x = r.extraction
    if x is not None:
        notes.append(f"extraction: a copy agrees {x.agreement:.2f} (kappa) after {x.queries} queries")
        if x.agreement > c.max_extraction_agreement:
            broken.append(f"extraction: a {x.surrogate} trained on the answers to {x.queries} synthetic queries agrees "
                          f"with the version on the test applicants at kappa {x.agreement:.3f} (raw "
                          f"{x.raw_agreement:.1%}; limit compliance.max_extraction_agreement "
                          f"{c.max_extraction_agreement}): the model is trivially copyable, e.g. its decision hangs "
                          "on one input or is constant")
    else:
        broken.append(f"no extraction evidence recorded{why}")


def governance_gate(ev: Evaluation, spec: PipelineSpec) -> GateOutcome:
    g = ev.governance
    broken = [f"lineage: {p}" for p in g.problems]
    sensitive_inputs = sorted(set(spec.sensitive_columns) & set(g.model_inputs))
    if sensitive_inputs and not spec.compliance.allow_sensitive_inputs:
        broken.append(f"sensitive columns {sensitive_inputs} are model inputs and compliance.allow_sensitive_inputs "
                      "is false")
    return GateOutcome("data_governance", not broken,
                       "; ".join(broken) or "lineage tags resolve to the current validated data and splits")


def integrity_gate(ev: Evaluation, spec: PipelineSpec) -> GateOutcome:
    i = ev.integrity
    broken = list(i.problems)
    if not i.loads_without_pickle and not (i.problems and (i.load_error or "").startswith("not loaded")):
        broken.append(f"the model did not load with pickle deserialization disabled: {i.load_error}")
    if not broken and not i.signature_verified:
        broken.append("the version's signature was not verified")
    return GateOutcome("integrity", not broken, "; ".join(broken) or (
        f"{i.files_verified} files match the version's manifest; model.sig verified with the trusted key "
        f"{(i.signing_key_sha256 or '')[:16]}...; loads without pickle"))


MODEL_GATES = (fairness_gate, performance_gate, baseline_gate, explainability_gate, robustness_gate, governance_gate,
               integrity_gate)
# Gates that read what the model did on data; a model that did not load has nothing for them to read.
MEASURED_GATES = (fairness_gate, performance_gate, baseline_gate, explainability_gate, robustness_gate)


def evaluate_gates(ev: Evaluation, spec: PipelineSpec) -> list[GateOutcome]:
    """Every gate but documentation, which needs the written report.

    A model that did not load has no measurements: every gate that needs them fails and says why.
    """
    if not ev.loaded:
        reason = ev.integrity.load_error or "no test metrics recorded"
        skipped = [GateOutcome(g.__name__.removesuffix("_gate"), False,
                               f"not evaluated: the model did not load ({reason})") for g in MEASURED_GATES]
        return [*skipped, governance_gate(ev, spec), integrity_gate(ev, spec)]
    return [gate(ev, spec) for gate in MODEL_GATES]
