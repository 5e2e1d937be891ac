"""Step-level continuous batching. Knows nothing of HTTP or Redis.

Each ``step()``: apply submissions and cancellations that arrived since the last step, expire
requests whose deadline passed, admit waiting requests (priority first, then least slack) while
the batch stays under a token budget, run ONE denoising step for every active request (a single
batched forward per cache-mode group, see ``model.sampling.pipeline.denoise_step``), and report
what happened as events. The requests submitted since the last step start together
(``Pipeline.start_all``: a text model encodes all their prompts in one batch); if that raises,
each starts alone, so a request that cannot start fails alone. Requests join and leave only at
step boundaries and never wait for a batch to fill. Output never depends on batch composition:
each request owns its latents, scheduler, generator and cache state. An engine runs one
pipeline (one model); a worker holding several models owns one engine each, so requests of
different models never share a batch.

``submit`` and ``cancel`` may be called from any thread; ``step`` from one thread at a time.
"""

from __future__ import annotations

import logging
import math
import queue
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

from model.cache import Mode
from model.sampling.pipeline import Job, Pipeline, Result
from model.sampling.plan import RunPlan
from service.messages import EventKind  # plain messages: no HTTP, no Redis

log = logging.getLogger(__name__)


@dataclass
class EngineRequest:
    id: str
    plan: RunPlan  # checked where it was made: the engine runs it as it is
    priority: int = 0  # higher is admitted first
    deadline: float = math.inf  # Unix seconds
    submitted: float = field(default_factory=time.time)


@dataclass
class EngineEvent:
    kind: EventKind
    request_id: str
    step: int = 0
    total: int = 0
    mode: Mode | None = None
    result: Result | None = None
    error: str | None = None
    queue_wait: float | None = None  # seconds from submit to admission, on STARTED


@dataclass
class StepReport:
    """What one engine step did, for metrics."""

    requests: int = 0  # requests in the batch
    rows: int = 0  # batch rows (guidance doubles a request's rows)
    seconds: float = 0.0  # the whole step
    # Per mode: requests that ran a step in it, and seconds of that mode's forward(s).
    mode_requests: dict[Mode, int] = field(default_factory=lambda: {m: 0 for m in Mode})
    mode_seconds: dict[Mode, float] = field(default_factory=dict)
    # Text models: prompts the embedding cache served (hits) and encoded (misses) while this
    # step started its new requests; None for class models.
    prompt_cache_hits: int | None = None
    prompt_cache_misses: int | None = None


@dataclass
class _Entry:
    request: EngineRequest
    job: Job  # created at submission: validated, noise drawn
    modes: list[Mode]  # the request's own full/cached schedule, for time estimates
    started: float = 0.0


class Engine:
    def __init__(
        self,
        pipeline: Pipeline,
        max_batch_tokens: int,
        clock: Callable[[], float] = time.time,
    ):
        self.pipeline = pipeline
        self.max_batch_tokens = max_batch_tokens
        self.clock = clock
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._waiting: list[_Entry] = []
        self._active: list[_Entry] = []
        # Measured seconds of one batched step, by mode (EMA); seeds the deadline estimates.
        self.step_seconds: dict[Mode, float | None] = {Mode.FULL: None, Mode.CACHED: None}

    # -- thread-safe intake

    def submit(self, request: EngineRequest) -> None:
        self._inbox.put(("submit", request))

    def cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id))

    # -- introspection

    @property
    def tokens_per_row(self) -> int:
        return self.pipeline.model.config.num_tokens

    @property
    def active_ids(self) -> list[str]:
        return [a.request.id for a in self._active]

    @property
    def waiting_ids(self) -> list[str]:
        return [e.request.id for e in self._waiting]

    def has_work(self) -> bool:
        return bool(self._active or self._waiting or not self._inbox.empty())

    def estimate_seconds(self, plan: list[Mode]) -> float:
        """Time to run ``plan`` (a request's remaining modes) at the measured step costs."""
        full = self.step_seconds[Mode.FULL]
        if full is None:
            return 0.0
        cached = self.step_seconds[Mode.CACHED] or full
        return sum(full if m is Mode.FULL else cached for m in plan)

    # -- the loop body

    def step(self) -> tuple[list[EngineEvent], StepReport]:
        events: list[EngineEvent] = []
        report = StepReport()
        before = self._prompt_cache_counts()
        self._drain_inbox(events)
        after = self._prompt_cache_counts()
        if before is not None and after is not None:
            report.prompt_cache_hits = after[0] - before[0]
            report.prompt_cache_misses = after[1] - before[1]
        now = self.clock()
        self._expire(now, events)
        self._admit(now, events)
        if not self._active:
            return events, report
        # One engine serves one model, so every active request joins one batch. Requests that
        # cannot share a forward (video of different frame counts) would get a batch key here:
        # group ``self._active`` by it and run one ``_run`` per group.
        jobs = [a.job for a in self._active]
        report.requests, report.rows = len(jobs), sum(j.rows for j in jobs)
        begin = time.perf_counter()
        modes = self._run(jobs, events)
        report.seconds = time.perf_counter() - begin
        for job, mode in zip(jobs, modes, strict=True):
            if mode is not None:
                report.mode_requests[mode] += 1
                if job.stats.last_seconds > 0:  # on CUDA a mode's first step is not timed yet
                    report.mode_seconds[mode] = job.stats.last_seconds
        for mode, sec in report.mode_seconds.items():
            old = self.step_seconds[mode]
            self.step_seconds[mode] = sec if old is None else 0.8 * old + 0.2 * sec
        still: list[_Entry] = []
        for entry, mode in zip(self._active, modes, strict=True):
            job, rid = entry.job, entry.request.id
            if mode is None:  # failed in isolation; its event is already out
                continue
            events.append(EngineEvent(EventKind.STEP, rid, job.step, job.total_steps, mode))
            if job.done:
                result = self.pipeline.finish(job, self.clock() - entry.started)
                events.append(
                    EngineEvent(EventKind.DONE, rid, job.step, job.total_steps, result=result)
                )
            else:
                still.append(entry)
        self._active = still
        return events, report

    def _run(self, jobs: list[Job], events: list[EngineEvent]) -> Sequence[Mode | None]:
        """One batched step; if it raises, step each job alone so one bad request fails alone."""
        try:
            return self.pipeline.step(jobs)
        except Exception as e:
            if len(jobs) == 1:
                log.exception("request %s failed", self._active[0].request.id)
                events.append(
                    EngineEvent(EventKind.FAILED, self._active[0].request.id, error=str(e))
                )
                return [None]
            log.exception("batched step failed; isolating %d requests", len(jobs))
        modes: list[Mode | None] = []
        for entry in self._active:
            try:
                modes.append(self.pipeline.step([entry.job])[0])
            except Exception as e:
                log.exception("request %s failed", entry.request.id)
                events.append(EngineEvent(EventKind.FAILED, entry.request.id, error=str(e)))
                modes.append(None)
        return modes

    def _prompt_cache_counts(self) -> tuple[int, int] | None:
        """(hits, misses) of a text model's embedding cache so far; None for class models.
        A worker steps all its engines on one thread, so a difference over ``_drain_inbox`` is
        this engine's, even where the worker's models share one cache."""
        prompting = self.pipeline.prompting
        return None if prompting is None else (prompting.cache.hits, prompting.cache.misses)

    def _drain_inbox(self, events: list[EngineEvent]) -> None:
        """Take submissions and cancellations in order. Submissions start together; a cancel
        first starts those before it, so it finds the request it names."""
        submitted: list[EngineRequest] = []
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                submitted.append(cast(EngineRequest, item))  # a submit's item: a request
                continue
            if submitted:
                self._prepare(submitted, events)
                submitted = []
            for entries in (self._waiting, self._active):
                for entry in [e for e in entries if e.request.id == item]:
                    entries.remove(entry)
                    events.append(
                        EngineEvent(
                            EventKind.CANCELLED,
                            entry.request.id,
                            entry.job.step,
                            entry.job.total_steps,
                        )
                    )
        if submitted:
            self._prepare(submitted, events)

    def _prepare(self, requests: list[EngineRequest], events: list[EngineEvent]) -> None:
        """Start ``requests`` together (their prompts encoded in one batch); if that raises,
        start each alone: one that cannot start fails alone, the others wait as usual."""
        try:
            jobs: list[Job | None] = list(self.pipeline.start_all([r.plan for r in requests]))
        except Exception as e:
            if len(requests) == 1:
                self._not_started(requests[0], e, events)
                return
            log.exception("starting %d requests together failed; isolating", len(requests))
            jobs = [self._start_alone(request, events) for request in requests]
        for request, job in zip(requests, jobs, strict=True):
            if job is None:
                continue
            timesteps = [int(t) for t in job.scheduler.timesteps]
            modes = job.cache.policy.planned_modes(job.cache.config, timesteps)
            self._waiting.append(_Entry(request, job, modes))

    def _start_alone(self, request: EngineRequest, events: list[EngineEvent]) -> Job | None:
        try:
            return self.pipeline.start(request.plan)
        except Exception as e:
            self._not_started(request, e, events)
            return None

    def _not_started(self, request: EngineRequest, e: Exception, events: list[EngineEvent]) -> None:
        """A plan this model cannot start fails alone."""
        log.exception("request %s could not start", request.id)
        events.append(EngineEvent(EventKind.FAILED, request.id, error=str(e)))

    def _expire(self, now: float, events: list[EngineEvent]) -> None:
        for entries, where in ((self._waiting, "in queue"), (self._active, "while running")):
            for entry in [e for e in entries if e.request.deadline <= now]:
                entries.remove(entry)
                events.append(
                    EngineEvent(
                        EventKind.EXPIRED,
                        entry.request.id,
                        entry.job.step,
                        entry.job.total_steps,
                        error=f"deadline passed {where}",
                    )
                )

    def _slack(self, entry: _Entry, now: float) -> float:
        if math.isinf(entry.request.deadline):
            return math.inf
        return entry.request.deadline - now - self.estimate_seconds(entry.modes)

    def _admit(self, now: float, events: list[EngineEvent]) -> None:
        self._waiting.sort(
            key=lambda e: (-e.request.priority, self._slack(e, now), e.request.submitted)
        )
        used = sum(e.job.rows for e in self._active) * self.tokens_per_row
        while self._waiting:
            entry = self._waiting[0]
            cost = entry.job.rows * self.tokens_per_row
            if used + cost > self.max_batch_tokens and self._active:
                return  # strict order: the head waits for room rather than being overtaken
            self._waiting.pop(0)
            used += cost
            entry.started = now
            self._active.append(entry)
            events.append(
                EngineEvent(
                    EventKind.STARTED,
                    entry.request.id,
                    0,
                    entry.job.total_steps,
                    queue_wait=max(0.0, now - entry.request.submitted),
                )
            )
