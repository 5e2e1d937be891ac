"""Queue backends behind one interface: ``memory`` (embedded default) and ``redis``."""

from __future__ import annotations

from service.queue.base import QueueBackend
from service.queue.memory import MemoryBackend
from service.queue.redis import RedisBackend
from service.settings import Settings


def make_backend(settings: Settings) -> QueueBackend:
    if settings.redis_url is None:
        return MemoryBackend(
            settings.max_queue, settings.result_ttl_s, settings.job_ttl_s, settings.retry_after_s
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
    )
