"""What keyed hashing and encryption cost the audit log: append, read and verify throughput, side by side.

    PYTHONPATH=. .venv/bin/python benchmarks/audit_throughput.py [--records 6000] [--rounds 3] [--postgres]

Three stores in one run, on the same disk, interleaved round by round (so the machine's noise falls on all):

- `before`: the store as it was before keys (`core/audit/store.py` at `--baseline` (git), default `main`,
  loaded from git: today's throughput);
- `unkeyed`: this tree's store without keys (a store written before keys, still supported);
- `keyed`: this tree's store with its keys: an HMAC-SHA256 per record and per head, the input hash keyed,
  the applicant's fields and the top factors encrypted with AES-256-GCM, checkpoints appended outside the store.

Appends go in group-commit batches like the server's (the batching engine commits whatever requests waited
together: 1 when idle, tens under load), each commit durable (SQLite WAL, synchronous=FULL). Each record is a
credit_risk applicant (22 numbers, 4 categories, a job title) with three top factors, its input hash computed
by the caller from the raw row, as the server does. Reads page through every record 500 at a time
(`read_after`, decrypting under the keyed rule); verify walks the whole chain (MACs under the keyed rule).

The machine this runs on is shared, so the three stores take turns: a few commits (or one page) each, the order
rotating, every variant's time the sum of its own turns; verify runs three times each and the fastest counts.
Figures: the median of `--rounds` rounds, and each variant against the first column as the median of the
per-round ratios; to stdout as Markdown and to benchmarks/results/audit_throughput.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NUMERIC = ["annual_income", "debt_to_income", "loan_amount", "term", "emp_length", "delinq_2y",
           "earliest_credit_line", "inquiries_last_12m", "total_credit_lines", "open_credit_lines",
           "total_credit_limit", "total_credit_utilized", "num_historical_failed_to_pay", "accounts_opened_24m",
           "num_satisfactory_accounts", "num_total_cc_accounts", "num_open_cc_accounts", "num_cc_carrying_balance",
           "num_mort_accounts", "account_never_delinq_percent", "public_record_bankrupt",
           "months_since_last_credit_inquiry"]
TITLES = ["registered nurse", "teacher", "truck driver", "software engineer", "store manager", "", "accountant",
          "sales associate", "police officer", "warehouse supervisor"]


def records(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` decision records shaped like the server's (input hash from the raw row, as batching.py does)."""
    from core.audit import input_hash, now_iso

    rng = random.Random(seed)
    out = []
    for i in range(n):
        row: dict[str, Any] = {c: round(rng.uniform(0, 100000), 2) for c in NUMERIC}
        row.update({"verified_income": rng.choice(["Verified", "Not Verified", "Source Verified"]),
                    "loan_purpose": rng.choice(["debt_consolidation", "credit_card", "other"]),
                    "application_type": "individual", "state": rng.choice(["CA", "TX", "NY", "WY"]),
                    "emp_title": f"{rng.choice(TITLES)} {i}"})
        p = rng.random()
        out.append({"decision_id": f"{seed:04d}{i:012d}", "time": now_iso(), "spec": "credit_risk",
                    "model_name": "credit_risk", "model_version": "3", "variant": "champion",
                    "input_hash": input_hash(row), "inputs": row, "probability": p, "decision": int(p >= 0.3),
                    "threshold": 0.3, "similar_cases": ["123", "456", "789"], "latency_ms": 4.2, "key_id": "ops",
                    "top_factors": [{"feature": c, "value": row[c], "contribution": round(rng.uniform(-.2, .2), 5)}
                                    for c in ("annual_income", "debt_to_income", "state")]})
    return out


def baseline_store_class(rev: str):
    """The AuditStore of `rev` (git), loaded beside this tree's records module, or None without git."""
    try:
        source = subprocess.run(["git", "show", f"{rev}:core/audit/store.py"], cwd=REPO, check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / "audit_store_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("audit_store_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.AuditStore


def open_store(variant: str, url: str, folder: Path, before: Any):
    from core.audit import AuditKeys, AuditStore

    if variant == "before":
        return before(url)
    if variant == "unkeyed":
        return AuditStore(url)
    checkpoints = folder / "checkpoints.jsonl"  # beside the store on SQLite; given on PostgreSQL
    return AuditStore(url, AuditKeys.load(folder / "keys"), checkpoints=checkpoints)


def measure(variants: list[str], urls: dict[str, str], folders: dict[str, Path], before: Any, batch: int,
            rows: list[dict], commits_per_slice: int = 8) -> dict[str, dict[str, float]]:
    """The same rows appended, read and verified on one store per variant, the variants taking turns slice by
    slice (a few commits each, the order rotating), so load from elsewhere on the machine falls on all of them
    alike; each variant's time is the sum of its own slices. Verify runs three times each, taking turns: the
    fastest counts (what the walk costs when nothing else runs)."""
    stores = {v: open_store(v, urls[v], folders[v], before) for v in variants}
    spent = {v: {"append": 0.0, "read": 0.0, "verify": float("inf")} for v in variants}
    step = batch * commits_per_slice
    for n, i in enumerate(range(0, len(rows), step)):
        for v in variants[n % len(variants):] + variants[:n % len(variants)]:
            start = time.perf_counter()
            for j in range(i, min(i + step, len(rows)), batch):
                stores[v].append(rows[j:j + batch])
            spent[v]["append"] += time.perf_counter() - start
    for store in stores.values():
        if hasattr(store, "flush_checkpoints"):
            store.flush_checkpoints()
    after = dict.fromkeys(variants, 0)
    read = dict.fromkeys(variants, 0)
    for n in range(len(rows) // 500 + 2):
        for v in variants[n % len(variants):] + variants[:n % len(variants)]:
            start = time.perf_counter()
            page = stores[v].read_after(after[v], limit=500)
            if page:
                assert page[-1].inputs["emp_title"]  # decrypted, not a sealed stand-in
                after[v], read[v] = page[-1].seq, read[v] + len(page)
            spent[v]["read"] += time.perf_counter() - start
    for _ in range(3):
        for v in variants:
            start = time.perf_counter()
            check = stores[v].verify()
            spent[v]["verify"] = min(spent[v]["verify"], time.perf_counter() - start)
            assert check.ok and check.checked == len(rows) == read[v], (v, check.problems[:3])
    for store in stores.values():
        store.engine.dispose()
    return {v: {"append_per_s": len(rows) / t["append"], "commits_per_s": len(rows) / batch / t["append"],
                "read_per_s": len(rows) / t["read"], "verify_per_s": len(rows) / t["verify"]}
            for v, t in spent.items()}


def cpu_cost(rows: list[dict], repeats: int = 25) -> dict[str, float]:
    """Microseconds per record of the work keys add, without a database, step by step: preparing a record for the
    store (canonical JSON, input hash; keyed: the keyed hash and the seal), its hash (and MAC), and turning a stored
    row back into a record (JSON; keyed: the unseal). The two variants take turns and the fastest of `repeats`
    runs counts: the cost itself, not the machine's noise."""
    from core.audit import AuditKeys, AuditStore
    from core.audit.records import row_hash

    folder = Path(tempfile.mkdtemp(prefix="audit-cpu-"))
    store = AuditStore(f"sqlite:///{folder / 'audit.db'}", AuditKeys.load(folder / "keys"))
    store._prepare_writer()
    stored = {keyed: [{**store._prepare(r, keyed)[0], "seq": i, "prev_hash": "0" * 64, "record_hash": "0" * 64}
                      for i, r in enumerate(rows, start=1)] for keyed in (False, True)}
    steps = {
        "prepare": lambda keyed: [store._prepare(r, keyed) for r in rows],
        "hash": lambda keyed: [store._cipher.mac("decision", row_hash(r)) if keyed else row_hash(r)
                               for r in stored[keyed]],
        "read": lambda keyed: [store._record(r) for r in stored[keyed]],
    }
    best = {f"{step}_{v}_us": float("inf") for step in steps for v in ("unkeyed", "keyed")}
    try:
        for _ in range(repeats):
            for step, run in steps.items():
                for keyed in (False, True):
                    start = time.perf_counter()
                    run(keyed)
                    key = f"{step}_{'keyed' if keyed else 'unkeyed'}_us"
                    best[key] = min(best[key], (time.perf_counter() - start) / len(rows) * 1e6)
    finally:
        store.engine.dispose()
        shutil.rmtree(folder, ignore_errors=True)
    return best


def postgres_urls():
    """A pgserver PostgreSQL on a Unix socket in a short /tmp folder, a function giving a fresh database URL on it,
    and the folder."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs' note about XDG_RUNTIME_DIR
        import pgserver
    import psycopg2

    folder = tempfile.mkdtemp(prefix="audit-bench-pg-")
    server = pgserver.get_server(folder, cleanup_mode="stop")
    counter = iter(range(10_000))

    def fresh() -> str:
        name = f"audit_bench_{next(counter)}"
        conn = psycopg2.connect(dbname="postgres", user="postgres", host=folder)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return f"postgresql+psycopg2://postgres:@/{name}?host={folder}"

    return server, fresh, folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=6000, help="records per store and batch size")
    parser.add_argument("--records-single", type=int, default=1000, help="records when each commit holds one")
    parser.add_argument("--batches", default="1,16,64", help="group-commit batch sizes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", default="main", help="git revision whose store is `before`")
    parser.add_argument("--postgres", action="store_true", help="also on PostgreSQL (the pgserver wheel)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "audit_throughput.json"))
    args = parser.parse_args()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped run still stops its PostgreSQL
    before = baseline_store_class(args.baseline)
    variants = (["before"] if before is not None else []) + ["unkeyed", "keyed"]
    backends = ["sqlite"] + (["postgres"] if args.postgres else [])
    work = Path(tempfile.mkdtemp(prefix="audit-bench-"))
    server, fresh_pg, pg_folder = postgres_urls() if args.postgres else (None, None, None)
    runs: dict[str, list[dict[str, float]]] = {}
    try:
        for rnd in range(args.rounds):
            for backend in backends:
                for batch in (int(b) for b in args.batches.split(",")):
                    rows = records(args.records_single if batch == 1 else args.records, seed=rnd * 100 + batch)
                    folders = {v: work / f"{backend}-{batch}-{v}-{rnd}" for v in variants}
                    for f in folders.values():
                        f.mkdir()
                    urls = {v: f"sqlite:///{folders[v] / 'audit.db'}" if backend == "sqlite" else fresh_pg()
                            for v in variants}
                    for variant, result in measure(variants, urls, folders, before, batch, rows).items():
                        runs.setdefault(f"{backend}|{batch}|{variant}", []).append(result)
                        print(f"round {rnd + 1} {backend} batch {batch:3d} {variant:8s} "
                              f"{result['append_per_s']:9.0f} appends/s {result['read_per_s']:9.0f} reads/s "
                              f"{result['verify_per_s']:9.0f} verified/s", flush=True)
    finally:
        if server is not None:
            server.cleanup()
            shutil.rmtree(pg_folder, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    medians = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    ref = "before" if before is not None else "unkeyed"

    def ratio(key: str, metric: str) -> float:
        """The median over rounds of this variant's figure over the reference's in the same round."""
        backend, batch, _ = key.split("|")
        base = runs[f"{backend}|{batch}|{ref}"]
        return statistics.median(r[metric] / b[metric] for r, b in zip(runs[key], base)) - 1

    lines = [f"| store | batch | variant | appends/s | vs {ref} | commits/s | reads/s | vs {ref} | verified/s | "
             f"vs {ref} |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, m in medians.items():
        backend, batch, variant = key.split("|")
        lines.append(f"| {backend} | {batch} | {variant} | {m['append_per_s']:,.0f} | "
                     f"{ratio(key, 'append_per_s'):+.1%} | {m['commits_per_s']:,.0f} | {m['read_per_s']:,.0f} | "
                     f"{ratio(key, 'read_per_s'):+.1%} | {m['verify_per_s']:,.0f} | {ratio(key, 'verify_per_s'):+.1%} |")
    cpu = cpu_cost(records(500, seed=999))
    lines += ["", "| per record, no database (fastest of 25) | unkeyed | keyed | added |", "|---|---|---|---|"]
    for step in ("prepare", "hash", "read"):
        u, k = cpu[f"{step}_unkeyed_us"], cpu[f"{step}_keyed_us"]
        lines.append(f"| {step} | {u:.1f} us | {k:.1f} us | {k - u:+.1f} us |")
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "machine": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
        "baseline": args.baseline, "rounds": args.rounds, "records": args.records,
        "records_single": args.records_single, "median": medians, "runs": runs, "cpu_us": cpu}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
