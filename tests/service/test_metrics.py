"""Stats objects in, Prometheus series out: names in base units, explicit buckets, labels."""

from __future__ import annotations

from model.cache import Mode
from model.sampling.pipeline import Pipeline
from service.engine import Engine, EngineRequest, StepReport
from service.metrics import LATENCY_BUCKETS, SPEEDUP_BUCKETS, STEP_BUCKETS, Metrics
from service.request import GenerateParams
from tests.helpers import plan_of


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_both_cache_modes_of_every_model_are_exported_before_any_step() -> None:
    metrics = Metrics(["a", "b"])
    for model in ("a", "b"):
        for mode in ("full", "cached"):
            assert value(metrics, "skipdit_steps_total", model=model, mode=mode) == 0
            count = value(metrics, "skipdit_step_duration_seconds_count", model=model, mode=mode)
            assert count == 0
    assert value(metrics, "skipdit_steps_total", model="c", mode="full") is None


def test_every_series_is_in_base_units_with_the_project_prefix_and_a_model_label() -> None:
    metrics = Metrics(["tiny"])
    families = list(metrics.registry.collect())
    names = {f.name for f in families}
    assert names == {
        "skipdit_request_duration_seconds",
        "skipdit_queue_wait_seconds",
        "skipdit_step_duration_seconds",
        "skipdit_batch_size",
        "skipdit_steps",
        "skipdit_speedup_ratio",
        "skipdit_queue_depth",
        "skipdit_dead_letter_jobs",
        "skipdit_inflight_requests",
        "skipdit_requests",
        "skipdit_errors",
        "skipdit_cancelled_jobs",
        "skipdit_prompt_cache_hits",
        "skipdit_prompt_cache_misses",
        "skipdit_webhook_deliveries",
        "skipdit_webhook_dead_letters",
        "skipdit_fast_path_component",
    }
    counters = {f.name for f in families if f.type == "counter"}
    assert counters == {  # *_total
        "skipdit_steps", "skipdit_requests", "skipdit_errors", "skipdit_cancelled_jobs",
        "skipdit_prompt_cache_hits", "skipdit_prompt_cache_misses", "skipdit_webhook_deliveries",
    }  # fmt: skip
    for family in (
        metrics.request_duration, metrics.queue_wait, metrics.step_duration, metrics.batch_size,
        metrics.steps, metrics.speedup, metrics.queue_depth, metrics.dead_letters,
        metrics.inflight, metrics.requests, metrics.errors, metrics.cancellations,
        metrics.prompt_cache_hits, metrics.prompt_cache_misses, metrics.fast_path,
        metrics.webhook_deliveries, metrics.webhook_dead_letters,
    ):  # fmt: skip
        assert family._labelnames[0] == "model", family
    assert len(families) == 17


def test_a_real_engine_step_becomes_batch_mode_and_duration_series(
    tiny_pipeline: Pipeline,
) -> None:
    metrics = Metrics()
    engine = Engine(tiny_pipeline, max_batch_tokens=10_000)
    engine.submit(
        EngineRequest("a", plan_of(engine.pipeline, GenerateParams(steps=6, cache_interval=3)))
    )
    engine.submit(
        EngineRequest(
            "b", plan_of(engine.pipeline, GenerateParams(steps=6, cache_interval=1, seed=1))
        )
    )
    reports = []
    while engine.has_work():
        _, report = engine.step()
        metrics.observe_step("tiny", report)
        reports.append(report)
    assert value(metrics, "skipdit_batch_size_count", model="tiny") == len(reports) == 6
    assert value(metrics, "skipdit_batch_size_sum", model="tiny") == 12  # two in every step
    full, cached = (
        value(metrics, "skipdit_steps_total", model="tiny", mode=m) for m in ("full", "cached")
    )
    assert (full, cached) == (9, 3)  # a: 3 full + 3 cached; b: 6 full
    full_count = value(metrics, "skipdit_step_duration_seconds_count", model="tiny", mode="full")
    cached_count = value(
        metrics, "skipdit_step_duration_seconds_count", model="tiny", mode="cached"
    )
    assert (full_count, cached_count) == (6, 3)  # one observation per step and mode that ran
    assert value(metrics, "skipdit_step_duration_seconds_sum", model="tiny", mode="full") > 0
    assert value(metrics, "skipdit_batch_size_count", model="other") is None


def test_an_empty_step_records_nothing() -> None:
    metrics = Metrics(["tiny"])
    metrics.observe_step("tiny", StepReport())
    assert value(metrics, "skipdit_batch_size_count", model="tiny") is None
    assert value(metrics, "skipdit_steps_total", model="tiny", mode="full") == 0


def test_a_step_report_counts_requests_per_mode() -> None:
    metrics = Metrics()
    report = StepReport(requests=5, rows=10, seconds=0.03)
    report.mode_requests = {Mode.FULL: 2, Mode.CACHED: 3}
    report.mode_seconds = {Mode.FULL: 0.02, Mode.CACHED: 0.004}
    metrics.observe_step("m", report)
    labels = {"model": "m"}
    assert value(metrics, "skipdit_steps_total", **labels, mode="full") == 2
    assert value(metrics, "skipdit_steps_total", **labels, mode="cached") == 3
    assert (
        value(metrics, "skipdit_step_duration_seconds_bucket", **labels, mode="cached", le="0.005")
        == 1
    )
    assert (
        value(metrics, "skipdit_step_duration_seconds_bucket", **labels, mode="full", le="0.01")
        == 0
    )
    assert value(metrics, "skipdit_batch_size_bucket", **labels, le="4.0") == 0
    assert value(metrics, "skipdit_batch_size_bucket", **labels, le="8.0") == 1


def test_prompt_cache_series_are_text_models_and_add_up_their_steps_reports() -> None:
    metrics = Metrics(["t2i", "tiny"], text_models=["t2i"])
    for name in ("skipdit_prompt_cache_hits_total", "skipdit_prompt_cache_misses_total"):
        assert value(metrics, name, model="t2i") == 0  # exported from the start
        assert value(metrics, name, model="tiny") is None  # a class model has none
    for hits, misses in ((0, 2), (2, 0), (3, 1)):
        metrics.observe_step("t2i", StepReport(prompt_cache_hits=hits, prompt_cache_misses=misses))
    metrics.observe_step("tiny", StepReport(requests=1))  # a class model's step: no counts
    assert value(metrics, "skipdit_prompt_cache_hits_total", model="t2i") == 5
    assert value(metrics, "skipdit_prompt_cache_misses_total", model="t2i") == 3
    assert value(metrics, "skipdit_prompt_cache_hits_total", model="tiny") is None


def test_the_end_of_a_request_records_latency_status_and_speedup() -> None:
    metrics = Metrics()
    metrics.observe_end("tiny", "done", 3.0, speedup=1.8)
    metrics.observe_end("tiny", "failed", 0.2)
    assert value(metrics, "skipdit_request_duration_seconds_sum", model="tiny", status="done") == 3
    assert value(metrics, "skipdit_request_duration_seconds_count", model="tiny", status="failed")
    assert value(metrics, "skipdit_requests_total", model="tiny", status="done") == 1
    assert value(metrics, "skipdit_requests_total", model="tiny", status="failed") == 1
    # Only where a speedup was given.
    assert value(metrics, "skipdit_speedup_ratio_count", model="tiny") == 1
    assert value(metrics, "skipdit_speedup_ratio_bucket", model="tiny", le="1.75") == 0
    assert value(metrics, "skipdit_speedup_ratio_bucket", model="tiny", le="2.0") == 1


def test_buckets_are_the_explicit_ones() -> None:
    metrics = Metrics(["tiny"])
    metrics.observe_end("tiny", "done", 1.0, speedup=1.0)
    metrics.queue_wait.labels("tiny").observe(0.1)
    tiny = {"model": "tiny"}
    for name, buckets, labels in (
        ("skipdit_request_duration_seconds", LATENCY_BUCKETS, tiny | {"status": "done"}),
        ("skipdit_queue_wait_seconds", LATENCY_BUCKETS, tiny),
        ("skipdit_step_duration_seconds", STEP_BUCKETS, tiny | {"mode": "full"}),
        ("skipdit_speedup_ratio", SPEEDUP_BUCKETS, tiny),
    ):
        for le in buckets:
            assert value(metrics, f"{name}_bucket", **labels, le=str(float(le))) is not None, le


def test_registries_are_per_instance() -> None:
    one, two = Metrics(), Metrics()
    one.errors.labels("", "backend_unavailable").inc()
    assert value(one, "skipdit_errors_total", model="", reason="backend_unavailable") == 1
    assert value(two, "skipdit_errors_total", model="", reason="backend_unavailable") is None
