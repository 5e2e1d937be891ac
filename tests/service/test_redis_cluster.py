"""The Redis backend on a real 3-master Redis Cluster: all of a job's keys on one master, jobs
spread over every master, the queues on one slot; a killed worker's job re-delivered and finished
once. (The API suite runs on the cluster through the ``backend`` fixture, the backend's
transitions through test_redis_workers.)"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import redis
from redis.cluster import key_slot

from service.messages import JobRecord, JobStatus, StoredResult
from service.queue.keys import Keys
from service.queue.redis import RedisBackend
from tests.service.helpers import (
    Clock,
    Load,
    RedisClusterServers,
    RedisServer,
    Workers,
    a_killed_workers_job_is_finished_by_another_exactly_once,
    api_settings,
    redis_client,
    running_app,
    until_ready,
)

MODEL = "tiny"


def test_the_keys_of_a_job_share_a_slot_and_so_do_the_queues() -> None:
    keys = Keys("skipdit")
    for job_id in ("3f2a9c", "a}b", "{x}"):  # ids are uuid hex; braces cannot split them either
        of_job = [keys.job(job_id), keys.result(job_id), keys.events(job_id)]
        of_job += [keys.cancel(job_id), keys.entry(job_id)]
        assert len({key_slot(k.encode()) for k in of_job}) == 1, of_job
    queues = [keys.stream(m) for m in ("tiny", "digits/skip-dit", "a}b")]
    queues += [keys.dead_letter("tiny"), keys.worker("w1"), keys.worker_names]
    assert len({key_slot(k.encode()) for k in queues}) == 1, queues
    assert keys.job("3f2a9c") == "skipdit:job:{3f2a9c}"
    assert keys.stream("tiny") == "{skipdit}:jobs:tiny"
    with pytest.raises(ValueError, match="SKIPDIT_REDIS_PREFIX"):
        Keys("a{b}")


@pytest_asyncio.fixture
async def backend(redis_cluster: RedisClusterServers) -> AsyncIterator[RedisBackend]:
    backend = RedisBackend(
        redis_cluster.url, max_queue=100, result_ttl=60, job_ttl=600, claim_idle=30,
        max_deliveries=3, prefix=f"c{uuid.uuid4().hex[:8]}", clock=Clock(), cluster=True,
    )  # fmt: skip
    yield backend
    await backend.close()


def keys_by_node(cluster: RedisClusterServers, prefix: str) -> dict[int, set[str]]:
    """Port -> the keys of ``prefix`` that node holds (SCAN on a node lists only its own)."""
    found: dict[int, set[str]] = {}
    for node in cluster.nodes:
        with redis.Redis(port=node.port) as client:
            found[node.port] = {k.decode() for k in client.scan_iter(match=f"*{prefix}*")}
    return found


async def test_each_job_lives_on_one_master_and_jobs_spread_over_all_of_them(
    backend: RedisBackend, redis_cluster: RedisClusterServers
) -> None:
    ids = []
    for _ in range(30):
        record, _ = await backend.submit(JobRecord(request={"model": MODEL, "steps": 2}))
        ids.append(record.id)
    for delivery in await backend.claim("w1", [MODEL], 30, 0):
        assert await backend.start(delivery) is not None
        result = StoredResult("image/png", [b"png"], {"seed": 1})
        assert await backend.finish(delivery, JobStatus.DONE, result) is not None
    await backend.heartbeat("w1", [], [MODEL])
    assert [(await backend.get(i)).status for i in ids] == [JobStatus.DONE] * 30
    held = keys_by_node(redis_cluster, backend.keys.prefix)
    node_of_job = {}
    for job_id in ids:
        of_job = {
            backend.keys.job(job_id),
            backend.keys.result(job_id),
            backend.keys.events(job_id),
        }
        nodes = [port for port, keys in held.items() if keys & of_job]
        assert len(nodes) == 1 and of_job <= held[nodes[0]], (job_id, held)
        node_of_job[job_id] = nodes[0]
    assert set(node_of_job.values()) == {node.port for node in redis_cluster.nodes}
    queues = {backend.keys.stream(MODEL), backend.keys.worker("w1"), backend.keys.worker_names}
    assert [port for port, keys in held.items() if keys & queues] == [
        port for port, keys in held.items() if queues <= keys
    ]  # on one node, all of them


@pytest.fixture
def cluster_workers(redis_cluster: RedisClusterServers, tiny_model_dir: Path) -> Iterator[Workers]:
    w = Workers(redis_cluster.url, tiny_model_dir, f"w{uuid.uuid4().hex[:8]}", cluster=True)
    yield w
    w.stop_all()


@pytest.mark.slow
async def test_a_killed_workers_job_is_finished_by_another_exactly_once(
    cluster_workers: Workers,
) -> None:
    """The plain Redis test, against worker processes and an API on the cluster."""
    await a_killed_workers_job_is_finished_by_another_exactly_once(cluster_workers)


async def outage(
    cluster: RedisClusterServers, queues: RedisServer, client: httpx.AsyncClient, load: Load
) -> list[httpx.Response]:
    """Kill ``queues`` (SIGKILL: no final fsync, no save) until the other masters mark it failed
    and a few more submissions were refused; /healthz and /readyz then; restart it on its own
    directory and wait for the cluster to be whole again."""
    queues.proc.kill()
    queues.proc.wait(10)
    queues.proc = None
    await asyncio.to_thread(cluster.wait_state, "fail")  # the others gave up on it
    refused = load.refused
    await load.until(lambda: load.refused >= refused + 3)  # CLUSTERDOWN: 503s too
    down = [await client.get(path) for path in ("/healthz", "/readyz")]
    queues.start()  # same port, same dir: nodes.conf and the AOF are read back
    await asyncio.to_thread(cluster.wait_ok)
    return down


@pytest.mark.cluster  # its own Redis Cluster
@pytest.mark.slow
async def test_the_queues_master_down_answers_503_and_back_loses_no_accepted_job(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """The master that serves the deployment's queue slot (the ``{prefix}`` hash tag) dies by
    SIGKILL while jobs are queued and running, and is started again on its own directory: its
    nodes.conf brings it back as the same node with the same slots, its AOF brings back the
    streams, their consumer group and pending entries, and the jobs on its slots.

    Why a restart in place and not a replica's failover: a replica is written to asynchronously,
    so a failover may lose writes the master had acknowledged (a submit answered 202, a job's
    end) and "every accepted job finishes exactly once" would not be a guarantee Redis gives. A
    restart on the AOF is (test_redis_persistence says why for a SIGKILL). A small
    cluster-node-timeout lets the others mark the node failed within the outage, so the whole
    cluster refuses (CLUSTERDOWN), as a cluster that requires full coverage does in production.
    """
    args = ["--appendonly", "yes", "--appendfsync", "always", "--cluster-node-timeout", "1000"]
    cluster = RedisClusterServers(tmp_path, args=args).start()
    workers = Workers(cluster.url, tiny_model_dir, f"d{uuid.uuid4().hex[:8]}", cluster=True)
    model = str(tiny_model_dir)
    try:
        worker = workers.start("w1", OMP_NUM_THREADS="1")  # a busy 2-core box: no spinning team
        settings = api_settings(workers, max_queue=10_000)
        keys = Keys(settings.redis_prefix)
        async with running_app(settings) as client:
            await until_ready(client, lambda r: r["models"][model]["held"], timeout=180)
            load = Load(client, steps=100)  # slower than submissions: work is in flight
            submitting = asyncio.create_task(load.run())
            await load.until(lambda: len(load.accepted) >= 15)
            before = list(load.accepted)
            statuses = [(await client.get(f"/jobs/{i}")).json()["status"] for i in before]
            down = await outage(cluster, cluster.master_of(keys.stream(model)), client, load)
            await load.until(lambda: len(load.accepted) >= len(before) + 15)
            records, results = await load.settle(submitting, 180)
            ready = await client.get("/readyz")
        alive = worker.poll() is None
        with redis_client(settings) as r:
            ends = load.terminal_events(r, keys)
            left = r.xlen(keys.stream(model))
    finally:
        workers.stop_all()
        cluster.stop()
    assert any(s != "done" for s in statuses)  # the outage caught work queued or running
    assert down[0].status_code == 200  # the API process lives on...
    assert down[1].status_code == 503  # ...and says it is not ready, with the error body
    assert down[1].json()["error"]["code"] == "backend_unavailable"
    assert "redis unreachable" in down[1].json()["error"]["message"]
    assert alive and ready.status_code == 200  # the worker too: it finished the jobs
    assert len(set(load.accepted)) == len(load.accepted) > len(before)
    assert [r["status"] for r in records] == ["done"] * len(records), records
    assert results == [200] * len(results)
    assert ends == [["done"]] * len(ends)  # one terminal event each: none lost, none doubled
    assert left == 0  # every delivery retired
