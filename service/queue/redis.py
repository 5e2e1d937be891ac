"""Redis backend: Streams with a consumer group carry jobs to workers, one stream per model; a
plain Redis or a Redis Cluster (``cluster=True``), through one code path.

XADD submits to the job's model stream; XREADGROUP hands a job to one worker, which reads only the
streams of the models it holds; XACK + XDEL retire it. A live worker refreshes its deliveries' idle
time (XCLAIM to itself, JUSTID) with every heartbeat, so XAUTOCLAIM with ``claim_idle`` re-delivers
only the work of a worker that stopped heartbeating (a worker looks for it every tenth of
``claim_idle``). Each delivery's counter bounds retries: past ``max_deliveries`` the job goes to
its model's dead-letter stream and fails. A worker's heartbeat key (TTL ``claim_idle``) names
the models it holds; a set of worker names finds the keys. Records, results (TTL) and a per-job
event stream live beside the queues; waiting API replicas block on the event stream (XREAD BLOCK)
instead of polling. Times on records come from the injected clock; TTLs are Redis's own.

Every transition of a record (``service.jobs``) is a compare-and-set: read the record, compute the
change in Python, then one Lua script checks the record is unchanged and writes the new record, its
event, the result and the end-of-job cleanup at once (or the read starts over). That is WATCH/MULTI
without a watching connection: redis-py's asyncio cluster pipeline runs each watched command on a
thread of its own and waits for it, blocking the event loop. The script's keys are all the job's
(``service.queue.keys``: one hash tag, one slot). So the first terminal state wins and a re-run's
result is discarded, on a cluster too.

Slots. A job's keys share the job id's slot: jobs spread over every master. A deployment's streams,
dead letters and heartbeats share the prefix's slot: a worker that holds several models blocks on
all their streams in one XREADGROUP and wakes on the first job of any; read stream by stream it
would poll, or hold a blocked connection per model. The queues carry only job ids, a few commands
per job of seconds, far below what one master serves; the bytes (records, events, images) spread.

A submit writes the record (job slot), then XADDs to the stream (queue slot): two slots, so not one
atomic step. What keeps the guarantees is one more key of the job, ``entry``: the stream entry that
carries it, set after the XADD and by every start. Redis may fail between the writes: the submit
answers 503 and the record is left queued without an entry (it expires with ``job_ttl``). A retry
with the same idempotency key finds such a record and enqueues it then, so the job is not lost to
a client that retries. The cost is that a job may get a second entry (the XADD landed, its answer
did not); a start refuses a delivery of a job that runs under another entry, and acks it, so a job
runs under one entry at a time and ends once.

Webhooks (``service.webhooks``) have the same two-slot step: a change is written on the job's
slot, then the hook it owes goes to the outbox on the deployment's slot (a sorted set of due
times, the hooks, their attempt counts; ``HOOK_ADD``), once per hook id. If the process dies
between the two, the job's delivery is still unacked (a worker acks after the write) or its
stream entry still waits (a cancel of a queued job), so it is delivered again; that start is
refused because the job has ended, and a transition refused on an ended job puts the end's hook
in the outbox, where the put-once marker drops it if it is already there. Deliverers claim
hooks for a lease by moving their due time to the lease's end (``HOOK_CLAIM``): a claim whose
deliverer died comes due again by itself.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ClusterError, RedisClusterException, ResponseError, SlotNotCoveredError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT, FieldT, StreamIdT

from service import jobs
from service.errors import BackendUnavailable, QueueFull
from service.jobs import Change
from service.messages import Event, JobRecord, JobStatus, StoredResult
from service.queue.base import (
    Delivery,
    QueueBackend,
    Transition,
    end_hook_of,
    holders_of,
    hook_of,
)
from service.queue.keys import Keys
from service.webhooks import Hook, dead_letter_entry

P = ParamSpec("P")
R = TypeVar("R")
DOWN = (
    RedisConnectionError, RedisTimeoutError, ClusterError, SlotNotCoveredError, ConnectionError,
    OSError,
)  # fmt: skip

# Compare-and-set of one job's record. KEYS: record, events, cancel, entry, result. ARGV: the
# record and entry as read ("" = none), the new record, its event ("" = none), job_ttl, "1" if
# the job ends, the entry to set ("" = keep), result_ttl, then the result's field/value pairs.
APPLY = """
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] or (redis.call('GET', KEYS[4]) or '') ~= ARGV[2]
then
  return 0
end
local ttl = tonumber(ARGV[5])
if ARGV[1] == '' then
  redis.call('SET', KEYS[1], ARGV[3], 'EX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[3], 'KEEPTTL')
end
if ARGV[4] ~= '' then
  redis.call('XADD', KEYS[2], '*', 'e', ARGV[4])
  if ARGV[1] == '' then
    redis.call('EXPIRE', KEYS[2], ttl)
  end
end
if ARGV[7] ~= '' then
  redis.call('SET', KEYS[4], ARGV[7], 'EX', ttl)
end
if ARGV[6] == '1' then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('DEL', KEYS[3], KEYS[4])
end
if #ARGV > 8 then
  redis.call('HSET', KEYS[5], unpack(ARGV, 9))
  redis.call('EXPIRE', KEYS[5], tonumber(ARGV[8]))
end
return 1
"""

# The webhook outbox; every key on the deployment's slot. KEYS: put marker, due, hooks. ARGV:
# hook id, its JSON, now, the marker's TTL. 1 if put, 0 if it had been.
HOOK_ADD = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[4])) then
  return 0
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
"""
# KEYS: due, hooks, attempts. ARGV: now, the lease's end, count. [hook JSON, attempts, ...].
HOOK_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  local hook = redis.call('HGET', KEYS[2], id)
  if hook then
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    table.insert(out, hook)
    table.insert(out, redis.call('HINCRBY', KEYS[3], id, 1))
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
"""
# KEYS: due, hooks, attempts, dead letters. ARGV: hook id, the claim's attempts, "done" | "retry"
# | "dead", the retry's due time, then the dead letter's field/value pairs. A retry or a dead
# letter of a claim that another claim has replaced changes nothing.
HOOK_END = """
local attempts = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
if ARGV[3] ~= 'done' and attempts ~= tonumber(ARGV[2]) then
  return 0
end
if ARGV[3] == 'retry' then
  redis.call('ZADD', KEYS[1], 'XX', ARGV[4], ARGV[1])
  return 1
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
if ARGV[3] == 'dead' then
  redis.call('XADD', KEYS[4], '*', unpack(ARGV, 5))
end
return 1
"""


def _down(e: Exception) -> bool:
    """Whether ``e`` means Redis cannot be reached (the cluster client wraps a failed start)."""
    return isinstance(e, DOWN) or (
        isinstance(e, RedisClusterException) and isinstance(e.__cause__, DOWN)
    )


# Replies as this client gets them: bytes (decode_responses off), RESP2. redis-py types each
# reply for every decoding and protocol at once (bytes | str; lists or dicts).
Streams = list[list[Any]]  # XREAD / XREADGROUP: [[stream, [(entry id, fields), ...]], ...]


def guarded(
    fn: Callable[Concatenate[RedisBackend, P], Awaitable[R]],
) -> Callable[Concatenate[RedisBackend, P], Coroutine[Any, Any, R]]:
    """Map 'Redis is unreachable' to BackendUnavailable (the API's 503)."""

    @functools.wraps(fn)
    async def wrapper(self: RedisBackend, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            await self._started()
            return await fn(self, *args, **kwargs)
        except (*DOWN, RedisClusterException) as e:
            if not _down(e):
                raise
            self._groups_ready.clear()
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
        cluster: bool = False,
    ):
        client = RedisCluster if cluster else aioredis.Redis
        self.redis: aioredis.Redis | RedisCluster = client.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
        )
        self._apply = self.redis.register_script(APPLY)
        self._hook_add = self.redis.register_script(HOOK_ADD)
        self._hook_claim = self.redis.register_script(HOOK_CLAIM)
        self._hook_end = self.redis.register_script(HOOK_END)
        self.keys = Keys(prefix)
        self.max_queue = max_queue
        self.result_ttl = int(result_ttl)
        self.job_ttl = int(job_ttl)
        self.claim_idle_ms = int(claim_idle * 1000)
        # A dead worker's entries come back after claim_idle; looking for them at every claim
        # (ten times a second while work runs) would only cost round trips: look once per tenth.
        self.reclaim_every = claim_idle / 10
        self._reclaimed_at: dict[str, float] = {}  # model -> when its stream was last looked at
        self.max_deliveries = max_deliveries
        self.retry_after = retry_after
        self.clock = clock
        self._groups_ready: set[str] = set()  # models whose stream has the group

    async def _started(self) -> None:
        """Finish starting the client before any command. redis-py's cluster client, while one
        task starts it, routes another task's command with an empty command table and fails
        ("No way to dispatch this command ... Missing key"); a started client returns at once."""
        await self.redis.initialize()

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
        return await self._transition(job_id, transition, result)

    async def _transition(
        self,
        job_id: str,
        transition: Transition,
        result: StoredResult | None = None,
        token: str | None = None,
    ) -> tuple[JobRecord | None, bool]:
        """``_commit``; with ``token`` (a start of that delivery) it is refused while the job runs
        under another entry, and on success that entry becomes the job's."""
        key, entry_key = self.keys.job(job_id), self.keys.entry(job_id)
        while True:
            raw, entry = cast(list[bytes | None], await self.redis.mget(key, entry_key))
            record = _record(raw)
            if record is None:
                return None, False
            running = record.status is JobStatus.RUNNING and entry is not None
            # running: entry is not None
            if token is not None and running and cast(bytes, entry).decode() != token:
                return record, False  # a second entry of a job that runs: drop it
            change = transition(record)
            if change is None:
                if record.status.terminal:  # see the module docstring: webhooks
                    await self._hook_if(end_hook_of(record))
                return record, False
            if await self._write(change, raw, entry, result, token):
                await self._hook_if(hook_of(change))
                return change.record, True

    async def _hook_if(self, hook: Hook | None) -> None:
        if hook is not None:
            await self._hook(hook)

    async def _write(
        self,
        change: Change,
        raw: bytes | None,
        entry: bytes | None,
        result: StoredResult | None = None,
        token: str | None = None,
    ) -> bool:
        """Store ``change`` if the record and entry still read ``raw`` and ``entry`` (None: no
        such key); whether it was stored."""
        record = change.record
        fields: list[Any] = []
        if result is not None:
            fields = ["content_type", result.content_type, "n", len(result.images)]
            fields += ["meta", json.dumps(result.meta)]
            for i, image in enumerate(result.images):
                fields += [str(i), image]
        keys = [
            self.keys.job(record.id), self.keys.events(record.id), self.keys.cancel(record.id),
            self.keys.entry(record.id), self.keys.result(record.id),
        ]  # fmt: skip
        args = [
            raw or b"", entry or b"", _dump(record),
            _dump(change.event) if change.event is not None else "", self.job_ttl,
            int(record.status.terminal), token or "", self.result_ttl, *fields,
        ]  # fmt: skip
        return await self._apply(keys=keys, args=args) == 1

    async def _enqueue(self, job_id: str, model: str, replace: bool = False) -> None:
        """XADD the job to its model's stream and make the entry the job's (``replace``: even
        if it already has one)."""
        token = await self.redis.xadd(self.keys.stream(model), {"id": job_id})
        await self.redis.set(self.keys.entry(job_id), token, nx=not replace, ex=self.job_ttl)

    @guarded
    async def _flag_cancel(self, job_id: str, reason: str | None) -> None:
        await self.redis.set(self.keys.cancel(job_id), reason or "", nx=True, ex=self.job_ttl)

    @guarded
    async def _cancel_reason(self, job_id: str) -> str | None:
        flag = cast(bytes | None, await self.redis.get(self.keys.cancel(job_id)))
        return flag.decode() if flag else None  # b"": flagged without a reason

    @guarded
    async def _requeue(self, delivery: Delivery) -> None:
        await self._enqueue(delivery.job_id, delivery.model, replace=True)

    @guarded
    async def _retire(self, delivery: Delivery) -> None:
        stream = self.keys.stream(delivery.model)
        async with self.redis.pipeline(transaction=False) as pipe:  # one key: one round trip
            pipe.xack(stream, self.keys.group, delivery.token)
            pipe.xdel(stream, delivery.token)
            await pipe.execute()

    # -- webhook outbox

    @guarded
    async def _hook(self, hook: Hook) -> None:
        k = self.keys
        keys = [k.hook_put(hook.id), k.hooks_due, k.hooks]
        await self._hook_add(keys=keys, args=[hook.id, hook.to_json(), self.clock(), self.job_ttl])

    @guarded
    async def hooks_claim(self, now: float, until: float, count: int) -> list[Hook]:
        k = self.keys
        reply = await self._hook_claim(
            keys=[k.hooks_due, k.hooks, k.hook_attempts], args=[now, until, count]
        )
        return [Hook.from_json(raw, int(n)) for raw, n in zip(reply[::2], reply[1::2], strict=True)]

    async def _end_hook(self, hook: Hook, how: str, at: float = 0, *fields: EncodableT) -> None:
        k = self.keys
        keys = [k.hooks_due, k.hooks, k.hook_attempts, k.hook_dead(hook.model)]
        await self._hook_end(keys=keys, args=[hook.id, hook.attempts, how, at, *fields])

    @guarded
    async def hook_done(self, hook: Hook) -> None:
        await self._end_hook(hook, "done")

    @guarded
    async def hook_retry(self, hook: Hook, at: float) -> None:
        await self._end_hook(hook, "retry", at)

    @guarded
    async def hook_dead(self, hook: Hook, error: str, at: float) -> None:
        entry = dead_letter_entry(hook, error, at)
        await self._end_hook(hook, "dead", at, *(x for kv in entry.items() for x in kv))

    @guarded
    async def webhook_dead_letters(self, model: str) -> list[dict[str, Any]]:
        entries = cast(
            list[tuple[bytes, dict[bytes, bytes]]],
            await self.redis.xrange(self.keys.hook_dead(model)),
        )
        return [
            {key.decode(): value.decode() for key, value in fields.items()} for _, fields in entries
        ]

    # -- API side

    @guarded
    async def submit(
        self, record: JobRecord, idempotency_key: str | None = None
    ) -> tuple[JobRecord, bool]:
        await self._ensure_group(record.model)
        idem = self.keys.idempotency(idempotency_key) if idempotency_key else None
        if idem is not None and not await self.redis.set(idem, record.id, nx=True, ex=self.job_ttl):
            known = cast(bytes | None, await self.redis.get(idem))
            existing = await self.get(known.decode()) if known else None
            if existing is not None:
                lost = not await self.redis.exists(self.keys.entry(existing.id))
                if existing.status is JobStatus.QUEUED and lost:
                    await self._enqueue(existing.id, existing.model)  # see the module docstring
                return existing, False
            await self.redis.set(idem, record.id, ex=self.job_ttl)
        waiting = await self.depth(record.model)
        if waiting >= self.max_queue:
            if idem is not None:
                await self.redis.delete(idem)
            raise QueueFull(waiting, self.retry_after)
        await self._write(jobs.submit(record, self.clock()), None, None)
        await self._enqueue(record.id, record.model)
        return record, True

    @guarded
    async def get(self, job_id: str) -> JobRecord | None:
        return _record(cast(bytes | None, await self.redis.get(self.keys.job(job_id))))

    @guarded
    async def get_result(self, job_id: str) -> StoredResult | None:
        raw = cast(dict[bytes, bytes], await self.redis.hgetall(self.keys.result(job_id)))
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
                await self._started()
                reply = cast(
                    Streams | None, await self.redis.xread({key: last}, count=100, block=2000)
                )
            except (*DOWN, RedisClusterException) as e:
                if not _down(e):
                    raise
                raise BackendUnavailable(f"redis unreachable: {e}") from e
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    event = Event(**json.loads(fields[b"e"]))
                    yield event
                    if event.terminal:
                        return

    @guarded
    async def dead_letters(self, model: str) -> int:
        return await self.redis.xlen(self.keys.dead_letter(model))

    @guarded
    async def depth(self, model: str) -> int:
        await self._ensure_group(model)
        stream = self.keys.stream(model)
        async with self.redis.pipeline(transaction=False) as pipe:  # one key: one round trip
            pipe.xlen(stream)
            pipe.xpending(stream, self.keys.group)
            length, pending = await pipe.execute()
        return max(0, length - int(pending["pending"]))

    @guarded
    async def holders(self) -> dict[str, list[str]]:
        members = cast(set[bytes], await self.redis.smembers(self.keys.worker_names))
        names = sorted(n.decode() for n in members)
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
        now = time.monotonic()
        for model in models:  # first the work of dead workers
            due = now - self._reclaimed_at.get(model, -math.inf) >= self.reclaim_every
            if len(out) < count and due:
                self._reclaimed_at[model] = now
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
        streams = cast(Streams | None, reply)
        return [
            Delivery(fields[b"id"].decode(), entry_id.decode(), consumer, model_of[key.decode()])
            for key, entries in streams or []
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
        fields: dict[FieldT, EncodableT] = {
            "id": delivery.job_id,
            "attempts": delivery.attempts,
            "at": now,
        }
        await self.redis.xadd(self.keys.dead_letter(delivery.model), fields)
        await self._retire(delivery)

    @guarded
    async def start(self, delivery: Delivery) -> JobRecord | None:
        """The base class's start, refusing (and acking) a second entry of a running job."""
        now = self.clock()
        record, started = await self._transition(
            delivery.job_id, lambda r: jobs.start(r, delivery.consumer, now), token=delivery.token
        )
        if not started:
            await self._retire(delivery)
            return None
        return record

    @guarded
    async def cancel_requested(self, job_ids: list[str]) -> set[str]:
        if not job_ids:
            return set()
        async with self.redis.pipeline(transaction=False) as pipe:  # one slot per job
            for job_id in job_ids:
                pipe.get(self.keys.cancel(job_id))
            flags = await pipe.execute()
        return {i for i, flag in zip(job_ids, flags, strict=True) if flag is not None}

    @guarded
    async def heartbeat(
        self, consumer: str, deliveries: list[Delivery], models: Sequence[str]
    ) -> None:
        beat = json.dumps({"at": self.clock(), "models": list(models)})
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.worker(consumer), beat, px=self.claim_idle_ms)
            pipe.sadd(self.keys.worker_names, consumer)
            await pipe.execute()
        tokens: dict[str, list[StreamIdT]] = {}
        for d in deliveries:
            tokens.setdefault(d.model, []).append(d.token)
        for model, held in tokens.items():  # reset their idle time: not for XAUTOCLAIM
            await self.redis.xclaim(
                self.keys.stream(model), self.keys.group, consumer, 0, held, justid=True
            )

    async def close(self) -> None:
        await self.redis.aclose()
