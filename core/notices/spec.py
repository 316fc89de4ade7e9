"""The spec's `notices:` section (assets/spec.py reads it into PipelineSpec.notices): the reasons, the template
file and the rules its notices are checked by. Pydantic only; the checks it names are in this package."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Notices(BaseModel):
    """Notices to the people decided about: for each decision in `adverse`, the server answers (and the audit log
    keeps) a notice rendered from `template`, a Jinja file next to the spec, registered in MLflow's prompt registry
    as `<spec>.notice` and checked on the test split before it may speak for a model (core/notices/,
    assets/notices.py, docs/pipelines.md).

    `reasons` maps each feature the model can cite (every feature column; a text feature and a categorical one are
    cited as themselves), or a group of them (`groups`), to a plain-language reason: a string, or for a numeric
    feature one per direction, `high` (above the training split's median), `low` and, where values can be missing,
    `missing`. A notice gives the reasons of the decision's first `top_factors` factors that raised its score, at
    most `max_reasons` (US Regulation B asks for no more than four). No reason may name a sensitive column or a
    `proxies` term (a column or word that stands in for one). `lender` is what the template reads as
    `lender.<key>` (name, contact, ...). `disclosures` are phrases every notice must carry word for word (the right
    to ask for the reasons, to a human review, whom to contact); `max_grade` the Flesch-Kincaid grade it may read
    at; `min_chars`/`max_chars` its length.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    template: str = Field(min_length=1)
    reasons: dict[str, str | dict[Literal["high", "low", "missing"], str]]
    groups: dict[str, list[str]] = {}
    lender: dict[str, str] = {}
    disclosures: dict[str, str] = {}
    proxies: list[str] = []
    adverse: list[Literal[0, 1]] = Field([1], min_length=1)
    top_factors: int = Field(4, ge=1, le=20)
    max_reasons: int = Field(4, ge=1, le=20)
    max_grade: float = Field(10.0, gt=0)
    min_chars: int = Field(200, ge=1)
    max_chars: int = Field(3000, ge=1)

    @model_validator(mode="after")
    def _bounds(self) -> "Notices":
        if self.min_chars >= self.max_chars:
            raise ValueError(f"notices: min_chars ({self.min_chars}) must be below max_chars ({self.max_chars})")
        if self.max_reasons > self.top_factors:
            raise ValueError(f"notices: max_reasons ({self.max_reasons}) cannot exceed top_factors "
                             f"({self.top_factors}): a notice cites only top factors")
        return self

    def problems(self, features: Any, sensitive: list[str]) -> list[str]:
        """What makes these notices unusable with these features: a feature the model can cite without a reason,
        a reason that names a sensitive column or a proxy, a group or reason of no feature."""
        from core.notices.checks import sensitive_terms, term_pattern
        from core.notices.reasons import table_problems

        out = table_problems(self.reasons, self.groups, features.all, features.numeric)
        for group, members in self.groups.items():
            if group in features.all:
                out.append(f"notices.groups.{group}: a group needs its own name, not a feature's")
            out += [f"notices.groups.{group}: {m!r} is not a feature of this spec" for m in members
                    if m not in features.all]
        out += [f"notices.reasons.{key}: {key!r} is neither a feature nor a group of notices.groups" for key in
                self.reasons if key not in features.all and key not in self.groups]
        barred = set(sensitive) | set(self.proxies)
        for key in self.reasons:
            members = [key, *self.groups.get(key, [])]
            named = [m for m in members if m in barred]
            if named:
                out.append(f"notices.reasons.{key}: {named[0]!r} is a sensitive column or declared proxy; a notice "
                           "may not cite it (if the model takes it as input, drop it from features)")
        for term in sensitive_terms(sensitive, self.proxies):
            pattern = term_pattern(term)
            for key, reason in self.reasons.items():
                for text in ([reason] if isinstance(reason, str) else reason.values()):
                    if pattern.search(text):
                        out.append(f"notices.reasons.{key}: {text!r} names {term!r}, a sensitive column or "
                                   "declared proxy; reword it")
        return out
