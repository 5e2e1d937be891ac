"""What routes depend on: the ``Service`` (one per app, built by the lifespan) and the job
operations several routers share (check, submit, wait for the outcome, the record's view)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request

from model.errors import FieldError
from model.registry import ModelInfo
from model.sampling.plan import RunPlan
from service import errors, webhooks
from service.api.auth import Caller, KeyRing
from service.images import FORMATS as IMAGE_FORMATS
from service.jobs import CLIENT_DISCONNECTED, REQUESTED
from service.messages import JobRecord, JobRequest, JobStatus, StoredResult
from service.metrics import Metrics
from service.queue.base import QueueBackend
from service.request import echo, resolve
from service.settings import Settings
from service.urls import UrlSigner
from service.video import VIDEO_FORMATS
from service.worker import Worker

OUTPUT_FORMATS = {"image": tuple(IMAGE_FORMATS), "video": VIDEO_FORMATS}  # model kind -> formats
Disconnected = Callable[[], Awaitable[None]]  # returns once the client has gone

log = logging.getLogger(__name__)


@dataclass
class Service:
    """Everything a route needs; reached through ``ServiceDep``."""

    settings: Settings
    backend: QueueBackend
    metrics: Metrics
    models: dict[str, ModelInfo]  # served name -> description; the first is the default
    keys: KeyRing = field(default_factory=lambda: KeyRing([]))  # none: the API is open
    urls: UrlSigner | None = None  # signs result URLs; None: they are off (``signer_for``)
    worker: Worker | None = None
    worker_task: asyncio.Task | None = None

    @property
    def default_model(self) -> str:
        return next(iter(self.models))

    def model_for(self, name: str | None) -> ModelInfo:
        """The served model a request names (None: the default); FieldError('model') if none."""
        info = self.models.get(name or self.default_model)
        if info is None:
            raise FieldError("model", f"unknown model {name!r}; served: {list(self.models)}")
        return info

    def openai_model(self, name: str | None, kind: str, prompt: str) -> ModelInfo:
        """The served model of ``kind`` (image or video) an OpenAI-style request names; None:
        the first served model of that kind that takes ``prompt`` (a class model takes one of
        its class labels or names, a text model any text), else the first of that kind.
        FieldError('model') for a named model of another kind, or none of the kind served."""
        if name is not None:
            info = self.model_for(name)
            if info.kind != kind:
                served = [n for n, i in self.models.items() if i.kind == kind]
                raise FieldError(
                    "model", f"{info.name!r} makes {info.kind}s; {kind} models served: {served}"
                )
            return info
        of_kind = [i for i in self.models.values() if i.kind == kind]
        if not of_kind:
            raise FieldError("model", f"no {kind} model is served; served: {list(self.models)}")
        # none takes it: the first, whose prompt_fields names what it takes
        return next((i for i in of_kind if _takes(i, prompt)), of_kind[0])

    def check(self, body: JobRequest) -> tuple[ModelInfo, RunPlan]:
        """The request resolved once against the model it names: its output options, this
        deployment's limits and defaults, the model's own checks. Returns the model and the
        checked plan its job runs; raises FieldError naming the request field."""
        info = self.model_for(body.model)
        check_output(body, info)
        if body.response_format == "url" and self.urls is None:
            raise FieldError(
                "response_format",
                "url is off on this deployment: it needs SKIPDIT_URL_SECRET, shared by every API "
                "replica; ask for b64_json",
            )
        if body.webhook is not None:
            webhooks.check(body.webhook, self.settings)
        return info, resolve(body, info, self.settings)

    async def submit(
        self, body: JobRequest, idempotency_key: str | None, caller: Caller
    ) -> JobRecord:
        """Check, count against the caller's key, and enqueue on the model's queue (the record:
        ``new_record``; its owner is the key's id)."""
        record, _ = await self._submit(body, idempotency_key, caller)
        return record

    async def _submit(
        self, body: JobRequest, idempotency_key: str | None, caller: Caller
    ) -> tuple[JobRecord, bool]:
        """``submit``, also saying whether this request made the job (not an earlier one with
        the same Idempotency-Key)."""
        info, run = self.check(body)
        self.keys.take(caller)
        record = new_record(body, info, run, caller.key_id)
        await self.keys.admit(caller, record.id, self._unfinished, self.settings.retry_after_s)
        try:
            stored, _ = await self.backend.submit(record, caller.scoped(idempotency_key))
        except BaseException:
            self.keys.release(caller, record.id)
            raise
        if stored.id != record.id:  # the job an earlier request with this Idempotency-Key made
            self.keys.release(caller, record.id)
            self.keys.owns(caller, stored.id)
        return stored, stored.id == record.id

    async def submit_and_wait(
        self,
        body: JobRequest,
        idempotency_key: str | None,
        caller: Caller,
        disconnected: Disconnected,
    ) -> tuple[JobRecord, StoredResult]:
        """A synchronous request: ``submit``, then ``wait_done``. With
        SKIPDIT_CANCEL_ON_DISCONNECT, if ``disconnected`` returns first (the client has gone)
        the job is cancelled for ``client_disconnected`` (queued: at once; running: at its next
        step) and JobCancelled is raised, for no one to read. Only the request that made the job
        cancels it: one an earlier request with the same Idempotency-Key made may have others
        waiting on it. Either way no task is left behind."""
        record, made = await self._submit(body, idempotency_key, caller)
        if not (made and self.settings.cancel_on_disconnect):
            return await self.wait_done(record)
        waiting = asyncio.ensure_future(self.wait_done(record))
        gone = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait((waiting, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this request is cancelled: stop both, collect their outcomes
            waiting.cancel()  # a no-op once done
            gone.cancel()
            await asyncio.gather(waiting, gone, return_exceptions=True)
        if not waiting.cancelled():  # the job ended first (or waiting failed): the answer
            return waiting.result()
        gone.result()  # raises if listening for the disconnect failed, rather than cancel
        await self._cancel_for_disconnect(record)
        raise errors.JobCancelled(f"job {record.id} was cancelled: the client disconnected")

    async def _cancel_for_disconnect(self, record: JobRecord) -> None:
        """Cancel the job of a client that left; one log line if there was one to cancel."""
        current, ended = await self.backend.cancel(record.id, CLIENT_DISCONNECTED)
        if current is None or (current.status.terminal and not ended):
            return  # its record expired, or it ended before the cancel: it stays as it ended
        log.info(
            "job %s: client disconnected at step %d/%d; cancelled %s",
            record.id,
            current.step,
            current.total_steps,
            "while queued" if ended else "at its next step",
        )
        if ended:  # a running job's worker counts it when it stops
            self.metrics.cancellations.labels(record.model, CLIENT_DISCONNECTED).inc()

    async def _unfinished(self, job_id: str) -> bool:
        record = await self.backend.get(job_id)
        return record is not None and not record.status.terminal

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

    async def known(self, job_id: str, caller: Caller) -> JobRecord:
        """The job, if it exists and the caller may see it (Forbidden: another key's job)."""
        record = await self.backend.get(job_id)
        if record is None:
            raise errors.JobNotFound(job_id)
        if self.keys.enabled and record.owner != caller.key_id:
            raise errors.Forbidden(job_id)
        return record

    async def cancel(self, job_id: str, caller: Caller) -> JobRecord:
        """Ask to cancel: a queued job ends at once, a running one at its next step."""
        await self.known(job_id, caller)
        record, ended = await self.backend.cancel(job_id)
        if record is None:
            raise errors.JobNotFound(job_id)
        if ended:  # a running job's worker counts it when it stops
            self.metrics.cancellations.labels(record.model, REQUESTED).inc()
        return record

    async def result(self, record: JobRecord) -> StoredResult:
        """The stored result of a job that is done."""
        if record.status is not JobStatus.DONE:
            raise errors.ResultNotReady(f"job {record.id} is {record.status.value}")
        result = await self.backend.get_result(record.id)
        if result is None:
            raise errors.ResultExpired(f"result of job {record.id} has expired")
        return result


def new_record(
    body: JobRequest, info: ModelInfo, run: RunPlan, owner: str | None = None
) -> JobRecord:
    """The record of a checked request: the plan its worker runs, and in ``request`` the body
    with what was resolved (the model, the output format and a video's fps, the guidance and
    the cache that run: what the response's ``request`` shows)."""
    resolved: dict[str, str | float | None] = {
        "model": info.name,
        "output_format": body.format_for(info.kind),
    }
    if info.kind == "video":
        resolved["fps"] = body.fps_for(info.kind)
    request = body.model_dump(mode="json", by_alias=True) | resolved | echo(run)
    return JobRecord(request, owner=owner, plan=run.to_json(), total_steps=body.steps)


def prompt_fields(
    info: ModelInfo, prompt: str, negative_prompt: str | None = None
) -> dict[str, Any]:
    """The request fields of an OpenAI-style ``prompt``: a text model's prompt as it is (and
    its negative prompt); a class model's class label read from the prompt (a card class name,
    "7", "digit 7"; anything else raises FieldError('prompt')). A negative prompt goes through
    either way: a class model refuses it naming the field."""
    if info.conditioning == "text":
        return {"prompt": prompt, "negative_prompt": negative_prompt}
    return {"class_label": info.label_from_prompt(prompt), "negative_prompt": negative_prompt}


def _takes(info: ModelInfo, prompt: str) -> bool:
    """Whether ``prompt_fields`` reads ``prompt`` for the model."""
    try:
        prompt_fields(info, prompt)
    except FieldError:
        return False
    return True


def check_output(body: JobRequest, info: ModelInfo) -> None:
    """The output options against the model's kind: a video's fps and formats on an image
    model, an image format on a video model, raise FieldError naming the field."""
    if info.kind != "video" and body.fps is not None:
        raise FieldError("fps", f"model {info.name!r} makes images: fps is for video models")
    allowed = OUTPUT_FORMATS[info.kind]
    if body.output_format is not None and body.output_format not in allowed:
        raise FieldError(
            "output_format",
            f"model {info.name!r} makes {info.kind}s: one of {list(allowed)}, "
            f"got {body.output_format!r}",
        )


def record_view(record: JobRecord) -> dict[str, Any]:
    """A job as the API shows it: the record plus progress in [0, 1]."""
    view = record.to_dict()
    del view["owner"]  # the key's id: the caller knows its key
    del view["plan"]  # the model layer's: ``request`` shows it in request fields
    view["progress"] = record.step / record.total_steps if record.total_steps else 0.0
    return view


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def client_gone(request: Request) -> Disconnected:
    """What returns once the client of ``request`` has disconnected: it waits on the ASGI
    ``receive`` for ``http.disconnect``. Use it once the body has been read: nothing else
    arrives then, so each ``receive`` blocks until the server sees the connection close (or the
    response complete), never polling."""

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return gone


ClientGoneDep = Annotated[Disconnected, Depends(client_gone)]
