"""The served models (their defaults and limits), liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from model import cache
from model.networks import lora
from model.registry import ModelInfo
from service import errors
from service.api.deps import Service, ServiceDep
from service.request import default_config, limits

router = APIRouter(tags=["system"])


@router.get("/models", summary="The served models, their cache defaults and runtimes")
async def models(svc: ServiceDep) -> dict[str, Any]:
    return {"data": [_model(svc, name, info) for name, info in svc.models.items()]}


def _model(svc: Service, name: str, info: ModelInfo) -> dict[str, Any]:
    return {
        "id": name,
        "kind": info.kind,
        "default": name == svc.default_model,
        "random_weights": info.random_weights,
        "config": dataclasses.asdict(info.config),
        "conditioning": info.conditioning,  # "class": class_label; "text": prompt
        "max_tokens": info.max_tokens,  # text models: prompt tokens read; null: class models
        "samplers": list(info.samplers),
        "default_sampler": info.samplers[0],  # what a request leaving sampler unset runs
        "default_guidance": info.default_guidance,
        "dynamic": info.config.dynamic,  # DyDiT routers: requests may set `dynamic`
        "cache_policies": sorted(info.cache_defaults()),  # those that apply to its kind
        "cache_defaults": info.cache_defaults(),
        "default_cache": _default_cache(svc, info),  # what a request naming no cache field runs
        "limits": limits(info, svc.settings).published(),
        "adapters": _adapters(svc, name),  # LoRA adapters a request may name (adapter)
        "card": info.card,
        "runtime": _runtime(svc, name),
    }


def _adapters(svc: Service, name: str) -> list[dict[str, Any]]:
    """Each adapter served with the model: its name, rank and card (adapter.json)."""
    out = []
    for adapter, directory in sorted(svc.settings.adapters_of(name).items()):
        meta = lora.read_meta(directory)
        out.append(
            {
                "name": adapter,
                "rank": meta["rank"],
                "alpha": meta["alpha"],
                "targets": len(meta["targets"]),
                "adapter_scale": {"min": 0.0, "max": lora.MAX_SCALE, "default": 1.0},
                "card": meta.get("card", {}),
            }
        )
    return out


def _default_cache(svc: Service, info: ModelInfo) -> dict[str, Any]:
    default, config = default_config(info, svc.settings)
    return {"policy": default.policy, "config": cache.as_json(config), "source": default.source}


def _runtime(svc: Service, name: str) -> dict[str, Any]:
    """How the model runs: the embedded worker's resolved path, else what workers are asked."""
    if svc.worker is not None:
        return svc.worker.runtimes[name]
    s = svc.settings
    return {"where": "worker processes", "kernels": s.kernels, "graphs": s.graphs}


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Queue reachable; per model, the live workers that hold it")
async def readyz(svc: ServiceDep) -> dict[str, Any]:
    """Ready once the queue answers: jobs of a model no worker holds wait in its queue (workers
    scale on the backlog), so ``models`` reports coverage without failing the probe."""
    await svc.backend.ping()
    if svc.worker_task is not None and svc.worker_task.done():
        raise errors.WorkerStopped("the embedded worker has stopped")
    held = await svc.backend.holders()
    return {
        "status": "ready",
        "model": svc.default_model,
        "models": {
            name: {"held": bool(held.get(name)), "workers": held.get(name, [])}
            for name in svc.models
        },
        "backend": svc.backend.name,
    }


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(svc: ServiceDep, request: Request) -> Response:
    if svc.settings.metrics_need_key:
        svc.keys.identify(request.headers.get("authorization"))
    with contextlib.suppress(errors.BackendUnavailable):
        for name in svc.models:
            svc.metrics.queue_depth.labels(name).set(await svc.backend.depth(name))
            svc.metrics.dead_letters.labels(name).set(await svc.backend.dead_letters(name))
            dead_hooks = await svc.backend.webhook_dead_letters(name)
            svc.metrics.webhook_dead_letters.labels(name).set(len(dead_hooks))
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)
