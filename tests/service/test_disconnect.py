"""A synchronous request (POST /generate, POST /v1/images/generations) whose client disconnects
cancels its job (``client_disconnected``) within two steps, over a real uvicorn socket, on the
memory and the Redis backend, and a job running beside it ends as it would have; one whose job
still waits in the queue cancels it at once; an SSE client leaving cancels nothing; with
SKIPDIT_CANCEL_ON_DISCONNECT=false a disconnected request's job runs to its end.

Steps are measured by the job's own step counter: the test leaves when its job's event stream
(on another connection) shows a step, and the job must end at most two steps later. The model is
a small random Skip-DiT wide enough that a step of eight images takes longer than the cancel
takes to travel (the disconnect, the flag, the worker's poll every ``poll_interval_s``)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from model.networks.checkpoint import save_pretrained
from service.settings import Settings
from tests.helpers import tiny
from tests.service.helpers import (
    TERMINAL,
    assert_solo,
    parse_metrics,
    pipeline_of,
    serving,
    settings_for,
)

pytestmark = pytest.mark.parametrize("backend", ["memory", "redis"])

VICTIM = {"class_label": 3, "num_images": 8, "steps": 200, "seed": 1}  # left mid-generation
OTHER = {"class_label": 5, "num_images": 1, "steps": 40, "seed": 2}  # runs beside it


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Skip-DiT of the shipped digits' width (hidden 192, 16x16, 64 tokens), random weights:
    a step of eight guided images is tens of milliseconds on one CPU thread."""
    model = tiny(seed=3, depth=6, hidden_size=192, num_heads=6, input_size=16)
    card = {"name": "wide-tiny", "default_guidance": 2.0}
    return save_pretrained(model, tmp_path_factory.mktemp("models") / "wide-tiny", card=card)


def settings(backend: str, model_dir: Path, redis_url: str | None, **kw: object) -> Settings:
    """Every step event published (progress_interval_s=0); cancel flags read between steps
    (poll_interval_s below a step's time); a stopping worker hands its jobs back at once."""
    return settings_for(
        backend, model_dir, redis_url, progress_interval_s=0, poll_interval_s=0.02,
        drain_timeout_s=0, **kw,
    )  # fmt: skip


async def post(port: int, path: str, body: dict[str, Any], key: str) -> asyncio.StreamWriter:
    """A synchronous POST over its own socket, left waiting for the answer (the writer closes
    it)."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps(body).encode()
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Idempotency-Key: {key}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    await writer.drain()
    return writer


async def leave(writer: asyncio.StreamWriter) -> None:
    """The client gives up: it closes its connection."""
    writer.close()
    await writer.wait_closed()


async def held(client: httpx.AsyncClient) -> float:
    """Jobs the worker holds (/metrics), over all models."""
    values = parse_metrics((await client.get("/metrics")).text)
    return sum(v for (name, _), v in values.items() if name == "skipdit_inflight_requests")


async def until_held(client: httpx.AsyncClient, n: int) -> None:
    async with asyncio.timeout(60):
        while await held(client) < n:
            await asyncio.sleep(0.02)


async def waiting(client: httpx.AsyncClient) -> float:
    """Jobs waiting for a worker (/metrics sets the queue depth when scraped), over all models."""
    values = parse_metrics((await client.get("/metrics")).text)
    return sum(v for (name, _), v in values.items() if name == "skipdit_queue_depth")


async def job_of(client: httpx.AsyncClient, body: dict[str, Any], key: str) -> dict[str, Any]:
    """The record of the job a synchronous request with Idempotency-Key ``key`` made (its
    worker holds it already): an async request with the same key answers with it."""
    response = await client.post("/generate", json=body | {"async": True},
                                 headers={"Idempotency-Key": key})  # fmt: skip
    record = response.json()
    assert response.status_code == 202 and record["request"]["async"] is False, record
    return record


async def events(client: httpx.AsyncClient, job_id: str) -> AsyncIterator[dict[str, Any]]:
    """The job's events as its SSE stream sends them, on the client's connection."""
    async with client.stream("GET", f"/jobs/{job_id}/events") as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                yield json.loads(line.removeprefix("data: "))


async def leave_at(
    client: httpx.AsyncClient, job_id: str, writer: asyncio.StreamWriter, step: int
) -> tuple[int, dict[str, Any]]:
    """Close ``writer`` once the job's stream shows ``step`` or later (past the steps it had
    published before: the stream replays those first); (the step last seen before closing,
    the job's terminal event)."""
    seen = None
    async with asyncio.timeout(120):
        async for event in events(client, job_id):
            if seen is None and event["type"] == "step" and event["step"] >= step:
                seen = event["step"]
                await leave(writer)
            if event["type"] in TERMINAL:
                assert seen is not None, f"the job ended before step {step}: {event}"
                return seen, event
    raise AssertionError("the event stream ended without a terminal event")


async def cancelled_jobs(client: httpx.AsyncClient, model: str, reason: str) -> float | None:
    values = parse_metrics((await client.get("/metrics")).text)
    labels = frozenset({"model": model, "reason": reason}.items())
    return values.get(("skipdit_cancelled_jobs_total", labels))


async def test_a_client_that_disconnects_cancels_its_job_and_only_its_job(
    backend: str, redis_url: str | None, model_dir: Path
) -> None:
    key = uuid.uuid4().hex
    async with (
        serving(settings(backend, model_dir, redis_url)) as port,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as client,
    ):
        victim = await post(port, "/generate", VICTIM, key)
        await until_held(client, 1)
        job = await job_of(client, VICTIM, key)
        other = asyncio.create_task(client.post("/generate", json=OTHER))  # waits, stays
        await until_held(client, 2)  # the other job joins the batch at the next step
        now = (await client.get(f"/jobs/{job['id']}")).json()["step"]
        seen, last = await leave_at(client, job["id"], victim, now + 2)
        record = (await client.get(f"/jobs/{job['id']}")).json()
        answer = await other
        counted = await cancelled_jobs(client, record["request"]["model"], "client_disconnected")
    assert last["type"] == "cancelled"
    assert seen < last["step"] <= seen + 2 < VICTIM["steps"]  # within two steps of leaving
    assert record["status"] == "cancelled" and record["step"] == last["step"]
    assert record["error"]["code"] == "client_disconnected"
    assert counted == 1
    assert answer.status_code == 200, answer.text
    done = answer.json()
    assert done["status"] == "done" and done["step"] == OTHER["steps"]
    assert done["started_at"] < record["finished_at"] < done["finished_at"]  # ran beside it
    assert_solo(pipeline_of(str(model_dir)), OTHER, done["images"][0])  # as if run alone


async def test_an_sse_client_that_leaves_cancels_nothing(
    backend: str, redis_url: str | None, model_dir: Path
) -> None:
    body = VICTIM | {"steps": 20, "async": True}
    async with (
        serving(settings(backend, model_dir, redis_url)) as port,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as client,
    ):
        job_id = (await client.post("/generate", json=body)).json()["id"]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /jobs/{job_id}/events HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        await writer.drain()
        async with asyncio.timeout(60):
            for _ in range(2):  # two step events: the job runs
                await reader.readuntil(b"event: step\n")
        await leave(writer)
        async with asyncio.timeout(120):
            last = [event async for event in events(client, job_id)][-1]
        record = (await client.get(f"/jobs/{job_id}")).json()
    assert last["type"] == "done" and last["step"] == 20
    assert record["status"] == "done" and record["error"] is None


async def test_with_the_setting_off_a_disconnected_job_runs_to_its_end(
    backend: str, redis_url: str | None, model_dir: Path
) -> None:
    body = VICTIM | {"steps": 20}
    key = uuid.uuid4().hex
    async with (
        serving(settings(backend, model_dir, redis_url, cancel_on_disconnect=False)) as port,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as client,
    ):
        victim = await post(port, "/generate", body, key)
        await until_held(client, 1)
        job = await job_of(client, body, key)
        seen, last = await leave_at(client, job["id"], victim, job["step"] + 2)
        record = (await client.get(f"/jobs/{job['id']}")).json()
    assert seen < 20
    assert last["type"] == "done" and last["step"] == 20
    assert record["status"] == "done" and record["error"] is None


async def test_a_client_that_disconnects_while_its_job_waits_cancels_it_at_once(
    backend: str, redis_url: str | None, model_dir: Path
) -> None:
    key = uuid.uuid4().hex
    async with (
        serving(settings(backend, model_dir, redis_url, max_inflight=1)) as port,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as client,
    ):
        blocker = (await client.post("/generate", json=VICTIM | {"async": True})).json()["id"]
        await until_held(client, 1)  # the worker holds all it may: the next job waits
        victim = await post(port, "/generate", OTHER, key)
        async with asyncio.timeout(60):
            while not await waiting(client):
                await asyncio.sleep(0.02)
        job = await job_of(client, OTHER, key)
        await leave(victim)
        async with asyncio.timeout(60):
            kinds = [event["type"] async for event in events(client, job["id"])]
        record = (await client.get(f"/jobs/{job['id']}")).json()
        counted = await cancelled_jobs(client, record["request"]["model"], "client_disconnected")
        running = (await client.get(f"/jobs/{blocker}")).json()
        await client.delete(f"/jobs/{blocker}")
    assert job["status"] == "queued"
    assert kinds == ["queued", "cancelled"]  # it never started
    assert record["status"] == "cancelled" and record["started_at"] is None
    assert record["error"]["code"] == "client_disconnected"
    assert counted == 1  # the API ended it, and counted it
    assert running["status"] == "running"  # the job that held the worker goes on


async def test_an_openai_images_client_that_disconnects_cancels_its_job(
    backend: str, redis_url: str | None, model_dir: Path
) -> None:
    key = uuid.uuid4().hex
    async with (
        serving(settings(backend, model_dir, redis_url)) as port,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as client,
    ):
        victim = await post(port, "/v1/images/generations", {"prompt": "3", "n": 8}, key)
        await until_held(client, 1)
        job = await job_of(client, VICTIM, key)  # the same key finds the job the route made
        seen, last = await leave_at(client, job["id"], victim, job["step"] + 2)
        record = (await client.get(f"/jobs/{job['id']}")).json()
    assert last["type"] == "cancelled" and seen < last["step"] <= seen + 2
    assert record["status"] == "cancelled" and record["error"]["code"] == "client_disconnected"
    assert record["request"]["num_images"] == 8 and last["step"] < record["total_steps"]
