"""The HTTP API with an embedded worker, run against both queue backends."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from model.networks.checkpoint import load_pretrained
from model.sampling.pipeline import Pipeline
from service.queue.keys import Keys
from service.request import GenerateParams
from tests.helpers import BATCH_TOL, generate
from tests.service.helpers import (
    Clock,
    parse_metrics,
    pixels,
    redis_client,
    running_app,
    sample,
    settings_for,
)


@pytest.fixture
def make_settings(backend: str, tiny_model_dir: Path, redis_url: str | None):
    def make(**kw: object):
        return settings_for(backend, tiny_model_dir, redis_url, **kw)

    return make


async def events_of(client: httpx.AsyncClient, job_id: str) -> list[dict]:
    response = await client.get(f"/jobs/{job_id}/events")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    return [
        json.loads(line[len("data: ") :])
        for line in response.text.splitlines()
        if line.startswith("data: ")
    ]


async def test_sync_generate_returns_the_pipelines_image(make_settings, tiny_model_dir) -> None:
    body = {"class_label": 4, "steps": 8, "seed": 7, "cache_interval": 2, "num_images": 2}
    async with running_app(make_settings()) as client:
        response = await client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["status"] == "done" and out["content_type"] == "image/png"
    result = out["result"]
    assert result["steps_full"] + result["steps_cached"] == 8 and result["seed"] == 7
    assert (result["steps_full"], result["steps_cached"]) == (5, 3)  # N=2, and t <= 20 full
    # The speedup is what its steps and their times give: every step at the mean full cost,
    # over the time they took; at most steps / full steps (cached steps cost something).
    took = result["seconds_full"] + result["seconds_cached"]
    assert result["speedup"] == pytest.approx(result["mean_full_step_seconds"] * 8 / took)
    assert 0 < result["speedup"] <= 8 / 5
    model, card = load_pretrained(tiny_model_dir)
    (direct,) = generate(
        Pipeline(model, default_guidance=card["default_guidance"]),
        [GenerateParams(**{k: v for k, v in body.items()})],
    )
    for encoded, expected in zip(out["images"], direct.images, strict=True):
        got = pixels(base64.b64decode(encoded))
        assert np.abs(got - expected[..., 0].numpy().astype(np.int16)).max() <= 1


async def test_async_submit_then_status_result_and_sse(make_settings) -> None:
    async with running_app(make_settings()) as client:
        response = await client.post(
            "/generate",
            json={"steps": 6, "cache_interval": 3, "output_format": "webp"},
            headers={"Prefer": "respond-async"},
        )
        assert response.status_code == 202
        location = response.headers["Location"]
        job_id = response.json()["id"]
        assert location == f"/jobs/{job_id}"
        events = await events_of(client, job_id)
        status = (await client.get(location)).json()
        result = await client.get(f"{location}/result")
    types = [e["type"] for e in events]
    assert types[0] == "queued" and types[1] == "started" and types[-1] == "done"
    # The worker coalesces step events (one per progress_interval, always the last step).
    steps = [e["step"] for e in events if e["type"] == "step"]
    assert steps == sorted(set(steps)) and steps[-1] == 6 and types[-2] == "step"
    assert {e["mode"] for e in events if e["type"] == "step"} <= {"full", "cached"}
    assert status["status"] == "done" and status["progress"] == 1.0
    assert result.status_code == 200 and result.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(result.content)).format == "WEBP"


async def test_cancel_a_queued_and_a_running_job(make_settings) -> None:
    async with running_app(make_settings(max_inflight=1)) as client:
        slow = {"steps": 1000, "async": True}
        running = (await client.post("/generate", json=slow)).json()["id"]
        queued = (await client.post("/generate", json=slow)).json()["id"]
        async with asyncio.timeout(30):
            while (await client.get(f"/jobs/{running}")).json()["step"] < 2:
                await asyncio.sleep(0.02)
        assert (await client.get(f"/jobs/{queued}")).json()["status"] == "queued"
        first = await client.delete(f"/jobs/{queued}")
        assert first.status_code == 200 and first.json()["status"] == "cancelled"
        second = await client.delete(f"/jobs/{running}")
        assert second.status_code == 202
        events = await events_of(client, running)
        final = (await client.get(f"/jobs/{running}")).json()
        never = await events_of(client, queued)
    assert events[-1]["type"] == "cancelled" and 2 <= events[-1]["step"] < 1000
    assert final["status"] == "cancelled"
    assert [e["type"] for e in never] == ["queued", "cancelled"]  # it never started


async def test_full_queue_gives_429_with_retry_after(make_settings) -> None:
    async with running_app(make_settings(max_inflight=1, max_queue=1)) as client:
        slow = {"steps": 1000, "async": True}
        running = (await client.post("/generate", json=slow)).json()["id"]
        async with asyncio.timeout(30):
            while (await client.get(f"/jobs/{running}")).json()["status"] != "running":
                await asyncio.sleep(0.02)
        waiting = await client.post("/generate", json=slow)
        full = await client.post("/generate", json=slow)
        for job in (running, waiting.json()["id"]):
            await client.delete(f"/jobs/{job}")
    assert waiting.status_code == 202
    assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
    assert full.json()["error"]["code"] == "queue_full"


async def test_same_idempotency_key_is_one_job(make_settings) -> None:
    async with running_app(make_settings()) as client:
        headers = {"Idempotency-Key": "abc-123", "Prefer": "respond-async"}
        first = await client.post("/generate", json={"steps": 3}, headers=headers)
        again = await client.post("/generate", json={"steps": 3}, headers=headers)
        other = await client.post(
            "/generate", json={"steps": 3}, headers={"Prefer": "respond-async"}
        )
    assert first.json()["id"] == again.json()["id"] != other.json()["id"]


async def test_deadline_passed_gives_504(make_settings) -> None:
    async with running_app(make_settings()) as client:
        response = await client.post("/generate", json={"steps": 1000, "timeout_s": 0.3})
        job_id = response.json()["error"]["message"].split()[1]
        record = (await client.get(f"/jobs/{job_id}")).json()
    assert response.status_code == 504 and response.json()["error"]["code"] == "deadline_exceeded"
    assert record["status"] == "expired" and record["step"] < 1000


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": 1001}, "steps"),
        ({"steps": "many"}, "steps"),
        ({"num_images": 0}, "num_images"),
        ({"num_images": 9}, "num_images"),
        ({"class_label": 10}, "class_label"),
        ({"class_label": -1}, "class_label"),
        ({"cache_interval": 0}, "cache_interval"),
        ({"cache_depth": 5}, "cache_depth"),
        ({"guidance_scale": 25}, "guidance_scale"),
        ({"seed": -1}, "seed"),
        ({"sampler": "euler"}, "sampler"),
        ({"output_format": "bmp"}, "output_format"),
        ({"priority": 11}, "priority"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"model": "nope"}, "model"),
        ({"cache_policy": "none", "cache_interval": 3}, "cache_interval"),
        ({"unknown_field": 1}, "unknown_field"),
    ],
)
async def test_invalid_body_is_422_naming_the_field(make_settings, body: dict, field: str) -> None:
    async with running_app(make_settings()) as client:
        response = await client.post("/generate", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field and field in error["message"]


@pytest.mark.parametrize(
    ("raw", "says"),
    [(b"not json", "body: not valid JSON ("), (b'{"steps": 4', "body: not valid JSON ("),
     (b"", "body: Field required")],
)  # fmt: skip
async def test_a_body_that_is_not_json_is_422_naming_the_body(
    make_settings, raw: bytes, says: str
) -> None:
    async with running_app(make_settings()) as client:
        response = await client.post(
            "/generate", content=raw, headers={"content-type": "application/json"}
        )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == "body" and error["message"].startswith(says), error


async def test_unknown_and_unfinished_jobs(make_settings) -> None:
    async with running_app(make_settings(max_inflight=1)) as client:
        assert (await client.get("/jobs/nope")).status_code == 404
        assert (await client.get("/jobs/nope/result")).status_code == 404
        assert (await client.delete("/jobs/nope")).status_code == 404
        job = (await client.post("/generate", json={"steps": 1000, "async": True})).json()["id"]
        early = await client.get(f"/jobs/{job}/result")
        await client.delete(f"/jobs/{job}")
    assert early.status_code == 409 and early.json()["error"]["code"] == "not_ready"


async def test_expired_result_is_410(backend, make_settings) -> None:
    """Expiry without waiting it out: the memory backend runs on a clock the test moves; Redis
    keeps the result under a key with the TTL, whose expiry (the key's removal) the test does."""
    settings = make_settings(result_ttl_s=60)
    clock = Clock(time.time())
    async with running_app(settings, clock) as client:
        done = (await client.post("/generate", json={"steps": 2})).json()
        kept = await client.get(f"/jobs/{done['id']}/result")
        if backend == "memory":
            clock.advance(59)
            assert (await client.get(f"/jobs/{done['id']}/result")).status_code == 200
            clock.advance(2)
        else:
            key = Keys(settings.redis_prefix).result(done["id"])
            r = redis_client(settings)
            assert 55_000 < r.pttl(key) <= 60_000
            r.delete(key)
        gone = await client.get(f"/jobs/{done['id']}/result")
    assert kept.status_code == 200
    assert gone.status_code == 410 and gone.json()["error"]["code"] == "expired"


async def test_openai_images_endpoint(make_settings) -> None:
    async with running_app(make_settings()) as client:
        ok = await client.post(
            "/v1/images/generations", json={"prompt": "7", "n": 2, "size": "8x8"}
        )
        bad_prompt = await client.post("/v1/images/generations", json={"prompt": "a cat"})
        bad_size = await client.post("/v1/images/generations", json={"prompt": "1", "size": "9x9"})
        bad_format = await client.post(
            "/v1/images/generations", json={"prompt": "1", "response_format": "png"}
        )
    assert ok.status_code == 200 and len(ok.json()["data"]) == 2
    assert Image.open(io.BytesIO(base64.b64decode(ok.json()["data"][0]["b64_json"]))).size == (8, 8)
    assert bad_prompt.status_code == 422 and bad_prompt.json()["error"]["field"] == "prompt"
    assert bad_size.json()["error"]["field"] == "size"
    assert bad_format.json()["error"]["field"] == "response_format"


async def test_models_health_ready_and_openapi(make_settings, tiny_model_dir) -> None:
    async with running_app(make_settings()) as client:
        models = (await client.get("/models")).json()["data"][0]
        health = await client.get("/healthz")
        ready = await client.get("/readyz")
        openapi = (await client.get("/openapi.json")).json()
    assert models["id"] == str(tiny_model_dir) and models["random_weights"] is False
    assert models["kind"] == "image" and models["default"] is True
    assert models["cache_defaults"]["skip_cache"]["depth"] == 1
    runtime = models["runtime"]  # auto on a CPU: plain eager torch
    assert (runtime["kernels"], runtime["graphs"], runtime["warmup_s"]) == ("torch", "off", 0)
    assert health.json() == {"status": "ok"} and ready.status_code == 200
    assert {
        "/generate",
        "/jobs/{job_id}",
        "/jobs/{job_id}/events",
        "/v1/images/generations",
    } <= set(openapi["paths"])


SERIES = [  # (name, labels beside model): every series carries the model
    ("skipdit_request_duration_seconds_count", {"status": "done"}),
    ("skipdit_queue_wait_seconds_count", {}),
    ("skipdit_step_duration_seconds_count", {"mode": "full"}),
    ("skipdit_step_duration_seconds_count", {"mode": "cached"}),
    ("skipdit_batch_size_count", {}),
    ("skipdit_steps_total", {"mode": "full"}),
    ("skipdit_steps_total", {"mode": "cached"}),
    ("skipdit_speedup_ratio_count", {}),
    ("skipdit_requests_total", {"status": "done"}),
    ("skipdit_inflight_requests", {}),
    ("skipdit_queue_depth", {}),
]


async def test_concurrent_mixed_requests_batch_and_match_solo_runs(
    make_settings, tiny_model_dir
) -> None:
    bodies = [
        {"class_label": i % 10, "steps": 10, "seed": 100 + i, "cache_interval": 1 + i % 4}
        for i in range(16)
    ]
    async with running_app(make_settings()) as client:
        responses = await asyncio.gather(*(client.post("/generate", json=b) for b in bodies))
        metrics = (await client.get("/metrics")).text
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    model, card = load_pretrained(tiny_model_dir)
    pipeline = Pipeline(model, default_guidance=card["default_guidance"])
    for body, response in zip(bodies, responses, strict=True):
        (solo,) = generate(pipeline, [GenerateParams(**body)])
        got = pixels(base64.b64decode(response.json()["images"][0]))
        assert np.abs(got - solo.images[0, ..., 0].numpy().astype(np.int16)).max() <= 1
    values = parse_metrics(metrics)
    name = str(tiny_model_dir)
    batch_count = sample(values, "skipdit_batch_size_count", model=name)
    batch_sum = sample(values, "skipdit_batch_size_sum", model=name)
    assert batch_sum / batch_count > 1  # steps ran more than one request at a time
    for series, labels in SERIES:
        got = sample(values, series, model=name, **labels)
        assert got is not None, f"{series}{labels} missing from /metrics"
        if series not in ("skipdit_inflight_requests", "skipdit_queue_depth"):
            assert got > 0, series


def test_engine_output_independent_of_batch_at_latent_level(tiny_model_dir) -> None:
    # The image-level check above is within 1/255; latents of the same runs agree at fp32.
    model, card = load_pretrained(tiny_model_dir)
    pipeline = Pipeline(model, default_guidance=card["default_guidance"])
    params = [GenerateParams(steps=10, seed=100 + i, cache_interval=1 + i % 4) for i in range(16)]
    together = generate(pipeline, params)
    for p, r in zip(params, together, strict=True):
        torch.testing.assert_close(r.latents, generate(pipeline, [p])[0].latents, **BATCH_TOL)
