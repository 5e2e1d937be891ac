"""Every Redis key name in one place (one prefix per deployment)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "skipdit"

    @property
    def stream(self) -> str:  # jobs waiting for / held by workers (consumer group below)
        return f"{self.prefix}:jobs"

    @property
    def group(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def dead_letter(self) -> str:  # jobs that failed delivery too often
        return f"{self.prefix}:jobs:dead"

    def job(self, job_id: str) -> str:  # JSON JobRecord, TTL job_ttl
        return f"{self.prefix}:job:{job_id}"

    def result(self, job_id: str) -> str:  # hash: meta, content_type, n, 0..n-1; TTL result_ttl
        return f"{self.prefix}:result:{job_id}"

    def events(self, job_id: str) -> str:  # stream of Event JSON, TTL job_ttl
        return f"{self.prefix}:events:{job_id}"

    def cancel(self, job_id: str) -> str:  # flag: cancel this running job
        return f"{self.prefix}:cancel:{job_id}"

    def idempotency(self, key: str) -> str:  # -> job id
        return f"{self.prefix}:idem:{key}"

    def worker(self, name: str) -> str:  # heartbeat, TTL
        return f"{self.prefix}:worker:{name}"
