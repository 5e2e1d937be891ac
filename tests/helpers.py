"""Helpers the tests share (imported from here, never from another test module).

Requests in tests are written as the API takes them (``GenerateParams``, request field names)
and resolved as the API resolves them (``service.request.resolve``) against the pipeline they
run on: its card's guidance and calibration, no deployment limits, no default cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from model.registry import ModelInfo
from model.sampling.pipeline import Job, Pipeline, ProgressFn, Result
from model.sampling.plan import RunPlan
from service.api.deps import new_record
from service.messages import JobRecord, JobRequest
from service.request import GenerateParams, resolve


def info_of(pipeline: Pipeline, card: dict[str, Any] | None = None) -> ModelInfo:
    """A ModelInfo for a pipeline built in a test, its card holding the pipeline's defaults."""
    teacache = pipeline.cache_overrides.get("teacache", {})
    own: dict[str, Any] = {"default_guidance": pipeline.default_guidance}
    if "coefficients" in teacache:
        own["teacache"] = {"coefficients": list(teacache["coefficients"])}
    return ModelInfo("test", pipeline.model.config, own | (card or {}), random_weights=True)


def plan_of(pipeline: Pipeline, params: GenerateParams | RunPlan) -> RunPlan:
    """The plan the API would run ``params`` with on this pipeline's model."""
    if isinstance(params, RunPlan):
        return params
    return resolve(params, info_of(pipeline))


def generate(
    pipeline: Pipeline,
    requests: Sequence[GenerateParams | RunPlan],
    progress: ProgressFn | None = None,
) -> list[Result]:
    """``Pipeline.generate`` of requests written as the API takes them."""
    return pipeline.generate([plan_of(pipeline, p) for p in requests], progress=progress)


def start(pipeline: Pipeline, params: GenerateParams | RunPlan) -> Job:
    """``Pipeline.start`` of a request written as the API takes it."""
    return pipeline.start(plan_of(pipeline, params))


def job_record(pipeline: Pipeline, body: JobRequest, **fields: Any) -> JobRecord:
    """The record the API would write for ``body`` (``new_record``) on a model named
    ``body.model`` that runs on ``pipeline``; ``fields`` (``created_at``...) set over it."""
    info = dataclasses.replace(info_of(pipeline), name=body.model or "test")
    record = new_record(body, info, resolve(body, info))
    return dataclasses.replace(record, deadline=0.0, **fields)  # deadline: from created_at
