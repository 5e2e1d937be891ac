"""Every Redis key name in one place (one prefix per deployment). Each model has its own job
stream, so a worker reads only the streams of the models it holds.

The braces are Redis Cluster hash tags: a key's slot is the hash of the text inside its first
``{...}``, and every key one operation touches must share a slot. So:

- a job's keys carry the job id as their tag (``skipdit:job:{<id>}``, ``...:result``, ...): each
  transition of the job is one atomic script on one slot, and jobs spread over all masters;
- a deployment's queues and worker heartbeats carry the prefix as their tag (``{skipdit}:...``):
  one XREADGROUP blocks on every stream a worker reads, a model's dead letters live beside its
  stream, and one MGET reads every heartbeat. They all sit on one master; they carry job ids,
  never results (see ``service.queue.redis`` for why that is the better split).

On a plain Redis the braces are just characters of the names.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "skipdit"

    def __post_init__(self) -> None:
        if "{" in self.prefix or "}" in self.prefix:
            raise ValueError(
                f"SKIPDIT_REDIS_PREFIX must not contain braces (they are Redis Cluster hash tags), "
                f"got {self.prefix!r}"
            )

    # -- the deployment's queues and workers: tag {prefix}, one slot

    def stream(self, model: str) -> str:  # jobs of a model waiting for / held by workers
        return f"{{{self.prefix}}}:jobs:{model}"

    @property
    def group(self) -> str:  # the consumer group, same name on every model's stream (not a key)
        return f"{self.prefix}:workers"

    def dead_letter(self, model: str) -> str:  # jobs of a model that failed delivery too often
        return f"{{{self.prefix}}}:dead:{model}"

    def worker(self, name: str) -> str:  # heartbeat: JSON {"at", "models"}, TTL claim_idle
        return f"{{{self.prefix}}}:worker:{name}"

    @property
    def worker_names(self) -> str:  # set of workers that heartbeat; pruned once a beat expires
        return f"{{{self.prefix}}}:worker-names"

    # -- the webhook outbox (service/webhooks.py), also on the deployment's slot: one script
    #    claims, ends or dead-letters a delivery

    @property
    def hooks_due(self) -> str:  # sorted set: hook id -> when due (Unix s), or its lease's end
        return f"{{{self.prefix}}}:webhooks:due"

    @property
    def hooks(self) -> str:  # hash: hook id -> Hook JSON
        return f"{{{self.prefix}}}:webhooks:body"

    @property
    def hook_attempts(self) -> str:  # hash: hook id -> attempts claimed
        return f"{{{self.prefix}}}:webhooks:attempts"

    def hook_put(self, hook_id: str) -> str:  # marker: this hook was put once; TTL job_ttl
        return f"{{{self.prefix}}}:webhooks:put:{hook_id}"

    def hook_dead(self, model: str) -> str:  # stream: a model's webhook dead letters
        return f"{{{self.prefix}}}:webhooks:dead:{model}"

    # -- one job's keys: tag {<job id>}, one slot per job

    def job(self, job_id: str) -> str:  # JSON JobRecord, TTL job_ttl
        return f"{self.prefix}:job:{{{job_id}}}"

    def result(self, job_id: str) -> str:  # hash: meta, content_type, n, 0..n-1; TTL result_ttl
        return f"{self.job(job_id)}:result"

    def events(self, job_id: str) -> str:  # stream of Event JSON, TTL job_ttl
        return f"{self.job(job_id)}:events"

    def cancel(self, job_id: str) -> str:  # flag: cancel this running job; value: reason or ""
        return f"{self.job(job_id)}:cancel"

    def entry(self, job_id: str) -> str:  # id of the stream entry that carries the job; TTL job_ttl
        return f"{self.job(job_id)}:entry"

    # -- on their own

    def idempotency(self, key: str) -> str:  # -> job id (any slot: only ever read or set alone)
        return f"{self.prefix}:idem:{key}"
