"""notice_template and notices on a real instance, real MLflow on SQLite (its prompt registry), real training.

The template is registered only when its content changes; the notices of the challenger's adverse test decisions
pass their checks and promotion moves the template's champion alias with the model and tags the version; a
template that drops a disclosure, or a model that can cite a feature the reasons do not cover, is refused.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
from loans_support import PROMOTION, loans, spec
from support import failure_text, materialize, write_spec

from core.names import NOTICE_TEMPLATE_TAG
from orchestration.definitions import build_definitions
from resources.mlflow import MlflowResource

TEMPLATE = """Notice about your loan application

Date: {{ date }}. Reference: {{ decision_id }}.

{{ lender.name }} did not approve your application on its own. A person will now review it.

The main reasons were:
{% for reason in reasons %}
{{ loop.index }}. {{ reason }}
{% endfor %}

You have the right to ask us for the reasons for this decision. You have the right to have a person review this decision.

Write to {{ lender.contact }} and give the reference above.
"""
NOTICES = {
    "template": "loans_notice.j2",
    "lender": {"name": "Test Lending", "contact": "review@example.com"},
    "reasons": {"income": {"high": "Your stated income", "low": "Your income is too low"},
                "debt_ratio": {"high": "Your debt is too high for your income", "low": "Your debt is unusually low"},
                "purpose": "What the loan is for"},
    "disclosures": {"right_to_reasons": "You have the right to ask us for the reasons for this decision.",
                    "human_review": "You have the right to have a person review this decision.",
                    "contact": "review@example.com"},
    "top_factors": 3, "max_reasons": 2, "max_grade": 9, "min_chars": 200, "max_chars": 1500,
}


def setup(pipelines: Path, text: str = TEMPLATE, write_data: bool = True, **over) -> dg.Definitions:
    if write_data:
        loans().to_csv(pipelines / "loans.csv", index=False)
    (pipelines / "loans_notice.j2").write_text(text)
    write_spec(pipelines, spec(notices=NOTICES, **over))
    return build_definitions(pipelines)


def notice_checks(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {c.check_name: c for c in result.get_asset_check_evaluations()
            if c.asset_key == dg.AssetKey(["loans", "notices"])}


def prompt_versions(home: Path) -> list[str]:
    return sorted(str(v.version) for v in MlflowResource(home=str(home)).client().search_prompt_versions("loans.notice"))


def test_the_template_is_registered_only_when_its_content_changes(home: Path, pipelines: Path, instance):
    select = 'key:"loans/notice_template"'
    first = materialize(setup(pipelines), instance, select)
    assert first.success, failure_text(first)
    meta = first.get_asset_materialization_events()[0].materialization.metadata
    assert meta["version"].value == "1" and meta["uri"].value == "prompts:/loans.notice/1"
    assert meta["registered"].value == "new version" and len(meta["sha256"].value) == 64

    again = materialize(setup(pipelines), instance, select)
    assert again.get_asset_materialization_events()[0].materialization.metadata["registered"].value == "unchanged"
    assert prompt_versions(home) == ["1"]

    changed = materialize(setup(pipelines, TEMPLATE.replace("A person", "A member of our staff")), instance, select)
    assert changed.get_asset_materialization_events()[0].materialization.metadata["version"].value == "2"
    # The reasons are part of the content: a reworded reason is a new version too.
    reworded = dict(NOTICES, reasons={**NOTICES["reasons"], "purpose": "The purpose of the loan"})
    write_spec(pipelines, spec(notices=reworded))
    third = materialize(build_definitions(pipelines), instance, select)
    assert third.get_asset_materialization_events()[0].materialization.metadata["version"].value == "3"
    # Back to the first content: the version that holds it is reused, nothing registered.
    back = materialize(setup(pipelines), instance, select)
    assert back.get_asset_materialization_events()[0].materialization.metadata["version"].value == "1"
    assert prompt_versions(home) == ["1", "2", "3"]

    broken = materialize(setup(pipelines, "{% for r in reasons %}"), instance, select)
    assert not broken.success and "loans_notice.j2: notice template loans.notice: line 1" in failure_text(broken)


@pytest.mark.slow
def test_notices_gate_promotion_and_move_the_template_alias_with_the_model(home: Path, pipelines: Path, instance):
    mlflow = MlflowResource(home=str(home))
    first = materialize(setup(pipelines), instance, PROMOTION)
    assert first.success, failure_text(first)
    checks = notice_checks(first)
    assert set(checks) == {"reason_coverage", "faithfulness", "no_sensitive_reasons", "disclosures", "readability",
                           "length", "hostile_text"}
    assert all(c.passed for c in checks.values()), {n: c.description for n, c in checks.items()}
    meta = {m.asset_key.path[-1]: m.materialization.metadata for m in first.get_asset_materialization_events()}
    assert meta["notices"]["adverse_decisions"].value > 0 and meta["notices"]["template_version"].value == "1"
    notices_file = Path(meta["notices"]["notices"].value)
    assert notices_file.is_file() and "You have the right to have a person review" in notices_file.read_text()
    client = mlflow.client()
    assert str(client.get_prompt_version_by_alias("loans.notice", "champion").version) == "1"
    champion = mlflow.get_version("loans", "champion")
    assert champion.tags[NOTICE_TEMPLATE_TAG] == "1"
    assert meta["champion_model"]["notice_template_version"].value == "1"
    report = Path(meta["compliance_report"]["report"].value).read_text()
    assert "## Notices to applicants" in report and "prompts:/loans.notice/1" in report
    assert "| debt_ratio | high: Your debt is too high for your income; low: Your debt is unusually low |" in report
    assert "| faithfulness | passed:" in report and "| Map 1.1 |" in report and "| Govern 4 |" in report

    # A template that drops a disclosure is registered (version 2) but refused: the champion template stays.
    refused = materialize(setup(pipelines, TEMPLATE.replace(
        "You have the right to have a person review this decision.", ""), write_data=False), instance,
        'key:"loans/notice_template" or key:"loans/notices" or key:"loans/compliance_report" or '
        'key:"loans/champion_model"')
    assert not refused.success
    assert not notice_checks(refused)["disclosures"].passed
    assert "human_review" in notice_checks(refused)["disclosures"].description
    assert str(client.get_prompt_version_by_alias("loans.notice", "champion").version) == "1"
    approved = materialize(build_definitions(pipelines), instance, 'key:"loans/champion_model"', run_config={
        "ops": {"loans__champion_model": {"config": {"approver": "ana@example.com", "reason": "pilot"}}}})
    assert not approved.success and "notice checks ['disclosures']" in failure_text(approved)
    assert "cannot be overridden" in failure_text(approved)

    # The model (trained with `purpose`) checked against reasons that no longer cover it: refused by name.
    no_purpose = dict(NOTICES, reasons={k: v for k, v in NOTICES["reasons"].items() if k != "purpose"})
    (pipelines / "loans_notice.j2").write_text(TEMPLATE)
    write_spec(pipelines, spec(notices=no_purpose, features={"numeric": ["income", "debt_ratio"]}))
    uncovered = materialize(build_definitions(pipelines), instance,
                            'key:"loans/notice_template" or key:"loans/notices"')
    assert not uncovered.success
    coverage = notice_checks(uncovered)["reason_coverage"]
    assert not coverage.passed and "feature 'purpose' can be a top factor but has no reason" in coverage.description
    assert str(client.get_prompt_version_by_alias("loans.notice", "champion").version) == "1"
