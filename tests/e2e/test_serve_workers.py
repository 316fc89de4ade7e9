"""Several server processes behind one port (deployment.workers; workloads/serving/workers.py), on one audit chain.

One small model is registered for the module; a server with two workers answers on one port. Both workers
answer; the chain holds every seq from 1 with no gap, in the order the decisions were answered; a worker killed
with SIGKILL in a burst of concurrent requests loses no answered decision, the supervisor starts another and the
server keeps answering, on SQLite and on PostgreSQL; a key sending over its rate limit through both workers is
refused at its limit, not at twice it; and a startup refusal is one line and exit status 2, not workers
restarting.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from serving_support import SPEC, Server, lent_registered

from workloads.serving.gateway import WORKER_HEADER

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
ROW = {"income": 52000.0, "debt_ratio": 12.5, "purpose": "car", "title": "registered nurse"}
PREDICT = f"/v1/models/{SPEC}:predict"
LIMIT = 20  # the attacker key's rate limit per minute
KEYS = {"attacker-key": (["predict", "read"], LIMIT), "predictor-key": (["predict"], 100_000)}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    yield from lent_registered(tmp_path_factory)


def keys_file(tmp: Path) -> str:
    path = tmp / "keys.json"
    path.write_text(json.dumps({"keys": [{"id": k.split("-")[0], "sha256": hashlib.sha256(k.encode()).hexdigest(),
                                          "scopes": scopes, "rate_limit_per_minute": limit}
                                         for k, (scopes, limit) in KEYS.items()]}))
    return str(path)


@pytest.fixture(scope="module")
def server(registered, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    s = Server(registered, tmp, "two", workers=2, api_keys_file=keys_file(tmp)).start()
    yield s
    s.stop()


def predict(url: str, key: str, fresh: bool = True) -> httpx.Response:
    """One request on a new connection (so the kernel may hand it to either worker)."""
    return httpx.post(url + PREDICT, json={"instances": [ROW]}, headers={**bearer(key), "Connection": "close"},
                      timeout=30)


def answered_by_both(s: Server) -> set[str]:
    workers = set()
    for _ in range(200):
        r = predict(s.url, s.smoke_key)
        assert r.status_code == 200, r.text
        workers.add(r.headers[WORKER_HEADER])
        if len(workers) == 2:
            break
    return workers


def whole_chain(s: Server, answered: list[str]) -> None:
    """Every answered decision is on the log; the chain verifies with every seq from 1, no gap."""
    store = s.store
    seqs = [r.seq for r in store.read_after(0, limit=100_000)]
    assert seqs == list(range(1, len(seqs) + 1)) and seqs, seqs[:5]
    v = store.verify()
    assert v.ok and v.checked == len(seqs) == store.latest_seq(), v.problems
    missing = [d for d in answered if store.get(d) is None]
    assert not missing, f"{len(missing)} answered decisions are not on the audit log: {missing[:3]}"


def test_both_workers_answer_one_chain_in_answer_order(server):
    assert len(server.worker_pids()) == 2
    assert answered_by_both(server) == {"0", "1"}
    ids, workers = [], []
    for _ in range(30):  # one after another: each answered before the next is sent
        r = predict(server.url, server.smoke_key)
        assert r.status_code == 200, r.text
        ids.append(r.json()["predictions"][0]["decision_id"])
        workers.append(r.headers[WORKER_HEADER])
    assert len(set(workers)) == 2, workers  # the sequence went through both processes
    store = server.store
    seqs = [store.get(d).seq for d in ids]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs  # the chain's order is the answers' order
    whole_chain(server, ids)
    # Which worker answered is for callers that may read the server's status, not for every caller.
    r = predict(server.url, "predictor-key")
    assert r.status_code == 200 and WORKER_HEADER not in r.headers
    status = httpx.get(server.url + "/intelligentops/status", headers=bearer(server.smoke_key), timeout=10).json()
    assert status["worker"] in (0, 1) and status["pid"] in server.worker_pids()


def burst_with_a_kill(s: Server, seconds: float = 6.0, clients: int = 6) -> tuple[list[str], int, int]:
    """Concurrent requests; one worker SIGKILLed once 20 decisions were answered, the burst going on `seconds`. (answered ids, failures,
    the killed pid)."""
    answered: list[str] = []
    failed = [0]
    stop = threading.Event()
    lock = threading.Lock()

    def client():
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                try:
                    r = c.post(s.url + PREDICT, json={"instances": [ROW, {**ROW, "title": "nurse"}]},
                               headers={**bearer(s.smoke_key), "Connection": "close"})
                except httpx.HTTPError:
                    with lock:
                        failed[0] += 1
                    continue
                with lock:
                    if r.status_code == 200:
                        answered.extend(p["decision_id"] for p in r.json()["predictions"])
                    else:
                        failed[0] += 1

    assert answered_by_both(s) == {"0", "1"}  # both warm
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(answered) < 20 and time.monotonic() < deadline:
        time.sleep(0.1)
    victim = s.worker_pids()[0]
    before = len(answered)
    os.kill(victim, signal.SIGKILL)
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    assert before > 0 and len(answered) > before, (before, len(answered))
    return answered, failed[0], victim


def back_to_two_workers(s: Server, victim: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pids = s.worker_pids()
        if len(pids) == 2 and victim not in pids and answered_by_both(s) == {"0", "1"}:
            return
        time.sleep(0.5)
    raise AssertionError(f"the supervisor did not bring a second worker back: {s.worker_pids()}; "
                         f"{s.log.read_text()[-2000:]}")


def test_a_worker_killed_in_a_burst_loses_no_answered_decision_and_is_replaced(server):
    answered, failed, victim = burst_with_a_kill(server)
    whole_chain(server, answered)
    back_to_two_workers(server, victim)
    assert f"(pid {victim}) ended with status -9; starting another" in server.log.read_text()
    r = predict(server.url, server.smoke_key)
    assert r.status_code == 200
    whole_chain(server, [r.json()["predictions"][0]["decision_id"]])


def test_a_key_over_its_rate_limit_through_both_workers_is_refused_at_its_limit(server):
    """The attack: 3x the key's per-minute limit at once, spread over both workers. Per-worker buckets would let
    through up to twice the limit; the shared table lets through the limit (plus what refills meanwhile)."""
    started = time.monotonic()
    codes, workers = [], set()
    for _ in range(3 * LIMIT):
        r = predict(server.url, "attacker-key")
        codes.append(r.status_code)
        workers.add(r.headers.get(WORKER_HEADER))
    refilled = (time.monotonic() - started) * LIMIT / 60
    assert workers == {"0", "1"}, workers
    assert set(codes) == {200, 429}, codes
    assert LIMIT <= codes.count(200) <= LIMIT + refilled + 1, (codes.count(200), refilled)


def test_a_startup_refusal_is_one_line_and_status_2_not_restarting_workers(registered, tmp_path):
    s = Server(registered, tmp_path, "refused", workers=2, api_keys_file=str(tmp_path / "no-such-keys.json"))
    run = subprocess.run([sys.executable, "-m", "workloads.serving", "--config", str(s.config_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.startswith("serving:")]
    assert len(lines) == 1 and "no-such-keys.json" in lines[0], run.stderr[-2000:]
    # A refusal only a worker can see (no version of this model has the alias): worker 0's one line, status 2.
    s = Server(registered, tmp_path, "no-model", workers=2, spec="no_such_spec")
    run = subprocess.run([sys.executable, "-m", "workloads.serving", "--config", str(s.config_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.startswith("serving:")]
    assert len(lines) == 1, run.stderr[-2000:]


def test_postgres_two_workers_one_chain_and_a_sigkill_loses_nothing(registered, postgres, tmp_path):
    url = postgres.create_database("serve_workers")
    s = Server(registered, tmp_path, "pg", workers=2, audit_url=url).start()
    try:
        assert s.store.location().startswith("postgresql")
        answered, failed, victim = burst_with_a_kill(s)
        whole_chain(s, answered)
        back_to_two_workers(s, victim)
    finally:
        s.stop()
