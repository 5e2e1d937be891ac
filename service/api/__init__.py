"""The HTTP API: ``build_app(settings)`` wires the routers, the error mapping and a lifespan that
owns the queue backend, the served models' descriptions and (embedded mode) the worker.

Routers, one per resource: ``generate`` (POST /generate), ``jobs`` (/jobs/{id}...), ``files``
(GET /files/{token}: a result by its signed URL, no API key), ``openai``
(POST /v1/images/generations), ``videos`` (/v1/videos...), ``system`` (/models, /healthz,
/readyz, /metrics). Errors are typed (``service/errors.py``) and mapped to status + code once
(``service/api/errors.py``). With SKIPDIT_WEBHOOK_SECRET (and SKIPDIT_WEBHOOK_DELIVER) the
lifespan also runs a webhook ``Deliverer`` (``service/webhooks.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI

from model import registry
from service.api import errors, files, generate, jobs, openai, system, videos
from service.api.auth import KeyRing
from service.api.deps import Service
from service.api.limits import BodyLimit
from service.heap import freeze_startup_heap
from service.metrics import Metrics
from service.queue import make_backend
from service.settings import Settings
from service.urls import signer_for
from service.webhooks import Deliverer
from service.worker import in_model_thread, make_worker

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    backend = make_backend(settings, app.state.clock)
    names = settings.models or []
    infos = await asyncio.to_thread(lambda: {name: registry.describe(name) for name in names})
    for info in infos.values():
        if info.random_weights:
            log.warning("serving %s: RANDOM untrained weights, for smoke tests only", info.name)
    keys = KeyRing(
        settings.api_keys, settings.key_rate_per_s, settings.key_burst, settings.key_max_queued
    )
    text = [name for name, info in infos.items() if info.conditioning == "text"]
    metrics = Metrics(names, text_models=text)
    svc = Service(settings, backend, metrics, infos, keys, urls=signer_for(settings))
    if settings.embedded_worker:
        svc.worker = await in_model_thread(make_worker, settings, backend, svc.metrics)
        svc.worker_task = asyncio.create_task(svc.worker.run(), name="skipdit-worker")
    deliverer = None
    if settings.webhook_secret is not None and settings.webhook_deliver:
        run = Deliverer(backend, settings, svc.metrics).run()
        deliverer = asyncio.create_task(run, name="skipdit-webhooks")
    app.state.service = svc
    if app.state.own_process:
        freeze_startup_heap()
    log.info(
        "serving models %s with %s backend; API keys %s",
        ", ".join(infos),
        backend.name,
        f"required ({len(settings.api_keys)} configured)" if keys.enabled else "off (open API)",
    )
    try:
        yield
    finally:
        if deliverer is not None:  # an attempt cut short is due again after its lease
            deliverer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await deliverer
        if svc.worker is not None and svc.worker_task is not None:
            svc.worker.stop()
            await svc.worker_task
        await backend.close()


def build_app(
    settings: Settings | None = None,
    clock: Callable[[], float] = time.time,
    own_process: bool = False,
) -> FastAPI:
    """The app; ``clock`` (Unix seconds) is the queue backend's, injectable for tests.
    ``own_process``: the app is its process's (``skipdit serve``), whose start-up heap is then
    frozen (``service/heap.py``)."""
    app = FastAPI(
        title="skipdit-serve",
        version="0.1.0",
        description="Skip-DiT image and Skip-Latte video generation with Skip-Cache, queued and "
        "step-batched.",
        lifespan=_lifespan,
    )
    app.state.settings = settings or Settings()
    app.state.clock = clock
    app.state.own_process = own_process
    errors.install(app)
    s = app.state.settings
    app.add_middleware(BodyLimit, max_bytes=s.max_body_bytes, timeout_s=s.body_timeout_s)
    for module in (generate, jobs, files, openai, videos, system):
        app.include_router(module.router)
    return app
