"""The outcome chain's reads and writes, as part of AuditStore (core/audit/store.py; the rules and the burst
check are core/audit/outcomes.py). Every report is appended to `audit_outcome_events` with the reporting key's
id and the time, chained and (under the keyed rule) authenticated like the decisions; nothing is overwritten.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from core.audit.checkpoints import OUTCOMES
from core.audit.outcomes import (DEFAULT_OUTCOME_RULE, MAX_REASON_CHARS, OutcomeConflict, OutcomeEvent,
                                 OutcomeEvidence, OutcomeReport, UnknownDecision, apply_rule)
from core.audit.records import AuditError, now_iso
from core.audit.schema import HEAD_OUTCOMES
from core.audit.verify import event_hash


class OutcomeLog:
    """AuditStore's outcome methods (a mixin: the store gives the engines, tables, lock, cipher and heads)."""

    def record_outcomes(self, reports: list[OutcomeReport], key_id: str | None, spec: str | None = None,
                        at: str | None = None) -> list[int]:
        """Append each report to the outcome chain (all or none), with `key_id` and the time; returns the event
        ids. A decision not on the log (or not of `spec`) is UnknownDecision; a different outcome for a decision
        that has one is a correction and needs a reason (else OutcomeConflict); the same outcome from the same key
        again is not recorded twice (its event id is returned)."""
        import sqlalchemy as sa

        checked = [_checked_report(r, i) for i, r in enumerate(reports)]
        if not checked:
            return []
        keyed = self._prepare_writer()
        when = at or now_iso()
        d, e = self.decisions, self.outcome_events
        ids = sorted({r.decision_id for r in checked})
        with self._lock, self.engine.begin() as conn:
            head, marks = self._locked_head(conn, HEAD_OUTCOMES, keyed)
            known: dict[str, Any] = {}
            latest: dict[str, Any] = {}
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                known.update({r.decision_id: r for r in conn.execute(
                    sa.select(d.c.decision_id, d.c.seq, d.c.spec).where(d.c.decision_id.in_(chunk)))})
                for r in conn.execute(sa.select(e.c.id, e.c.decision_id, e.c.outcome, e.c.key_id)
                                      .where(e.c.decision_id.in_(chunk)).order_by(e.c.id)):
                    latest[r.decision_id] = {"id": int(r.id), "outcome": int(r.outcome), "key_id": r.key_id}
            for n, r in enumerate(checked):
                found = known.get(r.decision_id)
                if found is None or (spec is not None and found.spec != spec):
                    raise UnknownDecision(f"outcomes[{n}]: no decision {r.decision_id!r}"
                                          f"{f' of model {spec!r}' if spec else ''} on the audit log")
            seq, prev = int(head.seq), head.hash
            rows, out = [], []
            for n, r in enumerate(checked):
                before = latest.get(r.decision_id)
                if before is not None and before["outcome"] != r.outcome and not r.reason:
                    raise OutcomeConflict(f"outcomes[{n}]: decision {r.decision_id!r} already has outcome "
                                          f"{before['outcome']}; a different outcome is a correction: send it with "
                                          "a reason")
                if (before is not None and before["outcome"] == r.outcome and before["key_id"] == key_id
                        and not r.reason):
                    out.append(before["id"])  # a retry of the same report
                    continue
                seq += 1
                row = {"id": seq, "decision_id": r.decision_id, "seq": int(known[r.decision_id].seq),
                       "spec": known[r.decision_id].spec, "outcome": r.outcome, "at": when, "key_id": key_id,
                       "reason": r.reason, "correction": int(before is not None and before["outcome"] != r.outcome),
                       "prev_hash": prev}
                row["record_hash"] = prev = event_hash(row)
                if keyed:
                    row["mac"] = self._cipher.mac("outcome", prev)
                rows.append(row)
                out.append(seq)
                latest[r.decision_id] = {"id": seq, "outcome": r.outcome, "key_id": key_id}
            if rows:
                conn.execute(e.insert(), rows)
                new_head = self._update_head(conn, HEAD_OUTCOMES, head, seq=seq, hash=prev, **marks)
        if rows:
            self._seen[HEAD_OUTCOMES] = seq
            self._checkpoint(OUTCOMES, new_head)
        return out

    def record_outcome(self, decision_id: str, outcome: int, at: str | None = None, reason: str | None = None,
                       key_id: str | None = None) -> int:
        """One outcome (1 = the positive class happened); the CLI's and the tests' way in. Returns its event id."""
        return self.record_outcomes([OutcomeReport(decision_id, outcome, reason)], key_id, at=at)[0]

    # --- outcomes --------------------------------------------------------------------------------------------

    def _events(self, decision_ids: list[str]) -> list[OutcomeEvent]:
        import sqlalchemy as sa

        e = self.outcome_events
        out: list[OutcomeEvent] = []
        ids = list(dict.fromkeys(decision_ids))
        with self._read_engine.connect() as conn:
            for i in range(0, len(ids), 500):
                out += [_event(r) for r in conn.execute(sa.select(e).where(e.c.decision_id.in_(ids[i:i + 500])))]
        return sorted(out, key=lambda ev: ev.id)

    def outcomes(self, decision_ids: list[str], rule: str = DEFAULT_OUTCOME_RULE,
                 exclude_key_ids: Iterable[str] = ()) -> dict[str, int]:
        """decision id -> its label under `rule` (first | latest | unanimous; core/audit/outcomes.py), leaving out
        the reports of `exclude_key_ids`. Decisions without a label are absent."""
        return apply_rule(self._events(decision_ids), rule, exclude_key_ids)

    def outcome_history(self, decision_id: str) -> list[OutcomeEvent]:
        """Every report of one decision's outcome, oldest first (corrections with their reasons)."""
        return self._events([decision_id])

    def outcome_evidence(self, spec: str) -> list[OutcomeEvidence]:
        """Each outcome report of `spec` beside the decision it reports on (for the per-key burst check)."""
        import sqlalchemy as sa

        d, e = self.decisions, self.outcome_events
        q = (sa.select(e.c.key_id, e.c.decision_id, e.c.outcome, d.c.probability, d.c.decision, d.c.model_version)
             .join(d, d.c.decision_id == e.c.decision_id).where(e.c.spec == spec).order_by(e.c.id))
        with self._read_engine.connect() as conn:
            return [OutcomeEvidence(key_id=r.key_id, decision_id=r.decision_id, outcome=int(r.outcome),
                                    probability=float(r.probability), decision=int(r.decision),
                                    model_version=str(r.model_version)) for r in conn.execute(q)]

    def outcome_events_after(self, event_id: int, spec: str, limit: int = 10000) -> list[tuple[int, int]]:
        """(event id, decision seq) of the outcomes of `spec` recorded after event `event_id`, oldest first."""
        import sqlalchemy as sa

        e = self.outcome_events
        q = (sa.select(e.c.id, e.c.seq).where(e.c.id > int(event_id), e.c.spec == spec).order_by(e.c.id)
             .limit(int(limit)))
        with self._read_engine.connect() as conn:
            return [(int(r.id), int(r.seq)) for r in conn.execute(q)]

    def outcome_count(self, spec: str, first: int, last: int, variants: tuple[str, ...] | None = None,
                      exclude_key_ids: tuple[str, ...] = ()) -> int:
        """How many decisions of `spec` with seq in [first, last] (of the given variants, not made for those API
        key ids) have at least one outcome reported."""
        import sqlalchemy as sa

        d, e = self.decisions, self.outcome_events
        q = (sa.select(sa.func.count(sa.distinct(d.c.decision_id)))
             .select_from(d.join(e, e.c.decision_id == d.c.decision_id))
             .where(d.c.spec == spec, d.c.seq >= int(first), d.c.seq <= int(last)))
        if variants:
            q = q.where(d.c.variant.in_(list(variants)))
        if exclude_key_ids:
            q = q.where(sa.or_(d.c.key_id.is_(None), d.c.key_id.not_in(list(exclude_key_ids))))
        with self._read_engine.connect() as conn:
            return int(conn.execute(q).scalar() or 0)


def _checked_report(r: Any, n: int) -> OutcomeReport:
    if not isinstance(r, OutcomeReport):
        raise AuditError(f"outcomes[{n}]: expected an OutcomeReport, not {type(r).__name__}")
    if not isinstance(r.decision_id, str) or not r.decision_id:
        raise AuditError(f"outcomes[{n}]: decision_id must be a non-empty string")
    if isinstance(r.outcome, bool) or r.outcome not in (0, 1):
        raise AuditError(f"outcomes[{n}].outcome must be 0 or 1, not {r.outcome!r}")
    if r.reason is not None and (not isinstance(r.reason, str) or len(r.reason) > MAX_REASON_CHARS):
        raise AuditError(f"outcomes[{n}].reason must be text of at most {MAX_REASON_CHARS} characters")
    return OutcomeReport(r.decision_id, int(r.outcome), r.reason.strip() or None if r.reason else None)


def _event(r: Any) -> OutcomeEvent:
    return OutcomeEvent(id=int(r.id), decision_id=r.decision_id, seq=int(r.seq), spec=r.spec, outcome=int(r.outcome),
                        at=r.at, key_id=r.key_id, reason=r.reason, correction=bool(r.correction))
