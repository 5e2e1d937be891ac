"""``/jobs/{id}``: status, result bytes, server-sent progress events, cancellation."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from model.errors import FieldError
from service import errors
from service.api.auth import CallerDep
from service.api.deps import ServiceDep, record_view
from service.api.files import done_urls

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.get("/{job_id}", summary="Job status and progress (and, done, its result URLs)")
async def job(job_id: str, request: Request, svc: ServiceDep, caller: CallerDep) -> dict[str, Any]:
    record = await svc.known(job_id, caller)
    return record_view(record) | done_urls(svc, request, record)


@router.get("/{job_id}/result", summary="One generated image (or video), as bytes")
async def job_result(
    job_id: str, svc: ServiceDep, caller: CallerDep, index: Annotated[int, Query(ge=0)] = 0
) -> Response:
    result = await svc.result(await svc.known(job_id, caller))
    if index >= len(result.images):
        raise FieldError("index", f"must be < {len(result.images)}")
    return Response(result.images[index], media_type=result.content_type)


@router.get("/{job_id}/events", summary="Server-sent events until the job ends")
async def job_events(job_id: str, svc: ServiceDep, caller: CallerDep) -> StreamingResponse:
    await svc.known(job_id, caller)

    async def stream() -> AsyncIterator[str]:
        try:
            async for event in svc.backend.events(job_id):
                yield f"event: {event.type}\ndata: {json.dumps(event.to_dict())}\n\n"
        except errors.BackendUnavailable as e:
            payload = json.dumps({"type": "error", "message": str(e)})
            yield f"event: error\ndata: {payload}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


@router.delete("/{job_id}", summary="Cancel: queued jobs never start, running ones stop")
async def cancel(job_id: str, svc: ServiceDep, caller: CallerDep) -> JSONResponse:
    record = await svc.cancel(job_id, caller)
    return JSONResponse(record_view(record), status_code=200 if record.status.terminal else 202)
