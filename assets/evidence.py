"""Typed evidence passed between stages: what model_evaluation measured, what compliance_report decided.

The gates, the report and the promotion read these by attribute, so a renamed or missing field is an error
where it happens, not a gate failing later with a misleading message. They become JSON only at the IO
boundary (the IO manager writes `model_dump(mode="json")` and reads back with `model_validate`), and unknown
fields are refused there too.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Evidence(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class SplitMetrics(Evidence):
    """Scores of one model on one set of rows, at the operating threshold chosen on the validation split."""

    auc: float
    accuracy: float
    precision: float
    recall: float
    selection_rate: float
    calibration_error: float
    threshold: float
    rows: int
    positive_rate: float


class GroupRates(Evidence):
    rows: int
    positives: int
    selection_rate: float | None
    tpr: float | None
    fpr: float | None
    measured: bool


class SliceMetrics(Evidence):
    """Per-group rates of one sensitive feature and the gaps over the groups large enough to measure."""

    groups: dict[str, GroupRates]
    too_small: list[str]
    demographic_parity_difference: float | None
    equalized_odds_difference: float | None
    measured_groups: int


class ChampionComparison(Evidence):
    version: str
    test: SplitMetrics


class Integrity(Evidence):
    problems: list[str]
    files_verified: int                 # files of the version's folder that match its manifest
    loads_without_pickle: bool = False
    load_error: str | None = None
    signature_verified: bool = False    # model.sig verified with the trusted public key
    signing_key_sha256: str | None = None  # that key's fingerprint (core/signing.py)


class Governance(Evidence):
    problems: list[str]
    model_inputs: list[str]
    current: dict[str, str]


class ExplainedDecision(Evidence):
    row_id: str
    probability: float
    top_factors: list[dict]


class Explanations(Evidence):
    rows: int
    with_factors: int
    example: ExplainedDecision | None = None


class NumericNoise(Evidence):
    relative_noise: float
    mean_abs_shift: float
    p99_abs_shift: float
    decision_flip_rate: float


class MissingText(Evidence):
    mean_abs_shift: float
    p99_abs_shift: float
    decision_flip_rate: float
    all_finite: bool


class Evasion(Evidence):
    """A black-box evasion attack on sampled test applicants (assets/attacks.py)."""

    attack: str
    rows: int
    epsilon: float                      # in standard deviations of each numeric input (train split)
    query_budget: int                   # model calls per applicant
    mean_queries: float
    success_rate: float                 # share of applicants whose decision flipped within epsilon and budget
    median_flip_distance: float | None  # the closest flip found, median over applicants with one
    features: list[str]
    seconds: float


class Extraction(Evidence):
    """A surrogate trained on the version's decisions to synthetic queries (assets/attacks.py)."""

    attack: str
    surrogate: str
    queries: int
    agreement: float                    # Cohen's kappa of the copy's and the version's test decisions
    raw_agreement: float                # share of test applicants the copy decides as the version does
    majority_agreement: float           # the raw agreement of always answering the majority decision
    curve: dict[str, float]             # queries -> agreement (kappa)
    seconds: float


class Robustness(Evidence):
    numeric_noise: NumericNoise | None = None
    missing_text: MissingText | None = None
    evasion: Evasion | None = None
    extraction: Extraction | None = None
    attack_error: str | None = None     # why an attack left no evidence

    @property
    def empty(self) -> bool:
        return self.numeric_noise is None and self.missing_text is None


class BaselineScore(Evidence):
    """A reference model fitted on the same train split and features, scored on the same test rows."""

    name: str
    auc: float
    fit_seconds: float


class Evaluation(Evidence):
    """Everything the gates need about one challenger version. `test` is None when the model did not load."""

    model_name: str
    model_version: str
    run_id: str | None
    evaluated_at: str
    source: str
    lineage: dict[str, str]
    integrity: Integrity
    governance: Governance
    test: SplitMetrics | None = None
    slices: dict[str, SliceMetrics] = {}
    champion: ChampionComparison | None = None
    baselines: list[BaselineScore] = []
    drift_detectors: str | None = None      # sha256 of the detectors' manifest, fitted on this version's train split
    importance: dict[str, float] = {}
    explanations: Explanations | None = None
    robustness: Robustness | None = None
    plots: dict[str, str] = {}
    seconds: float = 0.0

    @property
    def loaded(self) -> bool:
        return self.test is not None


class GateVerdict(Evidence):
    passed: bool
    summary: str


class ComplianceReport(Evidence):
    """Where the report for one version was written, and the verdict of each gate computed before it."""

    model_version: str
    markdown: str
    html: str
    gates: dict[str, GateVerdict]


class NoticeTemplateInfo(Evidence):
    """A spec's notice template in MLflow's prompt registry (core/notices/registry.py)."""

    name: str
    version: str
    uri: str
    sha256: str
    created: bool  # this materialization registered the version (its content was new)


class NoticeEvidence(Evidence):
    """The notices rendered for one model version's adverse test decisions with one template version, and the
    verdict of each notice check (core/notices/checks.py)."""

    model_version: str
    template: NoticeTemplateInfo
    test_rows: int
    adverse_rows: int
    checks: dict[str, GateVerdict]
    reasons: dict[str, str | dict[str, str]]
    sample: str | None = None
    path: str | None = None
