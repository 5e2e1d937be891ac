"""Every error type the API can answer with, mapped to its HTTP status and code once.

The body is always ``{"error": {"code", "message", "field"?}}``.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from model.errors import FieldError
from service import errors
from service.metrics import NO_MODEL

# type -> (status, code); looked up along the raised type's MRO.
STATUS: dict[type[Exception], tuple[int, str]] = {
    FieldError: (422, "invalid_request"),
    errors.Unauthorized: (401, "unauthorized"),
    errors.Forbidden: (403, "forbidden"),
    errors.JobNotFound: (404, "not_found"),
    errors.FileNotFound: (404, "not_found"),
    errors.ResultNotReady: (409, "not_ready"),
    errors.JobCancelled: (409, "cancelled"),
    errors.ResultExpired: (410, "expired"),
    errors.QueueFull: (429, "queue_full"),
    errors.RateLimited: (429, "rate_limited"),
    errors.GenerationFailed: (500, "generation_failed"),
    errors.BackendUnavailable: (503, "backend_unavailable"),
    errors.WorkerStopped: (503, "worker_stopped"),
    errors.DeadlineExceeded: (504, "deadline_exceeded"),
}


def error_response(
    status: int, code: str, message: str, field: str | None = None, headers: Any = None
) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        body["field"] = field
    return JSONResponse({"error": body}, status_code=status, headers=headers)


async def _typed(request: Request, e: Exception) -> JSONResponse:
    status, code = next(STATUS[t] for t in type(e).__mro__ if t in STATUS)
    headers = None
    if isinstance(e, errors.QueueFull | errors.RateLimited):
        headers = {"Retry-After": str(max(1, math.ceil(e.retry_after)))}
    if isinstance(e, errors.Unauthorized):
        headers = {"WWW-Authenticate": 'Bearer realm="skipdit"'}
    if isinstance(e, errors.BackendUnavailable):  # other failures are counted by the worker
        request.app.state.service.metrics.errors.labels(NO_MODEL, code).inc()
    return error_response(status, code, str(e), getattr(e, "field", None), headers)


async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0]
    if first["type"] == "json_invalid":  # its loc is the byte offset: name the body instead
        reason = first.get("ctx", {}).get("error", first["msg"])
        return error_response(422, "invalid_request", f"body: not valid JSON ({reason})", "body")
    loc = [str(p) for p in first["loc"] if p not in ("body", "query", "header", "path")]
    field = ".".join(loc) or "body"
    return error_response(422, "invalid_request", f"{field}: {first['msg']}", field)


def install(app: FastAPI) -> None:
    """Register one handler for every mapped type and for request validation."""
    for error_type in STATUS:
        app.add_exception_handler(error_type, _typed)
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]  # starlette types every handler for Exception; this one gets RequestValidationError only
