"""Checkpoints: the chain heads written down outside the store, so an insider who can rewrite the database but
not reach these copies cannot truncate the chain and rewrite its head unnoticed (Dagster-free).

A checkpoint is one chain's head at a moment: which chain (`decisions` or `outcomes`), seq, record hash, the
retention anchor and the keyed-rule start at that moment, when, the MAC key's id, and an HMAC over all of it
under `audit-mac.key`. They are kept in two places:

- a file the store appends to (JSON lines, mode 0600, each line fsynced), written after a commit at a bounded
  rate (at most one line per chain per `interval` seconds; a timer writes the last head of a burst), so group
  commit keeps its throughput. Beside a SQLite store (`<db stem>.checkpoints.jsonl`); elsewhere where its
  owner says.
- `<spec>/inference_log`'s materializations (metadata `ANCHOR_METADATA`), written each time it is materialized.

`python -m orchestration.decisions --verify` checks the store against every checkpoint it can find.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from core.audit.records import canonical_json, now_iso

DECISIONS, OUTCOMES = "decisions", "outcomes"
ANCHOR_METADATA = "audit_anchor"  # inference_log's metadata key: {"decisions": {...}, "outcomes": {...}}
DEFAULT_INTERVAL = 2.0
FILE_MODE = 0o600


@dataclass(frozen=True)
class Checkpoint:
    """One chain's head at one moment, with its MAC; `source` says where it was read (not authenticated)."""

    chain: str
    seq: int
    hash: str
    anchor_seq: int
    keyed_from: int | None
    key_id: str | None
    time: str
    mac: str = ""
    source: str = ""

    def signed_text(self) -> str:
        body = asdict(self)
        body.pop("mac")
        body.pop("source")
        return canonical_json(body)

    def to_json(self) -> dict:
        body = asdict(self)
        body.pop("source")
        return body

    @classmethod
    def parse(cls, raw: object, source: str) -> Checkpoint | None:
        """A checkpoint from its JSON object, or None when it is not one (counted as unreadable)."""
        if not isinstance(raw, dict):
            return None
        try:
            return cls(chain=str(raw["chain"]), seq=int(raw["seq"]), hash=str(raw["hash"]),
                       anchor_seq=int(raw.get("anchor_seq", 0)),
                       keyed_from=None if raw.get("keyed_from") is None else int(raw["keyed_from"]),
                       key_id=raw.get("key_id"), time=str(raw.get("time", "")), mac=str(raw.get("mac", "")),
                       source=source)
        except (KeyError, TypeError, ValueError):
            return None


def default_checkpoint_path(sqlite_path: str) -> Path:
    """Beside a SQLite store: `audit.db` -> `audit.checkpoints.jsonl`."""
    p = Path(sqlite_path)
    return p.with_name(f"{p.stem}.checkpoints.jsonl")


def read_checkpoints(path: Path | str) -> tuple[list[Checkpoint], list[str]]:
    """The checkpoints of a file, and a note for each line that is not one."""
    path = Path(path)
    out: list[Checkpoint] = []
    bad: list[str] = []
    if not path.is_file():
        return out, bad
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except ValueError:
                raw = None
            c = Checkpoint.parse(raw, f"{path} line {n}")
            if c is None:
                bad.append(f"{path} line {n} is not a checkpoint")
            else:
                out.append(c)
    return out, bad


def append_line(path: Path, text: str) -> None:
    """One line appended and fsynced; the file is created with mode 0600 before its first byte."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
    try:
        os.write(fd, (text + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """Writes a chain's head to the checkpoint file after commits, at most once per `interval` per chain.

    `note()` is called after each commit with a function that signs a head; the newest head of a burst is written
    by a timer when the interval has passed, so the file is never more than `interval` seconds behind the store.
    """

    def __init__(self, path: Path | str, interval: float = DEFAULT_INTERVAL):
        self.path = Path(path)
        self.interval = float(interval)
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._pending: dict[str, Checkpoint] = {}
        self._timer: threading.Timer | None = None

    def note(self, checkpoint: Checkpoint, sign: Callable[[Checkpoint], Checkpoint]) -> None:
        now = time.monotonic()
        with self._lock:
            due = now - self._last.get(checkpoint.chain, -1e9) >= self.interval
            if not due:
                self._pending[checkpoint.chain] = checkpoint
                if self._timer is None:
                    self._timer = threading.Timer(self.interval, self._flush_pending, args=(sign,))
                    self._timer.daemon = True
                    self._timer.start()
                return
            self._last[checkpoint.chain] = now
            self._pending.pop(checkpoint.chain, None)
        self._write([sign(checkpoint)])

    def _flush_pending(self, sign: Callable[[Checkpoint], Checkpoint]) -> None:
        with self._lock:
            pending, self._pending, self._timer = list(self._pending.values()), {}, None
            for c in pending:
                self._last[c.chain] = time.monotonic()
        if pending:
            self._write([sign(c) for c in pending])

    def flush(self, sign: Callable[[Checkpoint], Checkpoint]) -> None:
        """Write what is pending now (before a process ends, or in tests)."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
        self._flush_pending(sign)

    def write_now(self, checkpoints: Iterable[Checkpoint]) -> None:
        self._write(list(checkpoints))

    def _write(self, checkpoints: list[Checkpoint]) -> None:
        if not self.path.parent.is_dir():
            self.path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
        for c in checkpoints:
            append_line(self.path, json.dumps(c.to_json(), sort_keys=True, separators=(",", ":")))

    def compact(self, keep_from: dict[str, int]) -> None:
        """Drop the lines of heads older than each chain's retention anchor (retention prunes the records they
        name); the file is replaced atomically, mode 0600."""
        from core.files import atomic_write_local

        checkpoints, _ = read_checkpoints(self.path)
        kept = [c for c in checkpoints if c.seq >= keep_from.get(c.chain, 0)]
        if len(kept) == len(checkpoints):
            return
        text = "".join(json.dumps(c.to_json(), sort_keys=True, separators=(",", ":")) + "\n" for c in kept)
        atomic_write_local(self.path, text.encode(), mode=FILE_MODE)


def head_checkpoint(chain: str, seq: int, hash_: str, anchor_seq: int, keyed_from: int | None,
                    key_id: str | None) -> Checkpoint:
    return Checkpoint(chain=chain, seq=int(seq), hash=hash_, anchor_seq=int(anchor_seq),
                      keyed_from=None if keyed_from is None else int(keyed_from), key_id=key_id, time=now_iso())
