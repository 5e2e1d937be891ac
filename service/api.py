"""The HTTP API: ``build_app(settings)`` with a lifespan that owns the backend, model and worker.

Errors are JSON ``{"error": {"code", "message", "field"?}}``: 422 invalid input, 404 unknown
job, 409 not ready / cancelled, 410 expired result, 429 queue full (Retry-After), 503 not ready
or queue unreachable, 504 deadline passed, 500 generation failed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from model import cache, registry
from model.errors import FieldError
from model.pipeline import DEFAULT_GUIDANCE
from model.skip_dit import DiTConfig
from service.messages import JobRecord, JobRequest, JobStatus
from service.metrics import Metrics
from service.queue import make_backend
from service.queue.base import BackendUnavailable, QueueBackend, QueueFull
from service.settings import Settings
from service.worker import Worker, make_worker

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = headers


def _error(
    status: int, code: str, message: str, field: str | None = None, headers: Any = None
) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        body["field"] = field
    return JSONResponse({"error": body}, status_code=status, headers=headers)


@dataclass
class Service:
    """Everything a route needs; one per app, reached through ``Depends(service)``."""

    settings: Settings
    backend: QueueBackend
    metrics: Metrics
    model_name: str
    model_config: DiTConfig
    card: dict[str, Any]
    random_weights: bool
    worker: Worker | None = None
    worker_task: asyncio.Task | None = None

    @property
    def default_guidance(self) -> float:
        return float(self.card.get("default_guidance", DEFAULT_GUIDANCE))

    def check(self, body: JobRequest) -> None:
        """Checks that need the model or the deployment's limits; raise FieldError."""
        s = self.settings
        if body.model is not None and body.model != self.model_name:
            raise FieldError(
                "model", f"unknown model {body.model!r}; served: [{self.model_name!r}]"
            )
        if body.num_images > s.max_num_images:
            raise FieldError(
                "num_images", f"must be in [1, {s.max_num_images}], got {body.num_images}"
            )
        if body.steps > s.max_steps:
            raise FieldError("steps", f"must be in [1, {s.max_steps}], got {body.steps}")
        body.check_for(self.model_config)
        tokens = (
            body.rows_for(self.model_config, self.default_guidance) * self.model_config.num_tokens
        )
        if tokens > s.max_batch_tokens:
            raise FieldError(
                "num_images",
                f"{body.num_images} images need {tokens} tokens per step; the batch budget is "
                f"{s.max_batch_tokens}",
            )


def service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(service)]


# ----------------------------------------------------------------------------- bodies


class OpenAIImageRequest(BaseModel):
    model_config = {"extra": "forbid"}

    prompt: str = Field(..., min_length=1, max_length=1000)
    model: str | None = None
    n: int = Field(1, ge=1, le=16)
    size: str | None = Field(None, description="WxH; must be the model's size")
    response_format: Literal["b64_json"] = "b64_json"


def _record_view(record: JobRecord) -> dict[str, Any]:
    view = record.to_dict()
    view["progress"] = record.step / record.total_steps if record.total_steps else 0.0
    return view


# ----------------------------------------------------------------------------- app


def build_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics = Metrics()
        backend = make_backend(settings)
        name, config, card, random_weights = registry.describe(settings.model)
        if random_weights:
            log.warning("serving %s: RANDOM untrained weights, for smoke tests only", name)
        svc = Service(settings, backend, metrics, name, config, card, random_weights)
        if settings.embedded_worker:
            svc.worker = await asyncio.to_thread(make_worker, settings, backend, metrics)
            svc.worker_task = asyncio.create_task(svc.worker.run(), name="skipdit-worker")
        app.state.service = svc
        log.info("serving model %s with %s backend", name, backend.name)
        try:
            yield
        finally:
            if svc.worker is not None and svc.worker_task is not None:
                svc.worker.stop()
                await svc.worker_task
            await backend.close()

    app = FastAPI(
        title="skipdit-serve",
        version="0.1.0",
        description="Skip-DiT image generation with Skip-Cache, queued and step-batched.",
        lifespan=lifespan,
    )

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.code, e.message, e.field, e.headers)

    @app.exception_handler(FieldError)
    async def _field_error(request: Request, e: FieldError) -> JSONResponse:
        return _error(422, "invalid_request", str(e), e.field)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        loc = [str(p) for p in first["loc"] if p not in ("body", "query", "header", "path")]
        field = ".".join(loc) or "body"
        return _error(422, "invalid_request", f"{field}: {first['msg']}", field)

    @app.exception_handler(QueueFull)
    async def _full(request: Request, e: QueueFull) -> JSONResponse:
        headers = {"Retry-After": str(max(1, round(e.retry_after)))}
        return _error(429, "queue_full", str(e), headers=headers)

    @app.exception_handler(BackendUnavailable)
    async def _down(request: Request, e: BackendUnavailable) -> JSONResponse:
        service(request).metrics.errors.labels("backend_unavailable").inc()
        return _error(503, "backend_unavailable", str(e))

    async def submit(svc: Service, body: JobRequest, idempotency_key: str | None) -> JobRecord:
        svc.check(body)
        record = JobRecord(request=body.model_dump(mode="json", by_alias=True))
        record.total_steps = body.steps
        record, _ = await svc.backend.submit(record, idempotency_key)
        return record

    async def wait_done(svc: Service, record: JobRecord) -> tuple[JobRecord, Any]:
        """Wait until terminal or the job's deadline; raise the matching ApiError otherwise."""
        final = await svc.backend.wait(record.id, max(0.0, record.deadline - time.time()) + 1.0)
        if final is None:
            raise ApiError(404, "not_found", f"job {record.id} is gone")
        if final.status is JobStatus.DONE:
            result = await svc.backend.get_result(final.id)
            if result is None:
                raise ApiError(410, "expired", f"result of job {final.id} has expired")
            return final, result
        if final.status is JobStatus.EXPIRED or not final.status.terminal:
            raise ApiError(504, "deadline_exceeded", f"job {final.id} passed its deadline")
        if final.status is JobStatus.CANCELLED:
            raise ApiError(409, "cancelled", f"job {final.id} was cancelled")
        message = (final.error or {}).get("message", "generation failed")
        raise ApiError(500, "generation_failed", message)

    @app.post("/generate", status_code=200, summary="Generate images (sync, or async with 202)")
    async def generate(
        body: JobRequest,
        svc: ServiceDep,
        prefer: Annotated[str | None, Header()] = None,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> Response:
        record = await submit(svc, body, idempotency_key)
        if body.async_ or (prefer and "respond-async" in prefer.lower()):
            return JSONResponse(
                _record_view(record), status_code=202, headers={"Location": f"/jobs/{record.id}"}
            )
        final, result = await wait_done(svc, record)
        images = [base64.b64encode(image).decode() for image in result.images]
        body_out = _record_view(final) | {"content_type": result.content_type, "images": images}
        return JSONResponse(body_out)

    async def known(svc: Service, job_id: str) -> JobRecord:
        record = await svc.backend.get(job_id)
        if record is None:
            raise ApiError(404, "not_found", f"unknown job {job_id}", "job_id")
        return record

    @app.get("/jobs/{job_id}", summary="Job status and progress")
    async def job(job_id: str, svc: ServiceDep) -> dict[str, Any]:
        return _record_view(await known(svc, job_id))

    @app.get("/jobs/{job_id}/result", summary="One generated image, as bytes")
    async def job_result(
        job_id: str, svc: ServiceDep, index: Annotated[int, Query(ge=0)] = 0
    ) -> Response:
        record = await known(svc, job_id)
        if record.status is not JobStatus.DONE:
            raise ApiError(409, "not_ready", f"job {job_id} is {record.status.value}")
        result = await svc.backend.get_result(job_id)
        if result is None:
            raise ApiError(410, "expired", f"result of job {job_id} has expired")
        if index >= len(result.images):
            raise ApiError(
                422, "invalid_request", f"index: must be < {len(result.images)}", "index"
            )
        return Response(result.images[index], media_type=result.content_type)

    @app.get("/jobs/{job_id}/events", summary="Server-sent events until the job ends")
    async def job_events(job_id: str, svc: ServiceDep) -> StreamingResponse:
        await known(svc, job_id)

        async def stream() -> AsyncIterator[str]:
            try:
                async for event in svc.backend.events(job_id):
                    yield f"event: {event.type}\ndata: {json.dumps(event.to_dict())}\n\n"
            except BackendUnavailable as e:
                payload = json.dumps({"type": "error", "message": str(e)})
                yield f"event: error\ndata: {payload}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.delete("/jobs/{job_id}", summary="Cancel: queued jobs never start, running ones stop")
    async def cancel(job_id: str, svc: ServiceDep) -> JSONResponse:
        await known(svc, job_id)
        record = await svc.backend.request_cancel(job_id)
        if record is None:
            raise ApiError(404, "not_found", f"unknown job {job_id}", "job_id")
        return JSONResponse(
            _record_view(record), status_code=200 if record.status.terminal else 202
        )

    @app.post("/v1/images/generations", summary="OpenAI Images API subset (b64_json)")
    async def openai_images(
        body: OpenAIImageRequest,
        svc: ServiceDep,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> dict[str, Any]:
        size = svc.model_config.input_size * (8 if svc.model_config.in_channels == 4 else 1)
        if body.size is not None and body.size != f"{size}x{size}":
            raise FieldError("size", f"this model makes {size}x{size} images, got {body.size!r}")
        label = _label_from_prompt(body.prompt, svc)
        request = JobRequest(
            model=body.model,
            class_label=label,
            num_images=body.n,
            timeout_s=svc.settings.default_timeout_s,
        )
        record = await submit(svc, request, idempotency_key)
        _, result = await wait_done(svc, record)
        return {
            "created": int(record.created_at),
            "data": [{"b64_json": base64.b64encode(i).decode()} for i in result.images],
        }

    @app.get("/models", summary="The served model and its cache defaults")
    async def models(svc: ServiceDep) -> dict[str, Any]:
        defaults = cache.POLICIES["skip_cache"].default_config(svc.model_config)
        return {
            "data": [
                {
                    "id": svc.model_name,
                    "random_weights": svc.random_weights,
                    "config": dataclasses.asdict(svc.model_config),
                    "default_guidance": svc.default_guidance,
                    "cache_policies": sorted(cache.POLICIES),
                    "cache_defaults": {
                        "skip_cache": {
                            k: (None if v == float("inf") else v)
                            for k, v in dataclasses.asdict(defaults).items()
                        }
                    },
                    "card": svc.card,
                }
            ]
        }

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Model loaded and queue reachable")
    async def readyz(svc: ServiceDep) -> dict[str, Any]:
        await svc.backend.ping()
        if svc.worker_task is not None and svc.worker_task.done():
            raise ApiError(503, "worker_stopped", "the embedded worker has stopped")
        return {"status": "ready", "model": svc.model_name, "backend": svc.backend.name}

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics(svc: ServiceDep) -> Response:
        with contextlib.suppress(BackendUnavailable):
            svc.metrics.queue_depth.set(await svc.backend.depth())
        return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _label_from_prompt(prompt: str, svc: Service) -> int:
    """Class-conditional models take the class as the prompt: a number or a card class name."""
    names = [str(n).lower() for n in svc.card.get("class_names", [])]
    text = prompt.strip().lower()
    if text in names:
        return names.index(text)
    match = re.fullmatch(r"(?:class\s*|digit\s*)?(\d+)", text)
    n = svc.model_config.num_classes
    if match and int(match.group(1)) < n:
        return int(match.group(1))
    raise FieldError(
        "prompt", f"this model is class-conditional: give a class label 0..{n - 1}, got {prompt!r}"
    )
