"""core/ ships inside the serving and training images: no module of it may load Dagster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def core_modules() -> list[str]:
    out = []
    for path in sorted((REPO / "core").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def test_no_core_module_loads_dagster() -> None:
    modules = core_modules()
    assert "core.manifest" in modules and "core.audit.store" in modules
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            "print(','.join(sorted(m for m in sys.modules if m == 'dagster' or m.startswith('dagster.'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"core loaded Dagster: {out.stdout.strip()[:300]}"
