"""The notice template as one versioned document, its sandboxed renderer, and `generate_notice`.

A notice template is the Jinja text (a file next to the spec) together with the context it renders with, taken
from the spec's `notices:` section: the reason table and its groups, the lender, how many top factors a notice
looks at and how many reasons it gives, and which decisions are adverse. Both go to MLflow's prompt registry as
one prompt version (core/notices/registry.py), so a version names everything that decides a notice's words, and
its sha256 covers both.

Rendering is Jinja2 in a `SandboxedEnvironment` with HTML autoescape and `StrictUndefined`: the template sees only
the variables given (`reasons`, `decision_id`, `date`, `lender`, `applicant`), reads them by key (`lender.name`,
`applicant.emp_title`), may use Jinja's filters, its loop variable and its own macros, and nothing else: no
attribute of any object, no global function, no call. Applicant values reach it through `inert`: whitespace
collapsed, control and format characters (a newline, an ANSI escape, a right-to-left override) shown as U+FFFD,
long text cut; autoescape then escapes markup. A rendered value is never rendered again, so `{{ }}` in a job title
stays text. The output is text whose applicant-supplied parts are HTML-escaped: safe to show as text or in a page.

`generate_notice` is the one way a notice is made; the template renderer is its only implementation. A language
model could be added behind it later and would meet the same checks (core/notices/checks.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.notices.reasons import Citation, Reason, cite

FORMAT = 1              # the context document's format
QUOTE_LIMIT = 80        # characters of one applicant value a notice quotes, at most
REPLACEMENT = "\ufffd"  # what a control or format character becomes
LOOP_ATTRIBUTES = frozenset({"index", "index0", "first", "last", "length", "revindex", "revindex0"})


class NoticeTemplateError(ValueError):
    """A template that cannot be used: it does not parse, reads something it was not given, or its registered
    content does not match its digest. The message names the template and what to do."""


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class NoticeTemplate:
    """The template text and its context; `version` and `uri` are set once it is in the prompt registry."""

    text: str
    reasons: Mapping[str, Reason]
    groups: Mapping[str, Sequence[str]] = field(default_factory=dict)
    lender: Mapping[str, str] = field(default_factory=dict)
    top_factors: int = 4
    max_reasons: int = 4
    adverse: tuple[int, ...] = (1,)
    name: str = "notice"
    version: str | None = None
    uri: str | None = None

    def context(self) -> dict[str, Any]:
        """What the template renders with, besides its text: stored beside it in the registry."""
        return {"format": FORMAT, "reasons": {k: (v if isinstance(v, str) else dict(v)) for k, v in
                                              self.reasons.items()},
                "groups": {k: list(v) for k, v in self.groups.items()}, "lender": dict(self.lender),
                "top_factors": self.top_factors, "max_reasons": self.max_reasons, "adverse": list(self.adverse)}

    def context_json(self) -> str:
        return _canonical(self.context())

    @property
    def sha256(self) -> str:
        """The content digest: the text and the context, canonical JSON."""
        return hashlib.sha256(_canonical({"template": self.text, "context": self.context()}).encode()).hexdigest()

    @classmethod
    def from_context(cls, text: str, context_json: str, name: str, version: str | None = None,
                     uri: str | None = None) -> NoticeTemplate:
        """The template as the registry holds it: its text and the context tag."""
        try:
            ctx = json.loads(context_json)
            if ctx.get("format") != FORMAT:
                raise ValueError(f"context format {ctx.get('format')!r}, expected {FORMAT}")
            return cls(text=text, reasons=ctx["reasons"], groups=ctx.get("groups", {}), lender=ctx.get("lender", {}),
                       top_factors=int(ctx["top_factors"]), max_reasons=int(ctx["max_reasons"]),
                       adverse=tuple(int(a) for a in ctx["adverse"]), name=name, version=version, uri=uri)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise NoticeTemplateError(f"notice template {name} version {version}: its context is not readable "
                                      f"({exc}); register it again from the spec") from None

    def is_adverse(self, decision: int) -> bool:
        return int(decision) in self.adverse

    def compiled(self):
        """The parsed template (cached per object)."""
        cached = self.__dict__.get("_compiled")
        if cached is None:
            from jinja2 import TemplateSyntaxError

            try:
                cached = _environment().from_string(self.text)
            except TemplateSyntaxError as exc:
                raise NoticeTemplateError(f"notice template {self.name}: line {exc.lineno}: {exc.message}; fix the "
                                          "template file") from None
            object.__setattr__(self, "_compiled", cached)
        return cached


def _environment():
    from jinja2 import StrictUndefined
    from jinja2.runtime import LoopContext, Macro
    from jinja2.sandbox import SandboxedEnvironment

    class NoticeEnvironment(SandboxedEnvironment):
        """No attribute of any object (keys of the dicts given are items, read without attributes), no call but
        the template's own macros."""

        def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
            return isinstance(obj, LoopContext) and attr in LOOP_ATTRIBUTES

        def is_safe_callable(self, obj: Any) -> bool:
            return isinstance(obj, Macro)

    env = NoticeEnvironment(autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                            keep_trailing_newline=True)
    env.globals.clear()  # no range, dict, namespace, cycler, joiner, lipsum
    return env


def inert(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """An applicant's value as a notice may quote it: missing is empty, numbers plain, whitespace collapsed,
    control and format characters replaced by U+FFFD, at most `limit` characters (then an ellipsis)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        text = str(int(value)) if value.is_integer() else f"{value:.2f}".rstrip("0").rstrip(".")
    else:
        text = " ".join(str(value).split())
        text = "".join(REPLACEMENT if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn") else ch
                       for ch in text)
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "\u2026"


@dataclass(frozen=True)
class NoticeRequest:
    """One decision to write a notice for: its id and date, its top factors (as the model gave them), the
    applicant's values (already redacted where the deployment redacts) and the typical value of each numeric
    feature (the training split's median) that says whether a value is high or low."""

    decision_id: str
    date: str
    factors: Sequence[Mapping[str, Any]]
    applicant: Mapping[str, Any]
    typical: Mapping[str, float]


@dataclass(frozen=True)
class Notice:
    """A rendered notice, the reasons it gives and the factors that raised the score but have no reason."""

    text: str
    citations: tuple[Citation, ...]
    uncovered: tuple[str, ...]

    @property
    def sha256(self) -> str:
        return notice_sha256(self.text)


def notice_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _tidy(text: str) -> str:
    """Lines without trailing spaces, at most one blank line in a row, one newline at the end."""
    lines, blank = [], False
    for line in text.strip().splitlines():
        line = line.rstrip()
        if not line and blank:
            continue
        blank = not line
        lines.append(line)
    return "\n".join(lines) + "\n"


def render(template: NoticeTemplate, reasons: Sequence[str], request: NoticeRequest) -> str:
    """The template rendered with exactly these variables; a template that reads anything else fails, naming it."""
    from jinja2 import TemplateError
    from jinja2.sandbox import SecurityError

    variables = {"reasons": list(reasons), "decision_id": inert(request.decision_id), "date": inert(request.date),
                 "lender": {str(k): str(v) for k, v in template.lender.items()},
                 "applicant": {str(k): inert(v) for k, v in request.applicant.items()}}
    try:
        return _tidy(template.compiled().render(**variables))
    except SecurityError as exc:
        raise NoticeTemplateError(f"notice template {template.name}: {exc}: a template reads only its variables "
                                  "(reasons, decision_id, date, lender, applicant) by key") from None
    except TemplateError as exc:
        raise NoticeTemplateError(f"notice template {template.name}: {exc}; it may use reasons, decision_id, date, "
                                  "lender and applicant") from None


def generate_notice(template: NoticeTemplate, request: NoticeRequest) -> Notice:
    """The notice for one adverse decision. The one generator: today the sandboxed template renderer; a language
    model added later goes here, behind the same checks."""
    citations, uncovered = cite(request.factors, template.reasons, template.groups, request.typical,
                                template.top_factors, template.max_reasons)
    text = render(template, [c.text for c in citations], request)
    return Notice(text=text, citations=tuple(citations), uncovered=tuple(uncovered))
