"""Time to load the code location, next to `import dagster` alone, in fresh interpreters.

    .venv/bin/python benchmarks/code_location_load.py [runs]

Target (foundation issue): loading orchestration.definitions costs at most 1 s more than `import dagster`,
and imports no ML library.
"""

import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import sys, time, json
t0 = time.perf_counter(); import dagster; t1 = time.perf_counter()
import orchestration.definitions as d; d.build_definitions(); t2 = time.perf_counter()
print(json.dumps({"dagster": t1 - t0, "defs": t2 - t1, "heavy": [m for m in d.HEAVY_MODULES if m in sys.modules]}))
"""


def main(runs: int) -> None:
    results = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, check=True,
                             env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    dag = [r["dagster"] for r in results]
    defs = [r["defs"] for r in results]
    print(f"runs: {runs}")
    print(f"import dagster:                median {statistics.median(dag):.3f} s  (min {min(dag):.3f})")
    print(f"+ orchestration.definitions:   median {statistics.median(defs):.3f} s  (min {min(defs):.3f})  target < 1.0 s")
    print(f"heavy modules imported:        {sorted(set(m for r in results for m in r['heavy'])) or 'none'}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
