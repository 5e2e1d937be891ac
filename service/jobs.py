"""The job state machine, written once, beside the record.

    queued --start--> running --finish--> done | failed | cancelled | expired
      ^                  |
      +----release-------+          queued --request_cancel--> cancelled

Every transition is a pure function of a ``JobRecord`` and the time: it returns a ``Change``
(the new record and the event to publish, or None when nothing is published), or None when the
transition is refused. A terminal record refuses every transition, so the first terminal state
wins. The backends only store changes atomically (see ``QueueBackend._commit``).

A cancel may give a reason (``CANCEL_REASONS``): the job then ends with ``error`` {"code": the
reason, "message"}, at once while queued, or when its worker stops it (the backend keeps the
reason with the flag it raises for the worker). A cancel without one (``DELETE /jobs/{id}``)
leaves ``error`` empty.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, NamedTuple

from service.messages import Event, EventKind, JobRecord, JobStatus

ENDED = {
    JobStatus.DONE: EventKind.DONE,
    JobStatus.FAILED: EventKind.FAILED,
    JobStatus.CANCELLED: EventKind.CANCELLED,
    JobStatus.EXPIRED: EventKind.EXPIRED,
}
ENDED_BY = {kind: status for status, kind in ENDED.items()}  # terminal event -> status

CLIENT_DISCONNECTED = "client_disconnected"
CANCEL_REASONS = {  # reason -> what the cancelled job's error says
    CLIENT_DISCONNECTED: "the client of the synchronous request disconnected before the job ended",
}
REQUESTED = "requested"  # the reason metrics give a cancel that gave none (DELETE)


class Change(NamedTuple):
    record: JobRecord
    event: Event | None


def _event(record: JobRecord, kind: EventKind, now: float, **fields: Any) -> Event:
    return Event(kind, record.id, record.step, record.total_steps, time=now, **fields)


def submit(record: JobRecord, now: float) -> Change:
    """A new job enters the queue."""
    return Change(record, _event(record, EventKind.QUEUED, now))


def start(record: JobRecord, worker: str, now: float) -> Change | None:
    """A worker takes the job (again, if an earlier worker died with it)."""
    if record.status.terminal:
        return None
    return Change(replace(record, status=JobStatus.RUNNING, started_at=now, worker=worker), None)


def progress(
    record: JobRecord, kind: EventKind, step: int, total: int, now: float, mode: str | None = None
) -> Change | None:
    """The running job reports ``started`` or a finished ``step``."""
    if record.status.terminal or kind.terminal or kind is EventKind.QUEUED:
        return None
    new = replace(record, step=step, total_steps=total)
    return Change(new, _event(new, kind, now, mode=mode))


def release(record: JobRecord) -> Change | None:
    """A worker hands an unfinished job back; it waits in the queue again."""
    if record.status.terminal:
        return None
    return Change(replace(record, status=JobStatus.QUEUED), None)


def request_cancel(record: JobRecord, now: float, reason: str | None = None) -> Change | None:
    """A queued job is cancelled at once (with ``reason``'s error). None for a running one (its
    worker must be told, see ``cancel_pending``) and for one that has already ended."""
    if record.status is not JobStatus.QUEUED:
        return None
    return finish(record, JobStatus.CANCELLED, now, error=cancel_error(reason))


def cancel_error(reason: str | None) -> dict[str, str] | None:
    """The error a job cancelled for ``reason`` ends with; None for no reason, or one this
    version does not know (a flag an older API wrote)."""
    if reason is None or reason not in CANCEL_REASONS:
        return None
    return {"code": reason, "message": f"cancelled: {CANCEL_REASONS[reason]}"}


def cancel_reason(record: JobRecord) -> str:
    """Why a cancelled job was cancelled, for metrics: its error's code, else ``REQUESTED``."""
    return (record.error or {}).get("code", REQUESTED)


def cancel_pending(record: JobRecord) -> bool:
    """Whether a cancel request on ``record`` waits for its worker to act."""
    return record.status is JobStatus.RUNNING


def finish(
    record: JobRecord,
    status: JobStatus,
    now: float,
    result: dict[str, Any] | None = None,
    error: dict[str, str] | None = None,
) -> Change | None:
    """The job ends with ``status``; ``result`` is its metadata, ``error`` {"code", "message"}.
    Refused if it has already ended: the first terminal state wins."""
    if record.status.terminal:
        return None
    if not status.terminal:
        raise ValueError(f"finish needs a terminal status, got {status.value!r}")
    new = replace(record, status=status, finished_at=now, result=result, error=error)
    message = error["message"] if error else None
    return Change(new, _event(new, ENDED[status], now, message=message))
