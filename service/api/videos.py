"""``/v1/videos``: an OpenAI-style asynchronous video API over the ordinary jobs.

``POST`` queues a job and returns a video object at once; ``GET`` shows it (status queued,
in_progress, completed or failed; progress 0-100), ``/content`` returns the MP4 when it is
complete, ``DELETE`` cancels it. The prompt is a text model's prompt, or a class model's class
label or name, as for /v1/images. A job made here is an ordinary job (``/jobs/{id}`` shows it);
this router shows only video jobs.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header
from fastapi.responses import Response
from pydantic import BaseModel, Field, ValidationError

from model.errors import FieldError
from model.registry import ModelInfo
from service import errors
from service.api.auth import Caller, CallerDep
from service.api.deps import Service, ServiceDep, prompt_fields
from service.messages import DEFAULT_FPS, MAX_FPS, JobRecord, JobRequest, JobStatus
from service.request import Prompt

router = APIRouter(prefix="/v1/videos", tags=["openai"])

STATUS = {  # job status -> what OpenAI's video object says
    JobStatus.QUEUED: "queued",
    JobStatus.RUNNING: "in_progress",
    JobStatus.DONE: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "failed",
    JobStatus.EXPIRED: "failed",
}


class OpenAIVideoRequest(BaseModel):
    model_config = {"extra": "forbid"}

    prompt: Prompt = Field(
        ..., description="Text models: the prompt. Class models: a class label or name."
    )
    model: str | None = Field(
        None, description="A served video model; None: the first that takes the prompt."
    )
    seconds: float | None = Field(
        None, gt=0, description="Clip length: the model's frames over this; None: at 8 fps."
    )
    size: str | None = Field(None, description="WxH; must be the model's size")
    # Extensions: generation parameters as POST /generate takes them (None: its defaults).
    seed: int | None = None
    steps: int | None = None
    cache_interval: int | None = None
    guidance_scale: float | None = None


def _job_request(body: OpenAIVideoRequest, info: ModelInfo, timeout_s: float) -> JobRequest:
    """The ordinary job request; out-of-range extension values raise FieldError naming them."""
    side = info.image_size
    if body.size is not None and body.size != f"{side}x{side}":
        raise FieldError("size", f"this model makes {side}x{side} videos, got {body.size!r}")
    fps = DEFAULT_FPS if body.seconds is None else info.num_frames / body.seconds
    if fps > MAX_FPS:
        raise FieldError(
            "seconds",
            f"{info.num_frames} frames need at least {info.num_frames / MAX_FPS:g} seconds "
            f"(at most {MAX_FPS:g} fps), got {body.seconds:g}",
        )
    extensions = ("seed", "steps", "cache_interval", "guidance_scale")
    values = {k: getattr(body, k) for k in extensions if getattr(body, k) is not None}
    try:
        return JobRequest(
            model=info.name,
            **prompt_fields(info, body.prompt),
            output_format="mp4",
            fps=fps,
            timeout_s=timeout_s,
            **values,
        )
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise FieldError(field, first["msg"]) from None


def video_view(record: JobRecord, info: ModelInfo) -> dict[str, Any]:
    """A job as OpenAI's video object: status, progress 0-100, seconds as a string."""
    fps = record.request.get("fps") or DEFAULT_FPS
    view: dict[str, Any] = {
        "id": record.id,
        "object": "video",
        "model": record.model,
        "status": STATUS[record.status],
        "progress": 100 * record.step // record.total_steps if record.total_steps else 0,
        "created_at": int(record.created_at),
        "seconds": f"{info.num_frames / fps:g}",
        "size": f"{info.image_size}x{info.image_size}",
    }
    if record.status is JobStatus.DONE:
        view["progress"] = 100
    if STATUS[record.status] == "failed":  # cancelled and expired too: the code says which
        view["error"] = record.error or {
            "code": record.status.value,
            "message": f"job {record.id} {record.status.value}",
        }
    return view


async def _video_job(svc: Service, video_id: str, caller: Caller) -> tuple[JobRecord, ModelInfo]:
    """The job and its model; a job of an image model is not a video: JobNotFound."""
    record = await svc.known(video_id, caller)
    info = svc.models.get(record.request.get("model") or "")
    if info is None or info.kind != "video":
        raise errors.JobNotFound(video_id, f"no video {video_id}")
    return record, info


@router.post("", summary="Queue a video (OpenAI-style; prompt = class)")
async def create_video(
    body: OpenAIVideoRequest,
    svc: ServiceDep,
    caller: CallerDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> dict[str, Any]:
    info = svc.openai_model(body.model, "video", body.prompt)
    request = _job_request(body, info, svc.settings.default_timeout_s)
    return video_view(await svc.submit(request, idempotency_key, caller), info)


@router.get("/{video_id}", summary="A video job: status and progress")
async def get_video(video_id: str, svc: ServiceDep, caller: CallerDep) -> dict[str, Any]:
    return video_view(*await _video_job(svc, video_id, caller))


@router.get("/{video_id}/content", summary="The MP4 of a completed video")
async def video_content(video_id: str, svc: ServiceDep, caller: CallerDep) -> Response:
    record, _ = await _video_job(svc, video_id, caller)
    result = await svc.result(record)
    return Response(result.images[0], media_type=result.content_type)


@router.delete("/{video_id}", summary="Cancel: queued never starts, running stops at its next step")
async def delete_video(video_id: str, svc: ServiceDep, caller: CallerDep) -> dict[str, Any]:
    _, info = await _video_job(svc, video_id, caller)
    return video_view(await svc.cancel(video_id, caller), info) | {"deleted": True}
