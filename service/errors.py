"""Typed errors of the service layer. They say what went wrong, not how HTTP shows it: the API
maps each type to a status and a code once (``service/api/errors.py``)."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of the errors a client can be told about; ``str(e)`` is the message."""

    field: str | None = None  # the request field at fault, where there is one


class JobNotFound(ServiceError):
    def __init__(self, job_id: str, message: str | None = None):
        super().__init__(message or f"unknown job {job_id}")
        self.field = "job_id"


class ResultNotReady(ServiceError):
    """The job has not finished (yet): there is no result to read."""


class JobCancelled(ServiceError):
    """The job was cancelled before it finished."""


class ResultExpired(ServiceError):
    """The job finished but its result outlived its TTL."""


class FileNotFound(ServiceError):
    """No file answers to this result URL (not a token of this deployment, or altered). The
    message says no more: not which part of the token failed."""

    def __init__(self) -> None:
        super().__init__("no such file")


class DeadlineExceeded(ServiceError):
    """The job's deadline passed before it finished."""


class GenerationFailed(ServiceError):
    """The worker ran the job and it failed."""


class WorkerStopped(ServiceError):
    """The embedded worker is no longer running."""


class QueueFull(ServiceError):
    """Too many jobs wait; retry after ``retry_after`` seconds."""

    def __init__(self, depth: int, retry_after: float):
        super().__init__(f"queue is full ({depth} jobs); retry after {retry_after:.0f}s")
        self.retry_after = retry_after


class BackendUnavailable(ServiceError):
    """The queue backend cannot be reached."""


class Unauthorized(ServiceError):
    """No API key, or not one of the configured keys (the message never repeats it)."""


class Forbidden(ServiceError):
    """The job belongs to another API key."""

    def __init__(self, job_id: str):
        super().__init__(f"job {job_id} belongs to another API key")
        self.field = "job_id"


class RateLimited(ServiceError):
    """This API key is over its request rate or its cap on queued jobs; retry after
    ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after
