"""The traffic split a server applies, and what it reports back to the serving chain (core/audit/serving_events.py).

Where the split lives: the newest control event of the spec on the audit store's serving chain (a promotion, a
rollout step, a hold, a rollback), read by the alias-watch thread every `poll_seconds` and at once on SIGHUP, with
the server config's `mode` and `canary_share` for a spec that has none yet (core/rollout.py `split_in_force`).
The champion is `@champion`; the challenger is the version the event names (during a rollout the alias may already
point to a newer, ungated registration), or `@challenger` under the config's own policy.

How a change takes effect (workloads/serving/batching.py): the versions are loaded and verified on the watch
thread and handed over as one `ServedSplit`; the scoring loop takes it up between two batches. A request is
assigned its variant when its first slice is scored, on the split of that moment; a request still being scored
when the split changes is scored again from its first row on the new one (its held records dropped), so no
decision committed after the change comes from a variant or version that left the split. Before committing the
first batch on a new split the server appends an `applied` event whose `seq_at` is the decision chain's head:
every decision it commits after that seq is of the new split.

The server also reports, per variant and version, the rows it failed to score (an error, or a score that is not
finite) as `failures` events, at most one every `FAILURE_REPORT_SECONDS`: the rollout analysis's error rates.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from core.audit.serving_events import ServingEvent
from core.names import CHALLENGER, CHAMPION
from core.rollout import Split, split_in_force
from core.server_config import ServerConfig

log = logging.getLogger("intelligentops.serving")
FAILURE_REPORT_SECONDS = 2.0
CANARY, SHADOW = "canary", "shadow"


@dataclass(frozen=True, eq=False)
class ServedSplit:
    """The versions serving and how traffic is split between them; swapped by one reference. Identity is the
    split: a new object is a change (of versions, mode or share)."""

    mode: str
    share: float
    versions: dict[str, Any]  # alias -> ServedVersion
    event: ServingEvent | None = None  # the control event it comes from (None: the server config)

    @property
    def champion(self) -> Any:
        return self.versions[CHAMPION]

    @property
    def challenger(self) -> Any | None:
        """The challenger when it serves at all: loaded, and not the champion's own version."""
        c = self.versions.get(CHALLENGER)
        return None if c is None or c.version == self.versions[CHAMPION].version else c

    def variant(self, rng: Any) -> str:
        """Who answers one request: the canary with probability `share` under a canary split, else the champion."""
        if self.mode == CANARY and self.challenger is not None and rng.random() < self.share:
            return CANARY
        return CHAMPION

    @property
    def shadows(self) -> bool:
        return self.mode == SHADOW and self.challenger is not None

    def describe(self) -> str:
        c = self.challenger
        if self.mode == CANARY and c is not None:
            return f"champion v{self.champion.version}, canary v{c.version} at {self.share:.0%}"
        if self.mode == SHADOW and c is not None:
            return f"champion v{self.champion.version}, shadow v{c.version}"
        return f"champion v{self.champion.version} alone"

    def summary(self) -> dict[str, Any]:
        """What /intelligentops/status says about it."""
        c = self.challenger
        return {"mode": self.mode if c is not None else "champion", "share": self.share if c is not None else 0.0,
                "champion": self.champion.version, "challenger": c.version if c is not None else None,
                "control_event": self.event.id if self.event else None,
                "rollout": self.event.rollout if self.event else None, "step": self.event.step if self.event else None}


def split_source(cfg: ServerConfig, audit: Any):
    """A function giving (the split in force, its control event), read from the audit store's serving chain."""

    def read() -> tuple[Split, ServingEvent | None]:
        event = audit.latest_serving_event(cfg.spec)
        return split_in_force(event, cfg.mode, cfg.canary_share), event

    return read


def server_actor() -> str:
    return f"server {socket.gethostname()} pid {os.getpid()}"


class ServingReports:
    """The server's reports to the serving chain: the split it applied, and the rows each variant failed."""

    def __init__(self, cfg: ServerConfig, audit: Any):
        self.cfg, self.audit = cfg, audit
        self.actor = server_actor()
        self.applied: ServedSplit | None = None  # the split whose `applied` event is on the chain
        self.applied_event: ServingEvent | None = None
        self._failed: Counter = Counter()  # (variant, version, kind) -> rows
        self._lock = threading.Lock()
        self._last = time.monotonic()

    def apply(self, split: ServedSplit) -> None:
        """Record that this server now serves `split` (called before the first batch on it is committed)."""
        if split is self.applied:
            return
        self.flush()
        s = split.summary()
        source = f"control event {split.event.id} ({split.event.kind} by {split.event.actor})" if split.event else \
            "the server config"
        reason = (f"{'started' if self.applied is None else 'switched'}: {split.describe()}, as {source} says; every "
                  "decision it commits after seq_at is of this split")
        try:
            self.applied_event = self.audit.record_serving_event(
                self.cfg.spec, "applied", self.actor, reason, mode=s["mode"], share=s["share"],
                champion=s["champion"], challenger=s["challenger"], rollout=s["rollout"], step=s["step"],
                evidence={"control_event": s["control_event"]})
        except Exception as exc:  # never refuse to serve over a report; say so
            log.error("%s: could not record the applied split on the serving chain: %s", self.cfg.spec, exc)
        self.applied = split

    def failed(self, variant: str, version: str, kind: str, rows: int) -> None:
        with self._lock:
            self._failed[(variant, version, kind)] += rows

    def flush(self) -> None:
        """Append the failures counted since the last report as one `failures` event."""
        with self._lock:
            counts, self._failed = self._failed, Counter()
            self._last = time.monotonic()
        if not counts:
            return
        split = self.applied
        items = [{"variant": v, "version": ver, "kind": k, "rows": n} for (v, ver, k), n in sorted(counts.items())]
        try:
            self.audit.record_serving_event(
                self.cfg.spec, "failures", self.actor,
                "; ".join(f"{i['variant']} v{i['version']}: {i['rows']} rows {i['kind']}" for i in items),
                mode=split.summary()["mode"] if split else None,
                champion=split.champion.version if split else None,
                challenger=split.challenger.version if split and split.challenger else None,
                rollout=split.event.rollout if split and split.event else None,
                step=split.event.step if split and split.event else None, evidence={"failures": items})
        except Exception as exc:
            log.error("%s: could not record failures on the serving chain: %s", self.cfg.spec, exc)

    def watch(self, stop: threading.Event) -> None:
        """Report failures at most every FAILURE_REPORT_SECONDS, until `stop`."""
        while not stop.wait(FAILURE_REPORT_SECONDS):
            if self._failed:
                self.flush()

