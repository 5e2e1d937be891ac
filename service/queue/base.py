"""The interface every queue backend implements, and the errors the API maps to HTTP.

API side: submit (with idempotency and a bounded queue per model), read records/results, request
a cancel, follow a job's events, see which models live workers hold. Worker side: claim
deliveries of the models it holds, move a job's record through its states, publish events, ack,
heartbeat (which also advertises its models). The states and their transitions are
``service.jobs``; this class applies them through one primitive, ``_commit``, that each backend
makes atomic.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from service import jobs
from service.jobs import Change
from service.messages import Event, EventKind, JobRecord, JobStatus, StoredResult
from service.webhooks import Hook, hook_for

Transition = Callable[[JobRecord], Change | None]


@dataclass
class Delivery:
    """A job handed to a worker; ``token`` identifies the delivery to ack or release."""

    job_id: str
    token: str
    consumer: str  # the worker it was delivered to
    model: str  # the model whose queue it came from
    attempts: int = 1


def hook_of(change: Change) -> Hook | None:
    """The webhook delivery a stored change owes, if its job asked for its event."""
    if change.event is None:
        return None
    return hook_for(change.record, change.event.type, change.event.time)


def end_hook_of(record: JobRecord) -> Hook | None:
    """The webhook delivery of an ended job's terminal event, rebuilt from its record (the same
    id and body ``hook_of`` gave it when it ended)."""
    if not record.status.terminal or record.finished_at is None:
        return None
    return hook_for(record, jobs.ENDED[record.status], record.finished_at)


def holders_of(models_by_worker: Iterable[tuple[str, Sequence[str]]]) -> dict[str, list[str]]:
    """(worker, its models) pairs -> model -> the workers that hold it."""
    held: dict[str, list[str]] = {}
    for worker, models in models_by_worker:
        for model in models:
            held.setdefault(model, []).append(worker)
    return held


class QueueBackend(ABC):
    name: str
    clock: Callable[[], float]  # Unix seconds: the times written on records and events
    _turn: int = 0  # which model's queue ``_fairly`` asks first, rotating

    # -- storage: what each backend provides

    @abstractmethod
    async def _commit(
        self, job_id: str, transition: Transition, result: StoredResult | None = None
    ) -> tuple[JobRecord | None, bool]:
        """Atomically apply ``transition`` to the stored record: store the new record, publish
        its event, store ``result`` (TTL) and drop the cancel flag once terminal. Returns (the
        record as it now stands or None if unknown, whether the transition was applied)."""

    @abstractmethod
    async def _flag_cancel(self, job_id: str, reason: str | None) -> None:
        """Ask the worker running the job to cancel it (see ``cancel_requested``), for
        ``reason`` (None: none given; see ``_cancel_reason``). The first flag stays: a later
        cancel of the same job changes nothing, so its first reason is the one it ends with."""

    @abstractmethod
    async def _cancel_reason(self, job_id: str) -> str | None:
        """The reason the job's cancel flag gives, None if it gives none (or is not set)."""

    @abstractmethod
    async def _requeue(self, delivery: Delivery) -> None:
        """Put a released job back in the queue."""

    async def _retire(self, delivery: Delivery) -> None:
        """Acknowledge a delivery: no one is to run it again."""

    # -- the webhook outbox (``service/webhooks.py``): every stored change's hook goes in it

    @abstractmethod
    async def _hook(self, hook: Hook) -> None:
        """Put ``hook`` in the outbox, due now; a hook id put before (within the job's TTL) is
        not put again, however often the change that owes it is replayed."""

    @abstractmethod
    async def hooks_claim(self, now: float, until: float, count: int) -> list[Hook]:
        """Up to ``count`` hooks due at ``now``, each counted one more attempt and leased until
        ``until``: then due again, unless done, retried or dead-lettered first (its deliverer
        died)."""

    @abstractmethod
    async def hook_done(self, hook: Hook) -> None:
        """Delivered: out of the outbox."""

    @abstractmethod
    async def hook_retry(self, hook: Hook, at: float) -> None:
        """Failed: due again at ``at``; unless another claim took it since (its attempt
        decides)."""

    @abstractmethod
    async def hook_dead(self, hook: Hook, error: str, at: float) -> None:
        """Failed for the last time: out of the outbox, into its model's webhook dead letters
        (``service.webhooks.dead_letter_entry``); unless another claim took it since."""

    @abstractmethod
    async def webhook_dead_letters(self, model: str) -> list[dict[str, Any]]:
        """The model's webhook dead letters, oldest first."""

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

    async def request_cancel(self, job_id: str, reason: str | None = None) -> JobRecord | None:
        """Queued jobs are cancelled at once; running ones are flagged for the worker. The
        record as it stands (None: unknown); see ``cancel``."""
        record, _ = await self.cancel(job_id, reason)
        return record

    async def cancel(self, job_id: str, reason: str | None = None) -> tuple[JobRecord | None, bool]:
        """``request_cancel``, also saying whether this call ended the job (it was queued).
        ``reason`` (``jobs.CANCEL_REASONS``) ends up in the cancelled job's ``error``."""
        now = self.clock()
        record, ended = await self._commit(job_id, lambda r: jobs.request_cancel(r, now, reason))
        if record is not None and jobs.cancel_pending(record):
            await self._flag_cancel(job_id, reason)
        return record, ended

    @abstractmethod
    def events(self, job_id: str) -> AsyncIterator[Event]:
        """Every event of the job from its first, ending after a terminal one (an async
        generator: ``async def`` with ``yield`` in the backends)."""

    @abstractmethod
    async def depth(self, model: str) -> int:
        """Jobs of ``model`` submitted and not yet claimed by a worker."""

    async def dead_letters(self, model: str) -> int:
        """Jobs of ``model`` given up after too many deliveries (backends that re-deliver)."""
        return 0

    @abstractmethod
    async def holders(self) -> dict[str, list[str]]:
        """Model -> the live workers that hold it (from their heartbeats)."""

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
    async def claim(
        self, consumer: str, models: Sequence[str], count: int, block: float
    ) -> list[Delivery]:
        """Up to ``count`` deliveries of jobs of ``models``, waiting at most ``block`` seconds for
        the first."""

    async def _fairly(
        self,
        models: Sequence[str],
        count: int,
        take: Callable[[str, int], Awaitable[list[Delivery]]],
    ) -> list[Delivery]:
        """Up to ``count`` deliveries from ``take(model, n)``, shared among the models' queues:
        each is asked for its share of what is left, the first asked rotates between calls."""
        self._turn = (self._turn + 1) % max(1, len(models))
        order = [*models[self._turn :], *models[: self._turn]]
        out: list[Delivery] = []
        for i, model in enumerate(order):
            share = -(-(count - len(out)) // (len(order) - i))  # ceil
            if share > 0:
                out += await take(model, share)
        return out

    async def start(self, delivery: Delivery) -> JobRecord | None:
        """Mark a claimed job running; None (and acked) if it was cancelled or already ended."""
        now = self.clock()
        record, started = await self._commit(
            delivery.job_id, lambda r: jobs.start(r, delivery.consumer, now)
        )
        if not started:
            await self._retire(delivery)
            return None
        return record

    async def progress(
        self, job_id: str, kind: EventKind, step: int, total: int, mode: str | None = None
    ) -> None:
        """Store a running job's progress and publish it (``started`` or ``step``)."""
        now = self.clock()
        await self._commit(job_id, lambda r: jobs.progress(r, kind, step, total, now, mode))

    async def finish(
        self,
        delivery: Delivery,
        status: JobStatus,
        result: StoredResult | None = None,
        error: dict[str, str] | None = None,
    ) -> JobRecord | None:
        """End the job (its result stored with a TTL) and ack; the finished record, or None if
        the job had already ended (the first terminal state wins, this run's result is dropped)."""
        now = self.clock()
        meta: dict[str, Any] | None = None if result is None else result.meta
        if status is JobStatus.CANCELLED and error is None:  # stopped on a flag: its reason
            error = jobs.cancel_error(await self._cancel_reason(delivery.job_id))

        def end(record: JobRecord) -> Change | None:
            return jobs.finish(record, status, now, result=meta, error=error)

        record, written = await self._commit(delivery.job_id, end, result)
        await self._retire(delivery)
        return record if written else None

    async def release(self, delivery: Delivery) -> None:
        """Hand an unfinished job back to the queue (worker shutting down)."""
        _, released = await self._commit(delivery.job_id, jobs.release)
        if released:
            await self._requeue(delivery)
        await self._retire(delivery)

    @abstractmethod
    async def cancel_requested(self, job_ids: list[str]) -> set[str]: ...

    @abstractmethod
    async def heartbeat(
        self, consumer: str, deliveries: list[Delivery], models: Sequence[str]
    ) -> None:
        """Tell the backend this worker and its deliveries are alive, and which models it holds
        (none while it drains)."""

    async def close(self) -> None:
        """Release connections."""
