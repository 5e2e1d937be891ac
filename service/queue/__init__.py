"""Queue backends behind one interface: ``memory`` (embedded default) and ``redis`` (a plain
Redis, or a Redis Cluster with ``redis_cluster``)."""

from __future__ import annotations

import time
from collections.abc import Callable

from service.queue.base import QueueBackend
from service.queue.memory import MemoryBackend
from service.queue.redis import RedisBackend
from service.settings import Settings


def make_backend(settings: Settings, clock: Callable[[], float] = time.time) -> QueueBackend:
    """The backend the settings ask for; ``clock`` stamps records and (memory) expires TTLs."""
    if settings.redis_url is None:
        return MemoryBackend(
            settings.max_queue,
            settings.result_ttl_s,
            settings.job_ttl_s,
            settings.retry_after_s,
            clock=clock,
        )
    return RedisBackend(
        settings.redis_url,
        max_queue=settings.max_queue,
        result_ttl=settings.result_ttl_s,
        job_ttl=settings.job_ttl_s,
        claim_idle=settings.claim_idle_s,
        max_deliveries=settings.max_deliveries,
        prefix=settings.redis_prefix,
        retry_after=settings.retry_after_s,
        clock=clock,
        cluster=settings.redis_cluster,
    )
