"""The notice template in MLflow's prompt registry (the same SQL store as the models), through an MlflowClient.

One prompt per spec, `<spec>.notice` (core/names.py): each version holds the template's Jinja text as the prompt
template, the context it renders with as the tag `intelligentops.notice_context` and the digest of both as
`intelligentops.notice_sha256`. `register` adds a version only when no version has that digest yet (an unchanged
template, or one changed back to an earlier text, reuses the version that has it). `load` reads a version by
number or alias and refuses one whose content no longer matches its digest. Aliases: `champion` is the template
the champion model was checked with; promotion moves it (assets/notice_promotion.py).

The client's prompt methods are the ones `mlflow.genai.register_prompt`, `load_prompt` and `set_prompt_alias`
call; going through a client keeps the process-wide default store out of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.names import NOTICE_CONTEXT_TAG, NOTICE_SHA_TAG
from core.notices.template import NoticeTemplate, NoticeTemplateError
from core.registry import RegistryUnreachable, alias_missing


@dataclass(frozen=True)
class Registered:
    """A template's place in the registry."""

    name: str
    version: str
    uri: str
    sha256: str
    created: bool  # True when this call added the version


def _versions(client: Any, name: str) -> list[Any]:
    from mlflow.exceptions import MlflowException

    try:
        return list(client.search_prompt_versions(name))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise


def register(client: Any, name: str, template: NoticeTemplate, message: str) -> Registered:
    """The registry version holding exactly this content, registered now if none does."""
    sha = template.sha256
    for v in _versions(client, name):
        if (v.tags or {}).get(NOTICE_SHA_TAG) == sha:
            return Registered(name=name, version=str(v.version), uri=f"prompts:/{name}/{v.version}", sha256=sha,
                              created=False)
    pv = client.register_prompt(name, template.text, commit_message=message,
                                tags={NOTICE_SHA_TAG: sha, NOTICE_CONTEXT_TAG: template.context_json()})
    return Registered(name=name, version=str(pv.version), uri=f"prompts:/{name}/{pv.version}", sha256=sha,
                      created=True)


def _checked(name: str, pv: Any) -> NoticeTemplate:
    tags = dict(pv.tags or {})
    if NOTICE_CONTEXT_TAG not in tags or NOTICE_SHA_TAG not in tags:
        raise NoticeTemplateError(f"prompt {name} version {pv.version} was not registered as a notice template (no "
                                  f"{NOTICE_CONTEXT_TAG} / {NOTICE_SHA_TAG} tags); materialize the spec's "
                                  "notice_template")
    template = NoticeTemplate.from_context(pv.template, tags[NOTICE_CONTEXT_TAG], name, str(pv.version),
                                           f"prompts:/{name}/{pv.version}")
    if template.sha256 != tags[NOTICE_SHA_TAG]:
        raise NoticeTemplateError(f"prompt {name} version {pv.version}: its content has sha256 {template.sha256}, but "
                                  f"it was registered as {tags[NOTICE_SHA_TAG]}: it was changed in the registry; "
                                  "refusing it (register the template again from the spec)")
    return template


def load(client: Any, name: str, uri: str, version: str | None = None, alias: str | None = None
         ) -> NoticeTemplate | None:
    """The template at `version` or `alias`, its digest checked; None when that alias or prompt does not exist.
    A registry that cannot be asked is RegistryUnreachable naming `uri`; content that does not match its digest
    is NoticeTemplateError."""
    try:
        pv = (client.get_prompt_version_by_alias(name, alias) if alias is not None
              else client.get_prompt_version(name, version))
    except Exception as exc:
        if alias_missing(exc):  # no such prompt, version or alias
            return None
        raise RegistryUnreachable(uri, exc) from exc
    if pv is None:
        return None
    return _checked(name, pv)


def set_alias(client: Any, name: str, alias: str, version: str) -> None:
    client.set_prompt_alias(name, alias, int(version))
