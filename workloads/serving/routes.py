"""Deny by default: every route of the live app has a decision, taken from this table when the server starts.

KServe registers its routes when its REST server builds the app; the project adds its own (status, outcomes).
`apply_decisions(app)` walks the app's route table: a route the table marks REMOVED leaves the app, every other
route must be OPEN or need one scope, and a route the table does not know stops the server from starting
(`RouteTableError`), so a route added later (a KServe upgrade, a new handler) cannot go live unguarded.
`tests/unit/test_gateway_routes.py` walks the real app the same way.

Scopes (a key's `scopes` in the keys file; an entry without them has predict and explain):

| scope | routes |
| --- | --- |
| (open) | `GET /v2/health/live`, `GET /v2/health/ready`, `GET /v2/models/{name}/ready` (the InferenceService's readiness probe) |
| predict | `POST /v1/models/{name}:predict`, `POST /v2/models/{name}/infer` |
| explain | `POST /v1/models/{name}:explain` |
| outcomes | `POST /v2/models/{name}/outcomes` |
| read | `GET /metrics`, `/intelligentops/status`, `/v2`, `/v2/models`, `/v2/models/{name}`, `/v1/models`, `/v1/models/{name}` |
| admin | no route today: KServe's repository load and unload are removed (an unloaded model needs a restart) |

Removed: `/` (a second liveness route), `/openapi.json`, `/docs`, `/redoc` (the API's shape is in
docs/serving.md), the versioned v2 routes (KServe answers them "not implemented"), and the repository routes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

OPEN = "open"
REMOVED = "removed"
SCOPES = ("predict", "explain", "outcomes", "read", "admin")
DEFAULT_SCOPES = ("predict", "explain")

# (path template as the app spells it) -> decision. Methods are the route's own; a path decides them all.
DECISIONS: dict[str, str] = {
    "/v2/health/live": OPEN,
    "/v2/health/ready": OPEN,
    "/v2/models/{model_name}/ready": OPEN,
    "/v1/models/{model_name}:predict": "predict",
    "/v2/models/{model_name}/infer": "predict",
    "/v1/models/{model_name}:explain": "explain",
    "/v2/models/{name}/outcomes": "outcomes",
    "/metrics": "read",
    "/intelligentops/status": "read",
    "/v2": "read",
    "/v2/models": "read",
    "/v2/models/{model_name}": "read",
    "/v1/models": "read",
    "/v1/models/{model_name}": "read",
    "/": REMOVED,
    "/openapi.json": REMOVED,
    "/docs": REMOVED,
    "/docs/oauth2-redirect": REMOVED,
    "/redoc": REMOVED,
    "/v2/models/{model_name}/versions/{model_version}": REMOVED,
    "/v2/models/{model_name}/versions/{model_version}/ready": REMOVED,
    "/v2/models/{model_name}/versions/{model_version}/infer": REMOVED,
    "/v2/repository/models/{model_name}/load": REMOVED,
    "/v2/repository/models/{model_name}/unload": REMOVED,
}
# The routes whose work is scoring: bounded per client in flight (the gateway) and interleaved (batching).
SCORING_SCOPES = ("predict", "explain")


class RouteTableError(RuntimeError):
    """The app has a route that no decision covers: the server refuses to start rather than serve it unguarded."""


@dataclass(frozen=True)
class Resolved:
    """What a request asks for: the route's decision, and its path parameters (the model name)."""

    decision: str  # OPEN or a scope
    params: dict[str, Any]


def route_path(route: Any) -> str:
    return str(getattr(route, "path", getattr(route, "path_format", "")))


def apply_decisions(app: Any, decisions: dict[str, str] = DECISIONS) -> dict[str, str]:
    """Remove the REMOVED routes from `app`; refuse if any route is left without a decision. Returns the live
    table (path -> decision) the gateway enforces."""
    undecided = sorted({route_path(r) for r in app.router.routes if route_path(r) not in decisions})
    if undecided:
        raise RouteTableError(f"route(s) {undecided} have no access decision in workloads/serving/routes.py "
                              "(DECISIONS): give each one OPEN, a scope, or REMOVED before it can be served")
    app.router.routes[:] = [r for r in app.router.routes if decisions[route_path(r)] != REMOVED]
    # FastAPI would serve its generated schema again if asked to rebuild it; it is off for good.
    app.openapi_url = app.docs_url = app.redoc_url = None
    return {route_path(r): decisions[route_path(r)] for r in app.router.routes}


def resolve(app: Any, scope: dict[str, Any], decisions: dict[str, str] = DECISIONS) -> Resolved | int:
    """The decision for a request, or the status to refuse it with: 404 when no route has its path, 405 when
    one has the path but not the method. Matching is the app's own (Starlette's), so it cannot disagree with
    the route that would run."""
    from starlette.routing import Match

    partial = False
    for route in app.router.routes:
        match, child = route.matches(scope)
        if match == Match.FULL:
            return Resolved(decision=decisions.get(route_path(route), REMOVED),
                            params=dict(child.get("path_params", {})))
        partial = partial or match == Match.PARTIAL
    return 405 if partial else 404
