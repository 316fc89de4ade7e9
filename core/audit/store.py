"""The decision audit log: append-only, hash-chained, committed before a decision is answered.

Every decision the inference server makes is one row of `audit_decisions`. Each row carries the hash of the row
before it (`prev_hash`) and its own hash over every stored field (`record_hash`), so an edited, removed or
reordered row breaks the chain at that row and `AuditStore.verify()` names it (EU AI Act Art. 12 asks for logs
that can be trusted after the fact). Outcomes learned later (a loan that defaulted) go to their own table, so the
decision chain itself is never updated.

Storage is any SQLAlchemy URL: SQLite in WAL mode under the home by default (`default_audit_url`), PostgreSQL
(`postgresql+psycopg2://...`) on a cluster. `append()` takes a batch and commits it in one transaction: the
server groups the decisions of concurrent requests into one commit (group commit), which is what makes a durable
write per decision affordable.

Dagster-free: the inference server imports it (core/ ships in the serving image).
"""

from __future__ import annotations

import json
import math
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from core.audit.records import (DEFAULT_RETENTION_DAYS, FIELDS, GENESIS, JSON_FIELDS, REQUIRED, VARIANTS, AuditError,
                                AuditRecord, ChainVerification, canonical_json, input_hash, now_iso, row_hash)


def default_audit_url(home: str) -> str:
    """SQLite under `<home>/audit/audit.db`."""
    if "://" in home:
        raise AuditError(f"home {home} is not a local folder: set INTELLIGENTOPS_AUDIT_URL to a database URL "
                         "(postgresql+psycopg2://...)")
    folder = Path(home) / "audit"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'audit.db'}"



class AuditStore:
    """The decision log behind one SQLAlchemy URL. Thread-safe; several processes may append to one store."""

    def __init__(self, url: str):
        import sqlalchemy as sa

        self.url = url
        self._lock = threading.Lock()
        is_sqlite = url.startswith("sqlite")
        if is_sqlite:
            path = url.split(":///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            args = {"timeout": 30, "check_same_thread": False}
            self.engine = sa.create_engine(url, connect_args=args)
            # Readers get their own engine with deferred transactions, so the drift sensor reading a window never
            # holds the write lock the server needs.
            self._read_engine = sa.create_engine(url, connect_args=args)
            _sqlite_pragmas(self.engine, "BEGIN IMMEDIATE")
            _sqlite_pragmas(self._read_engine, "BEGIN")
        else:
            self.engine = self._read_engine = sa.create_engine(url, pool_pre_ping=True)
        self._tables(sa)
        self.meta.create_all(self.engine)
        with self.engine.begin() as conn:
            if conn.execute(sa.select(self.head.c.id)).first() is None:
                try:
                    conn.execute(self.head.insert().values(id=1, seq=0, hash=GENESIS, anchor_seq=0,
                                                           anchor_hash=GENESIS))
                except sa.exc.IntegrityError:
                    pass  # another process created it first

    def _tables(self, sa) -> None:
        self.meta = sa.MetaData()
        self.decisions = sa.Table(
            "audit_decisions", self.meta,
            sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                      autoincrement=False),
            sa.Column("decision_id", sa.String(64), nullable=False, unique=True),
            sa.Column("time", sa.String(40), nullable=False, index=True),
            sa.Column("spec", sa.String(128), nullable=False, index=True),
            sa.Column("model_name", sa.String(256), nullable=False),
            sa.Column("model_version", sa.String(64), nullable=False, index=True),
            sa.Column("variant", sa.String(16), nullable=False, index=True),
            sa.Column("input_hash", sa.String(64), nullable=False),
            sa.Column("inputs", sa.Text, nullable=False),
            sa.Column("probability", sa.Float(precision=53), nullable=False),
            sa.Column("decision", sa.Integer, nullable=False),
            sa.Column("threshold", sa.Float(precision=53), nullable=False),
            sa.Column("top_factors", sa.Text, nullable=False),
            sa.Column("similar_cases", sa.Text, nullable=False),
            sa.Column("latency_ms", sa.Float(precision=53), nullable=False),
            sa.Column("key_id", sa.String(128), nullable=True),
            sa.Column("prev_hash", sa.String(64), nullable=False),
            sa.Column("record_hash", sa.String(64), nullable=False),
        )
        # One row: the newest seq and hash (so removing the newest rows is detected too) and the anchor that
        # retention leaves behind (the last pruned seq and hash, where verification starts).
        self.head = sa.Table(
            "audit_head", self.meta,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), nullable=False),
            sa.Column("hash", sa.String(64), nullable=False),
            sa.Column("anchor_seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), nullable=False),
            sa.Column("anchor_hash", sa.String(64), nullable=False),
        )
        self.outcome_table = sa.Table(
            "audit_outcomes", self.meta,
            sa.Column("decision_id", sa.String(64), primary_key=True),
            sa.Column("outcome", sa.Integer, nullable=False),
            sa.Column("at", sa.String(40), nullable=False),
        )
        # Every outcome recorded, in arrival order: the drift sensor's feed for re-judging windows whose outcomes
        # came back after their report (a new table, so stores written before it simply start it empty).
        self.outcome_events = sa.Table(
            "audit_outcome_events", self.meta,
            sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
            sa.Column("decision_id", sa.String(64), nullable=False),
            sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), nullable=False),
            sa.Column("spec", sa.String(128), nullable=False, index=True),
            sa.Column("outcome", sa.Integer, nullable=False),
            sa.Column("at", sa.String(40), nullable=False),
        )

    # --- writing ---------------------------------------------------------------------------------------------

    def _prepare(self, rec: dict[str, Any]) -> dict[str, Any]:
        missing = [k for k in REQUIRED if rec.get(k) is None]
        if missing:
            raise AuditError(f"audit record {rec.get('decision_id', '?')} lacks {', '.join(missing)}")
        if rec["variant"] not in VARIANTS:
            raise AuditError(f"audit record {rec['decision_id']}: variant {rec['variant']!r}; expected one of "
                             f"{', '.join(VARIANTS)}")
        probability = float(rec["probability"])
        if not math.isfinite(probability):
            raise AuditError(f"audit record {rec['decision_id']}: probability {probability} is not finite")
        return {
            "decision_id": str(rec["decision_id"]),
            "time": str(rec.get("time") or now_iso()),
            "spec": str(rec["spec"]),
            "model_name": str(rec["model_name"]),
            "model_version": str(rec["model_version"]),
            "variant": rec["variant"],
            "input_hash": str(rec.get("input_hash") or input_hash(rec["inputs"])),
            "inputs": canonical_json(rec["inputs"]),
            "probability": probability,
            "decision": int(rec["decision"]),
            "threshold": float(rec["threshold"]),
            "top_factors": canonical_json(rec.get("top_factors") or []),
            "similar_cases": canonical_json(rec.get("similar_cases") or []),
            "latency_ms": float(rec.get("latency_ms") or 0.0),
            "key_id": None if rec.get("key_id") is None else str(rec["key_id"]),
        }

    def append(self, records: list[dict]) -> list[AuditRecord]:
        """Assign seq, chain the hashes and commit the whole batch in one transaction before returning."""
        import sqlalchemy as sa

        if not records:
            return []
        prepared = [self._prepare(r) for r in records]
        with self._lock, self.engine.begin() as conn:
            head = conn.execute(sa.select(self.head.c.seq, self.head.c.hash).where(self.head.c.id == 1)
                                .with_for_update()).one()
            seq, prev = int(head.seq), head.hash
            rows = []
            for p in prepared:
                seq += 1
                row = {**p, "seq": seq, "prev_hash": prev}
                row["record_hash"] = prev = row_hash(row)
                rows.append(row)
            conn.execute(self.decisions.insert(), rows)
            conn.execute(self.head.update().where(self.head.c.id == 1).values(seq=seq, hash=prev))
        return [self._record(r) for r in rows]

    def record_outcome(self, decision_id: str, outcome: int, at: str | None = None) -> None:
        """The observed outcome of a decision (1 = positive class happened); a later call replaces it."""
        import sqlalchemy as sa

        record = self.get(decision_id)
        if record is None:
            raise AuditError(f"no decision {decision_id!r} in the audit log at {self.location()}")
        values = {"decision_id": decision_id, "outcome": int(outcome), "at": at or now_iso()}
        with self._lock, self.engine.begin() as conn:
            conn.execute(sa.delete(self.outcome_table).where(self.outcome_table.c.decision_id == decision_id))
            conn.execute(self.outcome_table.insert().values(**values))
            conn.execute(self.outcome_events.insert().values(seq=record.seq, spec=record.spec, **values))

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
        """How many decisions of `spec` with seq in [first, last] (of the given variants) have an outcome."""
        import sqlalchemy as sa

        d, o = self.decisions, self.outcome_table
        q = (sa.select(sa.func.count()).select_from(d.join(o, o.c.decision_id == d.c.decision_id))
             .where(d.c.spec == spec, d.c.seq >= int(first), d.c.seq <= int(last)))
        if variants:
            q = q.where(d.c.variant.in_(list(variants)))
        if exclude_key_ids:
            q = q.where(sa.or_(d.c.key_id.is_(None), d.c.key_id.not_in(list(exclude_key_ids))))
        with self._read_engine.connect() as conn:
            return int(conn.execute(q).scalar() or 0)

    def outcomes(self, decision_ids: list[str]) -> dict[str, int]:
        import sqlalchemy as sa

        out: dict[str, int] = {}
        ids = list(decision_ids)
        with self._read_engine.connect() as conn:
            for i in range(0, len(ids), 500):
                q = sa.select(self.outcome_table.c.decision_id, self.outcome_table.c.outcome).where(
                    self.outcome_table.c.decision_id.in_(ids[i:i + 500]))
                out.update({r.decision_id: int(r.outcome) for r in conn.execute(q)})
        return out

    def prune(self, older_than_days: float = DEFAULT_RETENTION_DAYS) -> int:
        """Remove decisions older than the retention period (a prefix of the chain); returns how many.

        The last removed row's seq and hash become the chain's anchor, so what remains still verifies and a row
        removed from the middle is still detected.
        """
        import sqlalchemy as sa

        cutoff = (datetime.now(UTC) - timedelta(days=older_than_days)).isoformat(timespec="microseconds")
        cutoff = cutoff.replace("+00:00", "Z")
        d = self.decisions
        with self._lock, self.engine.begin() as conn:
            conn.execute(sa.select(self.head.c.seq).where(self.head.c.id == 1).with_for_update()).one()
            # Only the contiguous old prefix goes: a row with a skewed clock never punches a hole in the chain.
            first_young = conn.execute(sa.select(sa.func.min(d.c.seq)).where(d.c.time >= cutoff)).scalar()
            q = sa.select(d.c.seq, d.c.record_hash).where(d.c.time < cutoff)
            if first_young is not None:
                q = q.where(d.c.seq < first_young)
            last = conn.execute(q.order_by(d.c.seq.desc()).limit(1)).first()
            if last is None:
                return 0
            ids = sa.select(d.c.decision_id).where(d.c.seq <= last.seq)
            conn.execute(sa.delete(self.outcome_table).where(self.outcome_table.c.decision_id.in_(ids)))
            conn.execute(sa.delete(self.outcome_events).where(self.outcome_events.c.seq <= last.seq))
            removed = conn.execute(sa.delete(d).where(d.c.seq <= last.seq)).rowcount
            conn.execute(self.head.update().where(self.head.c.id == 1).values(anchor_seq=last.seq,
                                                                              anchor_hash=last.record_hash))
        return int(removed)

    # --- reading ---------------------------------------------------------------------------------------------

    def location(self) -> str:
        """The store's URL with any password hidden."""
        return self.engine.url.render_as_string(hide_password=True)

    @staticmethod
    def _record(row: Any) -> AuditRecord:
        m = dict(row._mapping) if hasattr(row, "_mapping") else dict(row)
        for k in JSON_FIELDS:
            m[k] = json.loads(m[k])
        m["seq"] = int(m["seq"])
        return AuditRecord(**{k: m[k] for k in FIELDS})

    def read_after(self, seq: int, limit: int = 1000, spec: str | None = None,
                   variants: tuple[str, ...] | None = None,
                   exclude_key_ids: tuple[str, ...] = ()) -> list[AuditRecord]:
        """Records with seq > `seq`, oldest first: the cursor the drift sensor reads windows with.
        `exclude_key_ids` leaves out the decisions made for those API key ids (the deployment's smoke requests)."""
        import sqlalchemy as sa

        d = self.decisions
        q = sa.select(d).where(d.c.seq > int(seq))
        if spec is not None:
            q = q.where(d.c.spec == spec)
        if variants:
            q = q.where(d.c.variant.in_(list(variants)))
        if exclude_key_ids:
            q = q.where(sa.or_(d.c.key_id.is_(None), d.c.key_id.not_in(list(exclude_key_ids))))
        with self._read_engine.connect() as conn:
            return [self._record(r) for r in conn.execute(q.order_by(d.c.seq).limit(int(limit)))]

    def latest_seq(self, spec: str | None = None) -> int:
        import sqlalchemy as sa

        with self._read_engine.connect() as conn:
            if spec is None:
                return int(conn.execute(sa.select(self.head.c.seq).where(self.head.c.id == 1)).scalar() or 0)
            value = conn.execute(sa.select(sa.func.max(self.decisions.c.seq))
                                 .where(self.decisions.c.spec == spec)).scalar()
        return int(value or 0)

    def count(self, spec: str | None = None, exclude_key_ids: tuple[str, ...] = ()) -> dict[str, int]:
        """Decisions per variant (all variants when `spec` is None), leaving out those API key ids."""
        import sqlalchemy as sa

        d = self.decisions
        q = sa.select(d.c.variant, sa.func.count()).group_by(d.c.variant)
        if spec is not None:
            q = q.where(d.c.spec == spec)
        if exclude_key_ids:
            q = q.where(sa.or_(d.c.key_id.is_(None), d.c.key_id.not_in(list(exclude_key_ids))))
        with self._read_engine.connect() as conn:
            return {r[0]: int(r[1]) for r in conn.execute(q)}

    def get(self, decision_id: str) -> AuditRecord | None:
        import sqlalchemy as sa

        with self._read_engine.connect() as conn:
            row = conn.execute(sa.select(self.decisions).where(self.decisions.c.decision_id == decision_id)).first()
        return self._record(row) if row is not None else None

    def find(self, spec: str | None = None, since: str | None = None, until: str | None = None,
             model_version: str | None = None, variant: str | None = None, limit: int = 100) -> list[AuditRecord]:
        """Decisions matching every given filter, newest first. `since`/`until` are ISO-8601 UTC times."""
        import sqlalchemy as sa

        d = self.decisions
        q = sa.select(d)
        if spec is not None:
            q = q.where(d.c.spec == spec)
        if since is not None:
            q = q.where(d.c.time >= _normalize_time(since))
        if until is not None:
            q = q.where(d.c.time < _normalize_time(until))
        if model_version is not None:
            q = q.where(d.c.model_version == str(model_version))
        if variant is not None:
            q = q.where(d.c.variant == variant)
        with self._read_engine.connect() as conn:
            return [self._record(r) for r in conn.execute(q.order_by(d.c.seq.desc()).limit(int(limit)))]

    def verify(self, batch: int = 5000) -> ChainVerification:
        """Walk the chain from its anchor; every row whose hash or link does not hold is named."""
        import sqlalchemy as sa

        d = self.decisions
        problems: list[str] = []
        checked = 0
        with self._read_engine.connect() as conn:
            head = conn.execute(sa.select(self.head).where(self.head.c.id == 1)).one()
            expected_seq, prev = int(head.anchor_seq), head.anchor_hash
            last_seen = expected_seq
            while True:
                rows = conn.execute(sa.select(d).where(d.c.seq > last_seen, d.c.seq <= int(head.seq))
                                    .order_by(d.c.seq).limit(batch)).all()
                if not rows:
                    break
                for r in rows:
                    m = dict(r._mapping)
                    checked += 1
                    seq, did = int(m["seq"]), m["decision_id"]
                    if seq != expected_seq + 1:
                        problems.append(f"seq {expected_seq + 1}..{seq - 1} missing before seq {seq} "
                                        f"(decision {did}): records were removed")
                    if m["prev_hash"] != prev:
                        problems.append(f"seq {seq} (decision {did}): prev_hash does not match the record before "
                                        "it: a record before it was removed, edited or reordered")
                    if row_hash(m) != m["record_hash"]:
                        problems.append(f"seq {seq} (decision {did}): contents do not match its record_hash: "
                                        "the record was edited")
                    expected_seq, prev = seq, m["record_hash"]
                    last_seen = seq
            if int(head.seq) != expected_seq or head.hash != prev:
                if int(head.seq) > expected_seq:
                    problems.append(f"seq {expected_seq + 1}..{int(head.seq)} missing at the end of the chain "
                                    "(the newest records were removed)")
                else:
                    problems.append(f"the chain head (seq {int(head.seq)}) does not match the newest record "
                                    f"(seq {expected_seq})")
        return ChainVerification(ok=not problems, checked=checked, problems=problems)


def _sqlite_pragmas(engine, begin: str) -> None:
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        # pysqlite's own transaction handling opens deferred transactions lazily; emit BEGIN ourselves so a writer
        # takes the write lock at BEGIN and two writers never both read the same chain head.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed decision survives power loss, not only a killed process; group commit pays for it.
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql(begin)


def _normalize_time(value: str) -> str:
    """Accept any ISO-8601 time; compare as the UTC text the store writes."""
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
