"""Redis backend: Streams with a consumer group carry jobs to workers.

XADD submits; XREADGROUP hands a job to one worker; XACK + XDEL retire it. A live worker
refreshes its deliveries' idle time (XCLAIM to itself, JUSTID) with every heartbeat, so XAUTOCLAIM
with ``claim_idle`` re-delivers only the work of a worker that stopped heartbeating. Each
delivery's counter bounds retries: past ``max_deliveries`` the job goes to a dead-letter stream
and fails. Records, results (TTL) and a per-job event stream live beside the queue; waiting API
replicas block on the event stream (XREAD BLOCK) instead of polling. Every transition of a
record (``service.jobs``) is written under WATCH/MULTI with its event, so the first terminal state
wins and a re-run's result is discarded. Times on records come from the injected clock; TTLs
are Redis's own.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service import jobs
from service.errors import BackendUnavailable, QueueFull
from service.jobs import Change
from service.messages import Event, JobRecord, JobStatus, StoredResult
from service.queue.base import Delivery, QueueBackend, Transition
from service.queue.keys import Keys

P = ParamSpec("P")
R = TypeVar("R")
DOWN = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


def guarded(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Map 'Redis is unreachable' to BackendUnavailable (the API's 503)."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except DOWN as e:
            args[0]._group_ready = False  # type: ignore[attr-defined]
            raise BackendUnavailable(f"redis unreachable: {e}") from e

    return wrapper


def _record(raw: bytes | None) -> JobRecord | None:
    return None if raw is None else JobRecord(**json.loads(raw))


def _dump(obj: JobRecord | Event) -> str:
    return json.dumps(obj.to_dict())


class RedisBackend(QueueBackend):
    name = "redis"

    def __init__(
        self,
        url: str,
        max_queue: int,
        result_ttl: float,
        job_ttl: float,
        claim_idle: float,
        max_deliveries: int,
        prefix: str = "skipdit",
        retry_after: float = 1,
        socket_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ):
        self.redis = aioredis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
        )
        self.keys = Keys(prefix)
        self.max_queue = max_queue
        self.result_ttl = int(result_ttl)
        self.job_ttl = int(job_ttl)
        self.claim_idle_ms = int(claim_idle * 1000)
        self.max_deliveries = max_deliveries
        self.retry_after = retry_after
        self.clock = clock
        self._group_ready = False

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self.redis.xgroup_create(self.keys.stream, self.keys.group, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

    # -- storage under the base class's transitions (guarded like every public method)

    @guarded
    async def _commit(
        self, job_id: str, transition: Transition, result: StoredResult | None = None
    ) -> tuple[JobRecord | None, bool]:
        key = self.keys.job(job_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    record = _record(await pipe.get(key))
                    change = None if record is None else transition(record)
                    if change is None:
                        await pipe.unwatch()
                        return record, False
                    pipe.multi()
                    self._store(pipe, change, result)
                    await pipe.execute()
                    return change.record, True
                except WatchError:
                    continue

    def _store(self, pipe: Any, change: Change, result: StoredResult | None) -> None:
        """Queue the writes of one change on a MULTI pipeline."""
        record = change.record
        pipe.set(self.keys.job(record.id), _dump(record), keepttl=True)
        if change.event is not None:
            pipe.xadd(self.keys.events(record.id), {"e": _dump(change.event)})
        if record.status.terminal:
            pipe.expire(self.keys.job(record.id), self.job_ttl)
            pipe.delete(self.keys.cancel(record.id))
        if result is not None:
            key = self.keys.result(record.id)
            fields: dict[str, Any] = {
                "content_type": result.content_type,
                "n": len(result.images),
                "meta": json.dumps(result.meta),
            }
            fields |= {str(i): image for i, image in enumerate(result.images)}
            pipe.hset(key, mapping=fields)
            pipe.expire(key, self.result_ttl)

    @guarded
    async def _flag_cancel(self, job_id: str) -> None:
        await self.redis.set(self.keys.cancel(job_id), 1, ex=self.job_ttl)

    @guarded
    async def _requeue(self, delivery: Delivery) -> None:
        await self.redis.xadd(self.keys.stream, {"id": delivery.job_id})

    @guarded
    async def _retire(self, delivery: Delivery) -> None:
        await self.redis.xack(self.keys.stream, self.keys.group, delivery.token)
        await self.redis.xdel(self.keys.stream, delivery.token)

    # -- API side

    @guarded
    async def submit(
        self, record: JobRecord, idempotency_key: str | None = None
    ) -> tuple[JobRecord, bool]:
        await self._ensure_group()
        idem = self.keys.idempotency(idempotency_key) if idempotency_key else None
        if idem is not None and not await self.redis.set(idem, record.id, nx=True, ex=self.job_ttl):
            known = await self.redis.get(idem)
            existing = await self.get(known.decode()) if known else None
            if existing is not None:
                return existing, False
            await self.redis.set(idem, record.id, ex=self.job_ttl)
        waiting = await self.depth()
        if waiting >= self.max_queue:
            if idem is not None:
                await self.redis.delete(idem)
            raise QueueFull(waiting, self.retry_after)
        queued = jobs.submit(record, self.clock()).event
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.job(record.id), _dump(record), ex=self.job_ttl)
            pipe.xadd(self.keys.events(record.id), {"e": _dump(queued)})
            pipe.expire(self.keys.events(record.id), self.job_ttl)
            pipe.xadd(self.keys.stream, {"id": record.id})
            await pipe.execute()
        return record, True

    @guarded
    async def get(self, job_id: str) -> JobRecord | None:
        return _record(await self.redis.get(self.keys.job(job_id)))

    @guarded
    async def get_result(self, job_id: str) -> StoredResult | None:
        raw = await self.redis.hgetall(self.keys.result(job_id))
        if not raw:
            return None
        n = int(raw[b"n"])
        return StoredResult(
            content_type=raw[b"content_type"].decode(),
            images=[raw[str(i).encode()] for i in range(n)],
            meta=json.loads(raw[b"meta"]),
        )

    async def events(self, job_id: str) -> AsyncIterator[Event]:
        last = b"0-0"
        key = self.keys.events(job_id)
        while True:
            try:
                reply = await self.redis.xread({key: last}, count=100, block=2000)
            except DOWN as e:
                raise BackendUnavailable(f"redis unreachable: {e}") from e
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    event = Event(**json.loads(fields[b"e"]))
                    yield event
                    if event.terminal:
                        return

    @guarded
    async def depth(self) -> int:
        await self._ensure_group()
        length = await self.redis.xlen(self.keys.stream)
        pending = await self.redis.xpending(self.keys.stream, self.keys.group)
        return max(0, length - int(pending["pending"]))

    @guarded
    async def ping(self) -> None:
        await self.redis.ping()
        await self._ensure_group()

    # -- worker side

    @guarded
    async def claim(self, consumer: str, count: int, block: float) -> list[Delivery]:
        await self._ensure_group()
        out: list[Delivery] = []
        _, reclaimed, _ = await self.redis.xautoclaim(
            self.keys.stream, self.keys.group, consumer, self.claim_idle_ms, "0-0", count=count
        )
        for entry_id, fields in reclaimed:
            info = await self.redis.xpending_range(
                self.keys.stream, self.keys.group, min=entry_id, max=entry_id, count=1
            )
            attempts = int(info[0]["times_delivered"]) if info else 1
            delivery = Delivery(fields[b"id"].decode(), entry_id.decode(), consumer, attempts)
            if attempts > self.max_deliveries:
                await self._dead_letter(delivery)
            else:
                out.append(delivery)
        if len(out) < count:
            reply = await self.redis.xreadgroup(
                self.keys.group,
                consumer,
                {self.keys.stream: ">"},
                count=count - len(out),
                block=int(block * 1000) if block > 0 else None,
            )
            for _, entries in reply or []:
                out += [Delivery(f[b"id"].decode(), eid.decode(), consumer) for eid, f in entries]
        return out

    async def _dead_letter(self, delivery: Delivery) -> None:
        now = self.clock()
        error = {
            "code": "poison_job",
            "message": f"gave up after {delivery.attempts - 1} deliveries",
        }
        await self._commit(
            delivery.job_id, lambda r: jobs.finish(r, JobStatus.FAILED, now, error=error)
        )
        fields = {"id": delivery.job_id, "attempts": delivery.attempts, "at": now}
        await self.redis.xadd(self.keys.dead_letter, fields)
        await self._retire(delivery)

    @guarded
    async def cancel_requested(self, job_ids: list[str]) -> set[str]:
        if not job_ids:
            return set()
        flags = await self.redis.mget([self.keys.cancel(i) for i in job_ids])
        return {i for i, flag in zip(job_ids, flags, strict=True) if flag is not None}

    @guarded
    async def heartbeat(self, consumer: str, deliveries: list[Delivery]) -> None:
        await self.redis.set(self.keys.worker(consumer), self.clock(), px=self.claim_idle_ms)
        if deliveries:
            await self.redis.xclaim(
                self.keys.stream,
                self.keys.group,
                consumer,
                0,
                [d.token for d in deliveries],
                justid=True,
            )

    async def close(self) -> None:
        await self.redis.aclose()
