"""The in-process queue backend on its own, with an injected clock for TTLs and times."""

from __future__ import annotations

import asyncio

import pytest

from service.errors import QueueFull
from service.messages import EventKind, JobRecord, JobStatus, StoredResult
from service.queue.base import Delivery
from service.queue.memory import MemoryBackend
from tests.service.helpers import Clock

RESULT_TTL, JOB_TTL = 60.0, 600.0
MODEL = "tiny"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def backend(clock: Clock) -> MemoryBackend:
    return MemoryBackend(max_queue=3, result_ttl=RESULT_TTL, job_ttl=JOB_TTL, clock=clock)


def new_record(backend: MemoryBackend, steps: int = 10) -> JobRecord:
    request = {"model": MODEL, "steps": steps}
    return JobRecord(request=request, created_at=backend.clock(), total_steps=steps)


async def submitted(backend: MemoryBackend) -> JobRecord:
    record, created = await backend.submit(new_record(backend))
    assert created
    return record


async def started(backend: MemoryBackend, consumer: str = "w1") -> tuple[Delivery, JobRecord]:
    (delivery,) = await backend.claim(consumer, [MODEL], 1, 0)
    record = await backend.start(delivery)
    assert record is not None
    return delivery, record


async def event_kinds(backend: MemoryBackend, job_id: str) -> list[EventKind]:
    async with asyncio.timeout(5):
        return [e.type async for e in backend.events(job_id)]


def png(meta: dict | None = None) -> StoredResult:
    return StoredResult("image/png", [b"\x89PNG one", b"\x89PNG two"], meta or {"seed": 1})


async def test_a_job_goes_through_queue_claim_start_and_done(
    backend: MemoryBackend, clock: Clock
) -> None:
    record = await submitted(backend)
    assert await backend.depth(MODEL) == 1
    clock.advance(2)
    delivery, running = await started(backend)
    assert await backend.depth(MODEL) == 0
    assert (running.status, running.worker, running.started_at) == ("running", "w1", clock())
    await backend.progress(record.id, EventKind.STARTED, 0, 10)
    await backend.progress(record.id, EventKind.STEP, 1, 10, "full")
    clock.advance(3)
    done = await backend.finish(delivery, JobStatus.DONE, png({"speedup": 1.0}))
    assert done is not None and done.finished_at == clock() and done.result == {"speedup": 1.0}
    assert await backend.get(record.id) == done
    stored = await backend.get_result(record.id)
    assert stored is not None and stored.images == png().images
    assert await event_kinds(backend, record.id) == ["queued", "started", "step", "done"]


async def test_records_cross_the_boundary_by_value(backend: MemoryBackend) -> None:
    record = await submitted(backend)
    fetched = await backend.get(record.id)
    assert fetched is not None
    fetched.status = JobStatus.DONE
    record.step = 7
    again = await backend.get(record.id)
    assert again is not None and again.status is JobStatus.QUEUED and again.step == 0


async def test_an_idempotency_key_returns_the_first_job(backend: MemoryBackend) -> None:
    first, created = await backend.submit(new_record(backend), idempotency_key="k")
    second, again = await backend.submit(new_record(backend), idempotency_key="k")
    assert created and not again and second.id == first.id
    assert await backend.depth(MODEL) == 1


async def test_a_full_queue_refuses_with_retry_after(backend: MemoryBackend) -> None:
    for _ in range(3):
        await submitted(backend)
    with pytest.raises(QueueFull) as refused:
        await backend.submit(new_record(backend))
    assert refused.value.retry_after == 1
    await started(backend)  # claimed jobs no longer count
    await submitted(backend)


async def test_cancel_of_a_queued_job_ends_it_and_no_worker_gets_it(backend: MemoryBackend) -> None:
    record = await submitted(backend)
    cancelled = await backend.request_cancel(record.id)
    assert cancelled is not None and cancelled.status is JobStatus.CANCELLED
    assert await backend.depth(MODEL) == 0 and await backend.claim("w1", [MODEL], 1, 0) == []
    assert await event_kinds(backend, record.id) == ["queued", "cancelled"]
    assert await backend.cancel_requested([record.id]) == set()


async def test_cancel_of_a_running_job_flags_it_for_its_worker(backend: MemoryBackend) -> None:
    record = await submitted(backend)
    other = await submitted(backend)
    delivery, _ = await started(backend)
    still = await backend.request_cancel(record.id)
    assert still is not None and still.status is JobStatus.RUNNING
    assert await backend.cancel_requested([record.id, other.id]) == {record.id}
    await backend.finish(delivery, JobStatus.CANCELLED)
    assert await backend.cancel_requested([record.id]) == set()


async def test_a_claimed_job_cancelled_before_start_is_not_started(backend: MemoryBackend) -> None:
    record = await submitted(backend)
    (delivery,) = await backend.claim("w1", [MODEL], 1, 0)
    await backend.request_cancel(record.id)  # still queued in the record: cancelled at once
    assert await backend.start(delivery) is None


async def test_the_first_finish_wins_and_a_late_run_changes_nothing(backend: MemoryBackend) -> None:
    record = await submitted(backend)
    delivery, _ = await started(backend)
    error = {"code": "poison_job", "message": "gave up"}
    failed = await backend.finish(delivery, JobStatus.FAILED, error=error)
    await backend.progress(record.id, EventKind.STEP, 5, 10, "full")
    late = await backend.finish(delivery, JobStatus.DONE, png())
    assert failed is not None and late is None
    stored = await backend.get(record.id)
    assert stored is not None and stored.status is JobStatus.FAILED and stored.step == 0
    assert await backend.get_result(record.id) is None
    assert await event_kinds(backend, record.id) == ["queued", "failed"]


async def test_release_puts_the_job_back_at_the_head_of_the_queue(backend: MemoryBackend) -> None:
    first = await submitted(backend)
    second = await submitted(backend)
    delivery, _ = await started(backend)
    await backend.release(delivery)
    assert (await backend.get(first.id)).status is JobStatus.QUEUED
    assert [d.job_id for d in await backend.claim("w2", [MODEL], 2, 0)] == [first.id, second.id]


async def test_release_of_an_ended_job_does_not_requeue_it(backend: MemoryBackend) -> None:
    await submitted(backend)
    delivery, _ = await started(backend)
    await backend.finish(delivery, JobStatus.DONE, png())
    await backend.release(delivery)
    assert await backend.depth(MODEL) == 0


async def test_results_then_records_expire_by_the_clock(
    backend: MemoryBackend, clock: Clock
) -> None:
    record = await submitted(backend)
    waiting = await submitted(backend)
    delivery, _ = await started(backend)
    await backend.finish(delivery, JobStatus.DONE, png())
    clock.advance(RESULT_TTL - 1)
    assert await backend.get_result(record.id) is not None
    clock.advance(1)
    assert await backend.get_result(record.id) is None
    assert (await backend.get(record.id)).status is JobStatus.DONE
    clock.advance(JOB_TTL - RESULT_TTL)
    assert await backend.get(record.id) is None
    assert await backend.get(waiting.id) is not None  # a job that has not ended never expires


async def test_claim_blocks_until_a_job_arrives(backend: MemoryBackend) -> None:
    assert await backend.claim("w1", [MODEL], 1, 0.01) == []
    async with asyncio.timeout(5):
        claiming = asyncio.create_task(backend.claim("w1", [MODEL], 4, 10))
        await asyncio.sleep(0)  # let it start waiting
        record = await submitted(backend)
        assert [d.job_id for d in await claiming] == [record.id]


async def test_wait_returns_once_terminal_or_the_current_record_after_its_timeout(
    backend: MemoryBackend,
) -> None:
    record = await submitted(backend)
    current = await backend.wait(record.id, timeout=0.01)
    assert current is not None and current.status is JobStatus.QUEUED
    waiter = asyncio.create_task(backend.wait(record.id, timeout=10))
    delivery, _ = await started(backend)
    await backend.finish(delivery, JobStatus.DONE, png())
    async with asyncio.timeout(5):
        final = await waiter
    assert final is not None and final.status is JobStatus.DONE


async def test_each_model_has_its_own_queue_shared_fairly_by_a_claim(
    backend: MemoryBackend,
) -> None:
    ids = {}
    for model in ("a", "b"):
        for _ in range(3):  # max_queue is per model: 3 each fit
            record = JobRecord(request={"model": model, "steps": 2}, created_at=backend.clock())
            ids.setdefault(model, []).append((await backend.submit(record))[0].id)
    with pytest.raises(QueueFull):
        await backend.submit(JobRecord(request={"model": "a", "steps": 2}))
    assert await backend.claim("w1", [MODEL], 10, 0) == []  # holds neither a nor b
    claimed = await backend.claim("w1", ["a", "b"], 4, 0)
    assert sorted(d.job_id for d in claimed) == sorted(ids["a"][:2] + ids["b"][:2])
    assert {d.model for d in claimed if d.job_id in ids["b"]} == {"b"}
    assert [d.job_id for d in await backend.claim("w2", ["b"], 10, 0)] == ids["b"][2:]
    assert (await backend.depth("a"), await backend.depth("b")) == (1, 0)


async def test_heartbeats_say_which_workers_hold_which_models(backend: MemoryBackend) -> None:
    await backend.heartbeat("w1", [], ["a", "b"])
    await backend.heartbeat("w2", [], ["b"])
    assert await backend.holders() == {"a": ["w1"], "b": ["w1", "w2"]}
    await backend.heartbeat("w1", [], [])  # draining: takes no new work
    assert await backend.holders() == {"b": ["w2"]}
