"""Audit retention: decisions older than `retention_days` leave the log, at start and once a day after."""

from __future__ import annotations

import logging
import threading

from core.audit import AuditStore

log = logging.getLogger("intelligentops.serving")

DAY_SECONDS = 86400


def prune_daily(store: AuditStore, retention_days: int, stop: threading.Event) -> None:
    """Prune now and then every day until `stop` is set (a thread's target); a failure is logged, not raised."""
    while True:
        try:
            removed = store.prune(retention_days)
            if removed:
                log.info("audit retention: removed %d decisions older than %d days", removed, retention_days)
        except Exception as exc:
            log.error("audit retention failed: %s", exc)
        if stop.wait(DAY_SECONDS):
            return
