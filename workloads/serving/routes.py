"""Deny by default: every route of the live app has a decision, taken from this table when the server starts.

KServe registers its routes when its REST server builds the app; the project adds its own (status, outcomes).
`live_routes(app)` walks the app's route table (routers included): every route must be OPEN, need one scope, or
be REMOVED (the gateway answers 404 for it, as for a path that does not exist), and a route the table does not
know stops the server from starting (`RouteTableError`), so a route added later (a KServe upgrade, a new
handler) cannot go live unguarded. The gateway (workloads/serving/gateway.py) resolves every request against
that list before any handler runs. `tests/unit/test_gateway_routes.py` walks the real app the same way.

Scopes (a key's `scopes` in the keys file; an entry without them has predict and explain):

| scope | routes |
| --- | --- |
| (open) | `GET /v2/health/live`, `GET /v2/health/ready`, `GET /v2/models/{name}/ready` (the InferenceService's readiness probe) |
| predict | `POST /v1/models/{name}:predict`, `POST /v2/models/{name}/infer` |
| explain | `POST /v1/models/{name}:explain` |
| outcomes | `POST /v2/models/{name}/outcomes` |
| read | `GET /metrics`, `/intelligentops/status`, `/v2`, `/v2/models`, `/v2/models/{name}`, `/v1/models`, `/v1/models/{name}` |
| admin | no route today: KServe's repository load and unload are removed (an unloaded model needs a restart) |
| similar_cases | no route: a field of the answer. Only a key with this scope gets `similar_cases` (the row ids of the nearest training cases by text; never decision ids of other applicants); everyone else gets `[]` |

Removed: `/` (a second liveness route), `/openapi.json`, `/docs`, `/redoc` (the API's shape is in
docs/serving.md), the versioned v2 routes (KServe answers them "not implemented"), and the repository routes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

OPEN = "open"
REMOVED = "removed"
SCOPES = ("predict", "explain", "outcomes", "read", "admin", "similar_cases")
SIMILAR_SCOPE = "similar_cases"  # gates a field of the answer, not a route
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
class LiveRoute:
    """One route of the live app as the gateway matches it: its path template, methods and decision."""

    path: str
    methods: frozenset[str]
    pattern: re.Pattern
    decision: str


@dataclass(frozen=True)
class Resolved:
    """What a request asks for: the route's decision, and its path parameters (the model name)."""

    decision: str  # OPEN, REMOVED or a scope
    params: dict[str, Any]


def live_routes(app: Any, decisions: dict[str, str] = DECISIONS) -> list[LiveRoute]:
    """Every route of `app` (routers included, in the order the app matches them) with its decision; refuses
    (`RouteTableError`) if any has none. A REMOVED route stays in the app but the gateway answers 404 for it as
    for a path that does not exist, so no request ever reaches it."""
    from fastapi.routing import iter_route_contexts
    from starlette.routing import compile_path

    routes, undecided = [], set()
    for ctx in iter_route_contexts(app.router.routes):
        path = ctx.path
        if not isinstance(path, str) or not path.startswith("/"):
            raise RouteTableError(f"a route of the app has no path the gateway can match ({ctx.original_route!r}); "
                                  "the route table cannot be decided: refusing to start")
        if path not in decisions:
            undecided.add(path)
            continue
        methods = getattr(ctx.original_route, "methods", None) or {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"}
        routes.append(LiveRoute(path=path, methods=frozenset(methods), pattern=compile_path(path)[0],
                                decision=decisions[path]))
    if undecided:
        raise RouteTableError(f"route(s) {sorted(undecided)} have no access decision in workloads/serving/routes.py "
                              "(DECISIONS): give each one OPEN, a scope, or REMOVED before it can be served")
    return routes


def disable_docs(app: Any) -> None:
    """FastAPI would build and serve its schema and docs pages again if asked; they are off for good."""
    app.openapi_url = app.docs_url = app.redoc_url = None


def resolve(routes: list[LiveRoute], method: str, path: str) -> Resolved | int:
    """The decision for a request, or the status to refuse it with: 404 when no route has its path (or only a
    REMOVED one does), 405 when one has the path but not the method. Routes are tried in the app's own order
    with the app's own path patterns, as Starlette's router does, so the gateway and the app agree on which
    route a request reaches."""
    partial = False
    for route in routes:
        match = route.pattern.match(path)
        if match is None:
            continue
        if method in route.methods:
            if route.decision == REMOVED:
                return 404
            return Resolved(decision=route.decision, params=match.groupdict())
        partial = partial or route.decision != REMOVED
    return 405 if partial else 404
