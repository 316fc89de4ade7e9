"""Two server processes appending to one SQLite audit store keep one unbroken chain."""

import subprocess
import sys
from pathlib import Path

import pytest

from core.audit import AuditStore, default_audit_url

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path: Path) -> AuditStore:
    return AuditStore(default_audit_url(str(tmp_path)))


WRITER = """
import sys
from core.audit import AuditStore
store = AuditStore(sys.argv[1])
for b in range(20):
    store.append([{"decision_id": f"{sys.argv[2]}-{b}-{i}", "spec": "loans", "model_name": "loans",
                   "model_version": "1", "variant": "champion", "inputs": {"x": i}, "probability": 0.5,
                   "decision": 1, "threshold": 0.5} for i in range(5)])
"""


def test_two_processes_append_to_one_store_without_breaking_the_chain(store: AuditStore):
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, store.url, name], cwd=REPO,
                              env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}) for name in ("a", "b")]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    v = store.verify()
    assert v.ok and v.checked == 200 and store.latest_seq() == 200
