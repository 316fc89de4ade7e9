"""One rollout step's analysis: the challenger against the champion on the decisions each answered (or, in a shadow
step, scored) in that step, from the audit log alone, and the verdict: advance, hold or roll back.

The figures (core/rollout_stats.py, each with its sample size and what it can tell at that size):
- decisions: the challenger's decisions in the step against what the step needs (`decisions`);
- errors: rows each version failed to score (the servers' `failures` reports on the serving chain) out of the rows
  it was given;
- latency: the challenger's decisions over `deployment.slo_p99_ms` (a p99 within the SLO allows 1% over);
- fairness: the flag rate per sensitive group on live decisions, from the callers' audit-only fields, against
  `compliance.max_demographic_parity_difference` (the fairness gate's metric, on real requests);
- live AUC: once outcomes arrive, DeLong's test, paired in a shadow step (the challenger's shadow decision and the
  champion's answer of the same request: same time and input hash), unpaired in a canary step;
- scores: the two score distributions (alibi-detect KS), informative.

`StepAnalysis.to_metadata()` writes what the UI shows and the sensor reads; `AnalysisRecord.from_metadata()` reads
the part the sensor acts on, through the same keys.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dagster as dg

from assets.metrics import sensitive_groups
from assets.spec import PipelineSpec
from core.audit import AuditRecord, AuditStore
from core.audit.traffic import NOT_TRAFFIC_KEY_IDS
from core.lazy import np, pd
from core.rollout import RolloutPolicy, StepWindow, parse_partition, step_window
from core.rollout_stats import (HOLD, PASS, ROLLBACK, Figure, compare_auc, compare_failures, compare_parity,
                                group_rates, latency_exceedance, score_shift, verdict_of)

ADVANCE = "advance"
VERDICTS = {PASS: ADVANCE, HOLD: HOLD, ROLLBACK: ROLLBACK}
CHECKS: dict[str, str] = {
    "decisions": "The step has seen the challenger decisions its policy asks for.",
    "errors": "The challenger fails no more rows than the champion, with significance.",
    "latency": "The challenger's decisions stay within deployment.slo_p99_ms (its p99), with significance.",
    "fairness": "The flag rate per sensitive group on live decisions stays within the fairness gate's threshold.",
    "live_auc": "Once outcomes arrive, the challenger's live AUC is not worse than the champion's beyond "
                "compliance.max_auc_regression (DeLong).",
}


@dataclass(frozen=True)
class AnalysisRecord:
    """What a step's analysis tells the rollout sensor."""

    partition: str
    rollout: str
    step: int
    verdict: str  # advance | hold | rollback
    reason: str
    challenger_decisions: int
    outcomes: int
    final: bool  # the step had ended when it was analysed

    def to_metadata(self) -> dict[str, Any]:
        return {"partition": self.partition, "rollout": self.rollout, "step": self.step, "verdict": self.verdict,
                "reason": self.reason, "challenger_decisions": self.challenger_decisions,
                "challenger_outcomes": self.outcomes, "step_ended": self.final}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], partition: str | None = None) -> AnalysisRecord:
        v = {k: getattr(m, "value", m) for k, m in metadata.items()}
        key = str(v.get("partition") or partition or "")
        rollout, step = parse_partition(key) if key else ("", 0)
        return cls(partition=key, rollout=str(v.get("rollout", rollout)), step=int(v.get("step", step)),
                   verdict=str(v.get("verdict", HOLD)), reason=str(v.get("reason", "")),
                   challenger_decisions=int(v.get("challenger_decisions", 0)),
                   outcomes=int(v.get("challenger_outcomes", 0)), final=bool(v.get("step_ended", False)))


@dataclass(frozen=True)
class StepAnalysis:
    window: StepWindow
    partition: str
    figures: dict[str, list[Figure]]  # check name -> its figures
    scores: Figure
    challenger_decisions: int
    champion_decisions: int
    outcomes: int
    needed: int

    @property
    def verdict(self) -> str:
        return VERDICTS[verdict_of([f for fs in self.figures.values() for f in fs])]

    def reason(self) -> str:
        worst = {ROLLBACK: [], HOLD: []}
        for fs in self.figures.values():
            for f in fs:
                if f.verdict in worst:
                    worst[f.verdict].append(f.text)
        said = worst[ROLLBACK] or worst[HOLD]
        w = self.window
        head = (f"{self.partition}: v{w.challenger} against champion v{w.champion}, {self.challenger_decisions} "
                f"challenger decisions, {self.outcomes} with outcomes")
        return f"{head}: {self.verdict}: " + ("; ".join(said) if said else "every check passed")

    def record(self) -> AnalysisRecord:
        w = self.window
        return AnalysisRecord(partition=self.partition, rollout=w.rollout, step=w.step, verdict=self.verdict,
                              reason=self.reason()[:4000], challenger_decisions=self.challenger_decisions,
                              outcomes=self.outcomes, final=w.last_seq is not None)

    def check_results(self, asset_key: dg.AssetKey) -> list[dg.AssetCheckResult]:
        out = []
        for name in CHECKS:
            figs = self.figures.get(name, [])
            verdict = verdict_of(figs) if figs else PASS
            out.append(dg.AssetCheckResult(
                asset_key=asset_key, check_name=name, passed=verdict == PASS,
                severity=dg.AssetCheckSeverity.ERROR if verdict == ROLLBACK else dg.AssetCheckSeverity.WARN,
                description=("; ".join(f.text for f in figs) or "nothing to check")[:2000],
                metadata={"verdict": verdict, "partition": self.partition,
                          "can_tell": "; ".join(f.can_tell for f in figs)[:2000],
                          "figures": dg.MetadataValue.json([f.to_json() for f in figs])}))
        return out

    def to_metadata(self) -> dict[str, Any]:
        w = self.window
        rows = ["| check | verdict | figures | what it can tell at this size |", "| --- | --- | --- | --- |"]
        for name, figs in self.figures.items():
            for f in figs:
                rows.append(f"| {f.name} | {f.verdict} | {f.text} | {f.can_tell} |")
        rows.append(f"| scores | informative | {self.scores.text} | {self.scores.can_tell} |")
        return {
            **self.record().to_metadata(), "mode": w.mode, "champion_version": w.champion,
            "challenger_version": w.challenger, "after_seq": w.after_seq,
            "last_seq": w.last_seq if w.last_seq is not None else "open",
            "champion_decisions": self.champion_decisions, "decisions_needed": self.needed,
            "begun_by": f"serving event {w.begun_by.id}: {w.begun_by.kind} by {w.begun_by.actor} at {w.begun_by.time}",
            "figures": dg.MetadataValue.md("\n".join(rows)),
            "figures_json": dg.MetadataValue.json({n: [f.to_json() for f in fs] for n, fs in self.figures.items()}
                                                  | {"scores": [self.scores.to_json()]}),
        }


def _records(store: AuditStore, spec: str, after: int, last: int | None, variants: tuple[str, ...]
             ) -> list[AuditRecord]:
    out: list[AuditRecord] = []
    while True:
        batch = store.read_after(after, limit=2000, spec=spec, variants=variants, exclude_key_ids=NOT_TRAFFIC_KEY_IDS)
        out += [r for r in batch if last is None or r.seq <= last]
        if not batch or (last is not None and batch[-1].seq >= last):
            return out
        after = batch[-1].seq


def _failed(store: AuditStore, spec: str, window: StepWindow) -> dict[tuple[str, str], int]:
    """Rows each (variant, version) failed in the step, from the servers' `failures` reports."""
    out: dict[tuple[str, str], int] = {}
    for e in store.serving_events(spec, kinds=("failures",)):
        if e.rollout != window.rollout or e.step != window.step:
            continue
        for item in e.evidence.get("failures", []):
            key = (str(item.get("variant")), str(item.get("version")))
            out[key] = out.get(key, 0) + int(item.get("rows", 0))
    return out


def _groups(spec: PipelineSpec, records: list[AuditRecord]) -> dict[str, list[str]]:
    """Per sensitive feature, each decision's group from the caller's audit-only fields ("missing": not sent)."""
    out = {}
    for feature in spec.sensitive_features:
        frame = pd.DataFrame({feature.column: [r.audit_fields.get(feature.column) for r in records]})
        out[feature.column] = list(sensitive_groups(frame, feature)) if len(frame) else []
    return out


def approved_over_fairness(mlflow: Any, spec: str, version: str) -> bool:
    try:
        tags = mlflow.client().get_model_version(spec, version).tags or {}
    except Exception:
        return False
    return "fairness" in str(tags.get("overridden_gates", "")).split(",")


def analyse_step(spec: PipelineSpec, policy: RolloutPolicy, store: AuditStore, partition: str,
                 approved_over_fairness: bool = False) -> StepAnalysis:
    """The analysis of one step partition (`<rollout>-<step>-<label>`) from the audit log."""
    rollout, step = parse_partition(partition)
    window = step_window(store.serving_events(spec.name), rollout, step)
    if window is None:
        raise ValueError(f"{spec.name}: no serving event began step {step} of rollout {rollout}; the partitions of "
                         f"rollout_analysis are made by the rollout sensor for steps that began")
    if step > len(policy.steps):
        raise ValueError(f"{spec.name}: rollout {rollout} step {step}, but deployment.rollout has {len(policy.steps)}")
    definition, settings, c = policy.steps[step - 1], policy.analysis, spec.compliance
    shadow = window.mode == "shadow"
    variant = "shadow" if shadow else "canary"
    records = _records(store, spec.name, window.after_seq, window.last_seq, (variant, "champion"))
    mine = [r for r in records if r.variant == variant and r.model_version == window.challenger]
    theirs = [r for r in records if r.variant == "champion" and r.model_version == window.champion]
    labels = store.outcomes([r.decision_id for r in theirs + ([] if shadow else mine)],
                            rule=spec.monitoring.outcome_rule)

    figures: dict[str, list[Figure]] = {}
    enough = len(mine) >= definition.decisions
    figures["decisions"] = [Figure(
        "decisions", PASS if enough else HOLD,
        f"{len(mine)} of the {definition.decisions} challenger decisions the step needs ({len(theirs)} champion "
        f"decisions beside them)", "the other checks judge what there is", {"challenger": len(mine),
                                                                           "needed": definition.decisions})]
    failed = _failed(store, spec.name, window)
    f1, f0 = failed.get((variant, window.challenger), 0), failed.get(("champion", window.champion), 0)
    figures["errors"] = [compare_failures(f1, len(mine) + f1, f0, len(theirs) + f0,
                                          settings.max_error_rate_increase, settings.alpha)]
    figures["latency"] = [latency_exceedance(np.array([r.latency_ms for r in mine]),
                                             np.array([r.latency_ms for r in theirs]), spec.deployment.slo_p99_ms,
                                             settings.max_slo_exceedance, settings.alpha)]
    g1, g0 = _groups(spec, mine), _groups(spec, theirs)
    figures["fairness"] = [compare_parity(
        f, group_rates(g1[f], [r.decision for r in mine]), group_rates(g0[f], [r.decision for r in theirs]),
        c.max_demographic_parity_difference, c.min_group_size, settings.alpha, approved_over_fairness)
        for f in spec.sensitive_columns] or [Figure("fairness", PASS, "no sensitive features declared", "-", {})]
    if shadow:  # pairs: the same request scored by both, at the same time with the same input hash
        answered = {(r.time, r.input_hash): r for r in theirs}
        pairs = [(r, answered[(r.time, r.input_hash)]) for r in mine if (r.time, r.input_hash) in answered]
        known = [(r, a) for r, a in pairs if a.decision_id in labels]
        y = np.array([labels[a.decision_id] for _, a in known])
        auc = compare_auc(y, np.array([r.probability for r, _ in known]), y,
                          np.array([a.probability for _, a in known]), True, c.max_auc_regression, settings.alpha,
                          definition.min_outcomes)
        outcomes = len(known)
    else:
        k1 = [r for r in mine if r.decision_id in labels]
        k0 = [r for r in theirs if r.decision_id in labels]
        auc = compare_auc(np.array([labels[r.decision_id] for r in k1]), np.array([r.probability for r in k1]),
                          np.array([labels[r.decision_id] for r in k0]), np.array([r.probability for r in k0]),
                          False, c.max_auc_regression, settings.alpha, definition.min_outcomes)
        outcomes = len(k1)
    figures["live_auc"] = [auc]
    scores = score_shift(np.array([r.probability for r in theirs]), np.array([r.probability for r in mine]),
                         settings.alpha)
    return StepAnalysis(window=window, partition=partition, figures=figures, scores=scores,
                        challenger_decisions=len(mine), champion_decisions=len(theirs), outcomes=outcomes,
                        needed=definition.decisions)


def analysis_evidence(record: AnalysisRecord, run_id: str, checks: list[dict[str, Any]]) -> str:
    """The evidence a move on this analysis rests on, as the rollout jobs take it (JSON)."""
    return json.dumps({"analysis": record.partition, "analysis_run": run_id, "verdict": record.verdict,
                       "checks": checks})
