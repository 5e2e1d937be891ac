"""In-process backend: the embedded default when no Redis URL is configured.

Same semantics as the Redis backend, inside one event loop: a FIFO of job ids per model, records,
events and results in dicts (results and records dropped after their TTLs, by the injected clock),
conditions to wake waiters. A transition is atomic because no ``await`` separates its read from its
write, and so is the webhook it owes: the outbox is a dict beside the records. It dies with the
process, as the jobs do (a restart keeps nothing; the Redis backend keeps both).
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from typing import Any

from service import jobs
from service.errors import QueueFull
from service.jobs import Change
from service.messages import Event, JobRecord, StoredResult
from service.queue.base import Delivery, QueueBackend, Transition, holders_of, hook_of
from service.webhooks import Hook, dead_letter_entry


def _copy(record: JobRecord) -> JobRecord:
    """Records cross the backend boundary by value, as they do through Redis."""
    return JobRecord(**copy.deepcopy(record.to_dict()))


class MemoryBackend(QueueBackend):
    name = "memory"

    def __init__(
        self,
        max_queue: int,
        result_ttl: float,
        job_ttl: float,
        retry_after: float = 1,
        clock: Callable[[], float] = time.time,
    ):
        self.max_queue = max_queue
        self.result_ttl = result_ttl
        self.job_ttl = job_ttl
        self.retry_after = retry_after
        self.clock = clock
        self._queues: defaultdict[str, deque[str]] = defaultdict(deque)  # model -> job ids
        self._models: dict[str, list[str]] = {}  # worker -> the models it advertises
        self._records: dict[str, JobRecord] = {}
        self._results: dict[str, tuple[float, StoredResult]] = {}  # expires at, result
        self._events: dict[str, list[Event]] = {}
        self._idempotency: dict[str, str] = {}
        self._cancel: dict[str, str | None] = {}  # job -> its cancel flag's reason
        self._changed = asyncio.Condition()
        self._hooks: dict[str, Hook] = {}  # the outbox: hook id -> hook (attempts so far)
        self._hook_due: dict[str, float] = {}  # hook id -> when it is due (or its lease ends)
        self._hooks_put: dict[str, float] = {}  # hook id -> when it was put (kept job_ttl)
        self._hook_dead: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _expire(self) -> None:
        now = self.clock()
        for job_id, (expires, _) in list(self._results.items()):
            if expires <= now:
                del self._results[job_id]
        for job_id, record in list(self._records.items()):
            if record.status.terminal and (record.finished_at or 0) + self.job_ttl <= now:
                del self._records[job_id]
                self._events.pop(job_id, None)
        for hook_id, put in list(self._hooks_put.items()):
            if put + self.job_ttl <= now:
                del self._hooks_put[hook_id]

    # -- storage

    async def _commit(
        self, job_id: str, transition: Transition, result: StoredResult | None = None
    ) -> tuple[JobRecord | None, bool]:
        stored = self._records.get(job_id)
        change = None if stored is None else transition(_copy(stored))
        if change is None:
            return (None if stored is None else _copy(stored)), False
        self._store(change, result)
        await self._notify()
        return _copy(change.record), True

    def _store(self, change: Change, result: StoredResult | None) -> None:
        record = change.record
        self._records[record.id] = _copy(record)
        if change.event is not None:
            self._events.setdefault(record.id, []).append(change.event)
        if record.status.terminal:
            self._cancel.pop(record.id, None)
            queue = self._queues[record.model]
            if record.id in queue:  # cancelled while queued
                queue.remove(record.id)
        if result is not None:
            self._results[record.id] = (self.clock() + self.result_ttl, result)
        hook = hook_of(change)
        if hook is not None:
            self._put_hook(hook)

    def _put_hook(self, hook: Hook) -> None:
        if hook.id in self._hooks_put:
            return
        now = self.clock()
        self._hooks_put[hook.id] = now
        self._hooks[hook.id] = replace(hook, attempts=0)
        self._hook_due[hook.id] = now

    async def _flag_cancel(self, job_id: str, reason: str | None) -> None:
        self._cancel.setdefault(job_id, reason)

    async def _cancel_reason(self, job_id: str) -> str | None:
        return self._cancel.get(job_id)

    async def _requeue(self, delivery: Delivery) -> None:
        self._queues[delivery.model].appendleft(delivery.job_id)
        await self._notify()

    # -- webhook outbox

    async def _hook(self, hook: Hook) -> None:
        self._put_hook(hook)

    async def hooks_claim(self, now: float, until: float, count: int) -> list[Hook]:
        due = sorted((at, i) for i, at in self._hook_due.items() if at <= now)[:count]
        out = []
        for _, hook_id in due:
            hook = self._hooks[hook_id]
            hook.attempts += 1
            self._hook_due[hook_id] = until
            out.append(replace(hook))
        return out

    def _claimed_by(self, hook: Hook) -> bool:
        """Whether ``hook``'s claim is still the latest of its id."""
        held = self._hooks.get(hook.id)
        return held is not None and held.attempts == hook.attempts

    async def hook_done(self, hook: Hook) -> None:
        self._hooks.pop(hook.id, None)
        self._hook_due.pop(hook.id, None)

    async def hook_retry(self, hook: Hook, at: float) -> None:
        if self._claimed_by(hook):
            self._hook_due[hook.id] = at

    async def hook_dead(self, hook: Hook, error: str, at: float) -> None:
        if self._claimed_by(hook):
            await self.hook_done(hook)
            self._hook_dead[hook.model].append(dead_letter_entry(hook, error, at))

    async def webhook_dead_letters(self, model: str) -> list[dict[str, Any]]:
        return [dict(entry) for entry in self._hook_dead[model]]

    # -- API side

    async def submit(
        self, record: JobRecord, idempotency_key: str | None = None
    ) -> tuple[JobRecord, bool]:
        self._expire()
        if idempotency_key is not None and idempotency_key in self._idempotency:
            known = self._records.get(self._idempotency[idempotency_key])
            if known is not None:
                return _copy(known), False
        queue = self._queues[record.model]
        if len(queue) >= self.max_queue:  # waiting, not yet claimed
            raise QueueFull(len(queue), self.retry_after)
        self._store(jobs.submit(record, self.clock()), None)
        if idempotency_key is not None:
            self._idempotency[idempotency_key] = record.id
        queue.append(record.id)
        await self._notify()
        return record, True

    async def get(self, job_id: str) -> JobRecord | None:
        self._expire()
        record = self._records.get(job_id)
        return None if record is None else _copy(record)

    async def get_result(self, job_id: str) -> StoredResult | None:
        self._expire()
        entry = self._results.get(job_id)
        return entry[1] if entry else None

    async def events(self, job_id: str) -> AsyncIterator[Event]:
        seen = 0
        while True:
            async with self._changed:

                def arrived(seen: int = seen) -> bool:
                    return len(self._events.get(job_id, ())) > seen

                await self._changed.wait_for(arrived)
                new = self._events[job_id][seen:]
            seen += len(new)
            for event in new:
                yield event
                if event.terminal:
                    return

    async def depth(self, model: str) -> int:
        return len(self._queues[model])

    async def holders(self) -> dict[str, list[str]]:
        return holders_of(self._models.items())

    async def ping(self) -> None:
        return None

    # -- worker side

    async def claim(
        self, consumer: str, models: Sequence[str], count: int, block: float
    ) -> list[Delivery]:
        def waiting() -> bool:
            return any(self._queues[m] for m in models)

        if not waiting() and block > 0:
            try:
                async with asyncio.timeout(block), self._changed:
                    await self._changed.wait_for(waiting)
            except TimeoutError:
                return []

        async def take(model: str, n: int) -> list[Delivery]:
            queue = self._queues[model]
            ids = [queue.popleft() for _ in range(min(n, len(queue)))]
            return [Delivery(job_id, job_id, consumer, model) for job_id in ids]

        return await self._fairly(models, count, take)

    async def cancel_requested(self, job_ids: list[str]) -> set[str]:
        return self._cancel.keys() & set(job_ids)

    async def heartbeat(
        self, consumer: str, deliveries: list[Delivery], models: Sequence[str]
    ) -> None:
        self._models[consumer] = list(models)
