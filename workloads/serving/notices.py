"""Notices with adverse decisions: the champion notice template, rendered by the server for each decision the
spec marks as adverse, before the decision is committed to the audit log.

The template is loaded from MLflow's prompt registry by alias (`<spec>.notice@champion`, core/notices/registry.py)
with its content digest checked, and kept until the alias moves: `ServedVersions.refresh` (the alias watch and
SIGHUP) refreshes it with the model aliases, and a version that fails to load or to match its digest leaves the
old one serving, with the reason on /intelligentops/status. At start a missing or bad template refuses to serve.

Each adverse decision answered (champion or canary; shadow decisions are never answered) gets `notice`, the
rendered text, `notice_template_version` and `notice_sha256` (the audit store keys the hash and encrypts the text
with the inputs). The notice is rendered from the decision's top factors and the applicant's values after the
deployment's redaction, so a field the log must not keep is not in the notice either.
"""

from __future__ import annotations

import logging
from typing import Any

from core.audit import redact
from core.names import CHAMPION
from core.notices.template import NoticeRequest, NoticeTemplate, generate_notice
from core.server_config import ServerConfig
from workloads.serving.versions import ServedVersion, ServedVersions, ServingRefused

log = logging.getLogger("intelligentops.serving")


class ServedNotices:
    """The champion notice template of one spec, and the notices it renders."""

    def __init__(self, cfg: ServerConfig, versions: ServedVersions):
        assert cfg.notice_prompt is not None
        self.cfg, self.versions, self.name = cfg, versions, cfg.notice_prompt
        self.current: NoticeTemplate | None = None
        self.last_error: str | None = None
        self._typical: dict[str, dict[str, float]] = {}
        versions.followers.append(self.refresh)

    def refresh(self) -> bool:
        """Load the template `champion` points to now; True when it changed. Raises ServingRefused (the old
        template keeps serving when there is one: the watch loop catches it and reports it)."""
        from core.notices.registry import load
        from core.notices.template import NoticeTemplateError
        from core.registry import RegistryUnreachable

        try:
            found = load(self.versions.client, self.name, self.versions.registry_uri, alias=CHAMPION)
        except (NoticeTemplateError, RegistryUnreachable) as exc:
            self.last_error = str(exc)
            raise ServingRefused(f"notice template {self.name}: {exc}") from None
        if found is None:
            self.last_error = f"no '{CHAMPION}' alias"
            raise ServingRefused(f"notice template {self.name} has no '{CHAMPION}' alias in the registry at "
                                 f"{self.versions.registry_uri}: materialize {self.cfg.spec}/champion_model (it moves "
                                 "the alias once the notice checks pass)")
        self.last_error = None
        current = self.current
        if current is not None and current.version == found.version and current.sha256 == found.sha256:
            return False
        found.compiled()  # parsed once here, not on the scoring thread
        self.current = found
        log.info("%s: notice template %s version %s (sha256 %s)", self.cfg.spec, self.name, found.version,
                 found.sha256[:16])
        return True

    @property
    def top_factors(self) -> int:
        return self.current.top_factors if self.current is not None else 0

    def _typical_of(self, version: ServedVersion) -> dict[str, float]:
        typical = self._typical.get(version.version)
        if typical is None:
            numeric = version.python_model.preprocessing["numeric"]
            typical = self._typical[version.version] = {c: float(st["median"]) for c, st in numeric.items()}
        return typical

    def attach(self, record: dict[str, Any], row: dict[str, Any], version: ServedVersion) -> None:
        """Render the notice of one decision record (not yet committed) when its decision is adverse."""
        template = self.current
        if template is None or not template.is_adverse(int(record["decision"])):
            return
        request = NoticeRequest(decision_id=record["decision_id"], date=str(record["time"])[:10],
                                factors=record["top_factors"] or [], applicant=redact(row, self.cfg.redact),
                                typical=self._typical_of(version))
        notice = generate_notice(template, request)
        if notice.uncovered:
            log.warning("%s: decision %s: top factor(s) %s raised the score and have no reason in template version %s",
                        self.cfg.spec, record["decision_id"], list(notice.uncovered), template.version)
        record.update(notice=notice.text, notice_template_version=template.version, notice_sha256=notice.sha256)

    def status(self) -> dict[str, Any]:
        t = self.current
        return {"prompt": self.name, "version": t.version if t else None, "sha256": t.sha256 if t else None,
                "last_error": self.last_error}
