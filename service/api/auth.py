"""API keys: who calls, and how much each key may ask for.

With ``SKIPDIT_API_KEYS`` (or ``SKIPDIT_API_KEYS_FILE``) set, every generation and job route
needs ``Authorization: Bearer <key>`` (the OpenAI clients' ``api_key`` sends exactly that):
401 without a known key, and a job, its result and its events are visible only to the key that
submitted it (403 for another key). ``/healthz``, ``/readyz`` and ``/models`` stay open;
``/metrics`` too unless ``SKIPDIT_METRICS_NEED_KEY`` (Prometheus scrapes the API port; its
labels carry no request content); ``/files/{token}`` too (a result URL: its signed, expiring
token is the credential, ``service/urls.py``). Unset: the API is open, as without keys.

A key is known by its id, the first 16 hex digits of its SHA-256: records store that as the
job's owner, logs and metrics never see the key. Comparison hashes the presented key and
compares the digest with every configured key's digest in constant time, without stopping at a
match, so timing tells neither which key matched nor how much of one did.

Per key, submissions (``POST /generate``, ``/v1/images/generations``, ``/v1/videos``) draw on a
token bucket (``SKIPDIT_KEY_RATE_PER_S`` sustained, ``SKIPDIT_KEY_BURST`` at once) and may hold
at most ``SKIPDIT_KEY_MAX_QUEUED`` unfinished jobs; past either, 429 with Retry-After. Reads
(status, results, events) are not rate-limited. Both counts live in the API process: with N API
replicas a key gets up to N times the rate (put the limit in the load balancer when that
matters); the queued cap holds per replica likewise.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from pydantic import SecretStr

from service import errors

KEY_ID_HEX = 16


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the key's id, or None when the API is open."""

    key_id: str | None = None

    def scoped(self, idempotency_key: str | None) -> str | None:
        """An Idempotency-Key as the backend stores it: per API key, so that two keys' equal
        idempotency keys never name each other's jobs."""
        if idempotency_key is None or self.key_id is None:
            return idempotency_key
        return f"{self.key_id}:{idempotency_key}"


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class KeyRing:
    """The configured keys, and each key's submission bucket and unfinished jobs."""

    keys: list[SecretStr]
    rate_per_s: float = 5.0
    burst: int = 20
    max_queued: int = 16
    clock: Callable[[], float] = time.monotonic
    _digests: list[tuple[bytes, str]] = field(init=False, repr=False)
    _buckets: dict[str, _Bucket] = field(default_factory=dict, init=False, repr=False)
    _jobs: dict[str, set[str]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._digests = []
        for key in self.keys:
            digest = _digest(key.get_secret_value())
            self._digests.append((digest, digest.hex()[:KEY_ID_HEX]))

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def identify(self, authorization: str | None) -> Caller:
        """The caller an ``Authorization`` header names; Unauthorized if it names no key."""
        if not self.enabled:
            return Caller()
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise errors.Unauthorized("missing API key: send Authorization: Bearer <key>")
        digest = _digest(presented.strip())
        found = None
        for known, key_id in self._digests:  # all of them, whatever matches
            if hmac.compare_digest(digest, known):
                found = key_id
        if found is None:
            raise errors.Unauthorized("unknown API key")
        return Caller(found)

    def take(self, caller: Caller) -> None:
        """One submission from the caller's bucket; RateLimited when it is empty."""
        if caller.key_id is None:
            return
        now = self.clock()
        bucket = self._buckets.setdefault(caller.key_id, _Bucket(float(self.burst), now))
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate_per_s)
        bucket.at = now
        if bucket.tokens < 1:
            wait = (1 - bucket.tokens) / self.rate_per_s
            raise errors.RateLimited(
                f"this API key is over {self.rate_per_s:g} submissions a second "
                f"(burst {self.burst}); retry after {math.ceil(wait)}s",
                wait,
            )
        bucket.tokens -= 1

    async def admit(
        self,
        caller: Caller,
        job_id: str,
        unfinished: Callable[[str], Awaitable[bool]],
        retry_after: float,
    ) -> None:
        """Count the new job ``job_id`` against the caller's cap: RateLimited if the caller
        already holds ``max_queued`` unfinished jobs (those ``unfinished(job_id)`` still calls
        unfinished). Check and count happen with no await between, so concurrent submissions
        cannot both take the last place."""
        if caller.key_id is None:
            return
        held = self._jobs.setdefault(caller.key_id, set())
        for old in list(held):
            if not await unfinished(old):
                held.discard(old)
        if len(held) >= self.max_queued:
            raise errors.RateLimited(
                f"this API key has {len(held)} unfinished jobs, the most it may hold "
                f"(SKIPDIT_KEY_MAX_QUEUED); retry after a job ends",
                retry_after,
            )
        held.add(job_id)

    def owns(self, caller: Caller, job_id: str) -> None:
        """Count an existing job against the caller's cap."""
        if caller.key_id is not None:
            self._jobs.setdefault(caller.key_id, set()).add(job_id)

    def release(self, caller: Caller, job_id: str) -> None:
        """Stop counting a job (its submission failed, or it was an existing job's id)."""
        if caller.key_id is not None:
            self._jobs.get(caller.key_id, set()).discard(job_id)


def authenticate(request: Request) -> Caller:
    """The route dependency: who calls (401 when keys are set and none is known)."""
    keys: KeyRing = request.app.state.service.keys
    return keys.identify(request.headers.get("authorization"))


CallerDep = Annotated[Caller, Depends(authenticate)]
