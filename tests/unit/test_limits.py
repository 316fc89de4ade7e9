"""Rate limits and in-flight bounds shared by a server's worker processes (workloads/serving/limits.py): two
workers map one table, so a key gets its limit once, and a worker started in place of a dead one clears only the
dead one's in-flight counts."""

from pathlib import Path

from workloads.serving.limits import CallerLimits, create_table


def test_two_workers_share_one_rate_limit_and_one_in_flight_bound(tmp_path: Path):
    path = str(tmp_path / "limits")
    create_table(path)
    a, b = CallerLimits(path, worker=0), CallerLimits(path, worker=1)
    # The attack: the key alternates workers; it gets 4 requests per minute in all, not 4 per worker.
    taken = [(a if i % 2 else b).take("key:attacker", 4) == 0 for i in range(8)]
    assert taken.count(True) == 4 and not any(taken[4:])
    assert a.take("key:other", 4) == 0  # another caller has its own bucket
    assert a.enter("key:attacker", 2) and b.enter("key:attacker", 2) and not a.enter("key:attacker", 2)
    b.leave("key:attacker")
    assert a.enter("key:attacker", 2) and not b.enter("key:attacker", 2)
    # Worker 1 dies holding nothing; worker 0 "dies" holding two: its replacement clears its column only.
    CallerLimits(path, worker=0)
    assert b.enter("key:attacker", 2) and b.enter("key:attacker", 2) and not b.enter("key:attacker", 2)


def test_a_private_table_without_a_file(tmp_path: Path):
    limits = CallerLimits()
    assert limits.take("addr:127.0.0.1", 1) == 0 and limits.take("addr:127.0.0.1", 1) > 0
    assert limits.enter("addr:127.0.0.1", 1) and not limits.enter("addr:127.0.0.1", 1)
    limits.leave("addr:127.0.0.1")
    assert limits.enter("addr:127.0.0.1", 1)
