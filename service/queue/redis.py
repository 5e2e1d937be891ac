"""Redis backend: Streams with a consumer group carry jobs to workers, one stream per model.

XADD submits to the job's model stream; XREADGROUP hands a job to one worker, which reads only the
streams of the models it holds; XACK + XDEL retire it. A live worker refreshes its deliveries' idle
time (XCLAIM to itself, JUSTID) with every heartbeat, so XAUTOCLAIM with ``claim_idle`` re-delivers
only the work of a worker that stopped heartbeating. Each delivery's counter bounds retries: past
``max_deliveries`` the job goes to its model's dead-letter stream and fails. A worker's heartbeat
key (TTL ``claim_idle``) names the models it holds; a set of worker names finds the keys. Records,
results (TTL) and a per-job event stream live beside the queues; waiting API replicas block on the
event stream (XREAD BLOCK) instead of polling. Every transition of a record (``service.jobs``) is
written under WATCH/MULTI with its event, so the first terminal state wins and a re-run's result is
discarded. Times on records come from the injected clock; TTLs are Redis's own.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, ParamSpec, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service import jobs
from service.errors import BackendUnavailable, QueueFull
from service.jobs import Change
from service.messages import Event, JobRecord, JobStatus, StoredResult
from service.queue.base import Delivery, QueueBackend, Transition, holders_of
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
            args[0]._groups_ready.clear()  # type: ignore[attr-defined]
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
        self._groups_ready: set[str] = set()  # models whose stream has the group

    async def _ensure_group(self, model: str) -> None:
        if model in self._groups_ready:
            return
        try:
            await self.redis.xgroup_create(
                self.keys.stream(model), self.keys.group, id="0", mkstream=True
            )
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._groups_ready.add(model)

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
        await self.redis.xadd(self.keys.stream(delivery.model), {"id": delivery.job_id})

    @guarded
    async def _retire(self, delivery: Delivery) -> None:
        stream = self.keys.stream(delivery.model)
        await self.redis.xack(stream, self.keys.group, delivery.token)
        await self.redis.xdel(stream, delivery.token)

    # -- API side

    @guarded
    async def submit(
        self, record: JobRecord, idempotency_key: str | None = None
    ) -> tuple[JobRecord, bool]:
        await self._ensure_group(record.model)
        idem = self.keys.idempotency(idempotency_key) if idempotency_key else None
        if idem is not None and not await self.redis.set(idem, record.id, nx=True, ex=self.job_ttl):
            known = await self.redis.get(idem)
            existing = await self.get(known.decode()) if known else None
            if existing is not None:
                return existing, False
            await self.redis.set(idem, record.id, ex=self.job_ttl)
        waiting = await self.depth(record.model)
        if waiting >= self.max_queue:
            if idem is not None:
                await self.redis.delete(idem)
            raise QueueFull(waiting, self.retry_after)
        queued = jobs.submit(record, self.clock()).event
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.job(record.id), _dump(record), ex=self.job_ttl)
            pipe.xadd(self.keys.events(record.id), {"e": _dump(queued)})
            pipe.expire(self.keys.events(record.id), self.job_ttl)
            pipe.xadd(self.keys.stream(record.model), {"id": record.id})
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
    async def depth(self, model: str) -> int:
        await self._ensure_group(model)
        stream = self.keys.stream(model)
        length = await self.redis.xlen(stream)
        pending = await self.redis.xpending(stream, self.keys.group)
        return max(0, length - int(pending["pending"]))

    @guarded
    async def holders(self) -> dict[str, list[str]]:
        names = sorted(n.decode() for n in await self.redis.smembers(self.keys.worker_names))
        if not names:
            return {}
        beats = await self.redis.mget([self.keys.worker(n) for n in names])
        gone = [n for n, beat in zip(names, beats, strict=True) if beat is None]
        if gone:
            await self.redis.srem(self.keys.worker_names, *gone)
        return holders_of(
            (n, json.loads(beat)["models"])
            for n, beat in zip(names, beats, strict=True)
            if beat is not None
        )

    @guarded
    async def ping(self) -> None:
        await self.redis.ping()

    # -- worker side

    @guarded
    async def claim(
        self, consumer: str, models: Sequence[str], count: int, block: float
    ) -> list[Delivery]:
        for model in models:
            await self._ensure_group(model)
        out: list[Delivery] = []
        for model in models:  # first the work of dead workers
            if len(out) < count:
                out += await self._reclaim(consumer, model, count - len(out))

        async def take(model: str, n: int) -> list[Delivery]:
            return await self._read(consumer, [model], n, None)

        out += await self._fairly(models, count - len(out), take)
        if out or block <= 0:
            return out
        # Nothing waits: block on every stream at once; each may answer with one entry.
        woken = await self._read(consumer, models, 1, int(block * 1000))
        for extra in woken[count:]:
            await self._requeue(extra)
            await self._retire(extra)
        return woken[:count]

    async def _read(
        self, consumer: str, models: Sequence[str], count: int, block_ms: int | None
    ) -> list[Delivery]:
        """New entries of the models' streams, ``count`` at most per stream."""
        model_of = {self.keys.stream(m): m for m in models}
        reply = await self.redis.xreadgroup(
            self.keys.group, consumer, dict.fromkeys(model_of, ">"), count=count, block=block_ms
        )
        return [
            Delivery(fields[b"id"].decode(), entry_id.decode(), consumer, model_of[key.decode()])
            for key, entries in reply or []
            for entry_id, fields in entries
        ]

    async def _reclaim(self, consumer: str, model: str, count: int) -> list[Delivery]:
        """Entries of ``model`` idle past ``claim_idle`` (their worker died); past
        ``max_deliveries`` a job goes to the dead letters instead."""
        stream = self.keys.stream(model)
        out: list[Delivery] = []
        _, reclaimed, _ = await self.redis.xautoclaim(
            stream, self.keys.group, consumer, self.claim_idle_ms, "0-0", count=count
        )
        for entry_id, fields in reclaimed:
            info = await self.redis.xpending_range(
                stream, self.keys.group, min=entry_id, max=entry_id, count=1
            )
            attempts = int(info[0]["times_delivered"]) if info else 1
            job_id = fields[b"id"].decode()
            delivery = Delivery(job_id, entry_id.decode(), consumer, model, attempts)
            if attempts > self.max_deliveries:
                await self._dead_letter(delivery)
            else:
                out.append(delivery)
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
        await self.redis.xadd(self.keys.dead_letter(delivery.model), fields)
        await self._retire(delivery)

    @guarded
    async def cancel_requested(self, job_ids: list[str]) -> set[str]:
        if not job_ids:
            return set()
        flags = await self.redis.mget([self.keys.cancel(i) for i in job_ids])
        return {i for i, flag in zip(job_ids, flags, strict=True) if flag is not None}

    @guarded
    async def heartbeat(
        self, consumer: str, deliveries: list[Delivery], models: Sequence[str]
    ) -> None:
        beat = json.dumps({"at": self.clock(), "models": list(models)})
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.worker(consumer), beat, px=self.claim_idle_ms)
            pipe.sadd(self.keys.worker_names, consumer)
            await pipe.execute()
        tokens: dict[str, list[str]] = {}
        for d in deliveries:
            tokens.setdefault(d.model, []).append(d.token)
        for model, held in tokens.items():  # reset their idle time: not for XAUTOCLAIM
            await self.redis.xclaim(
                self.keys.stream(model), self.keys.group, consumer, 0, held, justid=True
            )

    async def close(self) -> None:
        await self.redis.aclose()
