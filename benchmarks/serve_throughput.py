"""Our inference server (audit log on) against `mlflow models serve` of the same model version.

    PYTHONPATH=. .venv/bin/python benchmarks/serve_throughput.py --spec credit_risk [--seconds 8]

Same machine, same registered version (the spec's champion, which must carry the `operating_threshold` tag),
same request set (real rows of the spec's validated_dataset, one applicant per request), in one run:

- saturation: a closed loop of 16 connections for `--seconds`, answered requests per second;
- a fixed open-loop rate of 100 requests/s for `--seconds`: p50 and p99, each latency measured from the moment
  the request was due, so a server that falls behind is charged for the queue it builds;
- one connection, one request at a time: p50;

for our server with explanations on (`explain_top` 3) and off (0), each with repeated texts (50 rows cycled)
and never-seen texts (every text made unique, so no embedding cache can help), and for `mlflow models serve
--env-manager local` with the same rows. Our server writes every decision to a fresh audit log under the home;
afterwards the log must hold exactly the answered decisions and its chain must verify. The figures go to
stdout as a Markdown table and to benchmarks/results/serve_throughput.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def _wait(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"server not ready at {url}: {log.read_text()[-3000:]}")


class Target:
    """How to ask one server for one applicant's decision."""

    def __init__(self, name: str, url: str, body_of):
        self.name, self.url, self.body_of = name, url, body_of


async def _closed_loop(target: Target, bodies: list[bytes], seconds: float, connections: int) -> dict[str, Any]:
    import aiohttp

    ok = errors = 0
    first_error: list[str] = []
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    counter = iter(range(10**9))
    headers = {"Content-Type": "application/json"}

    async def worker(session):
        nonlocal ok, errors
        while time.perf_counter() < stop_at:
            body = bodies[next(counter) % len(bodies)]
            t = time.perf_counter()
            try:
                async with session.post(target.url, data=body, headers=headers) as r:
                    await r.read()
                    if r.status == 200:
                        ok += 1
                        latencies.append(time.perf_counter() - t)
                    else:
                        errors += 1
                        if not first_error:
                            first_error.append(f"HTTP {r.status}: {(await r.text())[-400:]}")
            except aiohttp.ClientError as exc:
                errors += 1
                if not first_error:
                    first_error.append(repr(exc))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:
        started = time.perf_counter()
        await asyncio.gather(*[worker(session) for _ in range(connections)])
        elapsed = time.perf_counter() - started
    return {"rps": ok / elapsed, "ok": ok, "errors": errors, "p50_ms": _pct(latencies, 50) * 1000,
            "p99_ms": _pct(latencies, 99) * 1000, "first_error": first_error[0] if first_error else None}


async def _open_loop(target: Target, bodies: list[bytes], seconds: float, rate: float) -> dict[str, Any]:
    import aiohttp

    n = int(seconds * rate)
    latencies: list[float] = []
    errors = 0
    headers = {"Content-Type": "application/json"}

    async def one(session, i: int, due: float):
        nonlocal errors
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            async with session.post(target.url, data=bodies[i % len(bodies)], headers=headers) as r:
                await r.read()
                if r.status == 200:
                    latencies.append(time.perf_counter() - due)
                else:
                    errors += 1
        except aiohttp.ClientError:
            errors += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512)) as session:
        start = time.perf_counter() + 0.2
        await asyncio.gather(*[one(session, i, start + i / rate) for i in range(n)])
    return {"rate": rate, "sent": n, "ok": len(latencies), "errors": errors, "p50_ms": _pct(latencies, 50) * 1000,
            "p99_ms": _pct(latencies, 99) * 1000}


async def _one_connection(target: Target, bodies: list[bytes], count: int) -> dict[str, Any]:
    result = await _closed_loop(target, bodies, seconds=count / 50.0, connections=1)
    return {"p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"], "ok": result["ok"]}


def measure(target: Target, bodies: list[bytes], seconds: float, rate: float, connections: int,
            single: bool) -> dict[str, Any]:
    asyncio.run(_closed_loop(target, bodies[:50], 1.5, 4))  # warm up
    out = {"saturation": asyncio.run(_closed_loop(target, bodies, seconds, connections)),
           "open_loop": asyncio.run(_open_loop(target, bodies, seconds, rate))}
    if single:
        out["one_connection"] = asyncio.run(_one_connection(target, bodies, 150))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", default="credit_risk")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--skip-mlflow", action="store_true")
    args = parser.parse_args()

    import pandas as pd

    from assets.deployment import server_config
    from assets.profile import load_profile
    from assets.serving_client import sample_rows
    from assets.spec import load_specs
    from resources import resources_for
    from core.audit import AuditKeys, AuditStore
    from core.server_config import write_server_config

    from dataclasses import replace

    from resources.settings import Settings

    settings = replace(Settings.from_env(), deployment="local")
    res = resources_for(settings)
    home = res["storage"].home
    loaded = {s.name: s for s in load_specs(settings.pipelines)}[args.spec]
    spec = loaded.spec
    mlflow = res["mlflow"]
    mv = mlflow.get_version(spec.name, "champion")
    version = str(mv.version)
    if "operating_threshold" not in (mv.tags or {}):
        raise SystemExit(f"{spec.name} v{version} has no operating_threshold tag; materialize model_evaluation "
                         "for it (or set the tag) first")
    validated = pd.read_parquet(Path(home) / "assets" / spec.name / "validated_dataset.parquet")
    rows = sample_rows(spec, validated.sample(frac=1.0, random_state=7), 3000)
    text = spec.features.text

    def unique_texts(rs: list[dict]) -> list[dict]:
        return [{**r, **{c: f"{r.get(c) or ''} {i}-{time.time_ns()}" for c in text}} for i, r in enumerate(rs)]

    repeated = rows[:50]
    never_seen = unique_texts(rows) if text else rows
    v1 = lambda r: json.dumps({"instances": [r]}).encode()  # noqa: E731
    mlflow_body = lambda r: json.dumps({"dataframe_records": [r]}).encode()  # noqa: E731

    work = Path(home) / "benchmarks" / f"serve-{int(time.time())}"
    work.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    results: dict[str, Any] = {"spec": spec.name, "version": version, "machine": platform.platform(),
                               "cpus": os.cpu_count(), "seconds": args.seconds, "rate": args.rate,
                               "connections": args.connections, "ours": {}, "mlflow": {}}
    profile = load_profile(res["storage"], spec)
    audit_url = f"sqlite:///{work / 'audit.db'}"
    for explain in (3, 0):
        config, _ = server_config(loaded, home, mlflow.resolved_tracking_uri(), audit_url, profile)
        port = _free_port()
        path = work / f"server-explain{explain}.json"
        write_server_config(path, config.replace(port=port, explain_top=explain, api_keys_file=None))
        log = work / f"server-explain{explain}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "workloads.serving", "--config", str(path)],
                                    cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        try:
            _wait(f"http://127.0.0.1:{port}/v2/health/ready", proc, log)
            target = Target("ours", f"http://127.0.0.1:{port}/v1/models/{spec.name}:predict", v1)
            for label, rs in (("repeated", repeated), ("never_seen", never_seen)):
                if label == "never_seen" and not text:
                    continue
                key = f"explain{'_on' if explain else '_off'}_{label}"
                print(f"ours {key} ...", flush=True)
                results["ours"][key] = measure(target, [v1(r) for r in rs], args.seconds, args.rate,
                                               args.connections, single=(label == "repeated"))
                if label == "never_seen":
                    never_seen = unique_texts(rows)  # fresh texts for the next server
        finally:
            proc.terminate()
            proc.wait(30)
    store = AuditStore(audit_url, AuditKeys.load(config.keys_dir) if config.keys_dir else None)
    answered = sum(m[k]["ok"] for m in results["ours"].values() for k in m) + 0
    chain = store.verify()
    results["audit"] = {"records": store.latest_seq(), "chain_ok": chain.ok, "answered_at_least": answered}

    if not args.skip_mlflow:
        port = _free_port()
        log = work / "mlflow-serve.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
                                     f"models:/{spec.name}/{version}", "--env-manager", "local", "-h", "127.0.0.1",
                                     "-p", str(port)], cwd=work,
                                    env={**env, "MLFLOW_TRACKING_URI": mlflow.resolved_tracking_uri(),
                                         # mlflow starts `uvicorn` by name
                                         "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"},
                                    stdout=fh, stderr=subprocess.STDOUT)
        try:
            _wait(f"http://127.0.0.1:{port}/ping", proc, log)
            target = Target("mlflow", f"http://127.0.0.1:{port}/invocations", mlflow_body)
            for label, rs in (("repeated", repeated), ("never_seen", unique_texts(rows) if text else None)):
                if rs is None:
                    continue
                print(f"mlflow {label} ...", flush=True)
                results["mlflow"][label] = measure(target, [mlflow_body(r) for r in rs], args.seconds, args.rate,
                                                   args.connections, single=(label == "repeated"))
        finally:
            proc.terminate()
            proc.wait(30)

    out = REPO / "benchmarks" / "results" / "serve_throughput.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print("\n| server | texts | saturation req/s (errors) | p50 / p99 ms at saturation | open loop "
          f"{args.rate:g}/s: p50 / p99 ms (errors) | one connection p50 ms |")
    print("|---|---|---|---|---|---|")
    for who, table in (("ours", results["ours"]), ("mlflow models serve", results["mlflow"])):
        for key, m in table.items():
            s, o = m["saturation"], m["open_loop"]
            one = f"{m['one_connection']['p50_ms']:.1f}" if "one_connection" in m else ""
            print(f"| {who} | {key} | {s['rps']:.0f} ({s['errors']}) | {s['p50_ms']:.1f} / {s['p99_ms']:.1f} | "
                  f"{o['p50_ms']:.1f} / {o['p99_ms']:.1f} ({o['errors']}) | {one} |")
    print(f"\naudit log: {results['audit']}")
    for who, table in (("ours", results["ours"]), ("mlflow models serve", results["mlflow"])):
        for key, m in table.items():
            if m["saturation"]["first_error"]:
                print(f"{who} {key}: first error: {m['saturation']['first_error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
