"""Outcomes: what really happened for earlier decisions, `POST /v2/models/<spec>/outcomes` with
`{"outcomes": [{"decision_id": "...", "outcome": 0 or 1, "reason": "optional text"}, ...]}`.

Only a key with the `outcomes` scope reaches this route (workloads/serving/routes.py; the deployment's own
`operator.key` has it). At most `max_outcomes_per_request` items per request (413 above). Every item is
checked (a decision of this model on the audit log, an outcome of 0 or 1, a short reason) before any is
recorded, so a bad report records nothing and its error names the item. The parsing and the database work run
on a worker thread, never on the event loop, so a large report cannot stall liveness or inference. The store
gets the reporting key's id and each item's reason (`store_outcomes`).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from core.audit import AuditError, AuditStore
from core.audit.outcomes import OutcomeConflict, OutcomeReport, UnknownDecision
from core.names import KEY_ID_HEADER

MAX_REASON_CHARS = 500


class OutcomeError(ValueError):
    """An outcome report that cannot be recorded; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def store_outcomes(store: AuditStore, spec: str, reports: list[OutcomeReport], key_id: str | None) -> int:
    """Append checked reports to the audit store's outcome chain with the reporting key's id, all or none.

    A decision not on the log (or of another model) is a 404 and a different outcome for a decision that has one,
    sent without the reason a correction needs, a 409; the store's message names the item."""
    try:
        store.record_outcomes(reports, key_id, spec=spec)
    except UnknownDecision as exc:
        raise OutcomeError(str(exc), status=404) from None
    except OutcomeConflict as exc:
        raise OutcomeError(str(exc), status=409) from None
    except AuditError as exc:
        raise OutcomeError(str(exc), status=400) from None
    return len(reports)


def parse_report(body: bytes, max_items: int) -> list[OutcomeReport]:
    """The items of a report, each checked for shape; the first problem names the item."""
    try:
        items = json.loads(body or b"{}").get("outcomes")
    except (ValueError, AttributeError):
        raise OutcomeError('body must be JSON {"outcomes": [{"decision_id": ..., "outcome": 0 or 1}]}') from None
    if not isinstance(items, list) or not items:
        raise OutcomeError('"outcomes" must be a non-empty list of {"decision_id", "outcome"}')
    if len(items) > max_items:
        raise OutcomeError(f"{len(items)} outcomes in one request; at most {max_items} "
                           "(deployment.max_outcomes_per_request): send them in several requests", status=413)
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("decision_id"), str) or \
                not 0 < len(item["decision_id"]) <= 64:
            raise OutcomeError(f"outcomes[{i}]: decision_id (a string of at most 64 characters) is required")
        if item.get("outcome") not in (0, 1) or isinstance(item.get("outcome"), bool):
            raise OutcomeError(f"outcomes[{i}].outcome must be 0 or 1")
        reason = item.get("reason")
        if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS):
            raise OutcomeError(f"outcomes[{i}].reason must be text of at most {MAX_REASON_CHARS} characters")
        unknown = sorted(set(item) - {"decision_id", "outcome", "reason"})
        if unknown:
            raise OutcomeError(f"outcomes[{i}]: unknown field(s) {[u[:30] for u in unknown[:5]]}")
        out.append(OutcomeReport(item["decision_id"], int(item["outcome"]), reason))
    return out


def record_outcomes(store: AuditStore, spec: str, model: str, body: bytes, key_id: str | None = None,
                    max_items: int = 1000) -> int:
    """Validate and record a report; every problem names the item. Returns how many were recorded."""
    if model != spec:
        raise OutcomeError("no model of that name is served here", status=404)
    return store_outcomes(store, spec, parse_report(body, max_items), key_id)


def outcomes_endpoint(store: AuditStore, spec: str, max_items: int = 1000) -> Callable[[Any], Awaitable[Any]]:
    """A plain Starlette handler for the route `/v2/models/{name}/outcomes`: it takes the request as it is, with
    no FastAPI parameter inference, and does its work on a worker thread."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse

    async def outcomes(request) -> JSONResponse:
        body = await request.body()
        try:
            recorded = await run_in_threadpool(record_outcomes, store, spec, request.path_params["name"], body,
                                               request.headers.get(KEY_ID_HEADER), max_items)
        except OutcomeError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        return JSONResponse({"recorded": recorded})

    return outcomes
