"""``POST /generate``: submit a job and wait for its images, or return 202 + Location."""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse

from service.api.auth import CallerDep
from service.api.deps import ServiceDep, record_view
from service.messages import JobRequest

router = APIRouter(tags=["generate"])


@router.post("/generate", summary="Generate images (sync, or async with 202)")
async def generate(
    body: JobRequest,
    svc: ServiceDep,
    caller: CallerDep,
    prefer: Annotated[str | None, Header()] = None,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONResponse:
    record = await svc.submit(body, idempotency_key, caller)
    if body.async_ or (prefer and "respond-async" in prefer.lower()):
        return JSONResponse(
            record_view(record), status_code=202, headers={"Location": f"/jobs/{record.id}"}
        )
    final, result = await svc.wait_done(record)
    images = [base64.b64encode(image).decode() for image in result.images]
    return JSONResponse(
        record_view(final) | {"content_type": result.content_type, "images": images}
    )
