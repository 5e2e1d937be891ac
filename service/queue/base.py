"""The interface every queue backend implements, and the errors the API maps to HTTP.

API side: submit (with idempotency and a bounded queue), read records/results, request a
cancel, follow a job's events. Worker side: claim deliveries, move a job's record through its
states (a terminal state is written once: the first completion wins), publish events, ack.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass

from service.messages import Event, JobRecord, JobStatus, StoredResult


class QueueFull(Exception):
    def __init__(self, depth: int, retry_after: float):
        super().__init__(f"queue is full ({depth} jobs); retry after {retry_after:.0f}s")
        self.retry_after = retry_after


class BackendUnavailable(Exception):
    """The queue backend cannot be reached."""


@dataclass
class Delivery:
    """A job handed to a worker; ``token`` identifies the delivery to ack or release."""

    job_id: str
    token: str
    consumer: str  # the worker it was delivered to
    attempts: int = 1


class QueueBackend(ABC):
    name: str

    # -- API side

    @abstractmethod
    async def submit(
        self, record: JobRecord, idempotency_key: str | None = None
    ) -> tuple[JobRecord, bool]:
        """Enqueue; returns (record, created). A known idempotency key returns its job."""

    @abstractmethod
    async def get(self, job_id: str) -> JobRecord | None: ...

    @abstractmethod
    async def get_result(self, job_id: str) -> StoredResult | None: ...

    @abstractmethod
    async def request_cancel(self, job_id: str) -> JobRecord | None:
        """Queued jobs are cancelled at once; running ones are flagged for the worker."""

    @abstractmethod
    async def events(self, job_id: str) -> AsyncIterator[Event]:
        """Every event of the job from its first, ending after a terminal one."""

    @abstractmethod
    async def depth(self) -> int:
        """Jobs submitted and not yet claimed by a worker."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise BackendUnavailable if the backend cannot serve."""

    async def wait(self, job_id: str, timeout: float) -> JobRecord | None:
        """The job's record once terminal, or its current record after ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                async for event in self.events(job_id):
                    if event.terminal:
                        break
        except TimeoutError:
            pass
        return await self.get(job_id)

    # -- worker side

    @abstractmethod
    async def claim(self, consumer: str, count: int, block: float) -> list[Delivery]:
        """Up to ``count`` deliveries, waiting at most ``block`` seconds for the first."""

    @abstractmethod
    async def start(self, delivery: Delivery) -> JobRecord | None:
        """Mark a claimed job running; None (and acked) if it was cancelled or already ended."""

    @abstractmethod
    async def progress(self, record: JobRecord, event: Event) -> None:
        """Store the record's progress and publish the event."""

    @abstractmethod
    async def finish(
        self, delivery: Delivery, record: JobRecord, event: Event, result: StoredResult | None
    ) -> bool:
        """Write a terminal state once (False if the job had already ended), publish, ack."""

    @abstractmethod
    async def release(self, delivery: Delivery) -> None:
        """Hand an unfinished job back to the queue (worker shutting down)."""

    @abstractmethod
    async def cancel_requested(self, job_ids: list[str]) -> set[str]: ...

    async def heartbeat(self, consumer: str, deliveries: list[Delivery]) -> None:
        """Tell the backend this worker and its deliveries are alive."""

    async def close(self) -> None:
        """Release connections."""


def finished_record(record: JobRecord, status: JobStatus, **changes: object) -> JobRecord:
    record.status = status
    record.finished_at = time.time()
    for k, v in changes.items():
        setattr(record, k, v)
    return record
