"""What the notices stage, promotion and rollback share: the spec's template as a document, the rules its checks
apply, the notice checks' latest verdicts for one model version, and moving the template's `champion` alias.

The template's alias follows the champion model: promotion tags the model version with the template version it
was checked with (`notice_template_version`, `notice_template_sha256`), and whenever a version becomes champion
(at once, at a rollout's last step, or restored by a rollback) the alias moves to its template version. While a
rollout's challenger answers part of the traffic, its adverse decisions are rendered with the champion's template. So the
server (which renders from the template's `champion` alias) always speaks with a template checked against the
model it serves.
"""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg

from assets import naming
from assets.spec import LoadedSpec, PipelineSpec
from core.names import NOTICE_TEMPLATE_SHA_TAG, NOTICE_TEMPLATE_TAG, notice_prompt_name
from core.notices.checks import CHECKS, Rules, sensitive_terms
from core.notices.template import NoticeTemplate

TEMPLATE_VERSION_KEY = "template_version"  # check-result metadata: the template version a check judged


def template_of(loaded: LoadedSpec) -> NoticeTemplate:
    """The spec's notice template as a document: its file's text and the `notices:` section's context."""
    n = loaded.spec.notices
    if n is None:
        raise ValueError(f"{loaded.path}: the spec has no notices section")
    path = loaded.resolve(n.template)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise dg.Failure(f"{loaded.path}: notices.template {path} cannot be read ({exc.strerror or exc})") from None
    return NoticeTemplate(text=text, reasons=n.reasons, groups=n.groups, lender=n.lender, top_factors=n.top_factors,
                          max_reasons=n.max_reasons, adverse=tuple(n.adverse), name=notice_prompt_name(loaded.name))


def rules_of(spec: PipelineSpec, citeable: list[str], numeric: list[str]) -> Rules:
    """What the checks ask of a notice for this spec, and what a model version with these inputs can cite."""
    n = spec.notices
    assert n is not None
    barred = [*spec.sensitive_columns, *n.proxies]
    return Rules(sensitive_terms=sensitive_terms(spec.sensitive_columns, n.proxies), sensitive_features=barred,
                 disclosures=dict(n.disclosures), max_grade=n.max_grade, min_chars=n.min_chars, max_chars=n.max_chars,
                 citeable=citeable, numeric=numeric, free_text=[*spec.features.categorical, *spec.features.text])


@dataclass(frozen=True)
class NoticeVerdicts:
    """The notice checks' latest results for one model version: the template version they judged (when every
    check judged the same one) and the checks that failed or did not run for this version."""

    template_version: str | None
    failed: list[str]
    summaries: dict[str, str]

    @property
    def passed(self) -> bool:
        return not self.failed and self.template_version is not None


def notice_verdicts(instance: dg.DagsterInstance, spec_name: str, version: str) -> NoticeVerdicts:
    """Each notice check's latest result from the instance's check history, for this model version only."""
    key = naming.asset_key(spec_name, naming.NOTICES)
    keys = [dg.AssetCheckKey(key, name) for name in CHECKS]
    records = instance.event_log_storage.get_latest_asset_check_execution_by_key(keys)
    failed, summaries, templates = [], {}, set()
    for check_key in keys:
        rec = records.get(check_key)
        evaluation = rec.event.dagster_event.event_specific_data if rec and rec.event and rec.event.dagster_event \
            else None
        meta = getattr(evaluation, "metadata", {}) if evaluation else {}
        judged = meta.get("model_version")
        if evaluation is None or judged is None or str(judged.value) != version:
            failed.append(check_key.name)
            summaries[check_key.name] = "not run for this version"
            continue
        summaries[check_key.name] = evaluation.description or ""
        if evaluation.passed is not True:
            failed.append(check_key.name)
        template = meta.get(TEMPLATE_VERSION_KEY)
        templates.add(str(template.value) if template is not None else None)
    template_version = next(iter(templates)) if len(templates) == 1 else None
    if len(templates) > 1:
        failed.append("template_version")  # the checks judged different template versions: run notices again
    return NoticeVerdicts(template_version=template_version, failed=failed, summaries=summaries)


def refuse_unchecked(spec: PipelineSpec, version: str, verdicts: NoticeVerdicts, champion: str | None) -> None:
    """Promotion stops here when a notice check failed or did not run for this version: never overridable (a
    notice that misstates its reasons, or names a sensitive attribute, is never served)."""
    if verdicts.passed:
        return
    details = "; ".join(f"{n}: {verdicts.summaries.get(n, '')}" for n in verdicts.failed)
    raise dg.Failure(f"{spec.name} v{version} is not promoted: notice checks {verdicts.failed} failed or did not run "
                     f"for this version ({details}). Fix the template or the reasons and materialize "
                     f"{spec.name}/{naming.NOTICES}; notice checks cannot be overridden. Champion stays at "
                     f"{champion or 'none'}.")


def tag_template(mlflow, spec_name: str, model_version: str, template_version: str) -> dict[str, str]:
    """Tag the model version with the template version its notice checks judged (and its sha256), so that whenever
    the version becomes champion (promotion, a rollout's last step, a rollback) the template's `champion` alias
    follows it (`follow_template`). Returns metadata for the promotion's materialization."""
    from core.notices.registry import load

    client = mlflow.client()
    name = notice_prompt_name(spec_name)
    template = load(client, name, mlflow.shown_registry_uri(), version=template_version)
    if template is None:
        raise dg.Failure(f"{spec_name}: notice template {name} version {template_version}, which the notice checks "
                         f"judged, is not in the registry at {mlflow.shown_registry_uri()}; materialize "
                         f"{spec_name}/{naming.NOTICE_TEMPLATE} and {spec_name}/{naming.NOTICES}")
    current = load(client, name, mlflow.shown_registry_uri(), alias=naming.CHAMPION)
    client.set_model_version_tag(spec_name, model_version, NOTICE_TEMPLATE_TAG, template_version)
    client.set_model_version_tag(spec_name, model_version, NOTICE_TEMPLATE_SHA_TAG, template.sha256)
    return {"notice_template_version": template_version, "notice_template_uri": template.uri or "",
            "notice_template_previous": current.version if current is not None else "none"}


def follow_template(mlflow, spec_name: str, model_version: str) -> str | None:
    """The template's `champion` alias to the version `model_version` (the new champion, or the one a rollback
    restored) was checked with (None when that model version carries no template tag, as one promoted before
    notices existed, or a spec without notices)."""
    from core.notices.registry import set_alias

    client = mlflow.client()
    tags = dict(client.get_model_version(spec_name, model_version).tags or {})
    template_version = tags.get(NOTICE_TEMPLATE_TAG)
    if template_version:
        set_alias(client, notice_prompt_name(spec_name), naming.CHAMPION, template_version)
    return template_version
