"""Every Redis key name in one place (one prefix per deployment). Each model has its own job
stream, so a worker reads only the streams of the models it holds."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "skipdit"

    def stream(self, model: str) -> str:  # jobs of a model waiting for / held by workers
        return f"{self.prefix}:jobs:{model}"

    @property
    def group(self) -> str:  # the consumer group, same name on every model's stream
        return f"{self.prefix}:workers"

    def dead_letter(self, model: str) -> str:  # jobs of a model that failed delivery too often
        return f"{self.prefix}:dead:{model}"

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

    def worker(self, name: str) -> str:  # heartbeat: JSON {"at", "models"}, TTL claim_idle
        return f"{self.prefix}:worker:{name}"

    @property
    def worker_names(self) -> str:  # set of workers that heartbeat; pruned once a beat expires
        return f"{self.prefix}:worker-names"
