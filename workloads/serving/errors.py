"""Error answers that never echo the request and never name Python internals.

KServe's own exception handlers log a full traceback for every rejected request and answer a 500 with the
exception's class name; FastAPI's validation error (422) repeats the whole body it could not parse.
`install_error_handlers(app)` replaces them all: a client's mistake (KServe's InvalidInput, a model it does not
serve, a body that does not fit the route's schema) is a 4xx with a message and no traceback in the log (the
gateway logs one structured line for it); anything else is a 500 that says only "internal error" and a
reference, the traceback kept in the server's log under that reference.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

log = logging.getLogger("intelligentops.serving")


def _json(status: int, message: str, headers: dict[str, str] | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=headers)


def validation_message(errors: list[dict[str, Any]]) -> str:
    """Where a body does not fit the route's schema: the location and the rule, never the value sent."""
    parts = []
    for err in errors[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc or 'body'}: {str(err.get('msg', 'invalid'))[:120]}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "the body does not fit this route's schema: " + "; ".join(parts) + more


def install_error_handlers(app: Any) -> None:
    """Replace KServe's and FastAPI's handlers on `app` (after KServe has added its own)."""
    from fastapi.exceptions import RequestValidationError
    from kserve.errors import (
        InferenceError,
        InvalidInput,
        ModelNotFound,
        ModelNotReady,
        ServerNotLive,
        ServerNotReady,
        UnsupportedProtocol,
    )
    from starlette.exceptions import HTTPException

    async def invalid_input(_request, exc):
        return _json(400, str(getattr(exc, "reason", None) or exc)[:2000])

    async def not_found(_request, _exc):
        return _json(404, "no model of that name is served here")

    async def not_ready(_request, _exc):
        return _json(503, "not ready", {"retry-after": "1"})

    async def unsupported(_request, _exc):
        return _json(501, "not supported by this server")

    async def schema(_request, exc):
        return _json(422, validation_message(exc.errors()))

    async def http_error(_request, exc):
        return _json(exc.status_code, "no such route" if exc.status_code == 404 else "request refused")

    async def internal(_request, exc):
        ref = uuid.uuid4().hex[:12]
        log.error("internal error (ref %s)", ref, exc_info=exc)
        return _json(500, f"internal error (ref {ref}); the server's log has the details")

    handlers = {InvalidInput: invalid_input, ModelNotFound: not_found, ModelNotReady: not_ready,
                ServerNotReady: not_ready, ServerNotLive: not_ready, UnsupportedProtocol: unsupported,
                NotImplementedError: unsupported, RequestValidationError: schema, HTTPException: http_error,
                InferenceError: internal, Exception: internal}
    for exc_class, handler in handlers.items():
        app.add_exception_handler(exc_class, handler)
