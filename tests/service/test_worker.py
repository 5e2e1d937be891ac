"""The worker loop over the in-process backend, a real engine on the tiny model, a fake clock."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest
from PIL import Image

from model.sampling.pipeline import Pipeline
from service.engine import Engine, EngineEvent, EngineRequest, StepReport
from service.messages import EventKind, JobRecord, JobRequest, JobStatus
from service.metrics import Metrics
from service.queue.base import Delivery
from service.queue.memory import MemoryBackend
from service.request import GenerateParams
from service.worker import Worker, WorkerConfig, burst, make_worker
from tests.helpers import job_record, plan_of, tiny_text_model
from tests.service.helpers import Clock, settings_for

MODEL = "tiny"


class CountingEngine(Engine):
    """The engine, counting its steps."""

    steps = 0

    def step(self) -> tuple[list[EngineEvent], StepReport]:
        self.steps += 1
        return super().step()


class Rig:
    def __init__(
        self,
        pipeline: Pipeline,
        max_inflight: int = 8,
        drain_timeout: float = 60,
        progress_interval: float = 0,
        poll_interval: float = 0.05,
        backend_cls: type[MemoryBackend] = MemoryBackend,
        engine_cls: type[CountingEngine] = CountingEngine,
    ):
        self.clock = Clock()
        self.worker_clock = Clock(0.0)  # times the worker's progress events
        self.backend = backend_cls(100, result_ttl=60, job_ttl=600, clock=self.clock)
        self.metrics = Metrics()
        self.engine = engine = engine_cls(pipeline, max_batch_tokens=10_000, clock=self.clock)
        config = WorkerConfig(
            "w1", max_inflight, heartbeat=0.5, drain_timeout=drain_timeout,
            progress_interval=progress_interval, poll_interval=poll_interval,
        )  # fmt: skip
        self.worker = Worker(
            self.backend, {MODEL: engine}, self.metrics, config, clock=self.worker_clock
        )

    async def submit(self, **params: object) -> JobRecord:
        body = JobRequest(**{"model": MODEL, **params})
        record = job_record(self.engine.pipeline, body, created_at=self.clock())
        return (await self.backend.submit(record))[0]

    async def until(self, job_id: str, check: Callable[[JobRecord], bool]) -> JobRecord:
        """The job's record once ``check`` holds, following its events (bounded)."""
        async with asyncio.timeout(60):
            async for _ in self.backend.events(job_id):
                record = await self.backend.get(job_id)
                if record is not None and check(record):
                    return record
        raise AssertionError(f"job {job_id} ended without {check}")

    async def kinds(self, job_id: str) -> list[EventKind]:
        async with asyncio.timeout(5):
            return [e.type async for e in self.backend.events(job_id)]

    def sample(self, name: str, **labels: str) -> float:
        labels = {"model": MODEL} | labels
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Worker]:
        task = asyncio.create_task(self.worker.run())
        try:
            yield self.worker
        finally:
            self.worker.stop()
            async with asyncio.timeout(60):
                await task


@pytest.fixture
def rig(tiny_pipeline: Pipeline) -> Rig:
    return Rig(tiny_pipeline)


async def test_a_job_runs_to_done_with_its_images_events_and_metrics(
    rig: Rig, tiny_pipeline: Pipeline
) -> None:
    async with rig.running():
        job = await rig.submit(steps=6, seed=3, class_label=2, cache_interval=2, num_images=2)
        done = await rig.until(job.id, lambda r: r.status.terminal)
    assert done.status is JobStatus.DONE and done.worker == "w1" and done.step == 6
    assert done.result is not None and done.result["model"] == MODEL and done.result["seed"] == 3
    result = await rig.backend.get_result(job.id)
    assert result is not None and result.content_type == "image/png"
    assert [Image.open(io.BytesIO(b)).size for b in result.images] == [(8, 8), (8, 8)]
    assert await rig.kinds(job.id) == ["queued", "started"] + ["step"] * 6 + ["done"]
    assert rig.sample("skipdit_requests_total", status="done") == 1
    steps = [rig.sample("skipdit_steps_total", mode=m) for m in ("full", "cached")]
    assert sum(steps) == 6 and steps[1] > 0
    assert rig.sample("skipdit_speedup_ratio_count") == 1


async def test_a_deadline_passed_on_the_clock_expires_the_running_job(rig: Rig) -> None:
    async with rig.running():
        job = await rig.submit(steps=1000, timeout_s=30)
        await rig.until(job.id, lambda r: r.step >= 2)
        rig.clock.advance(31)
        expired = await rig.until(job.id, lambda r: r.status.terminal)
    assert expired.status is JobStatus.EXPIRED and 2 <= expired.step < 1000
    assert expired.error == {"code": "expired", "message": "deadline passed while running"}
    assert expired.finished_at == rig.clock()
    assert rig.sample("skipdit_errors_total", reason="expired") == 1


async def test_cancel_reaches_a_running_job_through_the_backend(rig: Rig) -> None:
    async with rig.running():
        job = await rig.submit(steps=1000)
        await rig.until(job.id, lambda r: r.step >= 1)
        await rig.backend.request_cancel(job.id)
        cancelled = await rig.until(job.id, lambda r: r.status.terminal)
    assert cancelled.status is JobStatus.CANCELLED and cancelled.step < 1000
    assert (await rig.kinds(job.id))[-1] == "cancelled"
    assert await rig.backend.cancel_requested([job.id]) == set()


async def test_a_job_without_a_plan_fails_alone(rig: Rig) -> None:
    """A record no API of this version wrote (no plan: a rolling upgrade's old API) is failed
    with the reason, and the next job runs."""
    record = job_record(rig.engine.pipeline, JobRequest(model=MODEL, steps=3))
    async with rig.running():
        bad = (await rig.backend.submit(dataclasses.replace(record, plan=None)))[0]
        good = await rig.submit(steps=3)
        failed = await rig.until(bad.id, lambda r: r.status.terminal)
        done = await rig.until(good.id, lambda r: r.status.terminal)
    assert failed.status is JobStatus.FAILED and failed.error is not None
    assert failed.error["code"] == "generation_failed" and "no plan" in failed.error["message"]
    assert done.status is JobStatus.DONE
    assert rig.sample("skipdit_errors_total", reason="generation_failed") == 1


async def test_a_job_ended_elsewhere_keeps_its_state_and_this_run_is_dropped(
    tiny_pipeline: Pipeline,
) -> None:
    rig = Rig(tiny_pipeline, max_inflight=1)
    async with rig.running():
        job = await rig.submit(steps=1000)
        later = await rig.submit(steps=2)
        await rig.until(job.id, lambda r: r.step >= 2)
        error = {"code": "poison_job", "message": "ended by another worker"}
        elsewhere = Delivery(job.id, job.id, "w2", MODEL)
        assert await rig.backend.finish(elsewhere, JobStatus.FAILED, error=error) is not None
        # max_inflight=1: the later job starts only once the worker has let the first go.
        await rig.until(later.id, lambda r: r.status.terminal)
    record = await rig.backend.get(job.id)
    assert record is not None and record.status is JobStatus.FAILED and record.error == error
    assert await rig.backend.get_result(job.id) is None
    assert (await rig.kinds(job.id))[-1] == "failed"
    assert rig.sample("skipdit_requests_total", status="done") == 1  # only the later job
    assert rig.sample("skipdit_requests_total", status="failed") == 0  # not this worker's end


class GatedEngine(CountingEngine):
    """The engine, holding every step after the first that ran a request until ``gate`` opens:
    the test acts while the first job is surely running (a 40-step tiny job can otherwise end,
    and the worker take the next, before the test's coroutine runs again on a loaded machine;
    the worker publishes a burst's progress only after it, so the test polls ``worked``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.worked = False  # a step has run a request

    def step(self) -> tuple[list[EngineEvent], StepReport]:
        if self.worked:
            assert self.gate.wait(timeout=60), "the test never opened the gate"
        events, report = super().step()
        self.worked = self.worked or report.requests > 0
        return events, report


async def test_stop_drains_running_work_and_stops_intake(tiny_pipeline: Pipeline) -> None:
    rig = Rig(tiny_pipeline, max_inflight=1, engine_cls=GatedEngine)
    task = asyncio.create_task(rig.worker.run())
    first = await rig.submit(steps=40)
    second = await rig.submit(steps=2)
    engine = cast(GatedEngine, rig.engine)
    async with asyncio.timeout(60):  # the first job has run a step and holds at the gate
        while not engine.worked:
            await asyncio.sleep(0.01)
    rig.worker.stop()
    engine.gate.set()
    async with asyncio.timeout(60):
        await task
    assert (await rig.backend.get(first.id)).status is JobStatus.DONE
    assert (await rig.backend.get(second.id)).status is JobStatus.QUEUED
    assert await rig.backend.depth(MODEL) == 1


async def test_past_the_drain_timeout_held_jobs_go_back_to_the_queue(
    tiny_pipeline: Pipeline,
) -> None:
    rig = Rig(tiny_pipeline, drain_timeout=0)
    task = asyncio.create_task(rig.worker.run())
    job = await rig.submit(steps=1000)
    await rig.until(job.id, lambda r: r.step >= 1)
    rig.worker.stop()
    async with asyncio.timeout(60):
        await task
    record = await rig.backend.get(job.id)
    assert record is not None and record.status is JobStatus.QUEUED and record.finished_at is None
    assert [d.job_id for d in await rig.backend.claim("w2", [MODEL], 1, 0)] == [job.id]
    assert rig.worker.has_work() is False


async def test_step_events_are_coalesced_to_one_per_interval_always_with_the_last_step(
    tiny_pipeline: Pipeline,
) -> None:
    rig = Rig(tiny_pipeline, progress_interval=1.0, poll_interval=0)  # a burst is one step
    engine = rig.worker.engines[MODEL]
    step = engine.step

    def timed_step() -> object:
        out = step()
        rig.worker_clock.advance(0.25)  # each engine step takes 0.25 s on the worker's clock
        return out

    engine.step = timed_step  # type: ignore[method-assign]
    async with rig.running():
        job = await rig.submit(steps=50, seed=1)
        done = await rig.until(job.id, lambda r: r.status.terminal)
    async with asyncio.timeout(5):
        events = [e async for e in rig.backend.events(job.id)]
    # STARTED goes out with step 1 at t=0.25; then a step once 1 s has passed (t=1.25: step 5,
    # step 9, ... step 49), and the last step, then done: 13 of the 50 steps.
    assert [e.type for e in events] == ["queued", "started"] + ["step"] * 13 + ["done"]
    assert [e.step for e in events if e.type == "step"] == [*range(5, 50, 4), 50]
    assert done.status is JobStatus.DONE and (done.step, done.total_steps) == (50, 50)


def test_a_burst_steps_back_to_back_until_a_request_ends_or_its_time_is_up(
    tiny_pipeline: Pipeline,
) -> None:
    engine = Engine(tiny_pipeline, max_batch_tokens=10_000)
    engines = {MODEL: engine}

    def pick() -> str | None:
        return MODEL if engine.has_work() else None

    engine.submit(EngineRequest("a", plan_of(engine.pipeline, GenerateParams(steps=3, seed=1))))
    engine.submit(EngineRequest("b", plan_of(engine.pipeline, GenerateParams(steps=6, seed=2))))
    assert len(burst(engines, pick, until=-math.inf)) == 1  # time is up: one step all the same
    second = burst(engines, pick, until=math.inf)  # until "a" ends: its result goes out at once
    ended = [e.request_id for _, events, _ in second for e in events if e.kind.terminal]
    assert len(second) == 2 and ended == ["a"]
    third = burst(engines, pick, until=math.inf)
    assert len(third) == 3 and not engine.has_work()  # the rest of "b", then no work left
    assert burst(engines, pick, until=math.inf) == []


async def test_a_burst_publishes_a_jobs_latest_step_when_coalescing(
    tiny_pipeline: Pipeline,
) -> None:
    """No poll is due for an hour: the job runs in one burst, whose step events collapse to
    the latest (an interval is set) before the result."""
    rig = Rig(tiny_pipeline, progress_interval=1.0, poll_interval=3600)
    async with rig.running():
        job = await rig.submit(steps=20, seed=1)
        await rig.until(job.id, lambda r: r.status.terminal)
    async with asyncio.timeout(5):
        events = [e async for e in rig.backend.events(job.id)]
    assert [e.type for e in events] == ["queued", "started", "step", "done"]
    assert events[2].step == 20


async def test_a_cancelled_job_publishes_its_last_step_before_cancelled(
    tiny_pipeline: Pipeline,
) -> None:
    rig = Rig(tiny_pipeline, progress_interval=3600.0)  # no step goes out until the end
    async with rig.running():
        job = await rig.submit(steps=1000)
        await rig.until(job.id, lambda r: r.status is JobStatus.RUNNING)
        await rig.backend.request_cancel(job.id)
        cancelled = await rig.until(job.id, lambda r: r.status.terminal)
    events = [e async for e in rig.backend.events(job.id)]
    assert [e.type for e in events] == ["queued", "started", "step", "cancelled"]
    assert 1 <= events[2].step == cancelled.step == events[3].step < 1000


class HoldingBackend(MemoryBackend):
    """Holds a (one-job) step event until the worker's engine has stepped past it, or has no
    work left."""

    engine: CountingEngine

    async def progress(
        self, job_id: str, kind: EventKind, step: int, total: int, mode: str | None = None
    ) -> None:
        async with asyncio.timeout(10):
            while kind is EventKind.STEP and self.engine.steps <= step and self.engine.has_work():
                await asyncio.sleep(0.001)
        await super().progress(job_id, kind, step, total, mode)


async def test_the_engine_steps_on_while_the_last_bursts_events_are_published(
    tiny_pipeline: Pipeline,
) -> None:
    """A burst's events go out while the next burst runs: the model thread never waits for
    the backend. (Were they published before the next burst began, a burst's last step event
    would wait for a step that never comes, and the worker would fail on the timeout.)"""
    rig = Rig(tiny_pipeline, poll_interval=0.02, backend_cls=HoldingBackend)
    rig.backend.engine = rig.engine
    async with rig.running():
        job = await rig.submit(steps=300, seed=1)
        done = await rig.until(job.id, lambda r: r.status.terminal)
    assert done.status is JobStatus.DONE and rig.engine.steps >= 300
    steps = [e.step async for e in rig.backend.events(job.id) if e.type == "step"]
    assert steps == list(range(1, 301))  # every step went out, in order


class SlowToPrepareEngine(CountingEngine):
    """Prepares each request slowly (as a first request's allocations may), and says when a
    step is under way."""

    stepping = False

    def _prepare(self, requests: list[EngineRequest], events: list[EngineEvent]) -> None:
        time.sleep(0.2)
        super()._prepare(requests, events)

    def step(self) -> tuple[list[EngineEvent], StepReport]:
        self.stepping = True
        try:
            return super().step()
        finally:
            self.stepping = False


class RemoteQueue(MemoryBackend):
    """Answers the cancel-flag read after a pause, as a queue across the network does (the model
    thread steps meanwhile), and notes each claim's block and whether the worker's engine was
    stepping then."""

    engine: SlowToPrepareEngine
    claims: list[tuple[float, bool]]

    async def cancel_requested(self, job_ids: list[str]) -> set[str]:
        await asyncio.sleep(0.03)
        return await super().cancel_requested(job_ids)

    async def claim(
        self, consumer: str, models: Sequence[str], count: int, block: float
    ) -> list[Delivery]:
        self.claims.append((block, self.engine.stepping))
        return await super().claim(consumer, models, count, block)


async def test_the_worker_never_waits_on_the_queue_while_a_burst_runs(
    tiny_pipeline: Pipeline,
) -> None:
    """A job arrives while the idle worker blocks on the queue (longer than a poll interval).
    The next turn starts a burst whose first step prepares the job; a blocking ask then would
    leave the model thread idle until the ask returns (0.5 s), as the first request of every
    ``skipdit worker`` was (1.1-1.2 s against 0.6-0.7 s: the engine reads no work while it
    prepares a request, and the poll after a long wait was overdue at once)."""
    rig = Rig(
        tiny_pipeline, poll_interval=0.1, backend_cls=RemoteQueue, engine_cls=SlowToPrepareEngine
    )
    rig.backend.engine, rig.backend.claims = rig.engine, []
    async with rig.running():
        await asyncio.sleep(0.2)  # the worker blocks on the empty queue
        job = await rig.submit(steps=300, seed=1)  # steps over several polls
        done = await rig.until(job.id, lambda r: r.status.terminal)
    assert done.status is JobStatus.DONE
    assert any(stepping for _, stepping in rig.backend.claims)  # it asked while stepping...
    blocking = [b for b, stepping in rig.backend.claims if stepping and b > 0]
    assert blocking == []  # ...never blocking


def test_a_workers_text_models_share_one_prompt_cache_of_the_configured_size(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    texts = [str(tiny_text_model(tmp_path / name)) for name in ("t2i-a", "t2i-b")]
    models = [*texts, str(tiny_model_dir)]
    settings = settings_for("memory", tiny_model_dir, None, models=models, prompt_cache_entries=7)
    worker = make_worker(settings, MemoryBackend(10, 60, 600), Metrics(models))
    a, b, image = (worker.engines[name].pipeline.prompting for name in models)
    assert a is not None and b is not None and image is None
    assert a.cache is b.cache and a.cache.capacity == 7
