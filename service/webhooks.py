"""Webhooks: a job's events POSTed to the URL its request names, signed, at least once.

A request's ``webhook`` ({url, events}, ``service.messages.Webhook``) asks for some of its job's
events: ``started`` and the terminal ones. When a transition publishes one of those, the queue
backend puts a ``Hook`` in its outbox (``QueueBackend._hook``): in Redis beside the queues, so
it outlives the process that wrote it; in memory for the embedded backend. A ``Deliverer`` (one
per process that has ``SKIPDIT_WEBHOOK_DELIVER`` on: API and workers) claims due hooks for a
lease (``Settings.webhook_lease_s``; a claim whose deliverer died comes due again after it),
POSTs each, and then: a 2xx ends it; anything else (another status, a timeout, a refused
connection) schedules the next attempt after a wait drawn uniformly from
[0, min(backoff_max, backoff * 2^(n-1))] (full jitter); after ``webhook_max_attempts`` attempts
it goes to the model's webhook dead letters, with a log line and a count.

Signing follows the Standard Webhooks convention: ``webhook-id`` (the event's stable id,
``<job id>:<event type>``: a retry repeats it, so receivers deduplicate on it),
``webhook-timestamp`` (Unix seconds of this attempt) and ``webhook-signature``
(``v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">``) under ``SKIPDIT_WEBHOOK_SECRET``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from model.errors import FieldError
from service.errors import BackendUnavailable
from service.messages import WEBHOOK_EVENTS, EventKind, JobRecord, Webhook
from service.metrics import Metrics
from service.settings import Settings

if TYPE_CHECKING:
    from service.queue.base import QueueBackend

log = logging.getLogger(__name__)
SECRET_PREFIX = "whsec_"  # Standard Webhooks' form of a secret: the rest is its key, base64


@dataclass
class Hook:
    """One event to deliver to one URL. ``body`` is fixed when the event happens: every attempt
    sends the same bytes under the same ``id``."""

    id: str  # <job id>:<event type>; the webhook-id header
    url: str
    model: str
    body: str  # JSON
    created_at: float  # Unix seconds: when the event happened
    attempts: int = 0  # attempts made, this claim's included

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes, attempts: int | None = None) -> Hook:
        hook = cls(**json.loads(raw))
        if attempts is not None:
            hook.attempts = attempts
        return hook


def hook_for(record: JobRecord, kind: EventKind, at: float) -> Hook | None:
    """The hook of ``record``'s event ``kind`` (happened at ``at``), or None when the request
    asked for no webhook or not for this event."""
    spec = record.request.get("webhook")
    if not spec or kind.value not in spec.get("events", ()):
        return None
    event = WEBHOOK_EVENTS[kind.value]
    data = {
        "id": record.id,
        "status": record.status.value,
        "model": record.model,
        "created_at": record.created_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "step": record.step,
        "total_steps": record.total_steps,
        "error": record.error,
        "result": record.result,  # metadata only: the samples are at GET /jobs/{id}/result
    }
    timestamp = datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")
    body = json.dumps({"type": event, "timestamp": timestamp, "data": data})
    return Hook(f"{record.id}:{event}", spec["url"], record.model, body, at)


def check(spec: Webhook, settings: Settings) -> None:
    """A request's webhook against the deployment: webhooks on, its host allowed. Raises
    FieldError naming ``webhook`` or ``webhook.url``."""
    if settings.webhook_secret is None:
        raise FieldError("webhook", "webhooks are off on this deployment: they need "
                         "SKIPDIT_WEBHOOK_SECRET")  # fmt: skip
    host = (urlsplit(spec.url).hostname or "").lower()
    if settings.webhook_hosts and host not in settings.webhook_hosts:
        raise FieldError(
            "webhook.url", f"host {host!r} is not one webhooks may call on this deployment "
            f"(SKIPDIT_WEBHOOK_HOSTS: {settings.webhook_hosts})",
        )  # fmt: skip


def secret_key(secret: str) -> bytes:
    """The HMAC key of a secret: ``whsec_<base64>`` is Standard Webhooks' base64 key, anything
    else its own UTF-8 bytes."""
    if secret.startswith(SECRET_PREFIX):
        return base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    return secret.encode()


def signature(key: bytes, hook_id: str, timestamp: int, body: str) -> str:
    """The ``webhook-signature`` header: ``v1,<base64 HMAC-SHA256 of id.timestamp.body>``."""
    mac = hmac.new(key, f"{hook_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return f"v1,{base64.b64encode(mac).decode()}"


def headers(key: bytes, hook: Hook, timestamp: int) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "user-agent": "skipdit-serve webhooks",
        "webhook-id": hook.id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(key, hook.id, timestamp, hook.body),
    }


class Deliverer:
    """Claims due hooks from the backend's outbox and POSTs them (see the module docstring)."""

    def __init__(
        self,
        backend: QueueBackend,
        settings: Settings,
        metrics: Metrics,
        jitter: Callable[[], float] = random.random,
        batch: int = 16,
    ):
        assert settings.webhook_secret is not None, "a deliverer needs SKIPDIT_WEBHOOK_SECRET"
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        self.clock = backend.clock  # due times are the backend's; signatures carry time.time()
        self.jitter = jitter
        self.batch = batch
        self._key = secret_key(settings.webhook_secret.get_secret_value())
        self._client = httpx.AsyncClient(timeout=settings.webhook_timeout_s, follow_redirects=False)

    async def run(self) -> None:
        """Deliver until cancelled: at once again after a full batch, else every poll."""
        try:
            while True:
                try:
                    claimed = await self.deliver_due()
                except BackendUnavailable as e:
                    log.warning("webhooks: %s; retrying", e)
                    claimed = 0
                if claimed < self.batch:
                    await asyncio.sleep(self.settings.webhook_poll_s)
        finally:
            await self._client.aclose()

    async def deliver_due(self) -> int:
        """Claim the hooks due now and attempt each (concurrently); how many were claimed."""
        now = self.clock()
        hooks = await self.backend.hooks_claim(now, now + self.settings.webhook_lease_s, self.batch)
        await asyncio.gather(*(self._attempt(hook) for hook in hooks))
        return len(hooks)

    async def _attempt(self, hook: Hook) -> None:
        s = self.settings
        try:
            answer = await self._client.post(
                hook.url, content=hook.body, headers=headers(self._key, hook, int(time.time()))
            )
            failure = None if answer.is_success else f"HTTP {answer.status_code}"
        except httpx.TimeoutException:
            failure = f"no answer within {s.webhook_timeout_s:g}s"
        except httpx.HTTPError as e:
            failure = f"{type(e).__name__}: {e}"
        counter = self.metrics.webhook_deliveries
        if failure is None:
            await self.backend.hook_done(hook)
            counter.labels(hook.model, "delivered").inc()
        elif hook.attempts >= s.webhook_max_attempts:
            await self.backend.hook_dead(hook, failure, self.clock())
            counter.labels(hook.model, "dead_letter").inc()
            log.warning(
                "webhook %s to %s: dead letter after %d attempts; last: %s",
                hook.id, hook.url, hook.attempts, failure,
            )  # fmt: skip
        else:
            wait = min(s.webhook_backoff_max_s, s.webhook_backoff_s * 2 ** (hook.attempts - 1))
            await self.backend.hook_retry(hook, self.clock() + self.jitter() * wait)
            counter.labels(hook.model, "retried").inc()
            log.info("webhook %s attempt %d failed: %s", hook.id, hook.attempts, failure)


def dead_letter_entry(hook: Hook, error: str, at: float) -> dict[str, Any]:
    """What a webhook dead letter records (the body included, to replay it by hand)."""
    return {"id": hook.id, "url": hook.url, "attempts": hook.attempts, "error": error, "at": at,
            "body": hook.body}  # fmt: skip
