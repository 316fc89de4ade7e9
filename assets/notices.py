"""notice_template and notices: what a person decided about is told, as versioned and gated as the model.

For a spec with a `notices:` section (assets/spec.py), `<spec>/notice_template` registers the template (its file
and the reason table it renders with) in MLflow's prompt registry as `<spec>.notice`, a new version only when the
content changed; `<spec>/notices` renders, with that version, the notice of every adverse decision the challenger
makes on the test split, exactly as the server will (core/notices/), and judges them with seven blocking checks
(core/notices/checks.py). champion_model re-reads those checks for the exact model version before it promotes,
and moves the template's `champion` alias with the model (assets/notice_gate.py).
"""

import json
from datetime import datetime, timezone
from typing import Any

import dagster as dg

from assets import naming
from assets.evidence import Evaluation, GateVerdict, NoticeEvidence, NoticeTemplateInfo
from assets.naming import ROW_ID, SPLIT, asset_key
from assets.notice_gate import TEMPLATE_VERSION_KEY, rules_of, template_of
from assets.spec import LoadedSpec
from assets.wiring import DataFrameType, Log
from core.lazy import pd
from core.names import THRESHOLD_TAG
from core.notices.checks import CHECKS, Outcome, Rendered, render_one, run_checks
from core.notices.template import NoticeRequest, NoticeTemplate, NoticeTemplateError
from resources.mlflow import MlflowResource
from resources.storage import StorageResource, atomic_write_bytes

MAX_FACTORS_SHOWN = 20


def register_template(loaded: LoadedSpec, mlflow: MlflowResource, log: Log) -> NoticeTemplateInfo:
    """The spec's template in the prompt registry: parsed first (a syntax error names the file and line), then
    registered when no version holds this content."""
    from core.notices.registry import register

    template = template_of(loaded)
    path = loaded.resolve(loaded.spec.notices.template)  # type: ignore[union-attr]
    try:
        template.compiled()
    except NoticeTemplateError as exc:
        raise dg.Failure(f"{path}: {exc}") from None
    reg = register(mlflow.client(), template.name, template,
                   message=f"{path.name} and the reasons of {loaded.path.name}, sha256 {template.sha256[:16]}")
    log.info(f"{template.name}: version {reg.version} ({'registered now' if reg.created else 'unchanged'})")
    return NoticeTemplateInfo(name=reg.name, version=reg.version, uri=reg.uri, sha256=reg.sha256,
                              created=reg.created)


def _typical(preprocessing: dict[str, Any]) -> tuple[dict[str, float], list[str]]:
    """The training split's median of each numeric feature, and every feature the model can cite."""
    typical = {c: float(st["median"]) for c, st in preprocessing["numeric"].items()}
    citeable = [*preprocessing["numeric"], *preprocessing["categorical"], *preprocessing["embeddings"]]
    return typical, citeable


def adverse_requests(loaded: LoadedSpec, model: Any, threshold: float, template: NoticeTemplate, test: "pd.DataFrame",
                  date: str) -> tuple[list[tuple[str, NoticeRequest]], dict[str, float], list[str]]:
    """(row id, request) for every adverse decision of the test rows, as the server would decide them; and the
    model's typical values and citeable features."""
    from core.audit import redact

    spec = loaded.spec
    typical, citeable = _typical(model.unwrap_python_model().preprocessing)
    features = citeable  # the version's own inputs: the spec may have changed since it was trained
    scored = model.predict(test[features], params={"explain": template.top_factors})
    requests = []
    for i, probability in enumerate(scored["probability"].to_numpy(dtype=float)):
        if not template.is_adverse(int(probability >= threshold)):
            continue
        row = {c: test[c].iloc[i] for c in features}
        row_id = str(test[ROW_ID].iloc[i])
        requests.append((row_id, NoticeRequest(decision_id=f"test-{row_id}", date=date,
                                               factors=json.loads(scored["top_factors"].iloc[i]),
                                               applicant=redact(row, spec.deployment.redact), typical=typical)))
    return requests, typical, citeable


def render_notices(loaded: LoadedSpec, mlflow: MlflowResource, storage: StorageResource, ev: Evaluation,
                   info: NoticeTemplateInfo, validated: "pd.DataFrame", splits: "pd.DataFrame", log: Log
                   ) -> tuple[NoticeEvidence, list[Outcome]]:
    """Render the challenger's adverse test decisions with the registered template version and check them."""
    from core.notices.registry import load

    spec = loaded.spec
    if not ev.loaded:
        raise dg.Failure(f"{spec.name} v{ev.model_version} did not load ({ev.integrity.load_error}); no notice can "
                         "be rendered for it")
    # The registered version, read back and digest-checked the way the server reads it.
    template = load(mlflow.client(), info.name, mlflow.shown_registry_uri(), version=info.version)
    if template is None:
        raise dg.Failure(f"{info.uri} is not in the registry at {mlflow.shown_registry_uri()}; materialize "
                         f"{spec.name}/{naming.NOTICE_TEMPLATE}")
    version = ev.model_version
    tags = dict(mlflow.client().get_model_version(spec.name, version).tags or {})
    threshold = float(tags.get(THRESHOLD_TAG, ev.test.threshold if ev.test else 0.5))
    model = mlflow.load_model(spec.name, version=version)
    frame = validated.merge(splits, on=ROW_ID, how="inner", validate="one_to_one")
    test = frame[frame[SPLIT] == "test"].reset_index(drop=True)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    requests, _, citeable = adverse_requests(loaded, model, threshold, template, test, date)
    rules = rules_of(spec, citeable, [c for c in citeable if c in spec.features.numeric])
    rendered: list[Rendered] = [render_one(template, row_id, request, rules.free_text) for row_id, request in requests]
    outcomes = run_checks(template, rules, rendered)
    path = _write(storage, spec.name, version, template, rendered)
    log.info(f"{spec.name} v{version}: {len(rendered)} notices with {info.uri}; failed checks: "
             f"{[o.name for o in outcomes if not o.passed] or 'none'}")
    evidence = NoticeEvidence(
        model_version=version, template=info, test_rows=len(test), adverse_rows=len(rendered),
        checks={o.name: GateVerdict(passed=o.passed, summary=o.summary) for o in outcomes},
        reasons={k: (v if isinstance(v, str) else dict(v)) for k, v in template.reasons.items()},
        sample=rendered[0].text if rendered else None, path=str(path))
    return evidence, outcomes


def _write(storage: StorageResource, spec_name: str, version: str, template: NoticeTemplate,
           rendered: list[Rendered]) -> Any:
    """Every notice rendered, one JSON line each, under <home>/<spec>/notices/v<model>-t<template>/."""
    path = storage.local_dir(spec_name, "notices", f"v{version}-t{template.version}") / "notices.jsonl"
    lines = [json.dumps({"row_id": n.row_id, "reasons": list(n.cited), "features": list(n.cited_features),
                         "uncovered": list(n.uncovered), "factors": list(n.request.factors)[:MAX_FACTORS_SHOWN],
                         "decision_id": n.request.decision_id, "date": n.request.date, "notice": n.text},
                        default=str) for n in rendered]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


def notices_metadata(evidence: NoticeEvidence, outcomes: list[Outcome]) -> dict[str, Any]:
    table = ["| check | result | summary |", "| --- | --- | --- |"]
    table += [f"| {o.name} | {'passed' if o.passed else 'FAILED'} | {o.summary.replace('|', '/')[:300]} |"
              for o in outcomes]
    meta: dict[str, Any] = {
        "model_version": evidence.model_version, "template_version": evidence.template.version,
        "template_uri": evidence.template.uri, "template_sha256": evidence.template.sha256,
        "test_rows": evidence.test_rows, "adverse_decisions": evidence.adverse_rows,
        "checks": dg.MetadataValue.md("\n".join(table)),
        "failed_checks": ", ".join(o.name for o in outcomes if not o.passed) or "none",
    }
    if evidence.path:
        meta["notices"] = dg.MetadataValue.path(evidence.path)
    if evidence.sample:
        meta["sample_notice"] = dg.MetadataValue.md("```\n" + evidence.sample.replace("```", "'''") + "```")
    return meta


def check_results(spec_name: str, evidence: NoticeEvidence, outcomes: list[Outcome], log: Log
                  ) -> list[dg.AssetCheckResult]:
    results = []
    for o in outcomes:
        if not o.passed:
            log.error(f"{spec_name} v{evidence.model_version} notice check {o.name}: {o.summary}")
        results.append(dg.AssetCheckResult(
            asset_key=asset_key(spec_name, naming.NOTICES), check_name=o.name, passed=o.passed,
            severity=dg.AssetCheckSeverity.ERROR, description=o.summary[:2000],
            metadata={"model_version": evidence.model_version, TEMPLATE_VERSION_KEY: evidence.template.version,
                      **{k: v for k, v in o.details.items() if isinstance(v, int | float | str)}}))
    return results


# --- wiring ---------------------------------------------------------------------------------------------------


def definitions(loaded: LoadedSpec) -> dg.Definitions:
    """notice_template and notices (with their blocking checks) for a spec with a notices section."""
    spec = loaded.spec
    if spec.notices is None:
        return dg.Definitions()
    template_key, notices_key = (asset_key(spec.name, n) for n in (naming.NOTICE_TEMPLATE, naming.NOTICES))
    eval_key = asset_key(spec.name, naming.MODEL_EVALUATION)

    @dg.asset(key=template_key, group_name=naming.EVALUATION)
    def notice_template(context: dg.AssetExecutionContext, mlflow: MlflowResource) -> dg.Output[NoticeTemplateInfo]:
        """The notice template (the Jinja file next to the spec and the spec's reason table) in MLflow's prompt
        registry as `<spec>.notice`: a new prompt version only when its content changed. Metadata: version, URI,
        sha256."""
        info = register_template(loaded, mlflow, context.log)
        return dg.Output(info, metadata={"version": info.version, "uri": info.uri, "sha256": info.sha256,
                                         "registered": "new version" if info.created else "unchanged"})

    @dg.asset(key=notices_key, group_name=naming.EVALUATION,
              ins={"ev": dg.AssetIn(key=eval_key), "info": dg.AssetIn(key=template_key),
                   "validated": dg.AssetIn(key=asset_key(spec.name, naming.VALIDATED_DATASET)),
                   "splits": dg.AssetIn(key=asset_key(spec.name, naming.TRAINING_SPLITS))},
              check_specs=[dg.AssetCheckSpec(name, asset=notices_key, blocking=True, description=doc)
                           for name, doc in CHECKS.items()])
    def notices(context: dg.AssetExecutionContext, mlflow: MlflowResource, storage: StorageResource,
                ev: Evaluation, info: NoticeTemplateInfo, validated: DataFrameType, splits: DataFrameType):
        """The notice of every adverse decision the challenger makes on the test split, rendered with the
        registered template version exactly as the server renders it, and checked: faithful to the decision's
        top factors, no sensitive attribute or proxy, the required disclosures, readable, within length bounds,
        inert to hostile applicant text. Promotion needs every check passed for the version."""
        evidence, outcomes = render_notices(loaded, mlflow, storage, ev, info, validated, splits, context.log)
        yield dg.Output(evidence, metadata=notices_metadata(evidence, outcomes))
        yield from check_results(spec.name, evidence, outcomes, context.log)

    return dg.Definitions(assets=[notice_template, notices])
