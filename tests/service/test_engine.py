from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from model import registry
from model.sampling.pipeline import Pipeline
from service.engine import Engine, EngineEvent, EngineRequest, EventKind
from service.request import GenerateParams
from tests.helpers import BATCH_TOL, generate, plan_of, tiny_text_model
from tests.service.helpers import Clock

TOKENS = 16  # digits-tiny: 8x8 pixels, patch 2


def run_all(engine: Engine, limit: int = 200) -> list[EngineEvent]:
    events: list[EngineEvent] = []
    for _ in range(limit):
        if not engine.has_work():
            return events
        events += engine.step()[0]
    raise AssertionError("engine did not drain")


def by_kind(events: list[EngineEvent], kind: EventKind) -> dict[str, EngineEvent]:
    return {e.request_id: e for e in events if e.kind is kind}


def test_requests_batch_together_and_match_their_solo_runs(tiny_pipeline: Pipeline) -> None:
    engine = Engine(tiny_pipeline, max_batch_tokens=1000)
    params = {
        "a": GenerateParams(steps=6, seed=1, cache_interval=1),
        "b": GenerateParams(steps=8, seed=2, cache_interval=3, num_images=2),
        "c": GenerateParams(steps=5, seed=3, cache_interval=2, sampler="dpm++"),
    }
    for rid, p in params.items():
        engine.submit(EngineRequest(rid, plan_of(engine.pipeline, p)))
    events, report = engine.step()
    assert report.requests == 3 and set(by_kind(events, EventKind.STARTED)) == set(params)
    done = by_kind(events + run_all(engine), EventKind.DONE)
    for rid, p in params.items():
        (solo,) = generate(tiny_pipeline, [p])
        torch.testing.assert_close(done[rid].result.latents, solo.latents, **BATCH_TOL)


def test_token_budget_caps_the_batch_and_new_requests_join_between_steps(
    tiny_pipeline: Pipeline,
) -> None:
    # guidance doubles rows: each request is 2 rows x 16 tokens = 32 tokens.
    engine = Engine(tiny_pipeline, max_batch_tokens=64)
    for i in range(3):
        engine.submit(
            EngineRequest(
                f"r{i}", plan_of(engine.pipeline, GenerateParams(steps=3, seed=i, guidance_scale=2))
            )
        )
    _, first = engine.step()
    assert first.requests == 2 and first.rows == 4
    engine.step()
    engine.step()  # r0, r1 finish here
    events, report = engine.step()
    assert "r2" in by_kind(events, EventKind.STARTED) and report.requests == 1


def test_a_plan_over_the_budget_runs_alone(tiny_pipeline: Pipeline) -> None:
    """The API refuses such a request (``resolve``); a worker with a smaller budget than the
    API's still runs it, alone, and the next request waits for it."""
    engine = Engine(tiny_pipeline, max_batch_tokens=64)  # 2 rows x 16 tokens per image
    big = plan_of(tiny_pipeline, GenerateParams(steps=2, num_images=3, guidance_scale=2))
    assert big.tokens == 96
    engine.submit(EngineRequest("big", big))
    engine.submit(
        EngineRequest("ok", plan_of(tiny_pipeline, GenerateParams(steps=2, num_images=2)))
    )
    events, sizes = [], []
    while engine.has_work():
        step_events, report = engine.step()
        events += step_events
        sizes.append(report.requests)
    assert set(by_kind(events, EventKind.DONE)) == {"big", "ok"}
    assert max(sizes) == 1


def test_priority_then_least_slack_decide_admission(tiny_pipeline: Pipeline) -> None:
    clock = Clock()
    engine = Engine(tiny_pipeline, max_batch_tokens=32, clock=clock)
    p = GenerateParams(steps=2, guidance_scale=2)
    engine.submit(
        EngineRequest(
            "late-deadline", plan_of(engine.pipeline, p), deadline=clock.now + 500, submitted=1.0
        )
    )
    engine.submit(
        EngineRequest(
            "soon-deadline", plan_of(engine.pipeline, p), deadline=clock.now + 50, submitted=2.0
        )
    )
    engine.submit(EngineRequest("no-deadline", plan_of(engine.pipeline, p), submitted=0.0))
    engine.submit(
        EngineRequest("important", plan_of(engine.pipeline, p), priority=5, submitted=3.0)
    )
    order = [e.request_id for e in run_all(engine) if e.kind is EventKind.STARTED]
    assert order == ["important", "soon-deadline", "late-deadline", "no-deadline"]


def test_deadline_passed_expires_at_the_next_step_boundary(tiny_pipeline: Pipeline) -> None:
    clock = Clock()
    engine = Engine(tiny_pipeline, max_batch_tokens=1000, clock=clock)
    engine.submit(
        EngineRequest(
            "run", plan_of(engine.pipeline, GenerateParams(steps=10)), deadline=clock.now + 10
        )
    )
    engine.submit(EngineRequest("keep", plan_of(engine.pipeline, GenerateParams(steps=4, seed=9))))
    engine.step()
    engine.step()
    clock.advance(11)
    events, _ = engine.step()
    expired = by_kind(events, EventKind.EXPIRED)
    assert expired["run"].step == 2 and "run" not in engine.active_ids
    assert "keep" in by_kind(run_all(engine), EventKind.DONE)


def test_cancel_a_waiting_and_a_running_request(tiny_pipeline: Pipeline) -> None:
    engine = Engine(tiny_pipeline, max_batch_tokens=32)
    p = GenerateParams(steps=5, guidance_scale=2)
    engine.submit(EngineRequest("running", plan_of(engine.pipeline, p)))
    engine.submit(EngineRequest("waiting", plan_of(engine.pipeline, p)))
    engine.step()
    assert engine.active_ids == ["running"] and engine.waiting_ids == ["waiting"]
    engine.cancel("waiting")
    engine.cancel("running")
    events, report = engine.step()
    cancelled = by_kind(events, EventKind.CANCELLED)
    assert set(cancelled) == {"running", "waiting"} and cancelled["running"].step == 1
    assert report.requests == 0 and not engine.has_work()


def test_an_invalid_request_fails_alone(tiny_pipeline: Pipeline) -> None:
    engine = Engine(tiny_pipeline, max_batch_tokens=1000)
    good = plan_of(engine.pipeline, GenerateParams(steps=3))
    # Plans are checked where they are made; one that is wrong anyway (no such class row in the
    # label embedding) fails in the batched step and alone.
    engine.submit(EngineRequest("bad", dataclasses.replace(good, class_label=99)))
    engine.submit(EngineRequest("good", good))
    events = run_all(engine)
    assert "index" in by_kind(events, EventKind.FAILED)["bad"].error
    assert "good" in by_kind(events, EventKind.DONE)


def test_a_cancel_right_after_its_submit_finds_the_request(tiny_pipeline: Pipeline) -> None:
    """Submissions start together at the next step; a cancel taken in the same step still
    finds the request submitted before it (which never starts to run)."""
    engine = Engine(tiny_pipeline, max_batch_tokens=1000)
    plan = plan_of(engine.pipeline, GenerateParams(steps=3))
    engine.submit(EngineRequest("gone", plan))
    engine.cancel("gone")
    engine.submit(EngineRequest("kept", plan))
    events, report = engine.step()
    assert set(by_kind(events, EventKind.CANCELLED)) == {"gone"}
    assert set(by_kind(events, EventKind.STARTED)) == {"kept"} and report.requests == 1


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_text_model(tmp_path_factory.mktemp("t2i") / "t2i")


@pytest.fixture
def text_pipeline(text_model_dir: Path) -> Pipeline:
    """The tiny text model with a fresh embedding cache (a test counts its hits and misses)."""
    return registry.load(str(text_model_dir)).pipeline


def test_requests_submitted_together_encode_their_prompts_in_one_batch(
    text_pipeline: Pipeline,
) -> None:
    assert text_pipeline.prompting is not None
    calls = []
    encoder = text_pipeline.prompting.encoder.model
    handle = encoder.register_forward_hook(lambda *_: calls.append(1))
    engine = Engine(text_pipeline, max_batch_tokens=1000)
    prompts = {"a": "a 4 at the top", "b": "the digit 9 on the left", "c": "a large 5"}
    try:
        for rid, prompt in prompts.items():
            engine.submit(EngineRequest(rid, text_pipeline.plan(prompt=prompt, steps=3, seed=1)))
        events, report = engine.step()
    finally:
        handle.remove()
    assert len(calls) == 1  # three prompts and the empty one: one encoder batch
    assert set(by_kind(events, EventKind.STARTED)) == set(prompts)
    # 6 prompts asked (each request's and its guided branch's empty one): 4 encoded, the
    # empty prompt served twice more from the cache
    assert (report.prompt_cache_hits, report.prompt_cache_misses) == (2, 4)
    engine.submit(EngineRequest("again", text_pipeline.plan(prompt="a large 5", steps=3)))
    _, report = engine.step()
    assert (report.prompt_cache_hits, report.prompt_cache_misses) == (2, 0)
    _, report = engine.step()  # nothing new started
    assert (report.prompt_cache_hits, report.prompt_cache_misses) == (0, 0)


def test_a_request_that_cannot_start_fails_alone_and_its_batch_mate_runs(
    text_pipeline: Pipeline,
) -> None:
    """Starting the step's requests together raises (a class model's plan, no prompt, sent
    to the text model's engine): each starts alone, the bad one fails, the good one runs as
    it runs alone."""
    engine = Engine(text_pipeline, max_batch_tokens=1000)
    good = text_pipeline.plan(prompt="two digits: 3 above 8", steps=4, seed=5)
    engine.submit(EngineRequest("bad", dataclasses.replace(good, prompt=None)))
    engine.submit(EngineRequest("good", good))
    events = run_all(engine)
    assert set(by_kind(events, EventKind.FAILED)) == {"bad"}
    assert set(by_kind(events, EventKind.STARTED)) == {"good"}
    (solo,) = text_pipeline.generate([good])
    result = by_kind(events, EventKind.DONE)["good"].result
    assert result is not None and result.prompt_report == solo.prompt_report
    torch.testing.assert_close(result.latents, solo.latents, **BATCH_TOL)


def test_step_report_counts_modes_and_measures_their_cost(tiny_pipeline: Pipeline) -> None:
    engine = Engine(tiny_pipeline, max_batch_tokens=1000)
    engine.submit(
        EngineRequest("a", plan_of(engine.pipeline, GenerateParams(steps=6, cache_interval=3)))
    )
    totals = {"full": 0, "cached": 0}
    while engine.has_work():
        _, report = engine.step()
        for mode, n in report.mode_requests.items():
            totals[mode.value] += n
    assert totals == {"full": 3, "cached": 3}  # steps 0, 3 and the t <= 20 tail are full
    assert all(v is not None and v > 0 for v in engine.step_seconds.values())


def test_sixteen_staggered_mixed_requests_equal_solo_latents_at_fp32(
    tiny_pipeline: Pipeline,
) -> None:
    # Requests join while others are mid-way, so every one runs in changing batches.
    engine = Engine(tiny_pipeline, max_batch_tokens=10_000)
    params = {
        f"r{i}": GenerateParams(
            steps=10, seed=100 + i, class_label=i % 10, cache_interval=1 + i % 4
        )
        for i in range(16)
    }
    done: dict[str, EngineEvent] = {}
    batch_sizes = []
    pending = list(params.items())
    while pending or engine.has_work():
        for _ in range(3):  # three new requests join before each step
            if pending:
                rid, p = pending.pop(0)
                engine.submit(EngineRequest(rid, plan_of(engine.pipeline, p)))
        events, report = engine.step()
        batch_sizes.append(report.requests)
        done |= by_kind(events, EventKind.DONE)
    assert max(batch_sizes) > 1
    for rid, p in params.items():
        (solo,) = generate(tiny_pipeline, [p])
        torch.testing.assert_close(done[rid].result.latents, solo.latents, **BATCH_TOL)
