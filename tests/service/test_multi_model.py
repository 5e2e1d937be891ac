"""One deployment, several models: requests route by ``model``, each model has its own engine
(never a shared batch) and its own queue, and a Redis worker takes only the models it holds."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from model.sampling.pipeline import Pipeline
from service.engine import Engine
from service.messages import JobRequest, JobStatus
from service.metrics import Metrics
from service.queue.memory import MemoryBackend
from service.worker import Worker, WorkerConfig
from tests.helpers import job_record
from tests.service.helpers import (
    Clock,
    RedisServer,
    Workers,
    api_settings,
    assert_solo,
    parse_metrics,
    pipeline_of,
    running_app,
    sample,
    settings_for,
    until_ready,
    wait_for,
)


@pytest.fixture
def two(tiny_model_dir: Path, tiny_dit_model_dir: Path) -> list[str]:
    """The served names: the tiny Skip-DiT (default, first) and the tiny vanilla DiT."""
    return [str(tiny_model_dir), str(tiny_dit_model_dir)]


async def test_interleaved_requests_route_by_model_and_match_their_solo_runs(
    backend: str, two: list[str], redis_url: str | None
) -> None:
    a, b = two
    bodies = []
    for i in range(12):
        body = {"class_label": i % 10, "steps": 8, "seed": 10 + i}
        if i % 2:
            bodies.append(body | {"model": b})  # vanilla DiT: no long skips to cache with
        else:
            bodies.append(body | {"cache_interval": 1 + i % 3} | ({"model": a} if i % 4 else {}))
    settings = settings_for(backend, Path(a), redis_url, models=two)
    async with running_app(settings) as client:
        responses = await asyncio.gather(*(client.post("/generate", json=x) for x in bodies))
        metrics = parse_metrics((await client.get("/metrics")).text)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    pipelines = {a: pipeline_of(a), b: pipeline_of(b)}
    for body, response in zip(bodies, responses, strict=True):
        out = response.json()
        name = body.get("model", a)  # none named: the first served model
        assert out["result"]["model"] == name and out["request"]["model"] == name
        assert_solo(pipelines[name], body, out["images"][0])
    for name in two:  # each engine ran exactly its own model's request-steps, none of the other's
        own = sum(x["steps"] for x in bodies if x.get("model", a) == name)
        assert sample(metrics, "skipdit_batch_size_sum", model=name) == own
        modes = ("full", "cached")
        assert sum(sample(metrics, "skipdit_steps_total", model=name, mode=m) for m in modes) == own
        assert sample(metrics, "skipdit_requests_total", model=name, status="done") == 6
        assert sample(metrics, "skipdit_queue_depth", model=name) == 0
    assert sample(metrics, "skipdit_batch_size_sum", model=a) > sample(
        metrics, "skipdit_batch_size_count", model=a
    )  # requests of one model did batch together


async def test_unknown_model_models_list_readiness_and_openai_route(
    backend: str, two: list[str], tiny_model_dir: Path, redis_url: str | None
) -> None:
    a, b = two
    settings = settings_for(backend, tiny_model_dir, redis_url, models=two)
    async with running_app(settings) as client:
        unknown = await client.post("/generate", json={"model": "nope", "steps": 2})
        unknown_openai = await client.post(
            "/v1/images/generations", json={"prompt": "3", "model": "nope"}
        )
        models = (await client.get("/models")).json()["data"]
        ready = await until_ready(client, lambda r: all(m["held"] for m in r["models"].values()))
        openai = await client.post("/v1/images/generations", json={"prompt": "3", "model": b})
    for response in (unknown, unknown_openai):
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["field"] == "model" and a in error["message"] and b in error["message"]
    assert [m["id"] for m in models] == two and [m["default"] for m in models] == [True, False]
    assert {m["kind"] for m in models} == {"image"}
    assert [m["card"]["name"] for m in models] == ["tiny", "tiny-dit"]
    assert [m["default_guidance"] for m in models] == [2.0, 3.0]
    assert [m["config"]["long_skip"] for m in models] == [True, False]
    for m in models:
        assert set(m["cache_defaults"]) == set(m["cache_policies"]) and m["cache_policies"]
        assert m["runtime"]["kernels"] == "torch"  # each model's own resolved path (CPU)
    assert ready["model"] == a and set(ready["models"]) == set(two)
    assert openai.status_code == 200, openai.text
    assert_solo(pipeline_of(b), {"class_label": 3}, openai.json()["data"][0]["b64_json"])


async def test_the_worker_steps_its_engines_in_turn(tiny_pipeline: Pipeline) -> None:
    """Round-robin: while both engines have work, steps alternate between the models."""
    clock = Clock()
    backend = MemoryBackend(100, result_ttl=60, job_ttl=600, clock=clock)
    engines = {m: Engine(tiny_pipeline, max_batch_tokens=10_000, clock=clock) for m in "ab"}
    stepped: list[str] = []
    for name, engine in engines.items():
        step = engine.step

        def recording(name: str = name, step: Callable = step) -> object:
            stepped.append(name)
            return step()

        engine.step = recording  # type: ignore[method-assign]
    worker = Worker(backend, engines, Metrics(list(engines)), WorkerConfig("w1", heartbeat=0.5))
    jobs = []
    for model, steps in (("a", 6), ("b", 3)):
        body = JobRequest(model=model, steps=steps)
        record = job_record(tiny_pipeline, body)
        jobs.append((await backend.submit(record))[0])
    task = asyncio.create_task(worker.run())
    async with asyncio.timeout(60):
        for job in jobs:
            await backend.wait(job.id, 60)
    worker.stop()
    await task
    assert [(await backend.get(j.id)).status for j in jobs] == [JobStatus.DONE] * 2
    assert [(await backend.get(j.id)).result["model"] for j in jobs] == ["a", "b"]
    assert stepped == ["a", "b"] * 3 + ["a"] * 3  # b is done after 3 steps; a runs on alone


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["redis", "cluster"])
async def test_a_redis_worker_takes_only_the_models_it_holds(
    backend: str, redis_server: RedisServer, two: list[str], tiny_model_dir: Path
) -> None:
    a, b = two
    prefix, cluster = f"m{uuid.uuid4().hex[:8]}", backend == "cluster"
    workers = Workers(redis_server.url, tiny_model_dir, prefix, cluster=cluster)
    try:
        workers.start("holds-a", SKIPDIT_MODEL="", SKIPDIT_MODELS=a)
        async with running_app(api_settings(workers, models=two)) as client:
            job_a = (await client.post("/generate", json={"steps": 4, "async": True})).json()
            body_b = {"model": b, "steps": 4, "async": True}
            job_b = (await client.post("/generate", json=body_b)).json()
            done_a = await wait_for(client, job_a["id"], lambda r: r["status"] == "done")
            ready = await until_ready(client, lambda r: r["models"][a]["held"])
            waiting_b = (await client.get(f"/jobs/{job_b['id']}")).json()
            depth = parse_metrics((await client.get("/metrics")).text)
            workers.start("holds-b", SKIPDIT_MODEL="", SKIPDIT_MODELS=f'["{b}"]')
            done_b = await wait_for(client, job_b["id"], lambda r: r["status"] == "done")
            both = await until_ready(client, lambda r: r["models"][b]["held"])
    finally:
        workers.stop_all()
    assert done_a["worker"] == "holds-a" and done_a["result"]["model"] == a
    assert waiting_b["status"] == "queued"  # holds-a never took it
    assert ready["models"] == {
        a: {"held": True, "workers": ["holds-a"]},
        b: {"held": False, "workers": []},
    }
    assert sample(depth, "skipdit_queue_depth", model=b) == 1
    assert sample(depth, "skipdit_queue_depth", model=a) == 0
    assert done_b["worker"] == "holds-b" and done_b["result"]["model"] == b
    assert both["models"][b]["workers"] == ["holds-b"]
