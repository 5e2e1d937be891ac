"""``POST /generate``: submit a job and wait for its images (base64, or signed URLs with
``response_format: "url"``; a client that leaves first cancels it), or return 202 + Location."""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from service.api.auth import CallerDep
from service.api.deps import ClientGoneDep, ServiceDep, record_view
from service.api.files import result_urls
from service.messages import JobRequest

router = APIRouter(tags=["generate"])


@router.post("/generate", summary="Generate images (sync, or async with 202)")
async def generate(
    body: JobRequest,
    request: Request,
    svc: ServiceDep,
    caller: CallerDep,
    gone: ClientGoneDep,
    prefer: Annotated[str | None, Header()] = None,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONResponse:
    if body.async_ or (prefer and "respond-async" in prefer.lower()):
        record = await svc.submit(body, idempotency_key, caller)
        return JSONResponse(
            record_view(record), status_code=202, headers={"Location": f"/jobs/{record.id}"}
        )
    # Waits; a client that disconnects first cancels the job (SKIPDIT_CANCEL_ON_DISCONNECT).
    final, result = await svc.submit_and_wait(body, idempotency_key, caller, gone)
    view = record_view(final) | {"content_type": result.content_type}
    if body.response_format == "url":
        return JSONResponse(view | result_urls(svc, request, final, len(result.images)))
    images = [base64.b64encode(image).decode() for image in result.images]
    return JSONResponse(view | {"images": images})
