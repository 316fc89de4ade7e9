"""The audit log's test helpers: records, a keyed store, and the insider's attacks on the real SQLite file.

The insider has write access to the database and knows every algorithm (they can read core/audit/), but not the
keys folder: each attack recomputes whatever plain hashes it can, as someone covering their tracks would.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from core.audit import AuditKeys, AuditStore, default_audit_url
from core.audit.records import row_hash
from core.audit.verify import event_hash

SPEC = "loans"
REPO = Path(__file__).resolve().parents[1]


def record(i: int, variant: str = "champion", version: str = "1", **over: Any) -> dict:
    inputs = {"income": 1000.0 + i, "purpose": "car", "title": f"engineer {i}", "state": "Wyoming"}
    return {"decision_id": f"d-{i:05d}", "spec": SPEC, "model_name": SPEC, "model_version": version,
            "variant": variant, "inputs": inputs, "probability": 0.01 * (i % 100), "decision": int(i % 3 == 0),
            "threshold": 0.5, "top_factors": [{"feature": "income", "value": 1000.0 + i, "contribution": -0.1}],
            "similar_cases": ["r1", "r2"], "latency_ms": 1.5, "key_id": "ops", **over}


def keyed_store(home: Path, **kwargs: Any) -> AuditStore:
    """A store under `home` with its keys in `<home>/keys`, checkpointing every commit (interval 0)."""
    kwargs.setdefault("checkpoint_interval", 0)
    return AuditStore(default_audit_url(str(home)), AuditKeys.load(home / "keys"), **kwargs)


def db_path(store: AuditStore) -> str:
    return store.url.split(":///", 1)[1]


def sql(store: AuditStore, statement: str, *args: Any) -> None:
    with sqlite3.connect(db_path(store)) as conn:
        conn.execute(statement, args)


def _rows(conn: sqlite3.Connection, table: str, order: str) -> list[dict]:
    conn.row_factory = sqlite3.Row
    return [dict(r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY {order}")]


def rehash_decisions(conn: sqlite3.Connection, from_seq: int) -> None:
    """Recompute every plain hash and link from `from_seq` on, and the head's seq and hash (not its MAC)."""
    rows = _rows(conn, "audit_decisions", "seq")
    head = dict(conn.execute("SELECT * FROM audit_head WHERE id = 1").fetchone())
    prev = head["anchor_hash"]
    for r in rows:
        if r["seq"] >= from_seq:
            r["prev_hash"] = prev
            r["record_hash"] = row_hash(r)
            conn.execute("UPDATE audit_decisions SET prev_hash = ?, record_hash = ? WHERE seq = ?",
                         (r["prev_hash"], r["record_hash"], r["seq"]))
        prev = r["record_hash"]
    conn.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (rows[-1]["seq"] if rows else 0, prev))


def edit_record_and_rehash(store: AuditStore, seq: int, **changes: Any) -> None:
    """Attack 1: change a decision, then recompute its hash, every later link and the head."""
    with sqlite3.connect(db_path(store)) as conn:
        sets = ", ".join(f"{k} = ?" for k in changes)
        conn.execute(f"UPDATE audit_decisions SET {sets} WHERE seq = ?", (*changes.values(), seq))
        rehash_decisions(conn, seq)


def head_row(store: AuditStore, chain: int = 1) -> dict:
    with sqlite3.connect(db_path(store)) as conn:
        conn.row_factory = sqlite3.Row
        return dict(conn.execute("SELECT * FROM audit_head WHERE id = ?", (chain,)).fetchone())


def truncate_and_restore_head(store: AuditStore, saved_head: dict) -> None:
    """Attack 2: delete every record after the saved head's seq and put that (authentic, MAC-valid) head back."""
    with sqlite3.connect(db_path(store)) as conn:
        conn.execute("DELETE FROM audit_decisions WHERE seq > ?", (saved_head["seq"],))
        cols = ", ".join(f"{k} = ?" for k in saved_head if k != "id")
        conn.execute(f"UPDATE audit_head SET {cols} WHERE id = 1", [v for k, v in saved_head.items() if k != "id"])


def flip_outcome_and_rehash(store: AuditStore, event_id: int) -> None:
    """Attack 3: flip an outcome, then recompute the outcome chain's hashes and head from it on."""
    with sqlite3.connect(db_path(store)) as conn:
        conn.execute("UPDATE audit_outcome_events SET outcome = 1 - outcome WHERE id = ?", (event_id,))
        rows = _rows(conn, "audit_outcome_events", "id")
        head = dict(conn.execute("SELECT * FROM audit_head WHERE id = 2").fetchone())
        prev = head["anchor_hash"]
        for r in rows:
            if r["id"] >= event_id:
                r["prev_hash"] = prev
                r["record_hash"] = event_hash(r)
                conn.execute("UPDATE audit_outcome_events SET prev_hash = ?, record_hash = ? WHERE id = ?",
                             (r["prev_hash"], r["record_hash"], r["id"]))
            prev = r["record_hash"]
        conn.execute("UPDATE audit_head SET hash = ? WHERE id = 2", (prev,))


def delete_and_renumber(store: AuditStore, seq: int) -> None:
    """Attack 4: delete a record from the middle, close the gap (every later seq one lower) and recompute."""
    with sqlite3.connect(db_path(store)) as conn:
        conn.execute("DELETE FROM audit_decisions WHERE seq = ?", (seq,))
        for (s,) in conn.execute("SELECT seq FROM audit_decisions WHERE seq > ? ORDER BY seq", (seq,)).fetchall():
            conn.execute("UPDATE audit_decisions SET seq = ? WHERE seq = ?", (s - 1, s))
        rehash_decisions(conn, seq)


def raw_bytes(store: AuditStore) -> bytes:
    """Every byte of the store's files (db, -wal, -shm) and its checkpoint file."""
    base = Path(db_path(store))
    files = [base, Path(f"{base}-wal"), Path(f"{base}-shm")]
    if store.checkpoint_path:
        files.append(store.checkpoint_path)
    return b"".join(f.read_bytes() for f in files if f.exists())


def json_dump(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


def cli(home: Path, *args: str, keys: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m orchestration.decisions ARGS` in a fresh process, on the home (and keys folder) given."""
    env = {**os.environ, "INTELLIGENTOPS_HOME": str(home), "PYTHONPATH": str(REPO),
           "DAGSTER_HOME": str(home / "dagster")}
    env.pop("INTELLIGENTOPS_AUDIT_URL", None)
    env.pop("INTELLIGENTOPS_KEYS_DIR", None)
    if keys is not None:
        env["INTELLIGENTOPS_KEYS_DIR"] = str(keys)
    return subprocess.run([sys.executable, "-m", "orchestration.decisions", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
