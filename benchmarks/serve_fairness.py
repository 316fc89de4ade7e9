"""One-row latency while maximum-size requests of never-seen texts arrive back to back: today's server against
this one, in one run.

    PYTHONPATH=. .venv/bin/python benchmarks/serve_fairness.py --home .intelligentops --spec credit_risk \
        [--seconds 30] [--baseline-rev <git revision>]

The spec's champion (a home that `make run` filled) is served twice on loopback, each with a fresh audit log:
by the code at `--baseline-rev` (default: the last commit before the fair scheduler, `git archive`d into a
temporary folder) and by this checkout. Against each, for `--seconds`:

- an abuser: one connection sending `max_batch_rows`-row requests back to back, every text a new random
  400-character string (no cache can help);
- a victim: one connection sending one-row requests of a real applicant, one after another;

and the victim's latencies are reported (p50, p99, max), with the abuser's rows per second. The same victim
alone gives the floor. Results go to stdout as a Markdown table and to benchmarks/results/serve_fairness.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE_REV = "b98073e"  # main before the fair scheduler (issue 17)
# Keys the baseline's config schema does not know.
NEW_KEYS = ("operator_key_sha256", "host", "gateway_authenticates", "tls", "nullable", "numeric_allowed",
            "min_known_fraction", "max_in_flight_per_client", "batch_text_chars", "max_outcomes_per_request",
            "log_file", "log_max_bytes", "log_backups")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))] if s else float("nan")


def _config(home: Path, spec: str, folder: Path, port: int, baseline: bool) -> Path:
    from assets.deployment import server_config
    from assets.profile import load_profile
    from assets.spec import load_spec
    from resources.storage import StorageResource

    loaded = load_spec(REPO / "pipelines" / f"{spec}.yaml")
    tracking = f"sqlite:///{home.resolve()}/mlflow/mlflow.db"
    config, _ = server_config(loaded, str(home), tracking, f"sqlite:///{folder}/audit.db",
                              load_profile(StorageResource(home=str(home)), loaded.spec))
    data = {**config.to_json(), "port": port, "model_cache": str(folder / "models")}
    if baseline:
        data = {k: v for k, v in data.items() if k not in NEW_KEYS}
    path = folder / "server.json"
    path.write_text(json.dumps(data))
    return path


def _start(code: Path, config: Path, log: Path, url: str) -> subprocess.Popen:
    import httpx

    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1", "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "workloads.serving", "--config", str(config)], cwd=code, env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server not ready: {log.read_text()[-3000:]}")


def _random_text(rng: random.Random, n: int = 400) -> str:
    return " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9)))
                    for _ in range(n // 3))[:n]


def _measure(url: str, spec: str, row: dict, rows: int, seconds: float, abuse: bool) -> dict:
    import httpx

    stop = threading.Event()
    abuser_rows = [0]
    abuser_codes: dict[int, int] = {}

    def abuser() -> None:
        rng = random.Random(1)
        text_col = next(k for k, v in row.items() if isinstance(v, str) and k == "emp_title")
        with httpx.Client(timeout=300) as c:
            while not stop.is_set():
                body = {"instances": [{**row, text_col: _random_text(rng)} for _ in range(rows)]}
                r = c.post(f"{url}/v1/models/{spec}:predict", json=body)
                abuser_codes[r.status_code] = abuser_codes.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    abuser_rows[0] += rows

    with httpx.Client(timeout=300) as c:  # warm: the first request loads the similar-cases index
        c.post(f"{url}/v1/models/{spec}:predict", json={"instances": [row]})
    threads = [threading.Thread(target=abuser)] if abuse else []
    for t in threads:
        t.start()
    time.sleep(2.0 if abuse else 0.0)  # the abuser's first request is in
    latencies = []
    started = time.monotonic()
    with httpx.Client(timeout=300) as c:
        while time.monotonic() - started < seconds:
            t0 = time.perf_counter()
            r = c.post(f"{url}/v1/models/{spec}:predict", json={"instances": [row]})
            latencies.append((time.perf_counter() - t0) * 1000)
            assert r.status_code == 200, r.text
            time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    return {"requests": len(latencies), "p50_ms": round(_pct(latencies, 50), 1),
            "p99_ms": round(_pct(latencies, 99), 1), "max_ms": round(max(latencies), 1),
            "abuser_rows_per_s": round(abuser_rows[0] / elapsed, 1) if abuse else None,
            "abuser_codes": abuser_codes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=os.environ.get("INTELLIGENTOPS_HOME", str(REPO / ".intelligentops")))
    parser.add_argument("--spec", default="credit_risk")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--baseline-rev", default=BASELINE_REV)
    args = parser.parse_args()
    home = Path(args.home)
    from assets.serving_client import sample_rows
    from assets.spec import load_spec
    import pandas as pd

    spec = load_spec(REPO / "pipelines" / f"{args.spec}.yaml").spec
    frame = pd.read_parquet(home / "assets" / args.spec / "validated_dataset.parquet")
    row = next(r for r in sample_rows(spec, frame, 50) if all(v is not None for v in r.values()))
    results = {}
    with tempfile.TemporaryDirectory(prefix="fairness-") as tmp:
        base_code = Path(tmp) / "baseline"
        base_code.mkdir()
        archive = subprocess.run(["git", "archive", args.baseline_rev], cwd=REPO, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(base_code)], input=archive.stdout, check=True)
        for name, code, baseline in (("today", base_code, True), ("fair", REPO, False)):
            folder = Path(tmp) / name
            folder.mkdir()
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            proc = _start(code, _config(home, args.spec, folder, port, baseline), folder / "server.log", url)
            try:
                alone = _measure(url, args.spec, row, spec.deployment.max_batch_rows, min(10.0, args.seconds), False)
                loaded = _measure(url, args.spec, row, spec.deployment.max_batch_rows, args.seconds, True)
            finally:
                proc.terminate()
                proc.wait(30)
            results[name] = {"alone": alone, "beside_max_requests": loaded}
            print(f"{name}: alone {alone}; beside maximum-size requests {loaded}", flush=True)
    out = {"spec": args.spec, "rows_per_abusive_request": spec.deployment.max_batch_rows, "text_chars": 400,
           "seconds": args.seconds, "baseline_rev": args.baseline_rev, "machine": platform.platform(),
           "cpus": os.cpu_count(), "results": results}
    (REPO / "benchmarks" / "results").mkdir(exist_ok=True)
    (REPO / "benchmarks" / "results" / "serve_fairness.json").write_text(json.dumps(out, indent=2))
    print("\n| server | one-row p50 alone | p50 beside | p99 beside | max beside | abuser rows/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        b = r["beside_max_requests"]
        print(f"| {name} | {r['alone']['p50_ms']} ms | {b['p50_ms']} ms | {b['p99_ms']} ms | {b['max_ms']} ms | "
              f"{b['abuser_rows_per_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
