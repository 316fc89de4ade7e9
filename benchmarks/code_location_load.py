"""Time to load the code location, next to `import dagster` alone, in fresh interpreters.

    .venv/bin/python benchmarks/code_location_load.py [runs] [checkout ...]

Each checkout (default: this one) is measured in turn, so a baseline checkout and this one can be compared in one
run. Target (foundation issue): loading orchestration.definitions costs at most 1 s more than `import dagster`,
and imports no ML library; since core/lazy.py it imports neither numpy, pandas nor pyarrow.
"""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_MODULES = ("numpy", "pandas", "pyarrow")
PROBE = """
import sys, time, json
t0, c0 = time.perf_counter(), time.process_time(); import dagster; t1, c1 = time.perf_counter(), time.process_time()
import orchestration.definitions as d; d.build_definitions(); t2, c2 = time.perf_counter(), time.process_time()
print(json.dumps({"dagster": t1 - t0, "defs": t2 - t1, "defs_cpu": c2 - c1,
                  "heavy": [m for m in d.HEAVY_MODULES if m in sys.modules],
                  "data": [m for m in %r if m in sys.modules]}))
""" % (DATA_MODULES,)


def measure(repo: Path, runs: int) -> None:
    results = []
    env = {"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", PROBE], cwd=repo, capture_output=True, text=True, check=True,
                             env=env)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    dag = [r["dagster"] for r in results]
    defs = [r["defs"] for r in results]
    cpu = [r["defs_cpu"] for r in results]
    print(f"{repo} ({runs} runs)")
    print(f"  import dagster:              median {statistics.median(dag):.3f} s  (min {min(dag):.3f})")
    print(f"  + orchestration.definitions: median {statistics.median(defs):.3f} s  (min {min(defs):.3f})  "
          f"CPU median {statistics.median(cpu):.3f} s  target < 1.0 s")
    print(f"  heavy modules imported:      {sorted(set(m for r in results for m in r['heavy'])) or 'none'}")
    print(f"  numpy/pandas/pyarrow:        {sorted(set(m for r in results for m in r['data'])) or 'none'}")


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    for checkout in [Path(p).resolve() for p in sys.argv[2:]] or [REPO]:
        measure(checkout, count)
