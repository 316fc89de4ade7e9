"""Outcomes: what really happened for earlier decisions, `POST /v2/models/<spec>/outcomes` with
`{"outcomes": [{"decision_id": "...", "outcome": 0 or 1}, ...]}`.

Every item is checked (a decision of this model on the audit log, an outcome of 0 or 1) before any is recorded,
so a bad report records nothing and its error names the item. Outcomes live beside the hash chain, never in it;
the drift sensor turns them into a live AUC. The route sits behind the same gateway as inference.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from core.audit import AuditStore


class OutcomeError(ValueError):
    """An outcome report that cannot be recorded; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def record_outcomes(store: AuditStore, spec: str, model: str, body: bytes) -> int:
    """Validate and record a batch of outcomes; every problem names the item. Returns how many were recorded."""
    if model != spec:
        raise OutcomeError(f"this server serves model {spec!r}, not {model!r}", status=404)
    try:
        items = json.loads(body or b"{}").get("outcomes")
    except (ValueError, AttributeError):
        raise OutcomeError('body must be JSON {"outcomes": [{"decision_id": ..., "outcome": 0 or 1}]}', status=400)
    if not isinstance(items, list) or not items:
        raise OutcomeError('"outcomes" must be a non-empty list of {"decision_id", "outcome"}', status=400)
    checked = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("decision_id"), str):
            raise OutcomeError(f"outcomes[{i}]: decision_id (a string) is required", status=400)
        if item.get("outcome") not in (0, 1) or isinstance(item.get("outcome"), bool):
            raise OutcomeError(f"outcomes[{i}].outcome must be 0 or 1, not {item.get('outcome')!r}", status=400)
        record = store.get(item["decision_id"])
        if record is None or record.spec != spec:
            raise OutcomeError(f"outcomes[{i}]: no decision {item['decision_id']!r} of model {spec!r} on the "
                               "audit log", status=404)
        checked.append((item["decision_id"], int(item["outcome"])))
    for decision_id, outcome in checked:
        store.record_outcome(decision_id, outcome)
    return len(checked)


def outcomes_endpoint(store: AuditStore, spec: str) -> Callable[[Any], Awaitable[Any]]:
    """A plain Starlette handler for the route `/v2/models/{name}/outcomes`: it takes the request as it is, with
    no FastAPI parameter inference."""
    from starlette.responses import JSONResponse

    async def outcomes(request) -> JSONResponse:
        try:
            recorded = record_outcomes(store, spec, request.path_params["name"], await request.body())
        except OutcomeError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        return JSONResponse({"recorded": recorded})

    return outcomes
