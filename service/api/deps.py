"""What routes depend on: the ``Service`` (one per app, built by the lifespan) and the job
operations several routers share (check, submit, wait for the outcome, the record's view)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from model.errors import FieldError
from model.registry import ModelInfo
from service import errors
from service.messages import JobRecord, JobRequest, JobStatus, StoredResult
from service.metrics import Metrics
from service.queue.base import QueueBackend
from service.settings import Settings
from service.worker import Worker


@dataclass
class Service:
    """Everything a route needs; reached through ``ServiceDep``."""

    settings: Settings
    backend: QueueBackend
    metrics: Metrics
    model: ModelInfo
    worker: Worker | None = None
    worker_task: asyncio.Task | None = None

    def check(self, body: JobRequest) -> None:
        """The deployment's limits and the model's own checks; raise FieldError."""
        s = self.settings
        if body.model is not None and body.model != self.model.name:
            raise FieldError(
                "model", f"unknown model {body.model!r}; served: [{self.model.name!r}]"
            )
        if body.num_images > s.max_num_images:
            raise FieldError(
                "num_images", f"must be in [1, {s.max_num_images}], got {body.num_images}"
            )
        if body.steps > s.max_steps:
            raise FieldError("steps", f"must be in [1, {s.max_steps}], got {body.steps}")
        body.check_for(self.model.config)
        body.check_budget(self.model.config, self.model.default_guidance, s.max_batch_tokens)

    async def submit(self, body: JobRequest, idempotency_key: str | None) -> JobRecord:
        self.check(body)
        record = JobRecord(request=body.model_dump(mode="json", by_alias=True))
        record.total_steps = body.steps
        record, _ = await self.backend.submit(record, idempotency_key)
        return record

    async def wait_done(self, record: JobRecord) -> tuple[JobRecord, StoredResult]:
        """Wait until the job ends or its deadline passes; raise the matching error unless done."""
        final = await self.backend.wait(record.id, max(0.0, record.deadline - time.time()) + 1.0)
        if final is None:
            raise errors.JobNotFound(record.id, f"job {record.id} is gone")
        if final.status is JobStatus.DONE:
            return final, await self.result(final)
        if final.status is JobStatus.EXPIRED or not final.status.terminal:
            raise errors.DeadlineExceeded(f"job {final.id} passed its deadline")
        if final.status is JobStatus.CANCELLED:
            raise errors.JobCancelled(f"job {final.id} was cancelled")
        raise errors.GenerationFailed((final.error or {}).get("message", "generation failed"))

    async def known(self, job_id: str) -> JobRecord:
        record = await self.backend.get(job_id)
        if record is None:
            raise errors.JobNotFound(job_id)
        return record

    async def result(self, record: JobRecord) -> StoredResult:
        """The stored result of a job that is done."""
        if record.status is not JobStatus.DONE:
            raise errors.ResultNotReady(f"job {record.id} is {record.status.value}")
        result = await self.backend.get_result(record.id)
        if result is None:
            raise errors.ResultExpired(f"result of job {record.id} has expired")
        return result


def record_view(record: JobRecord) -> dict[str, Any]:
    """A job as the API shows it: the record plus progress in [0, 1]."""
    view = record.to_dict()
    view["progress"] = record.step / record.total_steps if record.total_steps else 0.0
    return view


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
