"""compliance_report, the blocking gates on it, champion_model (gated promotion) and the rollback job."""

from datetime import datetime, timezone
from typing import Any

import dagster as dg

from assets.checks.gates import GATES, NOT_OVERRIDABLE, GateOutcome, evaluate_gates
from assets.data import asset_key, owners_for
from assets.evaluation import CHALLENGER, CHAMPION, PREVIOUS, _alias_version
from assets.report import build_report, missing_sections, to_html, to_markdown
from assets.spec import LoadedSpec, PipelineSpec
from resources.mlflow import MlflowResource
from resources.storage import StorageResource, atomic_write_bytes

REPORT_GROUP = "evaluation"
CHAMPION_GROUP = "deployment"


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


def _write_report(storage: StorageResource, mlflow: MlflowResource, spec: PipelineSpec, ev: dict[str, Any],
                  gates: list[GateOutcome], log: Any) -> tuple[str, str]:
    title = f"Compliance report: {spec.name} version {ev['model_version']}"
    sections = build_report(spec, ev, gates, ev.get("lineage", {}), _history(mlflow, spec.name))
    md_path, html_path = _report_paths(storage, spec, ev["model_version"])
    atomic_write_bytes(md_path, to_markdown(title, sections).encode())
    atomic_write_bytes(html_path, to_html(title, sections).encode())
    if ev.get("run_id"):
        try:
            client = mlflow.client()
            client.log_artifact(ev["run_id"], str(md_path), "compliance")
            client.log_artifact(ev["run_id"], str(html_path), "compliance")
        except Exception as exc:
            log.warning(f"could not log the compliance report to MLflow run {ev['run_id']}: {exc}")
    return str(md_path), str(html_path)


def documentation_gate(md_path: str) -> GateOutcome:
    from pathlib import Path

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


class RollbackConfig(dg.Config):
    actor: str
    reason: str


def build_compliance_assets(loaded: LoadedSpec) -> list[Any]:
    spec = loaded.spec
    eval_key, report_key, champion_key = (asset_key(spec, n) for n in
                                          ("model_evaluation", "compliance_report", "champion_model"))
    owners = owners_for(spec)
    tags = {"spec": spec.name}

    @dg.asset(key=report_key, group_name=REPORT_GROUP, owners=owners, tags=tags, kinds={"markdown", "html",
                                                                                           "mlflow"},
              ins={"ev": dg.AssetIn(key=eval_key)})
    def compliance_report(context: dg.AssetExecutionContext, mlflow: MlflowResource, storage: StorageResource,
                          ev: dict) -> dg.Output[dict]:
        """EU AI Act Annex IV technical documentation and a NIST AI RMF mapping for this model version, written
        as Markdown and HTML from its lineage, evaluation and gate verdicts, and logged to MLflow."""
        gates = evaluate_gates(ev, spec)
        md_path, html_path = _write_report(storage, mlflow, spec, ev, gates, context.log)
        out = {"model_version": ev["model_version"], "markdown": md_path, "html": html_path,
               "gates": {g.name: {"passed": g.passed, "summary": g.summary} for g in gates}}
        failed = [g.name for g in gates if not g.passed]
        return dg.Output(out, metadata={
            "model_version": ev["model_version"], "report": dg.MetadataValue.path(md_path),
            "report_html": dg.MetadataValue.path(html_path), "failed_gates": ", ".join(failed) or "none",
            "preview": dg.MetadataValue.md(open(md_path).read()[:4000]),
        })

    check_specs = [dg.AssetCheckSpec(name=name, asset=report_key, blocking=True, description=doc,
                                     additional_deps=[eval_key])
                   for name, doc in GATES.items()]

    @dg.multi_asset_check(specs=check_specs, name=f"{spec.name}__compliance_gates",
                          ins={"ev": dg.AssetIn(key=eval_key), "report": dg.AssetIn(key=report_key)})
    def compliance_gates(context: dg.AssetCheckExecutionContext, ev: dict, report: dict):
        """The compliance gates; each failure says which number broke which threshold."""
        for g in [*evaluate_gates(ev, spec), documentation_gate(report["markdown"])]:
            if not g.passed:
                context.log.error(f"{spec.name} v{ev['model_version']} {g.name}: {g.summary}")
            yield dg.AssetCheckResult(asset_key=report_key, check_name=g.name, passed=g.passed,
                                      severity=dg.AssetCheckSeverity.ERROR, description=g.summary[:2000],
                                      metadata={"model_version": ev["model_version"]})

    @dg.asset(key=champion_key, group_name=CHAMPION_GROUP, owners=owners, tags=tags, kinds={"mlflow"},
              ins={"report": dg.AssetIn(key=report_key)})
    def champion_model(context: dg.AssetExecutionContext, config: PromotionConfig, mlflow: MlflowResource,
                       report: dict) -> dg.MaterializeResult:
        """Moves alias `champion` to the challenger only when every blocking gate passed for that version (the
        old champion becomes `previous`). A named approver with a reason may override failed gates other
        than integrity; the report and the version's tags say so."""
        version = str(report["model_version"])
        challenger = _alias_version(mlflow, spec.name, CHALLENGER)
        if challenger is None or str(challenger.version) != version:
            raise dg.Failure(f"{spec.name}: the report is for version {version} but '{CHALLENGER}' is "
                             f"{challenger.version if challenger else 'unset'}; re-run model_evaluation")
        verdicts = _latest_gate_verdicts(context, report_key, version)
        failed = sorted(n for n, ok in verdicts.items() if not ok)
        current = _alias_version(mlflow, spec.name, CHAMPION)
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
                raise dg.Failure(
                    f"{spec.name} v{version} is not promoted: failed gates {failed} (failed, or not evaluated for "
                    f"this version) "
                    f"({'; '.join(report['gates'].get(n, {}).get('summary', '') for n in failed if n in report['gates'])})"
                    f". {why}. Champion stays at {current.version if current else 'none'}.")
            approved = True
            client.set_model_version_tag(spec.name, version, "approved_by", config.approver)
            client.set_model_version_tag(spec.name, version, "approval_reason", config.reason)
            client.set_model_version_tag(spec.name, version, "overridden_gates", ",".join(failed))
            _append_approval(report, config, failed)
        now = _now()
        if current is not None:
            mlflow.set_alias(spec.name, PREVIOUS, str(current.version))
        mlflow.set_alias(spec.name, CHAMPION, version)
        client.set_model_version_tag(spec.name, version, "promoted_at", now)
        client.set_model_version_tag(spec.name, version, "promoted_by",
                                     f"approval by {config.approver}" if approved else "gates")
        return dg.MaterializeResult(metadata={
            "champion_version": version, "previous_version": str(current.version) if current else "none",
            "changed": True, "decision": f"approved by {config.approver}: {config.reason}" if approved
            else "every blocking gate passed", "overridden_gates": ", ".join(failed) or "none",
            "report": dg.MetadataValue.path(report["markdown"]),
        })

    return [compliance_report, compliance_gates, champion_model]


def _latest_gate_verdicts(context: dg.AssetExecutionContext, report_key: dg.AssetKey, version: str
                          ) -> dict[str, bool]:
    """The latest result of each gate for this model version, from the instance's check history."""
    keys = [dg.AssetCheckKey(report_key, name) for name in GATES]
    records = context.instance.event_log_storage.get_latest_asset_check_execution_by_key(keys)
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


def _append_approval(report: dict, config: PromotionConfig, failed: list[str]) -> None:
    """The report says, in its own change log, that a person promoted this version over failed gates."""
    line = (f"{_now()}: promoted by {config.approver} despite failed gates {failed}. Reason: {config.reason}")
    for path, fmt in ((report["markdown"], "md"), (report["html"], "html")):
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


def build_rollback_job(loaded: LoadedSpec) -> dg.JobDefinition:
    spec = loaded.spec
    champion_key = asset_key(spec, "champion_model")

    @dg.op(name=f"{spec.name}__rollback_champion", tags={"spec": spec.name})
    def rollback_champion(context: dg.OpExecutionContext, config: RollbackConfig, mlflow: MlflowResource):
        """Moves `champion` back to `previous`, and records who and why on the run and the model version."""
        current = _alias_version(mlflow, spec.name, CHAMPION)
        previous = _alias_version(mlflow, spec.name, PREVIOUS)
        if previous is None:
            raise dg.Failure(f"{spec.name}: there is no '{PREVIOUS}' version to roll back to; champion stays at "
                             f"{current.version if current else 'none'}")
        now = _now()
        mlflow.set_alias(spec.name, CHAMPION, str(previous.version))
        client = mlflow.client()
        client.delete_registered_model_alias(spec.name, PREVIOUS)
        if current is not None:
            for k, v in (("rolled_back_at", now), ("rolled_back_by", config.actor), ("rollback_reason", config.reason)):
                client.set_model_version_tag(spec.name, str(current.version), k, v)
        context.instance.add_run_tags(context.run_id, {"intelligentops/rollback_actor": config.actor,
                                                       "intelligentops/rollback_reason": config.reason[:200]})
        context.log.info(f"{spec.name}: champion {current.version if current else 'none'} -> {previous.version}")
        yield dg.AssetMaterialization(asset_key=champion_key, metadata={
            "champion_version": str(previous.version), "rolled_back_from": str(current.version) if current else "",
            "decision": f"rollback by {config.actor}: {config.reason}", "changed": True})
        yield dg.Output(None)

    @dg.job(name=f"{spec.name}__rollback", tags={"spec": spec.name},
            description=f"Move {spec.name}'s champion alias back to the previous version (config: actor, reason).")
    def rollback():
        rollback_champion()

    return rollback


