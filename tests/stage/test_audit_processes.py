"""Two server processes appending to one SQLite audit store keep one unbroken chain: unkeyed (a store written
before keys), and keyed, starting together on a new store, so both create the keys folder at once."""

import subprocess
import sys
from pathlib import Path

import pytest

from core.audit import AuditKeys, AuditStore, default_audit_url

REPO = Path(__file__).resolve().parents[2]


WRITER = """
import sys
from core.audit import AuditKeys, AuditStore
store = AuditStore(sys.argv[1], AuditKeys.load(sys.argv[3]) if sys.argv[3] != "-" else None)
for b in range(20):
    store.append([{"decision_id": f"{sys.argv[2]}-{b}-{i}", "spec": "loans", "model_name": "loans",
                   "model_version": "1", "variant": "champion", "inputs": {"x": i}, "probability": 0.5,
                   "decision": 1, "threshold": 0.5} for i in range(5)])
    store.record_outcome(f"{sys.argv[2]}-{b}-0", b % 2, key_id=sys.argv[2])
store.flush_checkpoints()
"""


@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "unkeyed"])
def test_two_processes_append_to_one_store_without_breaking_the_chain(tmp_path: Path, keyed: bool):
    url = default_audit_url(str(tmp_path))
    keys = str(tmp_path / "keys") if keyed else "-"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, url, name, keys], cwd=REPO,
                              env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}) for name in ("a", "b")]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    store = AuditStore(url, AuditKeys.load(keys) if keyed else None)
    v = store.verify()
    assert v.ok and v.checked == 200 and store.latest_seq() == 200 and v.outcome_events_checked == 40, v.problems
    assert (v.checkpoints_checked > 0) is keyed
    if keyed:
        assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["audit-enc.key", "audit-mac.key"]
        assert "every seq from 1 under the keyed rule" in v.rules[0]
