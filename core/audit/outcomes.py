"""Outcomes as evidence: what was reported, by which key, and which label a reader takes from it (Dagster-free).

Every outcome report is an event on the outcome chain (core/audit/store.py): the decision, the outcome, the
reporting API key's id, the time and, for a report that differs from the one before it, the reason (a
correction). Nothing is overwritten; a reader asks for labels under a rule:

- `first`: the first report stands; later ones are kept as corrections but do not change the label.
- `latest`: the newest report stands (a correction replaces the label it corrects).
- `unanimous` (the default): a decision has a label only while every report agrees; a disputed decision has
  none until the dispute is settled. The cost is a few disputed rows left out; the gain is that one key can
  never flip another key's label, only withhold it, so training cannot be steered by overwriting.

`key_bursts` is the check for a key that reports outcomes contradicting the model far beyond its measured error
(poisoned labels): per key, among its outcomes on decisions the model was confident about, the share that
contradicts the decision against the share the model's own error predicts (the version's test-split error, or
the calibrated probabilities), with a one-sided binomial test.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from core.audit.records import AuditError

OutcomeRule = Literal["first", "latest", "unanimous"]
OUTCOME_RULES: tuple[str, ...] = ("first", "latest", "unanimous")
DEFAULT_OUTCOME_RULE: OutcomeRule = "unanimous"
MAX_REASON_CHARS = 500
# inference_log's metadata key listing the flagged keys; the data stage reads the same name.
FLAGGED_KEYS_METADATA = "flagged_outcome_keys"


class UnknownDecision(AuditError):
    """An outcome for a decision that is not on the audit log (or not of that model); fit for a 404."""


class OutcomeConflict(AuditError):
    """An outcome the store refuses as it stands: a different outcome for a decision that already has one, sent
    without the reason a correction needs; fit for a 409."""


@dataclass(frozen=True)
class OutcomeReport:
    """One outcome as a caller reports it: 1 = the positive class happened. `reason` is needed for a correction."""

    decision_id: str
    outcome: int
    reason: str | None = None


@dataclass(frozen=True)
class OutcomeEvent:
    """One recorded report, as stored on the outcome chain."""

    id: int
    decision_id: str
    seq: int
    spec: str
    outcome: int
    at: str
    key_id: str | None
    reason: str | None
    correction: bool


def apply_rule(events: Iterable[OutcomeEvent], rule: str = DEFAULT_OUTCOME_RULE,
               exclude_key_ids: Iterable[str] = ()) -> dict[str, int]:
    """decision id -> label under `rule`, from events in arrival order; reports of `exclude_key_ids` are ignored."""
    if rule not in OUTCOME_RULES:
        raise AuditError(f"outcome rule {rule!r}: expected one of {', '.join(OUTCOME_RULES)}")
    excluded = set(exclude_key_ids)
    per: dict[str, list[int]] = defaultdict(list)
    for e in sorted(events, key=lambda e: e.id):
        if e.key_id is None or e.key_id not in excluded:
            per[e.decision_id].append(int(e.outcome))
    out: dict[str, int] = {}
    for did, values in per.items():
        if rule == "first":
            out[did] = values[0]
        elif rule == "latest":
            out[did] = values[-1]
        elif len(set(values)) == 1:
            out[did] = values[0]
    return out


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space (exact; n up to a few hundred thousand)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
            for i in range(k, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


@dataclass(frozen=True)
class OutcomeEvidence:
    """One key's report on one decision, beside what the model said."""

    key_id: str | None
    decision_id: str
    outcome: int
    probability: float
    decision: int
    model_version: str


@dataclass(frozen=True)
class KeyBurst:
    """One key's outcomes against the model: how many contradict its confident decisions, and how many should."""

    key_id: str
    outcomes: int
    confident: int
    contradicting: int
    expected_share: float
    p_value: float
    flagged: bool

    @property
    def share(self) -> float:
        return self.contradicting / self.confident if self.confident else 0.0

    def describe(self) -> str:
        verdict = "FLAGGED" if self.flagged else "consistent with the model's error"
        return (f"key {self.key_id}: {self.contradicting} of {self.confident} outcomes on confident decisions "
                f"contradict the model ({self.share:.0%}; its measured error predicts {self.expected_share:.0%}), "
                f"p = {self.p_value:.2g}: {verdict}")


CONFIDENT_MAX_ERROR = 0.2  # a decision is confident when the model gives it at most this chance of being wrong
MIN_CONFIDENT = 20  # fewer outcomes than this on confident decisions are not judged
ALPHA = 0.001  # family-wise false-flag rate over the keys tested (Bonferroni)
MIN_RATIO = 2.0  # and the contradicting share must be at least this multiple of the expected one


def key_bursts(evidence: Iterable[OutcomeEvidence], version_error: Mapping[str, float] | None = None,
               alpha: float = ALPHA, min_confident: int = MIN_CONFIDENT) -> list[KeyBurst]:
    """Each reporting key's outcomes tested against the model's measured error; flagged keys contradict the model
    on its confident decisions far more often than it errs.

    The expected share of contradictions on a key's confident decisions is the larger of the mean predicted error
    (1 - p for a positive decision, p for a negative one: the calibrated probability's own forecast) and the
    serving version's test-split error (`version_error`: model version -> 1 - test accuracy), which is the
    conservative choice (confident decisions err less than the average one). A key is flagged when the one-sided
    binomial p-value is under `alpha` divided by the number of keys tested and the share is at least twice the
    expected one. A key's latest report per decision is what is judged.
    """
    per_key: dict[str, dict[str, OutcomeEvidence]] = defaultdict(dict)
    for e in evidence:
        per_key[e.key_id or "-"][e.decision_id] = e
    tested = [k for k, rows in per_key.items()
              if sum(1 for r in rows.values() if _predicted_error(r) <= CONFIDENT_MAX_ERROR) >= min_confident]
    out: list[KeyBurst] = []
    for key, rows in sorted(per_key.items()):
        confident = [r for r in rows.values() if _predicted_error(r) <= CONFIDENT_MAX_ERROR]
        n = len(confident)
        wrong = sum(1 for r in confident if int(r.outcome) != int(r.decision))
        predicted = sum(_predicted_error(r) for r in confident) / n if n else 0.0
        measured = [version_error[r.model_version] for r in confident
                    if version_error and r.model_version in version_error]
        expected = min(0.5, max(predicted, sum(measured) / len(measured) if measured else 0.0, 1e-3))
        p_value = binomial_sf(wrong, n, expected) if n else 1.0
        flagged = (key in tested and p_value < alpha / max(1, len(tested))
                   and wrong / max(n, 1) >= MIN_RATIO * expected)
        out.append(KeyBurst(key_id=key, outcomes=len(rows), confident=n, contradicting=wrong,
                            expected_share=expected, p_value=p_value, flagged=flagged))
    return out


def _predicted_error(e: OutcomeEvidence) -> float:
    return 1.0 - float(e.probability) if int(e.decision) == 1 else float(e.probability)
