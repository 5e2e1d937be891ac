"""The worker loop: claims jobs from a queue backend, feeds the engine, publishes what happens.

Runs inside ``skipdit serve`` (embedded) or as ``skipdit worker`` (Redis). The engine's step
runs in a thread so the event loop stays free for the API and for heartbeats. ``stop()``
(SIGTERM) stops intake, lets running jobs finish for up to ``drain_timeout`` seconds, then hands
whatever is left back to the queue.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from typing import Any

import torch

from model import registry
from service.engine import Engine, EngineEvent, EngineRequest
from service.errors import BackendUnavailable
from service.images import CONTENT_TYPES, encode
from service.jobs import ENDED_BY
from service.messages import EventKind, JobRecord, StoredResult
from service.metrics import Metrics
from service.queue.base import Delivery, QueueBackend
from service.settings import Settings

log = logging.getLogger(__name__)


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    def __init__(
        self,
        backend: QueueBackend,
        engine: Engine,
        metrics: Metrics,
        model_name: str,
        name: str | None = None,
        max_inflight: int = 32,
        heartbeat: float = 5.0,
        drain_timeout: float = 60.0,
        runtime: dict[str, Any] | None = None,
    ):
        self.backend = backend
        self.engine = engine
        self.metrics = metrics
        self.model_name = model_name
        self.name = name or default_worker_name()
        self.max_inflight = max_inflight
        self.heartbeat_every = heartbeat
        self.drain_timeout = drain_timeout
        self.runtime = runtime or {}  # how the model runs: device, dtype, kernels, graphs
        self._held: dict[str, tuple[Delivery, JobRecord]] = {}
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Stop taking work; running jobs get ``drain_timeout`` seconds, the rest go back."""
        if not self._stopping.is_set():
            log.info("worker %s stopping: %d jobs held", self.name, len(self._held))
        self._stopping.set()

    async def run(self) -> None:
        log.info(
            "worker %s started: model %s, backend %s, %s",
            self.name,
            self.model_name,
            self.backend.name,
            ", ".join(f"{k}={v}" for k, v in self.runtime.items()),
        )
        last_beat = 0.0
        drain_until: float | None = None
        while True:
            now = time.monotonic()
            if self._stopping.is_set():
                drain_until = drain_until or now + self.drain_timeout
                if not self._held or now >= drain_until:
                    break
            try:
                if now - last_beat >= self.heartbeat_every:
                    await self.backend.heartbeat(self.name, [d for d, _ in self._held.values()])
                    last_beat = now
                if not self._stopping.is_set():
                    await self._intake()
                await self._cancellations()
            except BackendUnavailable as e:
                self.metrics.errors.labels("backend_unavailable").inc()
                log.warning("worker %s: %s; retrying", self.name, e)
                await asyncio.sleep(1.0)
                continue
            if self.engine.has_work():
                events, report = await asyncio.to_thread(self.engine.step)
                self.metrics.observe_step(report)
                for event in events:
                    await self._publish(event)
            self.metrics.inflight.set(len(self._held))
        await self._hand_back()
        log.info("worker %s stopped", self.name)

    async def _intake(self) -> None:
        room = self.max_inflight - len(self._held)
        if room <= 0:
            return
        block = 0.0 if self.engine.has_work() else 0.5
        for delivery in await self.backend.claim(self.name, room, block):
            record = await self.backend.start(delivery)
            if record is None:
                continue  # cancelled while queued, or already ended
            params = record.params
            self._held[record.id] = (delivery, record)
            self.engine.submit(
                EngineRequest(
                    record.id,
                    params,
                    priority=params.priority,
                    deadline=record.deadline,
                    submitted=record.created_at,
                )
            )

    async def _cancellations(self) -> None:
        for job_id in await self.backend.cancel_requested(list(self._held)):
            self.engine.cancel(job_id)

    async def _publish(self, event: EngineEvent) -> None:
        held = self._held.get(event.request_id)
        if held is None:
            return
        try:
            if event.kind.terminal:
                await self._finish(event, *held)
                return
            if event.kind is EventKind.STARTED and event.queue_wait is not None:
                self.metrics.queue_wait.observe(event.queue_wait)
            mode = event.mode.value if event.mode is not None else None
            await self.backend.progress(event.request_id, event.kind, event.step, event.total, mode)
        except BackendUnavailable:
            self.metrics.errors.labels("backend_unavailable").inc()
            log.exception("could not publish %s of job %s", event.kind, event.request_id)

    async def _finish(self, event: EngineEvent, delivery: Delivery, record: JobRecord) -> None:
        # Let go first: if the backend cannot be told, the unacked delivery is re-delivered.
        del self._held[record.id]
        status = ENDED_BY[event.kind]
        result = self._result(record, event) if event.kind is EventKind.DONE else None
        error = None
        if event.kind in (EventKind.FAILED, EventKind.EXPIRED):
            code = "expired" if event.kind is EventKind.EXPIRED else "generation_failed"
            error = {"code": code, "message": event.error or code}
            self.metrics.errors.labels(code).inc()
        ended = await self.backend.finish(delivery, status, result, error)
        if ended is None:
            log.info("job %s had already ended elsewhere; result of this run dropped", record.id)
            return
        seconds = (ended.finished_at or ended.created_at) - ended.created_at
        speedup = result.meta["speedup"] if result is not None else None
        self.metrics.observe_end(self.model_name, status.value, seconds, speedup)

    def _result(self, record: JobRecord, event: EngineEvent) -> StoredResult | None:
        """The encoded images and their metadata."""
        if event.result is None:
            return None
        params = record.params
        fmt = params.output_format
        images = [encode(image, fmt) for image in event.result.images]
        meta = {
            "seed": params.seed,
            "model": self.model_name,
            "cache_interval": params.cache_interval,
            "cache_policy": params.cache_policy,
            **event.result.stats.as_dict(),
            "seconds_engine": event.result.seconds,
        }
        return StoredResult(CONTENT_TYPES[fmt], images, meta)

    async def _hand_back(self) -> None:
        for job_id, (delivery, _) in list(self._held.items()):
            self.engine.cancel(job_id)
            try:
                await self.backend.release(delivery)
                log.info("handed job %s back to the queue", job_id)
            except BackendUnavailable:
                log.exception("could not hand back job %s; it will be re-delivered", job_id)
        self._held.clear()
        if self.engine.has_work():
            self.engine.step()  # drain the cancellations


def make_worker(settings: Settings, backend: QueueBackend, metrics: Metrics) -> Worker:
    """Load the model and build an engine + worker over ``backend``."""
    loaded = registry.load(
        settings.model,
        device=settings.device,
        dtype=getattr(torch, settings.dtype),
        vae_path=settings.vae,
    )
    fast = loaded.pipeline.use_fast_path(settings.kernels, settings.graphs)
    runtime = {
        "device": settings.device,
        "dtype": settings.dtype,
        "kernels": fast.kernels,
        "graphs": fast.graphs,
        "warmup_s": round(fast.warmup_seconds, 2),
    }
    engine = Engine(loaded.pipeline, settings.max_batch_tokens)
    return Worker(
        backend,
        engine,
        metrics,
        loaded.name,
        name=settings.worker_name,
        max_inflight=settings.max_inflight,
        heartbeat=settings.heartbeat_s,
        drain_timeout=settings.drain_timeout_s,
        runtime=runtime,
    )


def run_worker_process(settings: Settings) -> int:
    """``skipdit worker``: a worker over Redis with its own /metrics port; SIGTERM drains."""
    from prometheus_client import start_http_server

    from service.queue import make_backend

    async def main() -> None:
        metrics = Metrics()
        if settings.metrics_port is not None:
            start_http_server(settings.metrics_port, registry=metrics.registry)
        backend = make_backend(settings)
        worker = await asyncio.to_thread(make_worker, settings, backend, metrics)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        try:
            await worker.run()
        finally:
            await backend.close()

    asyncio.run(main())
    return 0
