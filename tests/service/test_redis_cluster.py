"""The Redis backend on a real 3-master Redis Cluster: all of a job's keys on one master, jobs
spread over every master, the queues on one slot; a killed worker's job re-delivered and finished
once. (The API suite runs on the cluster through the ``backend`` fixture, the backend's
transitions through test_redis_workers.)"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import key_slot

from service.messages import JobRecord, JobStatus, StoredResult
from service.queue.keys import Keys
from service.queue.redis import RedisBackend
from tests.service import test_redis_workers as on_plain_redis
from tests.service.conftest import Clock, RedisClusterServers
from tests.service.test_redis_workers import Workers

pytestmark = pytest.mark.anyio
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


@pytest.fixture
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


async def test_a_killed_workers_job_is_finished_by_another_exactly_once(
    cluster_workers: Workers,
) -> None:
    """The plain Redis test, against worker processes and an API on the cluster."""
    await on_plain_redis.test_a_killed_workers_job_is_finished_by_another_exactly_once(
        cluster_workers
    )
