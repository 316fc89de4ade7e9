"""The decision audit log: append-only, hash-chained, authenticated, private at rest, committed before a decision
is answered.

Every decision the inference server makes is one row of `audit_decisions`. Each row carries the hash of the row
before it (`prev_hash`), its own hash over every stored field (`record_hash`) and, under the keyed rule, an
HMAC-SHA256 of that hash (`mac`) under `audit-mac.key`, a key kept outside the database (core/audit/crypto.py).
An edited, removed or reordered row breaks the chain at that row, and one edited with every hash recomputed
fails at its MAC; `verify()` names the first bad seq (EU AI Act Art. 12 asks for logs that can be trusted after
the fact). The heads are authenticated too and checkpointed outside the store (core/audit/checkpoints.py), so a
truncated tail with a rewritten head is named as well. The applicant's fields and the top factors are stored
encrypted (AES-256-GCM under `audit-enc.key`), and the input hash is keyed.

Outcomes (a loan that defaulted) are a second chain, `audit_outcome_events`: every report in arrival order with
the reporting key's id and time; a different outcome for a decision is a correction that needs a reason and is
kept beside the first, never over it (core/audit/outcomes.py: the rules a reader takes labels by).

Storage is any SQLAlchemy URL: SQLite in WAL mode under the home by default (`default_audit_url`; its files mode
0600), PostgreSQL (`postgresql+psycopg2://...`) on a cluster. `append()` takes a batch and commits it in one
transaction: the server groups the decisions of concurrent requests into one commit (group commit), which is
what makes a durable write per decision affordable. A store written before keys keeps verifying under the old
rule; the first keyed write marks where the keyed rule starts (`keyed_from`), and keys are created then, never
for a store that already holds keyed records.

Dagster-free: the inference server imports it (core/ ships in the serving image).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from core.audit.checkpoints import (DECISIONS, DEFAULT_INTERVAL, OUTCOMES, SERVING, Checkpoint, Checkpointer,
                                    default_checkpoint_path, head_checkpoint, read_checkpoints)
from core.audit.crypto import (SEALED_WITH_INPUTS, AuditKeyError, AuditKeys, Cipher, SealedInputs, SealedList,
                               is_sealed)
from core.audit.outcome_log import OutcomeLog
from core.audit.records import (DEFAULT_RETENTION_DAYS, FIELDS, GENESIS, REDACTED, REQUIRED, VARIANTS, AuditError,
                                AuditRecord, ChainVerification, canonical_json, input_hash, now_iso, row_hash)
from core.audit.schema import (HEAD_DECISIONS, HEAD_OUTCOMES, HEAD_SERVING, KEYED, LEGACY_OUTCOMES, PLAIN, migrate,
                                tables)
from core.audit.serving_events import ServingLog, walk_serving
from core.audit.verify import Verifier, head_text

_BESIDE = object()  # checkpoints: beside a SQLite store, none elsewhere


def default_audit_url(home: str) -> str:
    """SQLite under `<home>/audit/audit.db` (the folder mode 0700)."""
    if "://" in home:
        raise AuditError(f"home {home} is not a local folder: set INTELLIGENTOPS_AUDIT_URL to a database URL "
                         "(postgresql+psycopg2://...)")
    folder = Path(home) / "audit"
    if not folder.is_dir():
        folder.mkdir(parents=True, mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)
    return f"sqlite:///{folder / 'audit.db'}"


def _private_sqlite(path: str) -> None:
    """Create the database file 0600 before SQLite does (its -wal and -shm files take the database's mode), and
    take group and others' access away from a store created before."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(p, os.O_RDWR | os.O_CREAT, 0o600))
    for f in (p, Path(f"{p}-wal"), Path(f"{p}-shm")):
        try:
            if f.stat().st_mode & 0o077:
                os.chmod(f, 0o600)
        except (FileNotFoundError, PermissionError):
            pass


class AuditStore(OutcomeLog, ServingLog):
    """The decision log behind one SQLAlchemy URL. Thread-safe; several processes may append to one store.

    `keys` (AuditKeys.load(folder)) makes writes keyed and encrypted and lets readers decrypt and verify; without
    them the store reads and writes the old unkeyed format, and refuses to write to a keyed store. `checkpoints`
    is the file the chain heads are appended to (default: beside a SQLite store; none for other URLs).
    """

    def __init__(self, url: str, keys: AuditKeys | None = None, checkpoints: Any = _BESIDE,
                 checkpoint_interval: float = DEFAULT_INTERVAL):
        import sqlalchemy as sa

        self.url = url
        self.keys = keys
        self._cipher = Cipher(keys)
        self._writer_ready = keys is None
        self._lock = threading.Lock()
        self._writer_lock = threading.Lock()
        self._seen: dict[int, int] = {}  # chain -> the newest seq this process committed (a rollback is refused)
        is_sqlite = url.startswith("sqlite")
        db_path = url.split(":///", 1)[-1] if is_sqlite else ""
        if is_sqlite and db_path and db_path != ":memory:":
            _private_sqlite(db_path)
        if checkpoints is _BESIDE:
            checkpoints = default_checkpoint_path(db_path) if is_sqlite and db_path not in ("", ":memory:") else None
        self.checkpoint_path = Path(checkpoints) if checkpoints else None
        self._checkpointer = Checkpointer(self.checkpoint_path, checkpoint_interval) if checkpoints else None
        if is_sqlite:
            args = {"timeout": 30, "check_same_thread": False}
            self.engine = sa.create_engine(url, connect_args=args)
            # Readers get their own engine with deferred transactions, so the drift sensor reading a window never
            # holds the write lock the server needs.
            self._read_engine = sa.create_engine(url, connect_args=args)
            _sqlite_pragmas(self.engine, "BEGIN IMMEDIATE")
            _sqlite_pragmas(self._read_engine, "BEGIN")
        else:
            self.engine = self._read_engine = sa.create_engine(url, pool_pre_ping=True)
        self.meta, self.decisions, self.head, self.outcome_events = tables(sa)
        self.serving_table = self.meta.tables["audit_serving_events"]
        migrate(sa, self.engine, self.meta)
        # Built once: a commit per request when idle, so the statements' construction shows in the throughput.
        self._select_head = sa.select(self.head).where(self.head.c.id == sa.bindparam("chain")).with_for_update()
        self._write_head = self.head.update().where(self.head.c.id == sa.bindparam("chain"))
        self._insert_decisions = self.decisions.insert()
        if self._ensure_heads(sa) and keys is not None:
            self._prepare_writer()  # a new store is keyed from its first record: nothing plain can precede it

    def _ensure_heads(self, sa) -> bool:
        """Create the head rows that are missing; True when this call created a new, empty store."""
        with self.engine.begin() as conn:
            have = {r.id for r in conn.execute(sa.select(self.head.c.id))}
        if {HEAD_DECISIONS, HEAD_OUTCOMES, HEAD_SERVING} <= have:
            return False
        try:
            with self.engine.begin() as conn:
                if HEAD_DECISIONS not in have:
                    conn.execute(self.head.insert().values(id=HEAD_DECISIONS, seq=0, hash=GENESIS, anchor_seq=0,
                                                           anchor_hash=GENESIS, format=PLAIN))
                if HEAD_OUTCOMES not in have:
                    # Events recorded before outcomes were chained (and, older still, the table of the latest
                    # outcome per decision) become the chain's unverifiable prefix: it starts after them.
                    self._copy_legacy_outcomes(sa, conn)
                    last = conn.execute(sa.select(sa.func.max(self.outcome_events.c.id))).scalar() or 0
                    conn.execute(self.head.insert().values(id=HEAD_OUTCOMES, seq=int(last), hash=GENESIS,
                                                           anchor_seq=int(last), anchor_hash=GENESIS, format=PLAIN))
                if HEAD_SERVING not in have:  # a store older than the serving chain gets it empty
                    conn.execute(self.head.insert().values(id=HEAD_SERVING, seq=0, hash=GENESIS, anchor_seq=0,
                                                           anchor_hash=GENESIS, format=PLAIN))
        except sa.exc.IntegrityError:
            return False  # another process created them first
        return HEAD_DECISIONS not in have

    def _copy_legacy_outcomes(self, sa, conn) -> None:
        if LEGACY_OUTCOMES not in sa.inspect(conn).get_table_names():
            return
        legacy = sa.Table(LEGACY_OUTCOMES, sa.MetaData(), autoload_with=conn)
        e, d = self.outcome_events, self.decisions
        rows = conn.execute(sa.select(legacy.c.decision_id, legacy.c.outcome, legacy.c.at, d.c.seq, d.c.spec)
                            .join(d, d.c.decision_id == legacy.c.decision_id)
                            .where(legacy.c.decision_id.not_in(sa.select(e.c.decision_id)))).all()
        start = int(conn.execute(sa.select(sa.func.max(e.c.id))).scalar() or 0)
        if rows:
            conn.execute(e.insert(), [{"id": start + i + 1, "decision_id": r.decision_id, "seq": int(r.seq),
                                       "spec": r.spec, "outcome": int(r.outcome), "at": r.at}
                                      for i, r in enumerate(rows)])

    # --- keys ------------------------------------------------------------------------------------------------

    def _prepare_writer(self) -> bool:
        """True when this store writes under the keyed rule. The first keyed write to a store not yet keyed creates
        the missing keys and marks both chains keyed from their next seq; a keyed store is never given new keys (a
        missing key file is an error naming it)."""
        if self.keys is None:
            return False
        with self._writer_lock:
            return self._ready_writer()

    def _ready_writer(self) -> bool:
        import sqlalchemy as sa

        if not self._writer_ready:
            with self._read_engine.connect() as conn:
                fmt = conn.execute(sa.select(self.head.c.format).where(self.head.c.id == HEAD_DECISIONS)).scalar()
            if fmt == KEYED:
                if self.keys.mac is None or self.keys.enc is None:
                    self.keys = AuditKeys.load(self.keys.folder)  # another writer may have created them since
                    self._cipher = Cipher(self.keys)
                for key, path in ((self.keys.mac, self.keys.mac_path), (self.keys.enc, self.keys.enc_path)):
                    if key is None:
                        raise AuditKeyError(f"no key file {path}: the audit log at {self.location()} is keyed; "
                                            "point INTELLIGENTOPS_KEYS_DIR (or the server config's keys_dir) at the "
                                            "folder it was written with")
            else:
                self.keys = self.keys.created()
                self._cipher = Cipher(self.keys)
                self._mark_keyed()
            self._writer_ready = True
        return True

    def _mark_keyed(self) -> None:
        """Both chains keyed from their next seq, in one transaction (heads locked in id order, as every writer
        does), so no plain record can be slipped in after the store was keyed."""
        import sqlalchemy as sa

        with self._lock, self.engine.begin() as conn:
            for chain in (HEAD_DECISIONS, HEAD_OUTCOMES, HEAD_SERVING):
                head = conn.execute(sa.select(self.head).where(self.head.c.id == chain).with_for_update()).one()
                self._update_head(conn, chain, head, **self._head_values(head, True))

    def _locked_head(self, conn, chain: int, keyed: bool) -> tuple[Any, dict[str, Any]]:
        """A chain's head, locked for this transaction, after checking it may be extended: a keyed head whose MAC
        fails, or one behind what this store last committed, was rewritten (a truncation, say), and writing on
        would give the rewrite a valid head; the write is refused instead (nobody gets an unaudited answer)."""

        head = conn.execute(self._select_head, {"chain": chain}).one()
        marks = self._head_values(head, keyed)
        name = {HEAD_DECISIONS: "decision", HEAD_OUTCOMES: "outcome", HEAD_SERVING: "serving"}[chain]
        if head.format == KEYED and not self._cipher.mac_ok("head", head_text(chain, head), head.mac):
            raise AuditError(f"the {name} chain's head in the audit log at {self.location()} does not match its "
                             "MAC: it was rewritten; nothing more is written to it. Run python -m "
                             "orchestration.decisions --verify, and restore the database from a backup")
        if int(head.seq) < self._seen.get(chain, 0):
            raise AuditError(f"the {name} chain's head in the audit log at {self.location()} is at {int(head.seq)}, "
                             f"behind the {self._seen[chain]} this process committed: the log was truncated and its "
                             "head rolled back; nothing more is written to it. Run python -m "
                             "orchestration.decisions --verify, and restore the database from a backup")
        return head, marks

    def _head_values(self, head: Any, keyed: bool) -> dict[str, Any]:
        """What the head row must say before this writer adds to it: refuses a writer whose format or keys differ
        from the store's; a keyed write to a plain chain marks where the keyed rule starts."""
        if head.format == KEYED:
            if not keyed:
                raise AuditKeyError(f"the audit log at {self.location()} is keyed (from seq {head.keyed_from}): "
                                    "open it with its keys folder (INTELLIGENTOPS_KEYS_DIR, or the server config's "
                                    "keys_dir) to write to it")
            if head.key_id != self.keys.mac_id or head.enc_key_id != self.keys.enc_id:
                raise AuditKeyError(f"the audit log at {self.location()} was written under audit-mac.key id "
                                    f"{head.key_id} and audit-enc.key id {head.enc_key_id}; {self.keys.folder} holds "
                                    f"ids {self.keys.mac_id} and {self.keys.enc_id}: use the keys it was written with")
            return {}
        if not keyed:
            return {}
        return {"format": KEYED, "keyed_from": int(head.seq) + 1, "key_id": self.keys.mac_id,
                "enc_key_id": self.keys.enc_id}

    def _update_head(self, conn, chain: int, head: Any, **values: Any) -> dict[str, Any]:
        """Write the head row; a keyed head gets its MAC over the new values. Returns the new values."""
        new = {c: values.get(c, getattr(head, c)) for c in ("seq", "hash", "anchor_seq", "anchor_hash", "format",
                                                            "keyed_from", "key_id", "enc_key_id")}
        if new["format"] == KEYED:
            new["mac"] = self._cipher.mac("head", head_text(chain, _Row(new)))
        conn.execute(self._write_head, {"chain": chain, **new})
        return new

    def _checkpoint(self, chain: str, head: dict[str, Any]) -> None:
        if self._checkpointer is not None and head.get("format") == KEYED and self._cipher.can_mac:
            self._checkpointer.note(head_checkpoint(chain, head["seq"], head["hash"], head["anchor_seq"],
                                                    head["keyed_from"], head["key_id"]), self._sign)

    def _sign(self, c: Checkpoint) -> Checkpoint:
        from dataclasses import replace

        return replace(c, mac=self._cipher.mac("checkpoint", c.signed_text()))

    def input_hash(self, inputs: dict) -> str:
        """The input hash this store records for raw `inputs` (keyed under the keyed rule)."""
        return self._keyed_digest(input_hash(inputs))

    def notice_hash(self, notice: str) -> str:
        """The notice hash this store records for a notice's text: its sha256, keyed under the keyed rule (a notice
        quotes applicant text, so candidates cannot be hashed and compared)."""
        import hashlib

        return self._keyed_digest(hashlib.sha256(notice.encode()).hexdigest())

    def _keyed_digest(self, plain: str) -> str:
        import sqlalchemy as sa

        with self._read_engine.connect() as conn:
            fmt = conn.execute(sa.select(self.head.c.format).where(self.head.c.id == HEAD_DECISIONS)).scalar()
        return self._cipher.input_hash(plain) if fmt == KEYED else plain

    # --- writing ---------------------------------------------------------------------------------------------

    def _prepare(self, rec: dict[str, Any], keyed: bool) -> tuple[dict[str, Any], str, str, dict[str, Any]]:
        missing = [k for k in REQUIRED if rec.get(k) is None]
        if missing:
            raise AuditError(f"audit record {rec.get('decision_id', '?')} lacks {', '.join(missing)}")
        if rec["variant"] not in VARIANTS:
            raise AuditError(f"audit record {rec['decision_id']}: variant {rec['variant']!r}; expected one of "
                             f"{', '.join(VARIANTS)}")
        probability = float(rec["probability"])
        if not math.isfinite(probability):
            raise AuditError(f"audit record {rec['decision_id']}: probability {probability} is not finite")
        decision_id = str(rec["decision_id"])
        inputs = canonical_json(rec["inputs"])
        # The top factors quote feature values: a redacted input's value is redacted there too.
        hidden = {k for k, v in rec["inputs"].items() if v == REDACTED}
        factors = canonical_json([{**f, "value": REDACTED} if isinstance(f, dict) and f.get("feature") in hidden
                                  and "value" in f else f for f in rec.get("top_factors") or []])
        digest = str(rec.get("input_hash") or input_hash(rec["inputs"]))
        notice, notice_digest = rec.get("notice"), rec.get("notice_sha256")
        stored_inputs, stored_factors, stored_notice = inputs, factors, notice
        audit_fields = rec.get("audit_fields") or {}
        if audit_fields and not keyed:
            raise AuditError(f"audit record {decision_id}: audit-only fields are stored only encrypted, and the audit "
                             f"log at {self.location()} is written without keys")
        if keyed:
            digest = self._cipher.input_hash(digest)
            # One ciphertext for all (the top factors and the notice quote the inputs): one seal per record, one
            # unseal per read. The caller's audit-only fields (sensitive columns, never model inputs) ride in it
            # when there are any.
            with_notice = "" if notice is None else f',"notice":{canonical_json(notice)}'
            extra = f',"audit_fields":{canonical_json(audit_fields)}' if audit_fields else ""
            stored_inputs = self._cipher.seal(f'{{"inputs":{inputs},"top_factors":{factors}{with_notice}{extra}}}',
                                              decision_id, "inputs")
            stored_factors = SEALED_WITH_INPUTS
            stored_notice = None if notice is None else SEALED_WITH_INPUTS
            notice_digest = None if notice_digest is None else self._cipher.input_hash(str(notice_digest))
        row = {
            "decision_id": decision_id, "time": str(rec.get("time") or now_iso()), "spec": str(rec["spec"]),
            "model_name": str(rec["model_name"]), "model_version": str(rec["model_version"]),
            "variant": rec["variant"], "input_hash": digest, "inputs": stored_inputs, "probability": probability,
            "decision": int(rec["decision"]), "threshold": float(rec["threshold"]), "top_factors": stored_factors,
            "similar_cases": canonical_json(rec.get("similar_cases") or []),
            "latency_ms": float(rec.get("latency_ms") or 0.0),
            "key_id": None if rec.get("key_id") is None else str(rec["key_id"]),
            "notice_template_version": (None if rec.get("notice_template_version") is None
                                        else str(rec["notice_template_version"])),
            "notice_sha256": notice_digest, "notice": stored_notice,
            "ood_score": None if rec.get("ood_score") is None else float(rec["ood_score"]),
            "ood": None if rec.get("ood") is None else int(rec["ood"]),
        }
        return row, inputs, factors, audit_fields

    def append(self, records: list[dict]) -> list[AuditRecord]:
        """Assign seq, chain (and authenticate) the hashes and commit the whole batch in one transaction."""

        if not records:
            return []
        keyed = self._prepare_writer()
        prepared = [self._prepare(r, keyed) for r in records]
        with self._lock, self.engine.begin() as conn:
            head, marks = self._locked_head(conn, HEAD_DECISIONS, keyed)
            seq, prev = int(head.seq), head.hash
            rows = []
            for p, _, _, _ in prepared:
                seq += 1
                row = {**p, "seq": seq, "prev_hash": prev}
                row["record_hash"] = prev = row_hash(row)
                if keyed:
                    row["mac"] = self._cipher.mac("decision", prev)
                rows.append(row)
            conn.execute(self._insert_decisions, rows)
            new_head = self._update_head(conn, HEAD_DECISIONS, head, seq=seq, hash=prev, **marks)
        self._seen[HEAD_DECISIONS] = seq
        self._checkpoint(DECISIONS, new_head)
        return [AuditRecord(**{**{k: r.get(k) for k in FIELDS}, "inputs": json.loads(plain_inputs),
                               "top_factors": json.loads(plain_factors), "notice": rec.get("notice"),
                               "similar_cases": json.loads(r["similar_cases"]), "audit_fields": audit_fields})
                for r, (_, plain_inputs, plain_factors, audit_fields), rec in zip(rows, prepared, records)]

    def prune(self, older_than_days: float = DEFAULT_RETENTION_DAYS) -> int:
        """Remove decisions older than the retention period (a prefix of the chain); returns how many.

        The last removed row's seq and hash become the chain's anchor (in the authenticated head), so what
        remains still verifies and a row removed from the middle is still detected. Outcome events go with their
        decisions, as a prefix of the outcome chain (an event whose decision stays keeps the ones after it).
        """
        import sqlalchemy as sa

        cutoff = (datetime.now(UTC) - timedelta(days=older_than_days)).isoformat(timespec="microseconds")
        cutoff = cutoff.replace("+00:00", "Z")
        d, e = self.decisions, self.outcome_events
        keyed = self._prepare_writer()
        heads: dict[str, dict[str, Any]] = {}
        with self._lock, self.engine.begin() as conn:
            head, _ = self._locked_head(conn, HEAD_DECISIONS, keyed)
            # Only the contiguous old prefix goes: a row with a skewed clock never punches a hole in the chain.
            first_young = conn.execute(sa.select(sa.func.min(d.c.seq)).where(d.c.time >= cutoff)).scalar()
            q = sa.select(d.c.seq, d.c.record_hash).where(d.c.time < cutoff)
            if first_young is not None:
                q = q.where(d.c.seq < first_young)
            last = conn.execute(q.order_by(d.c.seq.desc()).limit(1)).first()
            if last is None:
                return 0
            ohead, _ = self._locked_head(conn, HEAD_OUTCOMES, keyed)
            kept = conn.execute(sa.select(sa.func.min(e.c.id)).where(e.c.seq > last.seq)).scalar()
            upto = conn.execute(sa.select(sa.func.max(e.c.id)).where(
                e.c.id < kept if kept is not None else sa.true())).scalar()
            if upto is not None:
                event = conn.execute(sa.select(e.c.record_hash).where(e.c.id == int(upto))).first()
                conn.execute(sa.delete(e).where(e.c.id <= int(upto)))
                if int(upto) > int(ohead.anchor_seq):  # else only events from before the chain went
                    heads[OUTCOMES] = self._update_head(conn, HEAD_OUTCOMES, ohead, anchor_seq=int(upto),
                                                        anchor_hash=event.record_hash)
            if LEGACY_OUTCOMES in sa.inspect(conn).get_table_names():
                legacy = sa.Table(LEGACY_OUTCOMES, sa.MetaData(), autoload_with=conn)
                conn.execute(sa.delete(legacy).where(legacy.c.decision_id.in_(
                    sa.select(d.c.decision_id).where(d.c.seq <= last.seq))))
            removed = conn.execute(sa.delete(d).where(d.c.seq <= last.seq)).rowcount
            heads[DECISIONS] = self._update_head(conn, HEAD_DECISIONS, head, anchor_seq=int(last.seq),
                                                 anchor_hash=last.record_hash)
        if keyed and self._checkpointer is not None and self._cipher.can_mac:
            self._checkpointer.compact({c: h["anchor_seq"] for c, h in heads.items()})
            self.checkpoint_now()
        return int(removed)

    def flush_checkpoints(self) -> None:
        """Write the head a checkpoint timer is still holding back (before a process ends)."""
        if self._checkpointer is not None and self._cipher.can_mac:
            self._checkpointer.flush(self._sign)

    def checkpoint_now(self) -> list[Checkpoint]:
        """Append both chains' heads to the checkpoint file now (also done after retention); returns them."""
        if self._checkpointer is None or not self._cipher.can_mac:
            return []
        anchors = self.anchor()
        self._checkpointer.write_now(anchors)
        return anchors

    def anchor(self) -> list[Checkpoint]:
        """Both chains' current heads, signed: what inference_log records on each materialization (empty for an
        unkeyed store, or a reader without audit-mac.key)."""
        import sqlalchemy as sa

        if not self._cipher.can_mac:
            return []
        with self._read_engine.connect() as conn:
            heads = conn.execute(sa.select(self.head).order_by(self.head.c.id)).all()
        names = {HEAD_DECISIONS: DECISIONS, HEAD_OUTCOMES: OUTCOMES, HEAD_SERVING: SERVING}
        return [self._sign(head_checkpoint(names[h.id], h.seq, h.hash, h.anchor_seq, h.keyed_from, h.key_id))
                for h in heads if h.id in names and h.format == KEYED]

    # --- reading ---------------------------------------------------------------------------------------------

    def location(self) -> str:
        """The store's URL with any password hidden."""
        return self.engine.url.render_as_string(hide_password=True)

    def _record(self, row: Any) -> AuditRecord:
        m = dict(row._mapping) if hasattr(row, "_mapping") else dict(row)
        seq, did = int(m["seq"]), m["decision_id"]
        audit_fields: dict = {}
        if is_sealed(m["inputs"]):
            try:
                both = json.loads(self._cipher.unseal(m["inputs"], did, "inputs", seq))
                m["inputs"], m["top_factors"] = both["inputs"], both["top_factors"]
                if m.get("notice") is not None:
                    m["notice"] = both.get("notice")
                audit_fields = both.get("audit_fields") or {}
            except AuditKeyError as exc:
                m["inputs"], m["top_factors"] = SealedInputs(str(exc)), SealedList(str(exc))
                audit_fields = SealedInputs(str(exc))
        else:
            m["inputs"], m["top_factors"] = json.loads(m["inputs"]), json.loads(m["top_factors"])
        m["similar_cases"] = json.loads(m["similar_cases"])
        m["seq"] = seq
        return AuditRecord(**{k: m[k] for k in FIELDS}, audit_fields=audit_fields)

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
                return int(conn.execute(sa.select(self.head.c.seq).where(self.head.c.id == HEAD_DECISIONS))
                           .scalar() or 0)
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

    # --- verifying -------------------------------------------------------------------------------------------

    def checkpoints(self) -> tuple[list[Checkpoint], list[str]]:
        """The checkpoints in this store's file, and a note for each unreadable line."""
        return read_checkpoints(self.checkpoint_path) if self.checkpoint_path else ([], [])

    def verify(self, batch: int = 5000, anchors: Iterable[Checkpoint] = (), use_file: bool = True
               ) -> ChainVerification:
        """Walk both chains from their anchors (hashes, links, MACs, heads) and compare the store with `anchors`
        and, with `use_file`, the checkpoint file; the first bad seq is named."""
        found, unreadable = self.checkpoints() if use_file else ([], [])
        verifier = Verifier(self, [*found, *anchors], unreadable)
        with self._read_engine.connect() as conn:
            decisions = verifier.decisions(conn, batch)
            outcomes = verifier.outcomes(conn, batch)
            serving = walk_serving(verifier, conn, batch)
        return verifier.result(decisions, outcomes, serving)


class _Row:
    """Attribute access over a dict (a head row being written)."""

    def __init__(self, values: dict[str, Any]):
        self.__dict__.update(values)


def _sqlite_pragmas(engine, begin: str) -> None:
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        # pysqlite's own transaction handling opens deferred transactions lazily; emit BEGIN ourselves so a writer
        # takes the write lock at BEGIN and two writers never both read the same chain head.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        # First, so two processes opening a new database at once wait for each other's locks.
        cur.execute("PRAGMA busy_timeout=30000")
        _switch_to_wal(cur)
        # FULL: a committed decision survives power loss, not only a killed process; group commit pays for it.
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql(begin)


def _switch_to_wal(cur, seconds: float = 30.0) -> None:
    """WAL mode stays with the file, so only the first opener switches it; SQLite refuses a switch with "database is
    locked" at once, without its busy handler, while another opener holds a lock: retried."""
    import sqlite3

    if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
        return
    deadline = time.monotonic() + seconds
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _normalize_time(value: str) -> str:
    """Accept any ISO-8601 time; compare as the UTC text the store writes."""
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
