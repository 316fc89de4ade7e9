"""Verifying the audit log: both chains walked from their retention anchors, every record's hash, link and MAC,
each head's MAC, and the store against every checkpoint kept outside it (Dagster-free).

What each rule proves:
- the plain rule (stores written before keys; the rows before `keyed_from`): each record's sha256 over its stored
  fields and the link to the one before. An accident or a careless edit is named; an insider who recomputes the
  hashes is not (which is why the keyed rule exists). Old rows stay verifiable under it, and the first keyed
  record's MAC covers the link to them, so rewriting them breaks the chain at `keyed_from`.
- the keyed rule: an HMAC-SHA256 of each record's hash under `audit-mac.key`, which is not in the database; an
  edit with the hashes and the head recomputed fails at the edited record's MAC.
- checkpoints (the file beside the store, inference_log's materializations): a head that existed and was
  authenticated; a store that no longer holds it was truncated (its first missing seq is named) or rewritten.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from core.audit.checkpoints import DECISIONS, OUTCOMES, SERVING, Checkpoint
from core.audit.crypto import MAC_KEY_FILE, Cipher
from core.audit.records import GENESIS, ChainVerification, canonical_json, row_hash
from core.audit.schema import KEYED

MAX_LISTED = 30  # problems listed per chain; the rest are counted


def head_text(chain: int, head: Any) -> str:
    """What a head's MAC covers: everything in its row but the MAC itself."""
    return canonical_json({"chain": chain, "seq": int(head.seq), "hash": head.hash, "anchor_seq": int(head.anchor_seq),
                           "anchor_hash": head.anchor_hash, "format": head.format, "keyed_from": head.keyed_from,
                           "key_id": head.key_id, "enc_key_id": head.enc_key_id})


EVENT_FIELDS = ("id", "decision_id", "seq", "spec", "outcome", "at", "key_id", "reason", "correction", "prev_hash")


def event_hash(row: dict[str, Any]) -> str:
    """An outcome event's hash: every stored field but its own hash and MAC."""
    payload = {k: row.get(k) for k in EVENT_FIELDS}
    payload["id"], payload["seq"], payload["outcome"] = int(payload["id"]), int(payload["seq"]), int(payload["outcome"])
    payload["correction"] = int(payload["correction"] or 0)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class _Walk:
    """One chain's findings: (first bad position or None, text)."""

    name: str
    checked: int = 0
    findings: list[tuple[int | None, str]] = field(default_factory=list)
    mac_failures: int = 0

    def bad(self, at: int | None, text: str) -> None:
        self.findings.append((at, text))

    def first(self) -> int | None:
        return min((a for a, _ in self.findings if a is not None), default=None)


class Verifier:
    """Walks one store's chains; `store` gives the engine, tables and cipher."""

    def __init__(self, store: Any, anchors: Iterable[Checkpoint], unreadable: Iterable[str] = ()):
        self.store = store
        self.cipher: Cipher = store._cipher
        self.checkpoints: dict[str, list[Checkpoint]] = defaultdict(list)
        self.global_problems: list[str] = list(unreadable)
        self.rules: list[str] = []
        self.checkpoints_checked = 0
        self.unchecked = 0
        for c in anchors:
            self._admit(c)

    def _admit(self, c: Checkpoint) -> None:
        if c.chain not in (DECISIONS, OUTCOMES, SERVING):
            self.global_problems.append(f"{c.source}: unknown chain {c.chain!r}")
            return
        if not self.cipher.can_mac:
            self.unchecked += 1
            return
        if not self.cipher.mac_ok("checkpoint", c.signed_text(), c.mac):
            self.global_problems.append(f"{c.source}: the checkpoint's MAC does not verify under "
                                        f"{self._mac_file()}: it was forged, or written under another key")
            return
        self.checkpoints[c.chain].append(c)
        self.checkpoints_checked += 1

    def _mac_file(self) -> str:
        return str(self.cipher.keys.mac_path) if self.cipher.keys else MAC_KEY_FILE

    def _keyed_from(self, head: Any, chain: str, walk: _Walk) -> int | None:
        """The first seq under the keyed rule, as the head says and as authenticated checkpoints remember it."""
        remembered = [c.keyed_from for c in self.checkpoints[chain] if c.keyed_from is not None]
        says = int(head.keyed_from) if head.format == KEYED and head.keyed_from is not None else None
        if remembered and (says is None or says > min(remembered)):
            first = min(remembered)
            walk.bad(first, f"the {chain} chain's head says the keyed rule starts at "
                            f"{'no seq (unkeyed)' if says is None else f'seq {says}'}, but an authenticated "
                            f"checkpoint says seq {first}: the head was rewritten to downgrade the log")
            return first
        return says

    def _check_head(self, chain_no: int, chain: str, head: Any, keyed: bool, walk: _Walk) -> bool:
        """Head MAC and key id; False when MACs cannot be checked at all."""
        if not keyed:
            return False
        if not self.cipher.can_mac:
            walk.bad(None, f"the {chain} chain is keyed, but its MACs cannot be checked: "
                           f"{self.cipher.missing(MAC_KEY_FILE)}")
            return False
        mine = self.cipher.keys.mac_id if self.cipher.keys else None
        if head.key_id and head.key_id != mine:
            walk.bad(None, f"the {chain} chain was written under audit-mac.key id {head.key_id}, but "
                           f"{self._mac_file()} is id {mine}: verify with the keys folder the server writes with")
            return False
        if not self.cipher.mac_ok("head", head_text(chain_no, head), head.mac):
            walk.bad(int(head.seq) + 1, f"the {chain} chain's head row (seq {int(head.seq)}) does not match its MAC: "
                                        "it was rewritten (records after it may have been removed)")
        return True

    def _compare_checkpoints(self, chain: str, walk: _Walk, head: Any, hashes: dict[int, str],
                             last: int) -> None:
        """The store against each authenticated checkpoint; one problem per kind, the worst case named."""
        unit = self._unit(chain)
        beyond: Checkpoint | None = None
        differ: list[Checkpoint] = []
        matched = [int(head.anchor_seq)]
        for c in self.checkpoints[chain]:
            if c.seq < int(head.anchor_seq):
                continue  # retention removed what it names
            have = head.anchor_hash if c.seq == int(head.anchor_seq) else hashes.get(c.seq)
            if c.seq > last:
                beyond = c if beyond is None or c.seq > beyond.seq else beyond
            elif have is None:
                walk.bad(c.seq, f"{unit} {c.seq} is missing, but {c.source} says it existed")
            elif have != c.hash:
                differ.append(c)
            else:
                matched.append(c.seq)
        if beyond is not None:
            walk.bad(last + 1, f"{unit} {last + 1}..{beyond.seq} missing at the end of the {chain} chain: "
                               f"{beyond.source} (at {beyond.time}) says {unit} {beyond.seq} existed; the log was "
                               "truncated")
        if differ:
            # Records rewritten with valid MACs (written on a rolled-back head) differ from the checkpoints taken
            # before: the rewrite starts after the last checkpoint the store still matches.
            c = min(differ, key=lambda c: c.seq)
            good = max(m for m in matched if m < c.seq)
            named = [a for a, _ in walk.findings if a is not None and good < a <= c.seq]  # a MAC names it exactly
            more = f" (and {len(differ) - 1} later checkpoints)" if len(differ) > 1 else ""
            walk.bad(min(named, default=good + 1), f"{unit} {c.seq} does not have the hash {c.source} recorded{more}: the chain was "
                               f"rewritten after {unit} {good} (the last checkpoint it still matches)")

    @staticmethod
    def _unit(chain: str) -> str:
        return {DECISIONS: "seq", OUTCOMES: "outcome event"}.get(chain, f"{chain} event")

    # --- the decision chain ---

    def decisions(self, conn: Any, batch: int) -> _Walk:
        import sqlalchemy as sa

        s = self.store
        d = s.decisions
        walk = _Walk(DECISIONS)
        head = conn.execute(sa.select(s.head).where(s.head.c.id == 1)).one()
        keyed_from = self._keyed_from(head, DECISIONS, walk)
        macs = self._check_head(1, DECISIONS, head, keyed_from is not None, walk)
        wanted = {c.seq for c in self.checkpoints[DECISIONS]}
        hashes: dict[int, str] = {}
        expected_seq, prev = int(head.anchor_seq), head.anchor_hash
        last_seen = expected_seq
        while True:
            rows = conn.execute(sa.select(d).where(d.c.seq > last_seen, d.c.seq <= int(head.seq))
                                .order_by(d.c.seq).limit(batch)).all()
            if not rows:
                break
            for r in rows:
                m = dict(r._mapping)
                walk.checked += 1
                seq, did = int(m["seq"]), m["decision_id"]
                if seq != expected_seq + 1:
                    walk.bad(expected_seq + 1, f"seq {expected_seq + 1}..{seq - 1} missing before seq {seq} "
                                               f"(decision {did}): records were removed")
                if m["prev_hash"] != prev:
                    walk.bad(seq, f"seq {seq} (decision {did}): prev_hash does not match the record before it: a "
                                  "record before it was removed, edited or reordered")
                if row_hash(m) != m["record_hash"]:
                    walk.bad(seq, f"seq {seq} (decision {did}): contents do not match its record_hash: the record "
                                  "was edited")
                if macs and keyed_from is not None and seq >= keyed_from:
                    self._check_mac(walk, "decision", m["record_hash"], m.get("mac"), seq,
                                    f"seq {seq} (decision {did})")
                if seq in wanted:
                    hashes[seq] = m["record_hash"]
                expected_seq, prev = seq, m["record_hash"]
                last_seen = seq
        if int(head.seq) != expected_seq or head.hash != prev:
            if int(head.seq) > expected_seq:
                walk.bad(expected_seq + 1, f"seq {expected_seq + 1}..{int(head.seq)} missing at the end of the chain "
                                           "(the newest records were removed)")
            else:
                walk.bad(expected_seq, f"the chain head (seq {int(head.seq)}) does not match the newest record "
                                       f"(seq {expected_seq})")
        self._compare_checkpoints(DECISIONS, walk, head, hashes, expected_seq)
        self._rule(DECISIONS, head, keyed_from, walk.checked)
        return walk

    def _check_mac(self, walk: _Walk, kind: str, record_hash: str, mac: str | None, at: int, name: str) -> None:
        if mac is None:
            why = "has no MAC, but it is in the keyed part of the chain: it was written or rewritten without the key"
        elif not self.cipher.mac_ok(kind, record_hash, mac):
            why = ("does not match its MAC: it was edited and its hashes recomputed (or a record before it was, "
                   "and the links after it recomputed)")
        else:
            return
        walk.mac_failures += 1
        if walk.mac_failures <= 3:
            walk.bad(at, f"{name} {why}")

    def _rule(self, chain: str, head: Any, keyed_from: int | None, checked: int) -> None:
        start = int(head.anchor_seq) + 1
        unit = self._unit(chain)
        if keyed_from is None:
            self.rules.append(f"{chain}: {checked} verified under the old unkeyed rule (sha256 chain only; written "
                              "before audit keys, so a rewrite with recomputed hashes would pass)")
        elif keyed_from <= start:
            self.rules.append(f"{chain}: every {unit} from {start} under the keyed rule (HMAC-SHA256, "
                              f"audit-mac.key id {head.key_id})")
        else:
            self.rules.append(f"{chain}: {unit} {start}..{keyed_from - 1} under the old unkeyed rule (written before "
                              f"the store was keyed), {unit} {keyed_from} on under the keyed rule (HMAC-SHA256, "
                              f"audit-mac.key id {head.key_id})")

    # --- the outcome chain ---

    def outcomes(self, conn: Any, batch: int) -> _Walk:
        walk, head, keyed_from = self.walk_events(conn, self.store.outcome_events, 2, OUTCOMES, event_hash,
                                                  lambda m, i: f"outcome event {i} (decision seq {int(m['seq'])}, "
                                                               f"{m['decision_id']})",
                                                  "outcome", "outcome", "outcomes", batch)
        if head is None:
            return walk
        if int(head.anchor_seq) > 0 and head.anchor_hash == GENESIS:
            self.rules.append(f"outcomes: events up to {int(head.anchor_seq)} were recorded before outcomes were "
                              "chained, and cannot be verified")
        self._rule(OUTCOMES, head, keyed_from, walk.checked)
        return walk

    def walk_events(self, conn: Any, table: Any, head_id: int, chain: str, hash_of: Any, name_of: Any, word: str,
                    item: str, items: str, batch: int) -> tuple[_Walk, Any, int | None]:
        """Walk an event chain (outcomes, serving events) from its anchor to its head: each event's place, link,
        hash and MAC, the head, and the checkpoints. Returns the walk, the head row (None: no chain yet) and where
        keyed events begin; the caller records the chain's rule."""
        import sqlalchemy as sa

        s = self.store
        walk = _Walk(chain)
        head = conn.execute(sa.select(s.head).where(s.head.c.id == head_id)).first()
        if head is None:
            return walk, None, None
        keyed_from = self._keyed_from(head, chain, walk)
        macs = self._check_head(head_id, chain, head, keyed_from is not None, walk)
        wanted = {c.seq for c in self.checkpoints[chain]}
        hashes: dict[int, str] = {}
        expected, prev = int(head.anchor_seq), head.anchor_hash
        while True:
            rows = conn.execute(sa.select(table).where(table.c.id > expected, table.c.id <= int(head.seq))
                                .order_by(table.c.id).limit(batch)).all()
            if not rows:
                break
            for r in rows:
                m = dict(r._mapping)
                walk.checked += 1
                i = int(m["id"])
                name = name_of(m, i)
                if i != expected + 1:
                    walk.bad(expected + 1, f"{word} events {expected + 1}..{i - 1} missing before {name}: {items} "
                                           "were removed")
                if m["prev_hash"] != prev:
                    walk.bad(i, f"{name}: prev_hash does not match the event before it: an {item} before it was "
                                "removed, edited or reordered")
                if m["record_hash"] != hash_of(m):
                    walk.bad(i, f"{name}: contents do not match its record_hash: the {item} was edited")
                if macs and keyed_from is not None and i >= keyed_from:
                    self._check_mac(walk, word, m["record_hash"] or "", m.get("mac"), i, name)
                if i in wanted:
                    hashes[i] = m["record_hash"]
                expected, prev = i, m["record_hash"]
        if int(head.seq) != expected or head.hash != prev:
            if int(head.seq) > expected:
                walk.bad(expected + 1, f"{word} events {expected + 1}..{int(head.seq)} missing at the end of the "
                                       f"{word} chain (the newest {items} were removed)")
            else:
                walk.bad(expected, f"the {word} chain's head (event {int(head.seq)}) does not match the newest "
                                   f"event ({expected})")
        self._compare_checkpoints(chain, walk, head, hashes, expected)
        return walk, head, keyed_from

    def result(self, decisions: _Walk, outcomes: _Walk, *more: _Walk) -> ChainVerification:
        problems: list[str] = []
        for walk in (decisions, outcomes, *more):
            ordered = sorted(walk.findings, key=lambda f: (f[0] is None, f[0] or 0))
            problems += [t for _, t in ordered[:MAX_LISTED]]
            if len(ordered) > MAX_LISTED:
                problems.append(f"... and {len(ordered) - MAX_LISTED} more problems on the {walk.name} chain")
            if walk.mac_failures > 3:
                problems.append(f"{walk.mac_failures - 3} more records of the {walk.name} chain fail their MAC after "
                                "those named")
        problems += self.global_problems
        if self.unchecked:
            self.rules.append(f"{self.unchecked} checkpoints not checked: no {self._mac_file()} to authenticate them")
        return ChainVerification(ok=not problems, checked=decisions.checked, problems=problems,
                                 first_bad_seq=decisions.first(), outcome_events_checked=outcomes.checked,
                                 first_bad_outcome_event=outcomes.first(),
                                 checkpoints_checked=self.checkpoints_checked, rules=self.rules,
                                 serving_events_checked=sum(w.checked for w in more))
