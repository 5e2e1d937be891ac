"""HTTP -> Redis -> separate worker processes: kills, drains, dead letters, Redis outages; and
the Redis backend's transitions on their own (the first terminal state wins), on a plain Redis and
on a Redis Cluster."""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import redis
from redis.asyncio.cluster import RedisCluster

from service.errors import BackendUnavailable
from service.messages import EventKind, JobRecord, JobStatus, StoredResult
from service.queue.keys import Keys
from service.queue.redis import RedisBackend
from tests.service.helpers import (
    Clock,
    RedisServer,
    Workers,
    a_killed_workers_job_is_finished_by_another_exactly_once,
    api_settings,
    free_port,
    redis_client,
    running_app,
    settings_for,
    wait_for,
)

MODEL = "tiny"  # the backend tests' model name (no model is loaded there)


@pytest.fixture
def workers(redis_server: RedisServer, tiny_model_dir: Path) -> Iterator[Workers]:
    w = Workers(redis_server.url, tiny_model_dir, f"w{uuid.uuid4().hex[:8]}")
    yield w
    w.stop_all()


@pytest.mark.slow
async def test_http_redis_worker_returns_the_same_bytes_as_skipdit_generate(
    workers: Workers, tmp_path: Path
) -> None:
    workers.start("w1")
    params = {"class_label": 6, "steps": 12, "seed": 42, "cache_interval": 3}
    async with running_app(api_settings(workers)) as client:
        submitted = await client.post("/generate", json=params | {"async": True})
        job_id = submitted.json()["id"]
        await wait_for(client, job_id, lambda r: r["status"] == "done")
        served = (await client.get(f"/jobs/{job_id}/result")).content
    out = tmp_path / "cli.png"
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "generate", "--model", str(workers.model_dir),
         "--class-label", "6", "--steps", "12", "--seed", "42", "--cache-interval", "3",
         "--num-images", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert served == out.read_bytes()


@pytest.mark.slow
async def test_a_killed_workers_job_is_finished_by_another_exactly_once(workers: Workers) -> None:
    await a_killed_workers_job_is_finished_by_another_exactly_once(workers)


@pytest.mark.slow
async def test_a_job_that_keeps_killing_workers_goes_to_the_dead_letter_stream(
    workers: Workers,
) -> None:
    env = {"SKIPDIT_MAX_DELIVERIES": "1"}
    workers.start("a", **env)
    async with running_app(api_settings(workers, max_deliveries=1)) as client:
        job_id = (await client.post("/generate", json={"steps": 1000, "async": True})).json()["id"]
        await wait_for(client, job_id, lambda r: r["step"] >= 5)
        workers.procs["a"].send_signal(signal.SIGKILL)
        workers.procs["a"].wait(10)
        workers.start("b", **env)
        failed = await wait_for(client, job_id, lambda r: r["status"] == "failed", timeout=120)
        metrics = (await client.get("/metrics")).text
    assert failed["error"]["code"] == "poison_job"
    model = str(workers.model_dir)
    assert f'skipdit_dead_letter_jobs{{model="{model}"}} 1.0' in metrics  # the alert's series
    dead_key = Keys(workers.prefix).dead_letter(str(workers.model_dir))
    dead = redis_client(api_settings(workers)).xrange(dead_key)
    assert [fields[b"id"].decode() for _, fields in dead] == [job_id]


@pytest.mark.slow
async def test_sigterm_stops_intake_finishes_running_work_and_exits(workers: Workers) -> None:
    port = free_port()
    proc = workers.start(
        "a", SKIPDIT_METRICS_PORT=str(port), SKIPDIT_MAX_INFLIGHT="1", SKIPDIT_LOG_LEVEL="INFO"
    )
    async with running_app(api_settings(workers)) as client:
        first = (await client.post("/generate", json={"steps": 600, "async": True})).json()["id"]
        second = (await client.post("/generate", json={"steps": 5, "async": True})).json()["id"]
        await wait_for(client, first, lambda r: r["step"] >= 10)
        async with httpx.AsyncClient() as plain:
            metrics = (await plain.get(f"http://127.0.0.1:{port}/metrics")).text
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 60)
        first_record = (await client.get(f"/jobs/{first}")).json()
        second_record = (await client.get(f"/jobs/{second}")).json()
    log = proc.stderr.read()
    assert code == 0, log
    assert "froze" in log  # the worker process froze its start-up heap (service/heap.py)
    assert first_record["status"] == "done"  # drained, not dropped
    assert second_record["status"] == "queued"  # never taken: intake stopped
    assert "skipdit_step_duration_seconds_bucket" in metrics
    assert "skipdit_inflight_requests" in metrics


@pytest.mark.redis  # its own redis-server
async def test_redis_down_gives_503_and_the_service_recovers(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    server = RedisServer(tmp_path).start()
    try:
        settings = settings_for("redis", tiny_model_dir, server.url)
        async with running_app(settings) as client:
            assert (await client.get("/readyz")).status_code == 200
            server.stop()
            ready = await client.get("/readyz")
            submit = await client.post("/generate", json={"steps": 3})
            health = await client.get("/healthz")
            server.start()
            recovered = await client.get("/readyz")
            after = await client.post("/generate", json={"steps": 3})
    finally:
        server.stop()
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "backend_unavailable"
    assert submit.status_code == 503 and health.status_code == 200
    assert recovered.status_code == 200
    assert after.status_code == 200, after.text


@pytest_asyncio.fixture(params=["redis", "cluster"])
async def backend(
    request: pytest.FixtureRequest, redis_server: RedisServer
) -> AsyncIterator[RedisBackend]:
    backend = RedisBackend(
        redis_server.url, max_queue=10, result_ttl=60, job_ttl=600, claim_idle=30,
        max_deliveries=3, prefix=f"b{uuid.uuid4().hex[:8]}", clock=Clock(),
        cluster=request.param == "cluster",
    )  # fmt: skip
    yield backend
    await backend.close()


async def stored_kinds(backend: RedisBackend, job_id: str) -> list[str]:
    entries = await backend.redis.xrange(backend.keys.events(job_id))
    return [json.loads(fields[b"e"])["type"] for _, fields in entries]


async def test_redis_backend_first_finish_wins_and_late_progress_is_refused(
    backend: RedisBackend,
) -> None:
    request = {"model": MODEL, "steps": 10}
    record, _ = await backend.submit(JobRecord(request=request, total_steps=10))
    (delivery,) = await backend.claim("a", [MODEL], 1, 0)
    running = await backend.start(delivery)
    assert running is not None and running.started_at == backend.clock()
    backend.clock.advance(5)
    error = {"code": "poison_job", "message": "gave up"}
    failed = await backend.finish(delivery, JobStatus.FAILED, error=error)
    await backend.progress(record.id, EventKind.STEP, 4, 10, "full")  # a late, stale worker
    late = await backend.finish(delivery, JobStatus.DONE, StoredResult("image/png", [b"x"], {}))
    assert failed is not None and failed.finished_at == backend.clock() and late is None
    final = await backend.get(record.id)
    assert final is not None and final.status is JobStatus.FAILED and final.step == 0
    assert await backend.get_result(record.id) is None
    assert await stored_kinds(backend, record.id) == ["queued", "failed"]
    assert await backend.depth(MODEL) == 0


async def test_redis_backend_cancel_flags_running_jobs_and_ends_queued_ones(
    backend: RedisBackend,
) -> None:
    first, _ = await backend.submit(JobRecord(request={"model": MODEL, "steps": 10}))
    second, _ = await backend.submit(JobRecord(request={"model": MODEL, "steps": 10}))
    (delivery,) = await backend.claim("a", [MODEL], 1, 0)
    await backend.start(delivery)
    flagged = await backend.request_cancel(first.id)
    cancelled = await backend.request_cancel(second.id)
    assert flagged is not None and flagged.status is JobStatus.RUNNING
    assert cancelled is not None and cancelled.status is JobStatus.CANCELLED
    assert await backend.cancel_requested([first.id, second.id]) == {first.id}
    (stale,) = await backend.claim("a", [MODEL], 1, 0)
    assert await backend.start(stale) is None  # cancelled while queued: acked, never run
    await backend.finish(delivery, JobStatus.CANCELLED)
    assert await backend.cancel_requested([first.id]) == set()
    assert await stored_kinds(backend, second.id) == ["queued", "cancelled"]


async def test_redis_backend_release_requeues_only_unfinished_jobs(backend: RedisBackend) -> None:
    record, _ = await backend.submit(JobRecord(request={"model": MODEL, "steps": 10}))
    (delivery,) = await backend.claim("a", [MODEL], 1, 0)
    await backend.start(delivery)
    await backend.release(delivery)
    assert (await backend.get(record.id)).status is JobStatus.QUEUED
    assert await backend.depth(MODEL) == 1
    (again,) = await backend.claim("b", [MODEL], 1, 0)
    assert again.job_id == record.id and (await backend.start(again)).worker == "b"
    await backend.finish(again, JobStatus.DONE, StoredResult("image/png", [b"x"], {"seed": 1}))
    await backend.release(again)
    assert await backend.depth(MODEL) == 0


async def test_redis_backend_claims_only_the_named_models_streams_fairly(
    backend: RedisBackend,
) -> None:
    ids: dict[str, list[str]] = {"x": [], "y": []}
    for model, n in (("x", 3), ("y", 3)):
        for _ in range(n):
            record, _ = await backend.submit(JobRecord(request={"model": model, "steps": 2}))
            ids[model].append(record.id)
    assert await backend.claim("a", [MODEL], 10, 0) == []
    claimed = await backend.claim("a", ["x", "y"], 4, 0)
    assert sorted(d.job_id for d in claimed) == sorted(ids["x"][:2] + ids["y"][:2])
    assert [d.job_id for d in await backend.claim("b", ["y"], 10, 0)] == ids["y"][2:]
    assert (await backend.depth("x"), await backend.depth("y")) == (1, 0)
    assert await backend.redis.exists(backend.keys.stream("x"), backend.keys.stream("y")) == 2


async def test_a_blocked_claim_woken_by_two_streams_keeps_its_count_and_loses_nothing(
    backend: RedisBackend,
) -> None:
    for model in ("x", "y"):
        await backend.depth(model)  # creates the stream and its group
    claiming = asyncio.create_task(backend.claim("a", ["x", "y"], 1, 10))
    if isinstance(backend.redis, RedisCluster):  # the node that holds the streams
        node = backend.redis.get_node_from_key(backend.keys.stream("x"))
        info = functools.partial(backend.redis.info, "clients", target_nodes=node)
    else:
        info = functools.partial(backend.redis.info, "clients")
    async with asyncio.timeout(10):
        while int((await info())["blocked_clients"]) == 0:
            await asyncio.sleep(0.01)
    # Both arrive at once. Redis 7.0 answers with one stream; should a version answer with both,
    # the claim puts back what is over its count.
    async with backend.redis.pipeline(transaction=True) as pipe:
        pipe.xadd(backend.keys.stream("x"), {"id": "job-x"})
        pipe.xadd(backend.keys.stream("y"), {"id": "job-y"})
        await pipe.execute()
    async with asyncio.timeout(10):
        (delivery,) = await claiming
    other = "y" if delivery.model == "x" else "x"
    assert await backend.depth(delivery.model) == 0 and await backend.depth(other) == 1
    (again,) = await backend.claim("b", [other], 1, 0)
    assert again.job_id == f"job-{other}"


async def test_an_idempotent_retry_enqueues_a_job_whose_submit_failed_before_its_queue_entry(
    backend: RedisBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def down(job_id: str, model: str, replace: bool = False) -> None:
        raise redis.ConnectionError("connection lost")  # after the record was written

    first = JobRecord(request={"model": MODEL, "steps": 10})
    with monkeypatch.context() as m:
        m.setattr(backend, "_enqueue", down)
        with pytest.raises(BackendUnavailable):
            await backend.submit(first, idempotency_key="k")
    assert (await backend.get(first.id)).status is JobStatus.QUEUED
    assert await backend.depth(MODEL) == 0  # a record without a queue entry
    again, created = await backend.submit(JobRecord(request=first.request), idempotency_key="k")
    assert again.id == first.id and not created
    (delivery,) = await backend.claim("a", [MODEL], 10, 0)
    assert delivery.job_id == first.id
    await backend.submit(JobRecord(request=first.request), idempotency_key="k")
    assert await backend.redis.xlen(backend.keys.stream(MODEL)) == 1  # it has an entry now


async def test_a_second_entry_of_a_running_job_is_acked_and_the_first_still_carries_it(
    backend: RedisBackend,
) -> None:
    record, _ = await backend.submit(JobRecord(request={"model": MODEL, "steps": 10}))
    await backend._enqueue(record.id, MODEL)  # an XADD that landed though its answer was lost
    first, second = await backend.claim("a", [MODEL], 2, 0)
    assert await backend.start(first) is not None
    assert await backend.start(second) is None  # acked, not run twice at once
    stream = backend.keys.stream(MODEL)
    assert await backend.redis.xlen(stream) == 1
    assert (await backend.redis.xpending(stream, backend.keys.group))["pending"] == 1
    again = await backend.start(first)  # re-delivered when its worker died: it runs again
    assert again is not None and again.status is JobStatus.RUNNING
    await backend.finish(first, JobStatus.DONE, StoredResult("image/png", [b"x"], {}))
    assert await stored_kinds(backend, record.id) == ["queued", "done"]
    assert await backend.redis.xlen(stream) == 0


async def test_a_dead_workers_entry_comes_back_looked_for_once_per_tenth_of_claim_idle(
    redis_server: RedisServer,
) -> None:
    """Claims in a row (a worker polls ten times a second while it runs work) look for dead
    workers' entries (XAUTOCLAIM) at most once per tenth of ``claim_idle``; after ``claim_idle``
    the dead worker's entry comes back all the same."""
    backend = RedisBackend(
        redis_server.url, max_queue=10, result_ttl=60, job_ttl=600, claim_idle=0.5,
        max_deliveries=3, prefix=f"b{uuid.uuid4().hex[:8]}", clock=Clock(),
    )  # fmt: skip

    async def reclaims() -> int:
        stats = await backend.redis.info("commandstats")
        return stats.get("cmdstat_xautoclaim", {}).get("calls", 0)

    try:
        record, _ = await backend.submit(JobRecord(request={"model": MODEL, "steps": 10}))
        (dead,) = await backend.claim("dead", [MODEL], 1, 0)
        before, began = await reclaims(), asyncio.get_running_loop().time()
        for _ in range(20):
            assert await backend.claim("live", [MODEL], 1, 0) == []
        elapsed = asyncio.get_running_loop().time() - began
        looked = await reclaims() - before
        await asyncio.sleep(0.6)
        (again,) = await backend.claim("live", [MODEL], 1, 0)
    finally:
        await backend.close()
    assert 0 <= looked <= 1 + elapsed / backend.reclaim_every < 20
    assert dead.job_id == again.job_id == record.id
    assert (again.consumer, again.attempts) == ("live", 2)
