"""Who served when: the serving chain of the audit store, `audit_serving_events` (Dagster-free).

Every change of who serves is one event, appended in order, chained and (under the keyed rule) authenticated like
the decisions and the outcomes (core/audit/store.py), so an edited, removed or reordered event is named by
`verify()`:

- control events, written by whoever changes the split (the promotion asset, the rollout jobs, a person through
  them): `promote`, `rollout` (a rollout starts at its first step), `step`, `hold`, `rollback`, `traffic`. Each
  carries the time, the actor, a reason, the evidence it rested on (a Dagster run id, check evaluations) and the
  whole split after it: `mode` (champion | canary | shadow), `share` (of requests @challenger answers in canary),
  the champion and challenger versions, and the rollout and step it belongs to. The newest control event of a
  spec is the split its servers apply (core/rollout.py).
- report events, written by a server: `applied` (it now serves this split; `seq_at` is the decision seq after
  which every decision it commits is of it) and `failures` (rows a variant failed to score, counted per variant
  and version since its last report).

`seq_at` is the decision chain's head when the event was written: where the event sits among the decisions.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from core.audit.checkpoints import SERVING
from core.audit.records import AuditError, canonical_json, now_iso
from core.audit.schema import HEAD_DECISIONS, HEAD_SERVING

CONTROL_KINDS = ("promote", "rollout", "step", "hold", "rollback", "traffic")
REPORT_KINDS = ("applied", "failures")
KINDS = (*CONTROL_KINDS, *REPORT_KINDS)
MODES = ("champion", "canary", "shadow")
MAX_REASON_CHARS = 4000
EVENT_FIELDS = ("id", "time", "spec", "kind", "actor", "reason", "mode", "share", "champion", "challenger",
                "rollout", "step", "seq_at", "evidence", "prev_hash")


@dataclass(frozen=True)
class ServingEvent:
    """One event of the serving chain, as stored."""

    id: int
    time: str
    spec: str
    kind: str
    actor: str
    reason: str
    mode: str | None
    share: float | None
    champion: str | None
    challenger: str | None
    rollout: str | None
    step: int | None
    seq_at: int
    evidence: dict[str, Any] = field(default_factory=dict)
    record_hash: str = ""

    @property
    def is_control(self) -> bool:
        return self.kind in CONTROL_KINDS

    def split_text(self) -> str:
        """The split after this event, as a person reads it."""
        if self.mode == "canary" and self.challenger:
            pct = f"{(self.share or 0):.0%}"
            return f"champion v{self.champion} answers, canary v{self.challenger} answers {pct} of requests"
        if self.mode == "shadow" and self.challenger:
            return f"champion v{self.champion} answers, v{self.challenger} scores every request in shadow"
        return f"champion v{self.champion} answers every request"


def serving_event_hash(row: dict[str, Any]) -> str:
    """An event's hash: every stored field but its own hash and MAC (the evidence as the exact text stored)."""
    payload = {k: row.get(k) for k in EVENT_FIELDS}
    payload["id"], payload["seq_at"] = int(payload["id"]), int(payload["seq_at"])
    payload["share"] = None if payload["share"] is None else repr(float(payload["share"]))
    payload["step"] = None if payload["step"] is None else int(payload["step"])
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _checked(kind: str, actor: str, reason: str, mode: str | None, share: float | None) -> None:
    if kind not in KINDS:
        raise AuditError(f"serving event kind {kind!r}: expected one of {', '.join(KINDS)}")
    if not isinstance(actor, str) or not actor.strip() or len(actor) > 256:
        raise AuditError("a serving event needs an actor (who made the change): at most 256 characters")
    if kind in CONTROL_KINDS and (not isinstance(reason, str) or not reason.strip()):
        raise AuditError(f"a {kind} event needs a reason: why the split changes")
    if isinstance(reason, str) and len(reason) > MAX_REASON_CHARS:
        raise AuditError(f"a serving event's reason is at most {MAX_REASON_CHARS} characters")
    if mode is not None and mode not in MODES:
        raise AuditError(f"serving event mode {mode!r}: expected one of {', '.join(MODES)}")
    if share is not None and not (math.isfinite(share) and 0.0 <= share <= 1.0):
        raise AuditError(f"serving event share {share!r}: expected a number in [0, 1]")


class ServingLog:
    """AuditStore's serving-chain methods (a mixin: the store gives the engines, tables, lock, cipher and heads)."""

    def record_serving_event(self, spec: str, kind: str, actor: str, reason: str, *, mode: str | None = None,
                             share: float | None = None, champion: str | None = None,
                             challenger: str | None = None, rollout: str | None = None, step: int | None = None,
                             evidence: dict[str, Any] | None = None, at: str | None = None) -> ServingEvent:
        """Append one event to the serving chain (keyed and checkpointed like the others) and return it."""
        import sqlalchemy as sa

        _checked(kind, actor, reason or "", mode, share)
        keyed = self._prepare_writer()
        evidence_text = canonical_json(evidence or {})
        with self._lock, self.engine.begin() as conn:
            head, marks = self._locked_head(conn, HEAD_SERVING, keyed)
            seq_at = conn.execute(sa.select(self.head.c.seq).where(self.head.c.id == HEAD_DECISIONS)).scalar()
            row = {"id": int(head.seq) + 1, "time": at or now_iso(), "spec": spec, "kind": kind,
                   "actor": actor.strip(), "reason": (reason or "").strip(), "mode": mode,
                   "share": None if share is None else float(share),
                   "champion": None if champion is None else str(champion),
                   "challenger": None if challenger is None else str(challenger), "rollout": rollout,
                   "step": None if step is None else int(step), "seq_at": int(seq_at or 0),
                   "evidence": evidence_text, "prev_hash": head.hash}
            row["record_hash"] = serving_event_hash(row)
            if keyed:
                row["mac"] = self._cipher.mac("serving", row["record_hash"])
            conn.execute(self.serving_table.insert(), [row])
            new_head = self._update_head(conn, HEAD_SERVING, head, seq=row["id"], hash=row["record_hash"], **marks)
        self._seen[HEAD_SERVING] = row["id"]
        self._checkpoint(SERVING, new_head)
        return _event(row)

    def serving_events(self, spec: str | None = None, after: int = 0, kinds: Iterable[str] | None = None,
                       until: str | None = None, limit: int = 10_000) -> list[ServingEvent]:
        """Events with id > `after` (of `spec`, of `kinds`, at or before the time `until`), oldest first."""
        import sqlalchemy as sa

        t = self.serving_table
        q = sa.select(t).where(t.c.id > int(after))
        if spec is not None:
            q = q.where(t.c.spec == spec)
        if kinds is not None:
            q = q.where(t.c.kind.in_(list(kinds)))
        if until is not None:
            q = q.where(t.c.time <= until)
        with self._read_engine.connect() as conn:
            return [_event(r._mapping) for r in conn.execute(q.order_by(t.c.id).limit(int(limit)))]

    def latest_serving_event(self, spec: str, kinds: Iterable[str] = CONTROL_KINDS,
                             until: str | None = None) -> ServingEvent | None:
        """The newest event of `spec` of `kinds` (at or before `until`): by default the split in force."""
        import sqlalchemy as sa

        t = self.serving_table
        q = sa.select(t).where(t.c.spec == spec, t.c.kind.in_(list(kinds)))
        if until is not None:
            q = q.where(t.c.time <= until)
        with self._read_engine.connect() as conn:
            row = conn.execute(q.order_by(t.c.id.desc()).limit(1)).first()
        return None if row is None else _event(row._mapping)

    def step_counts(self, spec: str, first: int, last: int | None, variant: str, version: str,
                    exclude_key_ids: tuple[str, ...] = ()) -> tuple[int, int]:
        """(decisions, decisions with an outcome reported) of `spec` by `variant` and model `version` with seq in
        [first, last] (last None: to the end): what a rollout step has seen, counted without reading a record."""
        import sqlalchemy as sa

        d, e = self.decisions, self.outcome_events
        where = [d.c.spec == spec, d.c.seq >= int(first), d.c.variant == variant, d.c.model_version == str(version)]
        if last is not None:
            where.append(d.c.seq <= int(last))
        if exclude_key_ids:
            where.append(sa.or_(d.c.key_id.is_(None), d.c.key_id.not_in(list(exclude_key_ids))))
        labelled = sa.select(sa.func.count(sa.distinct(d.c.decision_id))).select_from(
            d.join(e, e.c.decision_id == d.c.decision_id)).where(*where)
        with self._read_engine.connect() as conn:
            n = int(conn.execute(sa.select(sa.func.count()).select_from(d).where(*where)).scalar() or 0)
            k = int(conn.execute(labelled).scalar() or 0)
        return n, k


def _event(m: Any) -> ServingEvent:
    m = dict(m)
    evidence = m.get("evidence") or "{}"
    try:
        parsed = json.loads(evidence)
    except ValueError:
        parsed = {"unreadable": evidence[:200]}
    return ServingEvent(id=int(m["id"]), time=m["time"], spec=m["spec"], kind=m["kind"], actor=m["actor"],
                        reason=m["reason"], mode=m.get("mode"),
                        share=None if m.get("share") is None else float(m["share"]), champion=m.get("champion"),
                        challenger=m.get("challenger"), rollout=m.get("rollout"),
                        step=None if m.get("step") is None else int(m["step"]), seq_at=int(m["seq_at"]),
                        evidence=parsed if isinstance(parsed, dict) else {"value": parsed},
                        record_hash=m.get("record_hash") or "")


def walk_serving(verifier: Any, conn: Any, batch: int) -> Any:
    """The serving chain walked like the outcome chain (core/audit/verify.py): each event's hash, link and MAC,
    the head, and the checkpoints; returns the verifier's walk."""
    walk, head, keyed_from = verifier.walk_events(
        conn, verifier.store.serving_table, HEAD_SERVING, SERVING, serving_event_hash,
        lambda m, i: f"serving event {i} ({m['kind']} by {m['actor']} at {m['time']})", "serving", "event", "events",
        batch)
    if head is not None:
        verifier._rule(SERVING, head, keyed_from, walk.checked)
    return walk
