"""The compliance report: EU AI Act Annex IV technical documentation and a NIST AI RMF mapping.

Built from the model's lineage, its evaluation and the gate verdicts, never typed by hand, and rendered
to Markdown and HTML from one structure so the two cannot drift apart.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

from assets.checks.gates import GATES, GateOutcome
from assets.evidence import Evaluation, NoticeEvidence, Robustness
from assets.spec import Compliance, PipelineSpec

# Annex IV headings in the order the report uses; the documentation gate requires each one filled.
ANNEX_IV_SECTIONS = (
    "Intended purpose",
    "Data and data governance",
    "Design and training",
    "Metrics and their limits",
    "Fairness findings",
    "Human oversight",
    "Logging and record-keeping",
    "Robustness",
    "Change log",
)
NIST_SECTION = "NIST AI RMF mapping"
REQUIRED_SECTIONS = (*ANNEX_IV_SECTIONS, NIST_SECTION)

Table = tuple[tuple[str, ...], list[tuple[str, ...]]]


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    bullets: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _f(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def build_report(spec: PipelineSpec, ev: Evaluation, gates: list[GateOutcome], lineage: dict[str, str],
                 history: list[dict[str, str]], notices: NoticeEvidence | None = None) -> list[Section]:
    c = spec.compliance
    verdict = {g.name: g for g in gates}
    not_measured = ev.integrity.load_error or "no test metrics recorded"
    t = ev.test
    sections: list[Section] = []

    purpose = c.intended_purpose or spec.description
    sections.append(Section("Intended purpose", [
        purpose or "(no intended purpose declared: set compliance.intended_purpose in the spec)",
        f"Model `{ev.model_name}` version {ev.model_version} predicts the positive class of "
        f"`{spec.target.column}` (values {spec.target.positive}). Owner: {spec.owner or 'not declared'}.",
    ] if purpose else []))

    data = Section("Data and data governance")
    data.paragraphs.append(
        f"Source: `{ev.source}`. Rows are validated by a Great Expectations suite generated "
        "from the spec (columns present, types, null rates, ranges, categories, unique ids, row count); rows "
        "that break row-level rules are set aside with their reason.")
    data.tables.append((("lineage", "value"), [(k, f"`{v}`") for k, v in sorted(lineage.items())]))
    data.bullets.append(f"Sensitive features (fairness slices): {spec.sensitive_columns or 'none'}; model inputs "
                        f"include them: {'yes, allowed by the spec' if c.allow_sensitive_inputs else 'no'}.")
    data.bullets.append(f"Governance gate: {_gate_line(verdict.get('data_governance'))}")
    sections.append(data)

    sections.append(Section("Design and training", [
        f"Multilayer perceptron over standardized numeric features {spec.features.numeric}, one-hot categorical "
        f"features {spec.features.categorical}" + (f" and sentence embeddings of {spec.features.text}"
                                                   if spec.features.text else "") +
        f", hidden layers {spec.training.hidden}, trained with DeepSpeed (ZeRO stage "
        f"{spec.training.deepspeed.zero_stage}, AdamW, peak learning rate {spec.training.learning_rate} with "
        f"warmup and cosine decay) for a budget of optimizer steps "
        f"{'fitted to the number of training rows' if spec.training.max_steps is None else f'of at most {spec.training.max_steps}'}"
        f", stopping early on validation {'log loss' if spec.training.monitor == 'loss' else 'AUC'}"
        f"{', positives weighted in the loss' if spec.training.class_weighting else ''}"
        f"{'; probabilities calibrated on the validation split (Platt scaling folded into the last layer)' if spec.training.calibrate else ''}.",
        f"Split: {spec.split.strategy}, test {spec.split.test:.0%}, validation {spec.split.validation:.0%}, seed "
        f"{spec.split.seed}. " + (f"Operating threshold {t.threshold:.3f}, chosen on the validation split to "
                                  "maximize F1." if t else f"Not measured: {not_measured}."),
    ]))

    metrics = Section("Metrics and their limits")
    if not t:
        metrics.paragraphs.append(f"Not measured: the model version could not be loaded ({not_measured}).")
    else:
        metrics.tables.append((("metric", "test value"), [
            ("AUC", _f(t.auc)), ("accuracy", _f(t.accuracy)), ("precision", _f(t.precision)),
            ("recall", _f(t.recall)), ("selection rate", _pct(t.selection_rate)),
            ("expected calibration error", _f(t.calibration_error)), ("rows", str(t.rows)),
            ("positive rate", _pct(t.positive_rate)),
        ]))
    champ = ev.champion
    metrics.paragraphs.append(
        f"Compared on the same rows with champion version {champ.version}: AUC {_f(champ.test.auc)}."
        if champ else "No champion existed when this version was evaluated.")
    if ev.baselines and t:
        metrics.paragraphs.append(
            "Performance against a reference (Annex IV 2(g); NIST AI RMF Measure 2.3): simple models fitted on the "
            "same train split and the same inputs, scored on the same test rows. Baseline gate: "
            + _gate_line(verdict.get("baseline")))
        metrics.tables.append((("model", "test AUC", "fit seconds"), [
            ("this model", _f(t.auc), "-"), *((b.name.replace("_", " "), _f(b.auc), f"{b.fit_seconds:.1f}")
                                              for b in ev.baselines)]))
    importance = sorted(ev.importance.items(), key=lambda kv: -kv[1])[:10]
    if importance:
        metrics.paragraphs.append("Global importance: the drop in test AUC when one input is shuffled across rows.")
        metrics.tables.append((("input", "AUC drop"), [(k, f"{v:.4f}") for k, v in importance]))
    example = ev.explanations.example if ev.explanations else None
    if example and example.top_factors:
        factors = "; ".join(f"{f['feature']}={f['value']!r} ({f['contribution']:+.3f})" for f in example.top_factors)
        metrics.paragraphs.append(f"Per-decision explanation, test row {example.row_id} (score "
                                  f"{example.probability:.3f}): {factors}.")
    metrics.paragraphs.append(
        "Limits: metrics come from one held-out split of historical data and do not promise the same on a "
        "different population; calibration is measured, not corrected. Performance gate: "
        + _gate_line(verdict.get("performance")))
    sections.append(metrics)

    fair = Section("Fairness findings")
    for feature, s in ev.slices.items():
        rows = [(g, str(r.rows), _pct(r.selection_rate), _f(r.tpr), _f(r.fpr),
                 "yes" if r.measured else "too small") for g, r in s.groups.items()]
        fair.paragraphs.append(
            f"**{feature}**: demographic parity difference {_f(s.demographic_parity_difference)} (limit "
            f"{c.max_demographic_parity_difference}), equalized odds difference "
            f"{_f(s.equalized_odds_difference)} (limit {c.max_equalized_odds_difference}).")
        fair.tables.append((("group", "rows", "selection rate", "TPR", "FPR", "measured"), rows))
    fair.paragraphs.append(f"Fairness gate: {_gate_line(verdict.get('fairness'))}")
    sections.append(fair)

    sections.append(Section("Human oversight", [
        "The model is decision support. It becomes `champion` only when every blocking gate passed, or when a "
        "named approver overrides a failed non-integrity gate with a recorded reason. A rollback job restores "
        "the previous champion and records who and why. Every served decision carries its top contributing "
        "factors so a reviewer can see why.",
        *(["Each adverse decision's notice tells the applicant its main reasons, their right to ask for the reasons "
           "and to have a person review the decision, and whom to contact (section Notices to applicants)."]
          if notices is not None else []),
    ], bullets=[f"{h['when']}: {h['what']}" for h in history if h.get("kind") == "approval"]))
    if notices is not None:
        sections.append(notices_section(spec, notices))

    sections.append(Section("Logging and record-keeping", [
        "Every materialization is recorded in the Dagster instance with its inputs' content hashes; the model "
        "version, its parameters, metrics and this report are stored in MLflow. Served decisions (id, time, "
        "model version, input hash, inputs, output, top factors) are written to the audit log before the "
        "response leaves.",
    ]))

    rob = Section("Robustness")
    r = ev.robustness
    if r is not None and r.numeric_noise is not None:
        n = r.numeric_noise
        rob.bullets.append(f"Numeric inputs perturbed by {n.relative_noise:.0%} of their spread: mean score shift "
                           f"{n.mean_abs_shift:.4f}, decisions flipped {_pct(n.decision_flip_rate)}.")
    if r is not None and r.missing_text is not None:
        m = r.missing_text
        rob.bullets.append(f"Text fields missing: mean score shift {m.mean_abs_shift:.4f}, decisions flipped "
                           f"{_pct(m.decision_flip_rate)}, all scores finite: {m.all_finite}.")
    _attack_lines(rob, r, c)
    rob.paragraphs.append(f"Robustness gate: {_gate_line(verdict.get('robustness'))}. Integrity gate: "
                          f"{_gate_line(verdict.get('integrity'))}")
    i = ev.integrity
    rob.paragraphs.append(
        "Cybersecurity of the model itself (Art. 15(5)): every file of the version's folder (MLmodel, the model "
        "code, code/, artifacts/, the environment files) is listed in its manifest, and the folder is signed "
        "with OpenSSF model-signing (ECDSA P-256, key mode). " + (
            f"Signature verified with the public key of fingerprint `{i.signing_key_sha256}` (sha256 of its DER "
            "SubjectPublicKeyInfo); anyone holding that key can check the version with `model_signing verify key "
            "--signature MODEL_DIR/model.sig --public_key model-signing.pub MODEL_DIR`."
            if i.signature_verified and i.signing_key_sha256 else
            "The signature was NOT verified for this version; see the integrity gate."))
    sections.append(rob)

    change = Section("Change log")
    change.bullets.extend(f"{h['when']}: {h['what']}" for h in history)
    change.bullets.append(f"{ev.evaluated_at}: version {ev.model_version} evaluated; gates: "
                          + ", ".join(f"{g.name} {'passed' if g.passed else 'FAILED'}" for g in gates))
    sections.append(change)

    nist = Section(NIST_SECTION)
    nist.tables.append((("function", "what it asks", "evidence here", "status"), [
        ("Govern", "accountability, policies, oversight", "owner, blocking gates, approval and rollback records",
         "in place"),
        ("Map", "context, purpose, data, impacts", "intended purpose, lineage hashes, sensitive features",
         _status(verdict, "data_governance")),
        ("Measure", "performance, fairness, robustness, security (2.7), explainability",
         "test metrics against a baseline, per-group rates, perturbation results, black-box evasion and "
         "extraction attacks, permutation importance",
         ", ".join(_status(verdict, g) for g in ("performance", "baseline", "fairness", "robustness",
                                                 "explainability"))),
        ("Manage", "release decisions, monitoring, response", "champion only after gates; integrity "
         "verified; drift monitoring and rollback", _status(verdict, "integrity")),
        *_notice_rows(notices),
    ]))
    nist.paragraphs.append("Gate verdicts: " + "; ".join(f"{g.name}: {'pass' if g.passed else 'FAIL'} ({g.summary})"
                                                       for g in gates))
    sections.append(nist)
    return sections


def _attack_lines(rob: Section, r: Robustness | None, c: Compliance) -> None:
    """The black-box attacks' figures (assets/attacks.py) with their limits: EU AI Act Art. 15, NIST Measure 2.7."""
    if r is None:
        return
    if r.evasion is not None:
        e = r.evasion
        flip = "none found" if e.median_flip_distance is None else f"{e.median_flip_distance:.3f} std"
        rob.bullets.append(
            f"Evasion (Art. 15(5); NIST AI RMF Measure 2.7): {e.attack} on {e.rows} test applicants, "
            f"{e.query_budget} queries each (used {e.mean_queries:.0f} on average): {_pct(e.success_rate)} had their "
            f"decision flipped by a change of at most {e.epsilon:g} standard deviations of {', '.join(e.features)} "
            f"(limit {_pct(c.max_evasion_success)}); median closest flip {flip}; {e.seconds:.1f} s.")
    if r.extraction is not None:
        x = r.extraction
        curve = ", ".join(f"{q} queries: {k:.2f}" for q, k in x.curve.items())
        rob.bullets.append(
            f"Extraction (Art. 15(5); NIST AI RMF Measure 2.7): {x.attack}; the better copy ({x.surrogate}) agrees "
            f"with this version on the test applicants at kappa {x.agreement:.3f} after {x.queries} queries (raw "
            f"agreement {_pct(x.raw_agreement)}, majority answer {_pct(x.majority_agreement)}; limit kappa "
            f"{c.max_extraction_agreement}); on the way: {curve}; {x.seconds:.1f} s.")
    if r.attack_error:
        rob.bullets.append(f"Attacks that left no evidence: {r.attack_error}.")


NOTICES_SECTION = "Notices to applicants"


def notices_section(spec: PipelineSpec, n: NoticeEvidence) -> Section:
    """Transparency to the people decided about (Annex IV 2(d) and Art. 13 and 86; US Regulation B's adverse
    action notice): the template version, the reason table and the checks the notices passed."""
    t = n.template
    section = Section(NOTICES_SECTION, [
        f"Every decision in {list(spec.notices.adverse) if spec.notices else [1]} is answered with a notice to the "
        "applicant, rendered by the server from the notice template and recorded (template version and the notice's "
        "hash) on the audit log. The template is a Jinja file in a sandbox, registered in MLflow's prompt registry; "
        f"this version was checked with template `{t.uri}` (sha256 `{t.sha256[:16]}...`), rendered for the "
        f"{n.adverse_rows} adverse decisions among {n.test_rows} test rows. Its `champion` alias moves only with a "
        "model version whose notice checks all passed.",
    ])
    section.tables.append((("feature or group", "reason"), [
        (k, v if isinstance(v, str) else "; ".join(f"{d}: {text}" for d, text in v.items()))
        for k, v in n.reasons.items()]))
    section.tables.append((("notice check", "result"), [
        (name, f"{'passed' if c.passed else 'FAILED'}: {c.summary}") for name, c in n.checks.items()]))
    return section


def _notice_rows(n: NoticeEvidence | None) -> list[tuple[str, ...]]:
    if n is None:
        return []
    ok = all(c.passed for c in n.checks.values())
    status = "notices pass" if ok else "notices FAIL: " + ", ".join(k for k, c in n.checks.items() if not c.passed)
    return [("Map 1.1", "context: who is affected and how they are told", "a checked notice with every adverse "
             f"decision, template {n.template.uri}", status),
            ("Govern 4", "a culture of communicating risk to those affected", "the notice's reasons, disclosures "
             "(the right to the reasons and to a human review, a contact) and readability are blocking checks",
             status)]


def _gate_line(g: GateOutcome | None) -> str:
    if g is None:
        return "not evaluated"
    return f"{'passed' if g.passed else 'FAILED'}: {g.summary}"


def _status(verdict: dict[str, GateOutcome], name: str) -> str:
    g = verdict.get(name)
    return "not evaluated" if g is None else f"{name} {'pass' if g.passed else 'FAIL'}"


def to_markdown(title: str, sections: list[Section]) -> str:
    out = [f"# {title}", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for p in s.paragraphs:
            out += [p, ""]
        if s.bullets:
            out += [f"- {b}" for b in s.bullets] + [""]
        for headers, rows in s.tables:
            out.append("| " + " | ".join(headers) + " |")
            out.append("| " + " | ".join("---" for _ in headers) + " |")
            out += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def to_html(title: str, sections: list[Section]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for s in sections:
        body.append(f"<h2>{html.escape(s.title)}</h2>")
        body += [f"<p>{_inline(p)}</p>" for p in s.paragraphs]
        if s.bullets:
            body.append("<ul>" + "".join(f"<li>{_inline(b)}</li>" for b in s.bullets) + "</ul>")
        for headers, rows in s.tables:
            head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
            trs = "".join("<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in row) + "</tr>" for row in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
    style = ("body{font-family:sans-serif;max-width:960px;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def missing_sections(markdown: str) -> list[str]:
    """Required headings that are absent or have nothing under them."""
    parts = re.split(r"^## (.+)$", markdown, flags=re.MULTILINE)
    content = {parts[i].strip(): parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}
    return [s for s in REQUIRED_SECTIONS if not content.get(s)]


__all__ = ["ANNEX_IV_SECTIONS", "GATES", "REQUIRED_SECTIONS", "Section", "build_report", "missing_sections",
           "to_html", "to_markdown"]
