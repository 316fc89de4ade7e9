"""compliance_report, the blocking gates on it, and champion_model: gated promotion, or the start of a rollout."""

from datetime import datetime, timezone
from pathlib import Path

import dagster as dg

from assets import naming, rollout_state
from assets.checks.gates import GATES, NOT_OVERRIDABLE, GateOutcome, evaluate_gates
from assets.evidence import ComplianceReport, Evaluation, GateVerdict, NoticeEvidence
from assets.naming import CHALLENGER, CHAMPION, asset_key
from assets.notice_gate import follow_template, notice_verdicts, refuse_unchecked, tag_template
from assets.report import build_report, missing_sections, to_html, to_markdown
from assets.spec import LoadedSpec, PipelineSpec
from assets.wiring import Log
from core.audit import AuditStore
from resources.mlflow import MlflowResource
from resources.servers import AuditResource
from resources.storage import StorageResource, atomic_write_bytes


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _history(mlflow: MlflowResource, name: str) -> list[dict[str, str]]:
    """Earlier registry events of this model, from version tags: registrations, promotions, approvals."""
    events: list[dict[str, str]] = []
    try:
        versions = mlflow.client().search_model_versions(f"name='{name}'")
    except Exception:
        return events
    for v in sorted(versions, key=lambda v: int(v.version)):
        t = v.tags or {}
        when = datetime.fromtimestamp(v.creation_timestamp / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        events.append({"when": when, "kind": "registered", "what": f"version {v.version} registered"})
        if t.get("promoted_at"):
            events.append({"when": t["promoted_at"], "kind": "promotion",
                           "what": f"version {v.version} became champion ({t.get('promoted_by', 'gates')})"})
        if t.get("approved_by"):
            events.append({"when": t.get("promoted_at", when), "kind": "approval",
                           "what": f"version {v.version} promoted by {t['approved_by']} despite failed gates "
                                   f"{t.get('overridden_gates', '')}: {t.get('approval_reason', '')}"})
        if t.get("rolled_back_at"):
            events.append({"when": t["rolled_back_at"], "kind": "rollback",
                           "what": f"version {v.version} rolled back by {t.get('rolled_back_by')}: "
                                   f"{t.get('rollback_reason', '')}"})
    return sorted(events, key=lambda e: e["when"])


def _report_paths(storage: StorageResource, spec: PipelineSpec, version: str):
    d = storage.local_dir(spec.name, "compliance", f"v{version}")
    return d / "report.md", d / "report.html"


def _write_report(storage: StorageResource, mlflow: MlflowResource, spec: PipelineSpec, ev: Evaluation,
                  gates: list[GateOutcome], log: Log, notices: NoticeEvidence | None = None) -> tuple[str, str]:
    title = f"Compliance report: {spec.name} version {ev.model_version}"
    sections = build_report(spec, ev, gates, ev.lineage, _history(mlflow, spec.name), notices)
    md_path, html_path = _report_paths(storage, spec, ev.model_version)
    atomic_write_bytes(md_path, to_markdown(title, sections).encode())
    atomic_write_bytes(html_path, to_html(title, sections).encode())
    if ev.run_id:
        try:
            client = mlflow.client()
            client.log_artifact(ev.run_id, str(md_path), "compliance")
            client.log_artifact(ev.run_id, str(html_path), "compliance")
        except Exception as exc:
            log.warning(f"could not log the compliance report to MLflow run {ev.run_id}: {exc}")
    return str(md_path), str(html_path)


def documentation_gate(md_path: str) -> GateOutcome:
    path = Path(md_path)
    if not path.exists():
        return GateOutcome("documentation", False, f"the compliance report {path} does not exist")
    missing = missing_sections(path.read_text())
    if missing:
        return GateOutcome("documentation", False, f"report sections empty or absent: {missing}")
    return GateOutcome("documentation", True, f"every section of {path.name} is filled")


class PromotionConfig(dg.Config):
    """A person may promote despite a failed gate (never integrity) by naming themself and a reason."""

    approver: str | None = None
    reason: str | None = None


def write_compliance_report(spec: PipelineSpec, storage: StorageResource, mlflow: MlflowResource, ev: Evaluation,
                            log: Log, notices: NoticeEvidence | None = None) -> dg.Output[ComplianceReport]:
    """The report for the evaluated version, with the verdict of every gate that needs no report (and, for a spec
    with notices, the notice template and its checks)."""
    gates = evaluate_gates(ev, spec)
    md_path, html_path = _write_report(storage, mlflow, spec, ev, gates, log, notices)
    report = ComplianceReport(model_version=ev.model_version, markdown=md_path, html=html_path,
                              gates={g.name: GateVerdict(passed=g.passed, summary=g.summary) for g in gates})
    failed = [g.name for g in gates if not g.passed]
    return dg.Output(report, metadata={
        "model_version": ev.model_version, "report": dg.MetadataValue.path(md_path),
        "report_html": dg.MetadataValue.path(html_path), "failed_gates": ", ".join(failed) or "none",
        "preview": dg.MetadataValue.md(Path(md_path).read_text()[:4000]),
    })


def gate_results(spec: PipelineSpec, ev: Evaluation, report: ComplianceReport, log: Log
                 ) -> list[dg.AssetCheckResult]:
    results = []
    for g in [*evaluate_gates(ev, spec), documentation_gate(report.markdown)]:
        if not g.passed:
            log.error(f"{spec.name} v{ev.model_version} {g.name}: {g.summary}")
        results.append(dg.AssetCheckResult(
            asset_key=asset_key(spec.name, naming.COMPLIANCE_REPORT), check_name=g.name, passed=g.passed,
            severity=dg.AssetCheckSeverity.ERROR, description=g.summary[:2000],
            metadata={"model_version": ev.model_version}))
    return results


def promote(spec: PipelineSpec, mlflow: MlflowResource, report: ComplianceReport, verdicts: dict[str, bool],
            config: PromotionConfig, store: AuditStore, storage: StorageResource, run_id: str = ""
            ) -> dg.MaterializeResult:
    """When every gate passed for the reported version (or a person approved): under `deployment.rollout: direct`
    (or with no champion yet) move `champion` to it; under a rollout policy start its rollout at the first step
    (assets/rollout_state.py). Either way the move is on the audit store's serving chain."""
    version = report.model_version
    challenger = mlflow.alias_version(spec.name, CHALLENGER)
    if challenger is None or str(challenger.version) != version:
        raise dg.Failure(f"{spec.name}: the report is for version {version} but '{CHALLENGER}' is "
                         f"{challenger.version if challenger else 'unset'}; re-run model_evaluation")
    failed = sorted(n for n, ok in verdicts.items() if not ok)
    current = mlflow.alias_version(spec.name, CHAMPION)
    if current is not None and str(current.version) == version:
        return dg.MaterializeResult(metadata={"champion_version": version, "changed": False,
                                              "decision": "already champion"})
    client = mlflow.client()
    approved = False
    if failed:
        blocked = sorted(set(failed) & NOT_OVERRIDABLE)
        if not (config.approver and config.reason) or blocked:
            why = (f"gate(s) {blocked} cannot be overridden" if blocked and config.approver else
                   "promote anyway by naming an approver and a reason in the run config "
                   "(ops: {<this asset>: {config: {approver: ..., reason: ...}}})")
            summaries = "; ".join(report.gates[n].summary for n in failed if n in report.gates)
            raise dg.Failure(
                f"{spec.name} v{version} is not promoted: failed gates {failed} (failed, or not evaluated for "
                f"this version) ({summaries}). {why}. Champion stays at {current.version if current else 'none'}.")
        approved = True
        client.set_model_version_tag(spec.name, version, "approved_by", config.approver)
        client.set_model_version_tag(spec.name, version, "approval_reason", config.reason)
        client.set_model_version_tag(spec.name, version, "overridden_gates", ",".join(failed))
        _append_approval(report, config, failed)
    decision = f"approved by {config.approver}: {config.reason}" if approved else "every blocking gate passed"
    actor = config.approver if approved else "gates"
    evidence = {"run_id": run_id, "gates": verdicts, "approved_by": config.approver if approved else None}
    move = rollout_state.enter(spec, mlflow, store, version, actor, decision, evidence) or rollout_state.promote_to(
        spec, mlflow, store, version, actor, decision, evidence,
        promoted_by=f"approval by {config.approver}" if approved else "gates")
    rollout_state.record_history(storage, spec.name, store, version, move.previous_champion)
    return dg.MaterializeResult(metadata={
        "champion_version": move.champion or "none", "previous_version": move.previous_champion or "none",
        "changed": move.changed_champion, "decision": decision if move.kind == "promote" else f"{move.text} ({decision})",
        "overridden_gates": ", ".join(failed) or "none", "rollout": move.event.rollout or "none",
        "split": move.event.split_text(), "serving_event": move.event.id,
        "report": dg.MetadataValue.path(report.markdown),
    })


# --- wiring ---------------------------------------------------------------------------------------------------


def definitions(loaded: LoadedSpec) -> dg.Definitions:
    """compliance_report, its blocking gate checks and champion_model for one spec."""
    spec = loaded.spec
    eval_key, report_key, champion_key = (asset_key(spec.name, n) for n in
                                          (naming.MODEL_EVALUATION, naming.COMPLIANCE_REPORT, naming.CHAMPION_MODEL))

    # A spec with notices documents them too: the report comes after their checks (notice_ins).
    notice_ins = {"notices": dg.AssetIn(key=asset_key(spec.name, naming.NOTICES))} if spec.notices else {}

    @dg.asset(key=report_key, group_name=naming.EVALUATION, ins={"ev": dg.AssetIn(key=eval_key), **notice_ins})
    def compliance_report(context: dg.AssetExecutionContext, mlflow: MlflowResource, storage: StorageResource,
                          ev: Evaluation, **notices: NoticeEvidence) -> dg.Output[ComplianceReport]:
        """EU AI Act Annex IV technical documentation and a NIST AI RMF mapping for this model version, written
        as Markdown and HTML from its lineage, evaluation and gate verdicts, and logged to MLflow."""
        given = notices.get("notices")
        return write_compliance_report(spec, storage, mlflow, ev, context.log,
                                       NoticeEvidence.model_validate(given) if isinstance(given, dict) else given)

    @dg.multi_asset_check(specs=[dg.AssetCheckSpec(name=name, asset=report_key, blocking=True, description=doc,
                                                   additional_deps=[eval_key]) for name, doc in GATES.items()],
                          name=f"{spec.name}__compliance_gates",
                          ins={"ev": dg.AssetIn(key=eval_key), "report": dg.AssetIn(key=report_key)})
    def compliance_gates(context: dg.AssetCheckExecutionContext, ev: Evaluation, report: ComplianceReport):
        """The compliance gates; each failure says which number broke which threshold."""
        yield from gate_results(spec, ev, report, context.log)

    @dg.asset(key=champion_key, group_name=naming.DEPLOYMENT, ins={"report": dg.AssetIn(key=report_key)})
    def champion_model(context: dg.AssetExecutionContext, config: PromotionConfig, mlflow: MlflowResource,
                       storage: StorageResource, audit: AuditResource,
                       report: ComplianceReport) -> dg.MaterializeResult:
        """Only when every blocking gate passed for the challenger: moves alias `champion` to it (the old
        champion becomes `previous`), or, under a rollout policy (deployment.rollout), starts its rollout, which
        earns it traffic step by step on live evidence. A named approver with a reason may override failed gates
        other than integrity; the report and the version's tags say so. For a spec with notices, every notice
        check must have passed for the version too (never overridden); the version is tagged with the template
        version it was checked with, and the template's `champion` alias moves with the model's. Every move is on
        the audit store's serving chain."""
        verdicts = latest_gate_verdicts(context.instance, report_key, report.model_version)
        tagged: dict[str, str] = {}
        if spec.notices is not None:
            notice = notice_verdicts(context.instance, spec.name, report.model_version)
            current = mlflow.alias_version(spec.name, CHAMPION)
            refuse_unchecked(spec, report.model_version, notice, str(current.version) if current else None)
            tagged = tag_template(mlflow, spec.name, report.model_version, str(notice.template_version))
        result = promote(spec, mlflow, report, verdicts, config, audit.store(), storage, context.run_id)
        champion = mlflow.alias_version(spec.name, CHAMPION)
        if tagged and champion is not None and str(champion.version) == report.model_version:
            follow_template(mlflow, spec.name, report.model_version)  # already champion: the alias still follows
        return dg.MaterializeResult(metadata={**(result.metadata or {}), **tagged})

    return dg.Definitions(assets=[compliance_report, champion_model], asset_checks=[compliance_gates])


def latest_gate_verdicts(instance: dg.DagsterInstance, report_key: dg.AssetKey, version: str) -> dict[str, bool]:
    """The latest result of each gate for this model version, from the instance's check history."""
    keys = [dg.AssetCheckKey(report_key, name) for name in GATES]
    records = instance.event_log_storage.get_latest_asset_check_execution_by_key(keys)
    verdicts: dict[str, bool] = {}
    for key in keys:
        rec = records.get(key)
        evaluation = rec.event.dagster_event.event_specific_data if rec and rec.event and rec.event.dagster_event \
            else None
        passed = getattr(evaluation, "passed", None)
        meta_version = getattr(evaluation, "metadata", {}).get("model_version") if evaluation else None
        ok = passed is True and meta_version is not None and str(meta_version.value) == version
        verdicts[key.name] = ok
    return verdicts


def _append_approval(report: ComplianceReport, config: PromotionConfig, failed: list[str]) -> None:
    """The report says, in its own change log, that a person promoted this version over failed gates."""
    line = (f"{_now()}: promoted by {config.approver} despite failed gates {failed}. Reason: {config.reason}")
    for path, fmt in ((report.markdown, "md"), (report.html, "html")):
        with open(path, encoding="utf8") as fh:
            text = fh.read()
        if fmt == "md":
            text = text.replace("## Human oversight\n", f"## Human oversight\n\n**Manual approval.** {line}\n", 1)
        else:
            import html

            text = text.replace("<h2>Human oversight</h2>",
                                f"<h2>Human oversight</h2><p><strong>Manual approval.</strong> {html.escape(line)}</p>",
                                1)
        atomic_write_bytes(path, text.encode())
