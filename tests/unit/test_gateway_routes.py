"""Deny by default, from the live route table: the server's own app (KServe's routes and ours, built by
workloads.serving.__main__.build_app) is walked, and every route must have a decision.

The attack it stops: a route that reaches the model or its data without a key (KServe's repository unload, the
OpenAPI schema, metadata and metrics that name versions, run ids and the audit store). A route added later (a
KServe upgrade, a new handler) without a decision makes the server refuse to start, and this test fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from workloads.serving.routes import DECISIONS, OPEN, REMOVED, SCOPES, LiveRoute, resolve

REPO = Path(__file__).resolve().parents[2]

# Builds the real app in a fresh interpreter (KServe's app is a process-wide object) with a stand-in model, and
# prints every live route with its decision; `extra` adds a route the way a later change would.
SCRIPT = r"""
import json, sys
sys.argv = sys.argv[:1]
import kserve
from core.server_config import ServerConfig
from workloads.serving.__main__ import build_app
from workloads.serving.metrics import Metrics
from workloads.serving.routes import RouteTableError, live_routes

class Stub(kserve.Model):
    def __init__(self):
        super().__init__("loans")
        self.ready = True

async def handler(request=None):
    return None

cfg = ServerConfig(spec="loans", tracking_uri="x", audit_url="y", numeric={"income": None})
app = build_app(cfg, Stub(), Metrics(), {}, handler, handler)
if EXTRA:
    app.add_api_route("/debug/dump", handler, methods=["GET"])
try:
    print(json.dumps([[r.path, sorted(r.methods), r.decision] for r in live_routes(app)]))
except RouteTableError as exc:
    print("REFUSED", exc)
"""


def _routes(extra: bool) -> str:
    done = subprocess.run([sys.executable, "-c", SCRIPT.replace("EXTRA", str(extra))], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                                                       "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def live() -> list[tuple[str, list[str], str]]:
    return [tuple(r) for r in json.loads(_routes(extra=False))]


def test_every_live_route_has_a_decision_and_only_health_is_open(live):
    paths = {p for p, _, _ in live}
    assert paths <= set(DECISIONS), paths - set(DECISIONS)
    assert all(d in (OPEN, REMOVED, *SCOPES) for _, _, d in live)
    assert {p for p, _, d in live if d == OPEN} == {"/v2/health/live", "/v2/health/ready",
                                                    "/v2/models/{model_name}/ready"}
    # The model's repository (unload: only a restart brings it back) and the generated schema are gone.
    for path in ("/v2/repository/models/{model_name}/unload", "/v2/repository/models/{model_name}/load",
                 "/openapi.json", "/"):
        assert (path, REMOVED) in {(p, d) for p, _, d in live}, path
    decided = {p: d for p, _, d in live}
    assert decided["/v1/models/{model_name}:predict"] == decided["/v2/models/{model_name}/infer"] == "predict"
    assert decided["/v1/models/{model_name}:explain"] == "explain"
    assert decided["/v2/models/{name}/outcomes"] == "outcomes"
    assert {decided[p] for p in ("/metrics", "/intelligentops/status", "/v2", "/v2/models/{model_name}")} == {"read"}


def test_a_route_added_without_a_decision_refuses_to_start():
    out = _routes(extra=True)
    assert out.startswith("REFUSED") and "'/debug/dump'" in out and "have no access decision" in out


def test_the_gateway_resolves_requests_as_the_app_matches_them(live):
    from starlette.routing import compile_path

    routes = [LiveRoute(p, frozenset(m), compile_path(p)[0], d) for p, m, d in live]
    assert resolve(routes, "POST", "/v1/models/loans:predict").decision == "predict"
    assert resolve(routes, "GET", "/v1/models/loans:predict").decision == "read"  # the model-ready route
    assert resolve(routes, "POST", "/v2/repository/models/loans/unload") == 404  # removed: as if it never existed
    assert resolve(routes, "GET", "/openapi.json") == 404 and resolve(routes, "GET", "/docs") == 404
    assert resolve(routes, "DELETE", "/v2/health/live") == 405
    assert resolve(routes, "GET", "/v2/models/loans/infer\nx") == 404
    found = resolve(routes, "POST", "/v2/models/loans/outcomes")
    assert found.decision == "outcomes" and found.params == {"name": "loans"}
