"""Helpers for tests (importable as `support`: pyproject puts tests/ on pytest's path)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import dagster as dg
import yaml
from http.server import BaseHTTPRequestHandler

REPO = Path(__file__).resolve().parents[1]
PIPELINES = REPO / "pipelines"


def shipped_spec(name: str) -> dict:
    return yaml.safe_load((PIPELINES / f"{name}.yaml").read_text())


def write_spec(folder: Path, spec: dict, file_name: str | None = None) -> Path:
    path = folder / (file_name or f"{spec['name']}.yaml")
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def copy_shipped(folder: Path, *names: str) -> None:
    """Shipped specs, with the notice template each names."""
    for n in names:
        shutil.copy(PIPELINES / f"{n}.yaml", folder / f"{n}.yaml")
        template = (shipped_spec(n).get("notices") or {}).get("template")
        if template:
            shutil.copy(PIPELINES / template, folder / template)


def materialize(defs: dg.Definitions, instance, selection: str | dg.AssetSelection, raise_on_error: bool = False,
                run_config: dict | None = None) -> dg.ExecuteInProcessResult:
    """Materialize a selection of `defs` (assets plus their checks) on a real instance."""
    sel = dg.AssetSelection.from_string(selection) if isinstance(selection, str) else selection
    all_defs = [*defs.assets, *(defs.asset_checks or [])]
    return dg.materialize(all_defs, selection=sel, resources=defs.resources, instance=instance,
                          raise_on_error=raise_on_error, run_config=run_config)


def failure_text(result: dg.ExecuteInProcessResult) -> str:
    """Every step failure's message, with the chain of causes, as one string."""
    parts: list[str] = []
    for event in result.all_events:
        if event.event_type_value != "STEP_FAILURE":
            continue
        err = event.event_specific_data.error
        while err is not None:
            parts.append(err.message)
            err = err.cause
    return "\n".join(parts)


def load_workload(name: str):
    """A program of workloads/ as a module (nothing in the code location imports them; tests may)."""
    spec = importlib.util.spec_from_file_location(f"intelligentops_{name}", REPO / "workloads" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class JsonHandler(BaseHTTPRequestHandler):
    """Base of the tests' small loopback HTTP stand-ins: quiet, and answers JSON."""

    def log_message(self, *_args) -> None:  # keep pytest's output clean
        pass

    def send_json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
