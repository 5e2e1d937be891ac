"""The served model and its cache defaults, liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from model import cache
from service import errors
from service.api.deps import Service, ServiceDep

router = APIRouter(tags=["system"])


@router.get("/models", summary="The served model and its cache defaults")
async def models(svc: ServiceDep) -> dict[str, Any]:
    info = svc.model
    return {
        "data": [
            {
                "id": info.name,
                "random_weights": info.random_weights,
                "config": dataclasses.asdict(info.config),
                "default_guidance": info.default_guidance,
                "cache_policies": sorted(cache.POLICIES),
                "cache_defaults": info.cache_defaults(),
                "card": info.card,
                "runtime": _runtime(svc),
            }
        ]
    }


def _runtime(svc: Service) -> dict[str, Any]:
    """How the model runs: the embedded worker's resolved path, else what workers are asked."""
    if svc.worker is not None:
        return svc.worker.runtime
    s = svc.settings
    return {"where": "worker processes", "kernels": s.kernels, "graphs": s.graphs}


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Model loaded and queue reachable")
async def readyz(svc: ServiceDep) -> dict[str, Any]:
    await svc.backend.ping()
    if svc.worker_task is not None and svc.worker_task.done():
        raise errors.WorkerStopped("the embedded worker has stopped")
    return {"status": "ready", "model": svc.model.name, "backend": svc.backend.name}


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(svc: ServiceDep) -> Response:
    with contextlib.suppress(errors.BackendUnavailable):
        svc.metrics.queue_depth.set(await svc.backend.depth())
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)
