"""Prometheus series, in base units. The engine and worker report plain stats objects; this
module alone turns them into series. One registry per app/worker (tests build many).

Every series carries a ``model`` label: one deployment serves several models, each with its own
engine and queue. Errors not tied to one model (the queue backend is down) have ``model=""``.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from model.cache import Mode
from service.engine import StepReport

# Up to 30 minutes: video requests take many minutes.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
SPEEDUP_BUCKETS = (0.5, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 4, 6, 8)
NO_MODEL = ""  # the model label of errors that concern no one model


class Metrics:
    def __init__(
        self,
        models: Sequence[str] = (),
        registry: CollectorRegistry | None = None,
        text_models: Sequence[str] = (),
    ):
        """``models``: exported (at zero) from the start, per cache mode; ``text_models``
        (those of ``models`` that take prompts): their prompt-cache series too."""
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.request_duration = Histogram(
            "skipdit_request_duration_seconds",
            "Submit to terminal state.",
            ["model", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "skipdit_queue_wait_seconds",
            "Submit to first step.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.step_duration = Histogram(
            "skipdit_step_duration_seconds",
            "One batched forward, by cache mode.",
            ["model", "mode"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "skipdit_batch_size",
            "Requests per engine step.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.steps = Counter(
            "skipdit_steps", "Request-steps run, by cache mode.", ["model", "mode"], registry=r
        )
        self.speedup = Histogram(
            "skipdit_speedup_ratio",
            "Per request: uncached-equivalent model time / actual.",
            ["model"],
            buckets=SPEEDUP_BUCKETS,
            registry=r,
        )
        self._gauges(r)
        self.requests = Counter(
            "skipdit_requests", "Jobs ended, by status.", ["model", "status"], registry=r
        )
        self.errors = Counter(
            "skipdit_errors", "Errors, by reason.", ["model", "reason"], registry=r
        )
        self.cancellations = Counter(
            "skipdit_cancelled_jobs",
            "Jobs cancelled, by reason: requested (DELETE), client_disconnected (the client of a "
            "synchronous request left).",
            ["model", "reason"],
            registry=r,
        )
        self.webhook_deliveries = Counter(
            "skipdit_webhook_deliveries",
            "Webhook delivery attempts by outcome: delivered (2xx), retried (failed, another "
            "attempt scheduled), dead_letter (failed, the retry budget spent).",
            ["model", "outcome"],
            registry=r,
        )
        self._prompt_cache(r)
        for model in models:
            for mode in Mode:  # export both modes from the start
                self.step_duration.labels(model, mode.value)
                self.steps.labels(model, mode.value)
        for model in text_models:
            self.prompt_cache_hits.labels(model)
            self.prompt_cache_misses.labels(model)

    def _prompt_cache(self, r: CollectorRegistry) -> None:
        """A worker's prompt-embedding cache (text models), as its engines saw it change."""
        self.prompt_cache_hits = Counter(
            "skipdit_prompt_cache_hits",
            "Prompts served from the embedding cache without encoding (text models).",
            ["model"],
            registry=r,
        )
        self.prompt_cache_misses = Counter(
            "skipdit_prompt_cache_misses",
            "Prompts the text encoder encoded: not in the embedding cache (text models).",
            ["model"],
            registry=r,
        )

    def _gauges(self, r: CollectorRegistry) -> None:
        """Levels set where they are known: queue depth and dead letters on /metrics, jobs
        held by each worker."""
        self.queue_depth = Gauge(
            "skipdit_queue_depth", "Jobs waiting for a worker.", ["model"], registry=r
        )
        self.dead_letters = Gauge(
            "skipdit_dead_letter_jobs",
            "Jobs in the model's dead-letter stream (given up after too many deliveries).",
            ["model"],
            registry=r,
        )
        self.webhook_dead_letters = Gauge(
            "skipdit_webhook_dead_letters",
            "Webhook events in the model's webhook dead letters (their retry budget spent).",
            ["model"],
            registry=r,
        )
        self.inflight = Gauge(
            "skipdit_inflight_requests", "Jobs held by this worker.", ["model"], registry=r
        )
        self.fast_path = Gauge(
            "skipdit_fast_path_component",
            "1 where the fast-path component (kernels: the Triton kernels, graphs: captured "
            "steps) runs for the model in this worker; 0 where it is off, by choice or after "
            "failing its start-up self-check.",
            ["model", "component"],
            registry=r,
        )

    def observe_step(self, model: str, report: StepReport) -> None:
        if report.prompt_cache_hits is not None and report.prompt_cache_misses is not None:
            self.prompt_cache_hits.labels(model).inc(report.prompt_cache_hits)
            self.prompt_cache_misses.labels(model).inc(report.prompt_cache_misses)
        if report.requests == 0:
            return
        self.batch_size.labels(model).observe(report.requests)
        for mode, n in report.mode_requests.items():
            if n:
                self.steps.labels(model, mode.value).inc(n)
        for mode, seconds in report.mode_seconds.items():
            self.step_duration.labels(model, mode.value).observe(seconds)

    def observe_end(
        self, model: str, status: str, seconds: float, speedup: float | None = None
    ) -> None:
        self.request_duration.labels(model, status).observe(seconds)
        self.requests.labels(model, status).inc()
        if speedup is not None:
            self.speedup.labels(model).observe(speedup)
