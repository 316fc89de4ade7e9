"""Which reasons a notice gives for one decision: its top factors that raised the score, as plain-language reasons.

The model names each top factor by its spec column (workloads/model_code.py `_explain`: a text feature's embedding
and a categorical feature's one-hot columns come back as the feature itself), with the applicant's value and the
contribution: how far the score moved when that feature was set to a typical value. A factor with a positive
contribution pushed the decision toward the adverse class; only those are reasons for it (one that lowered the
score is not a reason for an adverse decision).

The reason table (the spec's `notices.reasons`) maps a feature, or a group of features (`notices.groups`), to a
reason: a plain string, or one per direction for a numeric feature: `high` (the value is above the training
split's median), `low` (at or below it) and `missing` (no value). Two factors of one group give its reason once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DIRECTIONS = ("high", "low", "missing")
Reason = str | Mapping[str, str]


@dataclass(frozen=True)
class Citation:
    """One reason a notice gives: the factor's feature, the table key (the feature or its group), the direction
    (None for a plain reason) and the text."""

    feature: str
    key: str
    direction: str | None
    text: str


def direction_of(value: Any, typical: float | None) -> str | None:
    """`high`, `low` or `missing` for a numeric feature's value against its typical value; None for others."""
    if typical is None:
        return None
    if value is None or (isinstance(value, float) and value != value):
        return "missing"
    try:
        return "high" if float(value) > float(typical) else "low"
    except (TypeError, ValueError):
        return None


def key_of(feature: str, reasons: Mapping[str, Reason], groups: Mapping[str, Sequence[str]]) -> str | None:
    """The reason table's key for a feature: the feature itself, else the group it belongs to."""
    if feature in reasons:
        return feature
    return next((g for g, members in groups.items() if feature in members and g in reasons), None)


def reason_text(reason: Reason, direction: str | None) -> str | None:
    """The reason's text in this direction; a plain reason reads the same in every direction."""
    if isinstance(reason, str):
        return reason
    return reason.get(direction) if direction else None


def cite(factors: Sequence[Mapping[str, Any]], reasons: Mapping[str, Reason], groups: Mapping[str, Sequence[str]],
         typical: Mapping[str, float], top: int, most: int) -> tuple[list[Citation], list[str]]:
    """The reasons for one adverse decision, in the order of its top factors (the first `top`), at most `most`;
    and each factor that raised the score but has no reason, as `feature` or `feature (direction)`."""
    cited: list[Citation] = []
    uncovered: list[str] = []
    seen: set[str] = set()
    for f in list(factors)[:top]:
        if len(cited) >= most:
            break
        contribution = f.get("contribution")
        if not isinstance(contribution, int | float) or not contribution > 0:
            continue
        feature = str(f.get("feature"))
        direction = direction_of(f.get("value"), typical.get(feature))
        key = key_of(feature, reasons, groups)
        text = reason_text(reasons[key], direction) if key is not None else None
        if text is None:
            uncovered.append(feature if direction is None else f"{feature} ({direction})")
            continue
        if text in seen:
            continue
        seen.add(text)
        cited.append(Citation(feature=feature, key=key, direction=direction, text=text))
    return cited, uncovered


def all_texts(reasons: Mapping[str, Reason]) -> dict[str, tuple[str, str | None]]:
    """Every reason text of the table -> (key, direction)."""
    out: dict[str, tuple[str, str | None]] = {}
    for key, reason in reasons.items():
        if isinstance(reason, str):
            out[reason] = (key, None)
        else:
            for direction, text in reason.items():
                out[text] = (key, direction)
    return out


def table_problems(reasons: Mapping[str, Any], groups: Mapping[str, Sequence[str]], citeable: Sequence[str],
                   numeric: Sequence[str]) -> list[str]:
    """What is wrong with a reason table for a model that can cite `citeable` (its feature columns; `numeric` the
    ones compared with a typical value): a feature without a reason, a directional reason that lacks `high` or
    `low`, a direction on a non-numeric feature, a text given twice or inside another (a notice is read back by
    finding its reasons' texts), an unknown direction. Each names the key."""
    problems: list[str] = []
    for feature in citeable:
        key = key_of(feature, reasons, groups)
        if key is None:
            problems.append(f"feature {feature!r} can be a top factor but has no reason: add notices.reasons."
                            f"{feature} (or a group holding it)")
            continue
        reason = reasons[key]
        if isinstance(reason, Mapping):
            if feature not in numeric:
                problems.append(f"notices.reasons.{key}: {feature!r} is not numeric, so it has no direction; give "
                                "one plain reason")
            else:
                absent = [d for d in ("high", "low") if not reason.get(d)]
                if absent:
                    problems.append(f"notices.reasons.{key}: a reason with directions needs {' and '.join(absent)}")
    for key, reason in reasons.items():
        if isinstance(reason, Mapping):
            unknown = sorted(set(reason) - set(DIRECTIONS))
            if unknown:
                problems.append(f"notices.reasons.{key}: unknown direction(s) {unknown} (known: {list(DIRECTIONS)})")
        elif not isinstance(reason, str):
            problems.append(f"notices.reasons.{key}: a reason is a string or a mapping of direction to string")
    texts: dict[str, str] = {}
    for key, reason in reasons.items():
        for text in ([reason] if isinstance(reason, str) else list(reason.values()) if isinstance(reason, Mapping)
                     else []):
            if not isinstance(text, str) or not text.strip():
                problems.append(f"notices.reasons.{key}: a reason's text is empty")
                continue
            if text in texts:
                problems.append(f"notices.reasons.{key}: {text!r} is also the reason of {texts[text]!r}; each "
                                "reason needs its own text")
            texts[text] = key
    for a in texts:
        for b in texts:
            if a != b and a.lower() in b.lower():
                problems.append(f"notices.reasons.{texts[b]}: {b!r} contains the reason {a!r} of "
                                f"{texts[a]!r}; reword one so a notice's reasons can be told apart")
    return problems
