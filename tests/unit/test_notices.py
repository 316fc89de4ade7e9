"""Notices as pure functions: the sandboxed renderer, the reasons a decision gives, the checks that refuse a bad
template, hostile applicant text, and the spec's notices section refused at load (core/notices/, assets/spec.py)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
from support import PIPELINES, shipped_spec, write_spec

from assets.notice_gate import rules_of
from assets.spec import SpecError, load_spec
from core.notices.checks import HOSTILE_TEXTS, Rules, hostile_renders, render_one, run_checks
from core.notices.template import NoticeRequest, NoticeTemplate, NoticeTemplateError, generate_notice, inert

SHIPPED = load_spec(PIPELINES / "credit_risk.yaml")
NOTICES = SHIPPED.spec.notices
TEXT = (PIPELINES / "credit_risk_notice.j2").read_text()
FEATURES = SHIPPED.spec.features


def template(text: str = TEXT, **over) -> NoticeTemplate:
    base = dict(text=text, reasons=NOTICES.reasons, groups=NOTICES.groups, lender=NOTICES.lender,
                top_factors=NOTICES.top_factors, max_reasons=NOTICES.max_reasons, adverse=tuple(NOTICES.adverse))
    return NoticeTemplate(**{**base, **over})


RULES: Rules = rules_of(SHIPPED.spec, FEATURES.all, FEATURES.numeric)
TYPICAL = {c: 10.0 for c in FEATURES.numeric}
APPLICANT = {**{c: 12.0 for c in FEATURES.numeric}, **{c: "individual" for c in FEATURES.categorical},
             "loan_amount": 15000.0, "emp_title": "registered nurse"}


def request(factors: list[dict], **applicant) -> NoticeRequest:
    return NoticeRequest(decision_id="d-1", date="2026-11-29", factors=factors, applicant={**APPLICANT, **applicant},
                         typical=TYPICAL)


FACTORS = [{"feature": "debt_to_income", "value": 31.0, "contribution": 0.12},
           {"feature": "annual_income", "value": 8.0, "contribution": 0.08},
           {"feature": "term", "value": 36.0, "contribution": -0.05},   # lowered the score: not a reason
           {"feature": "inquiries_last_12m", "value": None, "contribution": 0.02}]


def rendered(t: NoticeTemplate, factors: list[dict] = FACTORS, n: int = 3):
    return [render_one(t, f"row{i}", request(factors), RULES.free_text) for i in range(n)]


def verdicts(t: NoticeTemplate, rules: Rules = RULES, factors: list[dict] = FACTORS) -> dict:
    return {o.name: o for o in run_checks(t, rules, rendered(t, factors))}


def test_a_notice_gives_the_reasons_of_the_factors_that_raised_the_score_in_their_order_and_direction():
    notice = generate_notice(template(), request(FACTORS))
    assert [c.text for c in notice.citations] == ["Your debt is too high compared with your income",
                                                   "Your annual income is too low"]
    # inquiries_last_12m is missing and its reason has no `missing` entry: named, never made up.
    assert notice.uncovered == ("inquiries_last_12m (missing)",)
    lines = notice.text.splitlines()
    assert "1. Your debt is too high compared with your income" in lines and "2. Your annual income is too low" in lines
    assert "The length of the loan term you chose" not in notice.text


def test_the_shipped_template_passes_every_check_but_coverage_names_the_missing_direction():
    v = verdicts(template())
    assert all(v[n].passed for n in v if n != "reason_coverage"), {n: o.summary for n, o in v.items()}
    assert not v["reason_coverage"].passed and "inquiries_last_12m (missing)" in v["reason_coverage"].summary
    covered = [f for f in FACTORS if f["feature"] != "inquiries_last_12m"]
    assert all(o.passed for o in verdicts(template(), factors=covered).values())


COVERED = [f for f in FACTORS if f["feature"] != "inquiries_last_12m"]


def test_a_template_that_cites_a_reason_that_is_not_a_top_factor_fails_faithfulness():
    text = TEXT.replace("The main reasons were:", "The main reasons were:\nYou have too many open credit cards")
    v = verdicts(template(text), factors=COVERED)
    assert not v["faithfulness"].passed
    assert "cites 'You have too many open credit cards', which is not one of its top factors" in v["faithfulness"].summary


def test_a_template_that_gives_the_reasons_out_of_order_or_none_fails_faithfulness():
    reversed_ = TEXT.replace("{% for reason in reasons %}", "{% for reason in reasons|reverse %}")
    v = verdicts(template(reversed_), factors=COVERED)
    assert not v["faithfulness"].passed and "out of the factors' order" in v["faithfulness"].summary
    none = re.sub(r"\{% for reason in reasons %\}.*?\{% endfor %\}", "", TEXT, flags=re.S)
    assert "gives no reason" in verdicts(template(none), factors=COVERED)["faithfulness"].summary
    # An adverse decision none of whose first top_factors factors raised its score: the check says what to change.
    lowered = [{**f, "contribution": -abs(f["contribution"])} for f in COVERED]
    summary = verdicts(template(), factors=lowered)["faithfulness"].summary
    assert "gives no reason (none of its first 4 factors raised its score; notices.top_factors" in summary
    # Only the first reason is still faithful: a subsequence, in order.
    first = TEXT.replace("{% for reason in reasons %}", "{% for reason in reasons[:1] %}")
    assert verdicts(template(first), factors=COVERED)["faithfulness"].passed


def test_a_template_that_names_a_sensitive_column_or_a_proxy_fails():
    for added, term in (("Your homeownership was taken into account.", "homeownership"),
                        ("Renters are reviewed with more care.", "renter")):
        v = verdicts(template(TEXT.replace("No final decision has been made yet.", added)), factors=COVERED)
        assert not v["no_sensitive_reasons"].passed, added
        assert f"names '{term}'" in v["no_sensitive_reasons"].summary.lower()
    # The required fair-lending disclosure lists protected classes, and that is allowed.
    scoring = load_spec(PIPELINES / "credit_scoring.yaml").spec
    assert {"age", "marital"} <= {t.lower() for t in rules_of(scoring, [], []).sensitive_terms}


def test_a_template_that_drops_a_disclosure_fails_naming_it():
    text = TEXT.replace("You have the right to have a person review this decision. ", "")
    v = verdicts(template(text), factors=COVERED)
    assert not v["disclosures"].passed and v["disclosures"].summary.startswith("human_review")
    assert "missing from 3 of 3 notices" in v["disclosures"].summary


def test_a_template_that_is_too_long_or_too_hard_to_read_fails():
    padding = "\nPlease read the following carefully. " * 60
    v = verdicts(template(TEXT + padding), factors=COVERED)
    assert not v["length"].passed and "over 2000 characters" in v["length"].summary
    legalese = TEXT.replace("No final decision has been made yet.",
                            "Notwithstanding the aforementioned determination, institutional underwriting "
                            "considerations necessitate comprehensive supplementary evaluation procedures "
                            "incorporating multidimensional creditworthiness characteristics, "
                            "notwithstanding preliminary automated classification outcomes.")
    v = verdicts(template(legalese), rules=replace(RULES, max_grade=6.0), factors=COVERED)
    assert not v["readability"].passed and "above grade 6" in v["readability"].summary


def test_hostile_job_titles_render_inert():
    t = template()
    sample = render_one(t, "row0", request(COVERED), RULES.free_text)
    problems, renders = hostile_renders(t, RULES, sample)
    assert problems == []
    baseline = generate_notice(t, request(COVERED)).text
    for hostile in HOSTILE_TEXTS:
        out = generate_notice(t, request(COVERED, emp_title=hostile)).text
        assert "49" not in out  # {{ 7 * 7 }} and friends are never evaluated
        assert "<script" not in out and "<b " not in out and "\x1b" not in out and "\u202e" not in out
        assert len(out.splitlines()) == len(baseline.splitlines())  # no line of its own: "Reason 1:" stays inline
        assert len(out) <= len(baseline) + 2 * 80 * 6  # cut to 80 characters (then escaped)
    out = generate_notice(t, request(COVERED, emp_title="{{ 7 * 7 }}")).text
    assert "job title ({{ 7 * 7 }})" in out
    out = generate_notice(t, request(COVERED, emp_title="nurse\n\nReason 1: Your application was approved.")).text
    assert "(nurse Reason 1: Your application was approved.)" in out
    assert "&lt;script&gt;" in generate_notice(t, request(COVERED, emp_title="<script>alert('x')</script>")).text


def test_a_template_that_lets_a_value_through_unescaped_fails_the_hostile_check():
    unsafe = TEXT.replace("{{ applicant.emp_title or \"none given\" }}", "{{ applicant.emp_title|safe }}")
    v = verdicts(template(unsafe), factors=COVERED)
    assert not v["hostile_text"].passed and "emp_title: hostile text" in v["hostile_text"].summary


def test_the_sandbox_gives_no_attribute_no_call_and_no_undefined_variable():
    for bad in ("{{ lender.__class__ }}", "{{ reasons.append('x') }}", "{{ applicant.items() }}",
                "{{ range(3) }}", "{{ secret }}", "{{ lender.missing_key }}"):
        with pytest.raises(NoticeTemplateError, match="credit_risk.notice|notice"):
            generate_notice(template(TEXT + bad, name="credit_risk.notice"), request(COVERED))
    ok = template("{% macro item(r) %}- {{ r }}{% endmacro %}{% for r in reasons %}{{ loop.index }}{{ item(r) }}\n"
                  "{% endfor %}{{ lender.name|upper }}")
    assert generate_notice(ok, request(COVERED)).text.startswith("1- Your debt")
    with pytest.raises(NoticeTemplateError, match="line 1"):
        template("{% for r in reasons %}").compiled()


def test_inert_values():
    assert inert(None) == "" and inert(float("nan")) == "" and inert(15000.0) == "15000" and inert(2.5) == "2.5"
    assert inert("a\tb\n\nc\x1bd\u202ee") == "a b c\ufffdd\ufffde"
    assert len(inert("x" * 1000)) == 80


def test_the_content_digest_covers_the_text_and_the_context():
    t = template()
    assert t.sha256 == template().sha256
    assert template(TEXT + " ").sha256 != t.sha256
    assert template(lender={**NOTICES.lender, "contact": "x@example.com"}).sha256 != t.sha256
    again = NoticeTemplate.from_context(t.text, t.context_json(), "credit_risk.notice", "3")
    assert again.sha256 == t.sha256 and again.version == "3"


def test_checks_fail_when_there_is_nothing_to_check():
    assert all(not o.passed and "no adverse decision" in o.summary for o in run_checks(template(), RULES, []))


def test_a_model_that_can_cite_a_feature_without_a_reason_fails_coverage():
    rules = replace(RULES, citeable=[*FEATURES.all, "num_accounts_120d_past_due"])
    v = verdicts(template(), rules=rules, factors=COVERED)
    assert not v["reason_coverage"].passed
    assert "'num_accounts_120d_past_due' can be a top factor but has no reason" in v["reason_coverage"].summary


# --- the spec ---------------------------------------------------------------------------------------------------


def spec_with(tmp_path: Path, **notices) -> Path:
    raw = shipped_spec("credit_risk")
    raw["notices"] = {**raw["notices"], **notices}
    return write_spec(tmp_path, raw)


def test_the_spec_refuses_a_feature_without_a_reason(tmp_path):
    reasons = dict(shipped_spec("credit_risk")["notices"]["reasons"])
    del reasons["loan_amount"]
    with pytest.raises(SpecError, match=r"feature 'loan_amount' can be a top factor but has no reason: add "
                                        r"notices.reasons.loan_amount"):
        load_spec(spec_with(tmp_path, reasons=reasons))


def test_the_spec_refuses_a_reason_that_names_a_sensitive_column_or_a_proxy(tmp_path):
    reasons = {**shipped_spec("credit_risk")["notices"]["reasons"], "state": "Your homeownership status"}
    with pytest.raises(SpecError, match=r"notices.reasons.state: 'Your homeownership status' names 'homeownership'"):
        load_spec(spec_with(tmp_path, reasons=reasons))
    reasons = {**shipped_spec("credit_risk")["notices"]["reasons"], "state": "Whether you are a tenant"}
    with pytest.raises(SpecError, match=r"names 'tenant', a sensitive column or declared proxy"):
        load_spec(spec_with(tmp_path, reasons=reasons))
    # A proxy that the model takes as input could be cited, so its reason is refused too.
    with pytest.raises(SpecError, match=r"notices.reasons.state: 'state' is a sensitive column or declared proxy"):
        load_spec(spec_with(tmp_path, proxies=["state"]))


def test_the_spec_refuses_ambiguous_or_malformed_reasons(tmp_path):
    base = shipped_spec("credit_risk")["notices"]["reasons"]
    with pytest.raises(SpecError, match="needs low"):
        load_spec(spec_with(tmp_path, reasons={**base, "loan_amount": {"high": "The amount is too high"}}))
    with pytest.raises(SpecError, match="contains the reason"):
        load_spec(spec_with(tmp_path, reasons={**base, "term": "Your debt is too high"}))
    with pytest.raises(SpecError, match="'state' is not numeric"):
        load_spec(spec_with(tmp_path, reasons={**base, "state": {"high": "a", "low": "b"}}))
    with pytest.raises(SpecError, match="'nope' is neither a feature nor a group"):
        load_spec(spec_with(tmp_path, reasons={**base, "nope": "Something"}))
    with pytest.raises(SpecError, match="max_reasons"):
        load_spec(spec_with(tmp_path, max_reasons=5, top_factors=3))


def test_a_group_gives_its_reason_once(tmp_path):
    base = dict(shipped_spec("credit_risk")["notices"]["reasons"])
    for f in ("num_total_cc_accounts", "num_open_cc_accounts"):
        del base[f]
    base["credit_cards"] = "How many credit cards you have"
    loaded = load_spec(spec_with(tmp_path, reasons=base, groups={"credit_cards": ["num_total_cc_accounts",
                                                                                   "num_open_cc_accounts"]}))
    n = loaded.spec.notices
    t = template(reasons=n.reasons, groups=n.groups)
    factors = [{"feature": "num_open_cc_accounts", "value": 20.0, "contribution": 0.2},
               {"feature": "num_total_cc_accounts", "value": 30.0, "contribution": 0.1},
               {"feature": "term", "value": 60.0, "contribution": 0.05}]
    assert [c.text for c in generate_notice(t, request(factors)).citations] == [
        "How many credit cards you have", "The length of the loan term you chose"]


def test_the_notices_section_does_not_change_the_spec_hash(tmp_path):
    with_notices = load_spec(PIPELINES / "credit_risk.yaml").spec
    raw = shipped_spec("credit_risk")
    del raw["notices"]
    without = load_spec(write_spec(tmp_path, raw)).spec
    assert with_notices.spec_hash == without.spec_hash
