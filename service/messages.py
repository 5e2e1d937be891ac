"""Plain messages passed between the API, the queue backends, the worker and the engine.

Times are Unix seconds (``time.time()``) unless a name says otherwise; durations are seconds.
Everything here round-trips through JSON (the Redis backend stores these dicts).
"""

from __future__ import annotations

import enum
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from model.sampling.plan import RunPlan
from service.images import FORMATS as IMAGE_FORMATS
from service.request import GenerateParams
from service.video import VIDEO_FORMATS

# Images: png, jpeg, webp; videos: mp4, gif, webp (animated). Which apply: the model's kind.
if TYPE_CHECKING:  # a Literal over a runtime tuple is no static type: a str to mypy
    OutputFormat = str
else:  # pydantic validates against the formats the encoders write
    OutputFormat = Literal[tuple(dict.fromkeys([*IMAGE_FORMATS, *VIDEO_FORMATS]))]
DEFAULT_FORMATS = {"image": "png", "video": "mp4"}  # model kind -> output format
ResponseFormat = Literal["b64_json", "url"]  # samples in the answer, or signed URLs to them
DEFAULT_FPS = 8.0
MAX_FPS = 60.0  # a video's frames per second: (0, MAX_FPS]


# Job events a webhook may ask for -> the webhook event type; the terminal ones by default.
WEBHOOK_EVENTS = {
    "started": "job.started",
    "done": "job.done",
    "failed": "job.failed",
    "cancelled": "job.cancelled",
    "expired": "job.expired",
}
WebhookEvent = Literal["started", "done", "failed", "cancelled", "expired"]
MAX_WEBHOOK_URL = 2048


class Webhook(BaseModel):
    """Where a job's events are POSTed (``service/webhooks.py``), and which."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        max_length=MAX_WEBHOOK_URL,
        description="http:// or https:// URL, no user:password@; the deployment may restrict "
        "its host (SKIPDIT_WEBHOOK_HOSTS).",
    )
    events: list[WebhookEvent] = Field(
        ["done", "failed", "cancelled", "expired"],
        min_length=1,
        description="Job events to deliver: started, done, failed, cancelled, expired; "
        "default: the terminal four.",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"must be an http:// or https:// URL, got scheme {parts.scheme!r}")
        if not parts.hostname:
            raise ValueError("must name a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not carry credentials (user:password@)")
        try:
            parts.port  # noqa: B018  # raises on a port that is no number or out of range
        except ValueError as e:
            raise ValueError(f"bad port: {e}") from None
        return url

    @field_validator("events")
    @classmethod
    def _unique(cls, events: list[str]) -> list[str]:
        return list(dict.fromkeys(events))


class JobRequest(GenerateParams):
    """The body of ``POST /generate``: generation parameters plus serving options."""

    output_format: OutputFormat | None = Field(
        None, description="png, jpeg, webp (images); mp4, gif, webp (videos). None: png | mp4."
    )
    fps: float | None = Field(
        None, gt=0, le=MAX_FPS, description="Video frames per second (video models only); None: 8."
    )
    response_format: ResponseFormat = Field(
        "b64_json",
        description="b64_json: the samples base64-encoded in the answer (images); url: signed "
        "URLs of GET /files/{token}, valid until the result expires (urls).",
    )
    priority: int = Field(0, ge=-10, le=10, description="Higher runs first.")
    timeout_s: float = Field(
        300.0, gt=0, le=3600, description="Deadline from submission; past it the job expires."
    )
    async_: bool = Field(False, alias="async", description="Return 202 + Location at once.")
    webhook: Webhook | None = Field(
        None,
        description="POST the job's events to this URL, signed (Standard Webhooks headers); "
        "needs SKIPDIT_WEBHOOK_SECRET.",
    )

    def format_for(self, kind: str) -> str:
        """The output format: the one asked for, else the default of the model's kind."""
        return self.output_format or DEFAULT_FORMATS[kind]

    def fps_for(self, kind: str) -> float | None:
        """Frames per second of a video (asked for, else 8); None for an image model."""
        return None if kind != "video" else self.fps or DEFAULT_FPS


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)


class EventKind(enum.StrEnum):
    """What happened to a job: the one event vocabulary of engine, worker, backends and SSE."""

    QUEUED = "queued"
    STARTED = "started"
    STEP = "step"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self in (EventKind.DONE, EventKind.FAILED, EventKind.CANCELLED, EventKind.EXPIRED)


@dataclass
class JobRecord:
    """What the service knows about a job; stored by the backend, returned by GET /jobs/{id}."""

    request: dict[str, Any]  # JobRequest as JSON (by alias)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: JobStatus = JobStatus.QUEUED
    created_at: float = field(default_factory=time.time)
    deadline: float = 0.0  # created_at + timeout_s
    started_at: float | None = None
    worker: str | None = None  # the worker that ran (or runs) it
    finished_at: float | None = None
    step: int = 0
    total_steps: int = 0
    error: dict[str, str] | None = None  # {"code", "message"}
    result: dict[str, Any] | None = None  # metadata only; image bytes live in StoredResult
    owner: str | None = None  # id of the API key that submitted it (None: the API is open)
    plan: dict[str, Any] | None = None  # the checked RunPlan the API resolved (``RunPlan.to_json``)

    def __post_init__(self) -> None:
        self.status = JobStatus(self.status)
        if not self.deadline:
            self.deadline = self.created_at + float(self.request.get("timeout_s", 300.0))

    @property
    def model(self) -> str:
        """The model that runs the job: the API writes the resolved name into the request."""
        name = self.request.get("model")
        if not name:
            raise ValueError(f"job {self.id} names no model")
        return name

    @property
    def run_plan(self) -> RunPlan:
        """The plan the API resolved: the worker runs it as it is, checking nothing again."""
        if self.plan is None:
            raise ValueError(f"job {self.id} holds no plan")
        return RunPlan.from_json(self.plan)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"status": self.status.value}


@dataclass
class StoredResult:
    """Encoded images of a finished job plus the metadata returned with them."""

    content_type: str
    images: list[bytes]
    meta: dict[str, Any]


@dataclass
class Event:
    """One line of a job's progress stream (SSE ``event:`` is ``type``)."""

    type: EventKind
    job_id: str
    step: int = 0
    total: int = 0
    mode: str | None = None  # full | cached, on step events
    message: str | None = None
    time: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.type = EventKind(self.type)

    @property
    def terminal(self) -> bool:
        return self.type.terminal

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"type": self.type.value}
