"""The worker loop: claims jobs from a queue backend, feeds one engine per model, publishes what
happens.

Runs inside ``skipdit serve`` (embedded) or as ``skipdit worker`` (Redis). All model work (loading,
warm-up, every engine step) runs on one dedicated thread (``in_model_thread``), so the event
loop stays free for the API and for heartbeats, and only that thread ever enters torch's CPU
thread pool: OpenMP keeps a team of threads per calling thread, and steps landing on changing
executor threads left several teams spinning against each other (a 50-step request took 1.9x
its direct time on 2 cores; on one thread it takes what the direct call takes). ``stop()``
(SIGTERM) stops intake, lets running jobs finish for up to ``drain_timeout`` seconds, then hands
whatever is left back to the queue.

Steps run in bursts: the model thread steps an engine back to back until the next queue poll is
due (``poll_interval``) or a request ends, and the loop's between-step work (events, metrics)
runs once per burst instead of once per step. The loop does it while the next burst runs, with
its queue polls and heartbeats, so the model thread never waits for a Redis round trip. New jobs
and cancel flags wait at most ``poll_interval``; the engine takes them at its next step.

Progress is coalesced: a job's step events go out at most once per ``progress_interval``
seconds (each is a backend write: a Redis round trip), always with its last step, and a step
held back when the job ends (cancelled, failed) goes out just before the terminal event, so
every event stream ends on the job's true last step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from model import registry
from model.networks import lora
from model.text.cache import EmbeddingCache
from service.engine import Engine, EngineEvent, EngineRequest, StepReport
from service.errors import BackendUnavailable
from service.images import CONTENT_TYPES, encode
from service.jobs import ENDED_BY, cancel_reason
from service.messages import EventKind, JobRecord, JobStatus, StoredResult
from service.metrics import NO_MODEL, Metrics
from service.queue.base import Delivery, QueueBackend
from service.request import prompt_result
from service.settings import Settings
from service.video import VIDEO_CONTENT_TYPES, encode_video

log = logging.getLogger(__name__)
T = TypeVar("T")
Step = tuple[str, list[EngineEvent], StepReport]  # (model, its events, its report)


@functools.cache
def model_thread() -> ThreadPoolExecutor:
    """The process's one model thread, started on first use (not at import)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="skipdit-model")


async def in_model_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run model work on the process's one model thread (see the module docstring)."""
    return await asyncio.get_running_loop().run_in_executor(
        model_thread(), functools.partial(fn, *args)
    )


def burst(
    engines: Mapping[str, Engine], pick: Callable[[], str | None], until: float
) -> list[Step]:
    """Engine steps back to back, each of the engine ``pick`` names (the next in turn with
    work): until ``time.monotonic()`` reaches ``until`` (after one step at least), a step that
    ends a request (its result goes out at once) or no engine has work. Returns (model, events,
    report) per step."""
    steps = []
    while (model := pick()) is not None:
        events, report = engines[model].step()
        steps.append((model, events, report))
        if time.monotonic() >= until or any(event.kind.terminal for event in events):
            break
    return steps


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker takes and reports work (seconds unless named otherwise)."""

    name: str = field(default_factory=default_worker_name)
    max_inflight: int = 32  # jobs held at once (running + waiting in the engines)
    heartbeat: float = 5.0  # between heartbeats that keep held deliveries this worker's
    drain_timeout: float = 60.0  # after stop(): running jobs get this long, the rest go back
    progress_interval: float = 0.1  # between a job's step events (0: every step)
    poll_interval: float = 0.05  # between queue asks while work runs

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerConfig:
        return cls(
            name=settings.worker_name or default_worker_name(),
            max_inflight=settings.max_inflight,
            heartbeat=settings.heartbeat_s,
            drain_timeout=settings.drain_timeout_s,
            progress_interval=settings.progress_interval_s,
            poll_interval=settings.poll_interval_s,
        )


class Worker:
    """Holds one engine per model it loaded and claims only those models' jobs. Engines step in
    turn (round-robin among those with work, one step each), so requests of different models
    never share a batch and each engine keeps its own token budget."""

    def __init__(
        self,
        backend: QueueBackend,
        engines: dict[str, Engine],
        metrics: Metrics,
        config: WorkerConfig | None = None,
        runtimes: dict[str, dict[str, Any]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.backend = backend
        self.engines = engines  # model name -> its engine
        self.metrics = metrics
        self.config = config or WorkerConfig()
        # How each model runs: device, dtype, kernels, graphs.
        self.runtimes = runtimes or {model: {} for model in engines}
        self._held: dict[str, tuple[Delivery, JobRecord]] = {}
        self._clock = clock  # times the step events
        self._progress_at: dict[str, float] = {}  # job -> when its last progress went out
        self._unsent: dict[str, EngineEvent] = {}  # job -> its latest step held back
        self._stopping = asyncio.Event()
        self._turn = 0  # the engine to try first at the next step
        self._last_beat = self._last_poll = -float("inf")  # time.monotonic()
        self._drain_until: float | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def models(self) -> list[str]:
        return list(self.engines)

    def stop(self) -> None:
        """Stop taking work; running jobs get ``drain_timeout`` seconds, the rest go back."""
        if not self._stopping.is_set():
            log.info("worker %s stopping: %d jobs held", self.name, len(self._held))
        self._stopping.set()

    def has_work(self) -> bool:
        return any(engine.has_work() for engine in self.engines.values())

    async def run(self) -> None:
        """Turns until stopped and drained. Each turn starts a burst of steps in the model thread,
        and while it runs publishes the previous burst, heartbeats and asks the queue: the model
        thread never waits for Redis. Then it hands back what it still holds."""
        self._log_models()
        done: list[Step] = []  # the last burst's steps, published while the next burst runs
        while not self._drained():
            running = self._start_burst()
            await self._between_bursts(done, bursting=running is not None)
            done = await running if running is not None else []
        await self._publish_steps(done)
        await self._hand_back()
        log.info("worker %s stopped", self.name)

    def _log_models(self) -> None:
        for model, runtime in self.runtimes.items():
            log.info(
                "worker %s: model %s, backend %s, %s",
                self.name,
                model,
                self.backend.name,
                ", ".join(f"{k}={v}" for k, v in runtime.items()),
            )

    def _drained(self) -> bool:
        """Stopping, and nothing held or the drain time is up."""
        if not self._stopping.is_set():
            return False
        now = time.monotonic()
        self._drain_until = self._drain_until or now + self.config.drain_timeout
        return not self._held or now >= self._drain_until

    def _start_burst(self) -> asyncio.Future[list[Step]] | None:
        """A burst in the model thread until the next queue poll is due; None: no work."""
        if not self.has_work():
            return None
        until = time.monotonic() + self.config.poll_interval
        return asyncio.ensure_future(in_model_thread(burst, self.engines, self._next_engine, until))

    async def _between_bursts(self, steps: list[Step], bursting: bool) -> None:
        """Publish ``steps``, heartbeat when due, ask the queue when due. While a burst runs the
        queue is asked at most every ``poll_interval`` (each ask is a round trip or more: new
        jobs and cancel flags wait that long), and never with a blocking ask (the model thread
        would idle until it returns); a new job starts at the next turn."""
        now = time.monotonic()
        try:
            await self._publish_steps(steps)
            if now - self._last_beat >= self.config.heartbeat:
                await self._heartbeat()
                self._last_beat = now
            if not bursting or now - self._last_poll >= self.config.poll_interval:
                await self._cancellations()
                if not self._stopping.is_set():
                    await self._intake(may_block=not bursting)
                self._last_poll = time.monotonic()  # after the ask: it may have blocked
        except BackendUnavailable as e:
            self.metrics.errors.labels(NO_MODEL, "backend_unavailable").inc()
            log.warning("worker %s: %s; retrying", self.name, e)
            await asyncio.sleep(1.0)

    async def _heartbeat(self) -> None:
        """Keep the held deliveries ours; advertise the models while taking work."""
        models = [] if self._stopping.is_set() else self.models
        await self.backend.heartbeat(self.name, [d for d, _ in self._held.values()], models)

    def _next_engine(self) -> str | None:
        """The next model in turn whose engine has work (round-robin), or None. Called by the
        model thread (``burst``), which alone moves the turn."""
        names = self.models
        for i in range(len(names)):
            model = names[(self._turn + i) % len(names)]
            if self.engines[model].has_work():
                self._turn = (self._turn + i + 1) % len(names)
                return model
        return None

    async def _publish_steps(self, steps: list[Step]) -> None:
        """Publish what a burst's steps did: their events (a job's superseded step events
        dropped when coalescing) and metrics."""
        if not steps:
            return
        events = []
        for model, step_events, report in steps:
            self.metrics.observe_step(model, report)
            events += [(model, event) for event in step_events]
        # Coalescing (an interval set): a job's later step in the burst supersedes a step.
        latest = {e.request_id: i for i, (_, e) in enumerate(events) if e.kind is EventKind.STEP}
        for i, (model, event) in enumerate(events):
            superseded = event.kind is EventKind.STEP and latest[event.request_id] != i
            if not (superseded and self.config.progress_interval > 0):
                await self._publish(model, event)
        held = [d.model for d, _ in self._held.values()]
        for name in self.engines:
            self.metrics.inflight.labels(name).set(held.count(name))

    async def _intake(self, may_block: bool) -> None:
        """Claim jobs and hand them to their engines. With nothing to step (``may_block``: no
        burst runs, and the engines have no work) the ask blocks until a job comes, up to 0.5 s.
        ``has_work()`` is only asked while no burst runs: during a step it can read False (a
        request taken from the inbox and still being prepared is in none of its lists)."""
        room = self.config.max_inflight - len(self._held)
        if room <= 0:
            return
        block = 0.5 if may_block and not self.has_work() else 0.0
        for delivery in await self.backend.claim(self.name, self.models, room, block):
            record = await self.backend.start(delivery)
            if record is None:
                continue  # cancelled while queued, or already ended
            try:
                plan = record.run_plan
            except (ValueError, TypeError, KeyError) as e:  # not written by this API version
                await self._refuse(delivery, f"job {record.id} holds no plan this worker runs: {e}")
                continue
            self._held[record.id] = (delivery, record)
            self.engines[delivery.model].submit(
                EngineRequest(
                    record.id,
                    plan,
                    priority=record.request.get("priority", 0),
                    deadline=record.deadline,
                    submitted=record.created_at,
                )
            )

    async def _refuse(self, delivery: Delivery, message: str) -> None:
        """End a job this worker cannot run: failed, with the reason."""
        log.error("%s", message)
        self.metrics.errors.labels(delivery.model, "generation_failed").inc()
        error = {"code": "generation_failed", "message": message}
        await self.backend.finish(delivery, JobStatus.FAILED, error=error)

    async def _cancellations(self) -> None:
        for job_id in await self.backend.cancel_requested(list(self._held)):
            self.engines[self._held[job_id][0].model].cancel(job_id)

    async def _publish(self, model: str, event: EngineEvent) -> None:
        job_id = event.request_id
        held = self._held.get(job_id)
        if held is None:
            return
        try:
            if event.kind.terminal:
                unsent = self._unsent.pop(job_id, None)
                self._progress_at.pop(job_id, None)
                if unsent is not None:
                    await self._progress(unsent)
                await self._finish(event, *held)
                return
            if event.kind is EventKind.STEP and not self._step_due(event):
                self._unsent[job_id] = event
                return
            if event.kind is EventKind.STARTED and event.queue_wait is not None:
                self.metrics.queue_wait.labels(model).observe(event.queue_wait)
            self._unsent.pop(job_id, None)
            await self._progress(event)
        except BackendUnavailable:
            self.metrics.errors.labels(model, "backend_unavailable").inc()
            log.exception("could not publish %s of job %s", event.kind, event.request_id)

    def _step_due(self, event: EngineEvent) -> bool:
        """A step event goes out if it is the last step or the interval has passed."""
        last = self._progress_at.get(event.request_id)
        return (
            event.step >= event.total
            or last is None
            or self._clock() - last >= self.config.progress_interval
        )

    async def _progress(self, event: EngineEvent) -> None:
        self._progress_at[event.request_id] = self._clock()
        mode = event.mode.value if event.mode is not None else None
        await self.backend.progress(event.request_id, event.kind, event.step, event.total, mode)

    async def _finish(self, event: EngineEvent, delivery: Delivery, record: JobRecord) -> None:
        # Let go first: if the backend cannot be told, the unacked delivery is re-delivered.
        del self._held[record.id]
        model = delivery.model
        status = ENDED_BY[event.kind]
        result = self._result(model, record, event) if event.kind is EventKind.DONE else None
        error = None
        if event.kind in (EventKind.FAILED, EventKind.EXPIRED):
            code = "expired" if event.kind is EventKind.EXPIRED else "generation_failed"
            error = {"code": code, "message": event.error or code}
            self.metrics.errors.labels(model, code).inc()
        ended = await self.backend.finish(delivery, status, result, error)
        if ended is None:
            log.info("job %s had already ended elsewhere; result of this run dropped", record.id)
            return
        seconds = (ended.finished_at or ended.created_at) - ended.created_at
        speedup = result.meta["speedup"] if result is not None else None
        self.metrics.observe_end(model, status.value, seconds, speedup)
        if status is JobStatus.CANCELLED:
            self.metrics.cancellations.labels(model, cancel_reason(ended)).inc()

    def _result(self, model: str, record: JobRecord, event: EngineEvent) -> StoredResult | None:
        """The encoded images (or videos, one file per sample) and their metadata."""
        if event.result is None:
            return None
        request = record.request  # as the API resolved it (``new_record``)
        samples = event.result.images
        assert samples is not None, (
            "a done result is decoded"
        )  # (n, H, W, c), or a video's (n, F, H, W, c); uint8
        fmt = request["output_format"]
        meta = {
            "seed": request["seed"],
            "model": model,
            "cache_interval": request["cache_interval"],  # what ran
            "cache_policy": request["cache_policy"],
            **event.result.stats.as_dict(),
            "seconds_engine": event.result.seconds,
            # Text models: the prompt's tokens and whether the encoder's limit cut it.
            **prompt_result(event.result.plan, event.result.prompt_report),
        }
        fps = request.get("fps")
        if fps is None:
            return StoredResult(CONTENT_TYPES[fmt], [encode(i, fmt) for i in samples], meta)
        videos = [encode_video(clip, fmt, fps) for clip in samples]
        meta |= {"num_frames": samples.shape[1], "fps": fps}
        return StoredResult(VIDEO_CONTENT_TYPES[fmt], videos, meta)

    async def _hand_back(self) -> None:
        for job_id, (delivery, _) in list(self._held.items()):
            self.engines[delivery.model].cancel(job_id)
            try:
                await self.backend.release(delivery)
                log.info("handed job %s back to the queue", job_id)
            except BackendUnavailable:
                log.exception("could not hand back job %s; it will be re-delivered", job_id)
        self._held.clear()
        self._unsent.clear()
        self._progress_at.clear()
        for engine in self.engines.values():
            if engine.has_work():
                await in_model_thread(engine.step)  # drain the cancellations


def _load(
    settings: Settings, name: str, embeddings: EmbeddingCache, metrics: Metrics
) -> tuple[Engine, dict[str, Any]]:
    """One model loaded onto its fast path (a text model with its text encoder, its prompt
    embeddings in the worker's ``embeddings``), its engine, and how it runs: the path, each
    component's self-check (also the ``skipdit_fast_path_component`` gauge)."""
    loaded = registry.load(
        name,
        device=settings.device,
        dtype=getattr(torch, settings.dtype),
        vae_path=settings.vae,
        embeddings=embeddings,
    )
    for adapter, directory in settings.adapters_of(name).items():
        loaded.pipeline.adapters[adapter] = lora.load(directory, loaded.pipeline.model)
    fast = loaded.pipeline.use_fast_path(
        settings.kernels, settings.graphs, on_failure=settings.fast_path_check
    )
    for component, on in fast.components.items():
        metrics.fast_path.labels(name, component).set(int(on))
    runtime = {
        "device": settings.device,
        "dtype": settings.dtype,
        "kernels": fast.kernels,
        "graphs": fast.graphs,
        "warmup_s": round(fast.warmup_seconds, 2),
        "self_check": {v.component: v.describe() for v in fast.checks},
    }
    return Engine(loaded.pipeline, settings.max_batch_tokens), runtime


def make_worker(settings: Settings, backend: QueueBackend, metrics: Metrics) -> Worker:
    """Load every configured model and build an engine per model + a worker over ``backend``.
    Text models load their encoders here, once, and share one prompt-embedding cache of
    ``SKIPDIT_PROMPT_CACHE_ENTRIES`` (its keys hold the model name). Runs on the model thread
    (``in_model_thread``): loading never blocks the event loop."""
    engines: dict[str, Engine] = {}
    runtimes: dict[str, dict[str, Any]] = {}
    embeddings = EmbeddingCache(settings.prompt_cache_entries)
    for name in settings.models or []:
        engines[name], runtimes[name] = _load(settings, name, embeddings, metrics)
    return Worker(backend, engines, metrics, WorkerConfig.from_settings(settings), runtimes)


def run_worker_process(settings: Settings) -> int:
    """``skipdit worker``: a worker over Redis with its own /metrics port; SIGTERM drains. With
    SKIPDIT_WEBHOOK_SECRET (and SKIPDIT_WEBHOOK_DELIVER) it delivers webhooks too."""
    from prometheus_client import start_http_server

    from service.heap import freeze_startup_heap
    from service.queue import make_backend
    from service.webhooks import Deliverer

    async def main() -> None:
        names = settings.models or []
        text = [n for n in names if registry.describe(n).conditioning == "text"]
        metrics = Metrics(names, text_models=text)
        if settings.metrics_port is not None:
            start_http_server(settings.metrics_port, registry=metrics.registry)
        backend = make_backend(settings)
        worker = await in_model_thread(make_worker, settings, backend, metrics)
        freeze_startup_heap()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        deliverer = None
        if settings.webhook_secret is not None and settings.webhook_deliver:
            deliverer = asyncio.create_task(Deliverer(backend, settings, metrics).run())
        try:
            await worker.run()
        finally:
            if deliverer is not None:  # an attempt cut short is due again after its lease
                deliverer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await deliverer
            await backend.close()

    asyncio.run(main())
    return 0
