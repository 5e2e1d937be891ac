"""``GET /files/{token}``: a finished job's sample by its signed URL (``service/urls.py``), with no
API key, until the job's result expires; and the URLs a request with ``response_format: "url"``
gets.

404 for anything that is not a genuine token of this deployment (the answer never says which
part failed), 410 once the token's expiry has passed or the result is gone from the backend.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service import errors
from service.api.deps import Service, ServiceDep
from service.images import CONTENT_TYPES
from service.messages import JobRecord, JobStatus
from service.urls import FileRef
from service.video import VIDEO_CONTENT_TYPES

router = APIRouter(tags=["files"])

EXTENSIONS = {kind: fmt for fmt, kind in (CONTENT_TYPES | VIDEO_CONTENT_TYPES).items()}
EXTENSIONS["image/jpeg"] = "jpg"
SAMPLE_TYPES = sorted({*CONTENT_TYPES.values(), *VIDEO_CONTENT_TYPES.values()})


def wants_urls(record: JobRecord) -> bool:
    return record.request.get("response_format") == "url"


def result_urls(svc: Service, request: Request, record: JobRecord, count: int) -> dict[str, Any]:
    """The answer's ``urls`` (one per sample, absolute: SKIPDIT_PUBLIC_URL or the request's
    base URL) and ``urls_expire_at`` (Unix seconds: when the result expires, counted from the
    job's end)."""
    assert svc.urls is not None and record.finished_at is not None, "a done job, URLs on"
    expires = math.floor(record.finished_at + svc.settings.result_ttl_s)
    base = svc.settings.public_url or str(request.base_url).rstrip("/")
    tokens = [svc.urls.sign(FileRef(record.id, i, expires)) for i in range(count)]
    return {"urls": [f"{base}/files/{token}" for token in tokens], "urls_expire_at": expires}


def done_urls(svc: Service, request: Request, record: JobRecord) -> dict[str, Any]:
    """``result_urls`` for a record as GET /jobs/{id} shows it: for a done job that asked for
    URLs (one per requested sample), else nothing."""
    if record.status is not JobStatus.DONE or not wants_urls(record) or svc.urls is None:
        return {}
    return result_urls(svc, request, record, int(record.request.get("num_images") or 1))


@router.get(
    "/files/{token}",
    summary="A result by its signed URL (no API key; until the result expires)",
    response_class=Response,
    responses={
        200: {
            "description": "The sample's bytes, as the job produced them",
            "content": {kind: {} for kind in SAMPLE_TYPES},
        },
        404: {"description": "Not a genuine URL of this deployment"},
        410: {"description": "The URL has expired, or the result is gone"},
    },
)
async def file(token: str, svc: ServiceDep) -> Response:
    ref = svc.urls.verify(token) if svc.urls is not None else None
    if ref is None:
        raise errors.FileNotFound()
    now = svc.backend.clock()
    if now >= ref.expires:
        raise errors.ResultExpired("this URL has expired")
    result = await svc.backend.get_result(ref.job_id)
    if result is None:
        raise errors.ResultExpired("this URL's result has expired")
    if ref.index >= len(result.images):  # signed for a sample the job never made
        raise errors.FileNotFound()
    name = f"skipdit-{ref.index}.{EXTENSIONS.get(result.content_type, 'bin')}"
    headers = {
        "Cache-Control": f"private, max-age={max(0, math.floor(ref.expires - now))}",
        "Content-Disposition": f'inline; filename="{name}"',
        "X-Content-Type-Options": "nosniff",
    }
    return Response(result.images[ref.index], media_type=result.content_type, headers=headers)
