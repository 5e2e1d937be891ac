"""Webhooks against a real local receiver (a Starlette app on uvicorn): a delivery whose
Standard Webhooks signature verifies, retries after a 500 and after a timeout under the same
``webhook-id``, ids that tell events and jobs apart, a delivery that outlives the worker killed
in the middle of it, the dead letter after the retry budget, and 422s for bad webhooks."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import signal
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.queue.keys import Keys
from service.settings import Settings
from service.webhooks import Hook, headers, secret_key
from tests.service.helpers import (
    RedisServer,
    Workers,
    api_settings,
    free_port,
    parse_metrics,
    redis_client,
    running_app,
    sample,
    settings_for,
    wait_for,
)

SECRET = "webhook-secret-0123456789abcdef-0123"
FAST = {  # small budgets: retries within a fraction of a second
    "webhook_secret": SECRET,
    # Long enough that the receiver (in this process, beside the app and its model thread)
    # always answers in time, even on a loaded CI machine: an answer past it is retried (at
    # least once), which would add a call the counting tests do not expect. The timeout test
    # sets 1 s.
    "webhook_timeout_s": 10.0,
    "webhook_backoff_s": 0.05,
    "webhook_backoff_max_s": 0.2,
    "webhook_poll_s": 0.05,
}


@dataclass
class Call:
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A real HTTP receiver on a free loopback port. It answers the n-th POST by ``plan[n]``:
    "ok" (200), "500", or "hold" (keeps the request open until the test ends); past the plan,
    ``then``. Every POST is recorded as it arrives."""

    def __init__(self, plan: Sequence[str] = (), then: str = "ok"):
        self.plan, self.then = list(plan), then
        self.calls: list[Call] = []
        self.released = asyncio.Event()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"

    async def _hook(self, request: Request) -> Response:
        n = len(self.calls)
        self.calls.append(Call(dict(request.headers), await request.body()))
        answer = self.plan[n] if n < len(self.plan) else self.then
        if answer == "hold":
            await self.released.wait()
        return Response(status_code=500 if answer == "500" else 200)

    async def until(self, n: int, timeout: float = 60) -> list[Call]:
        """The calls once ``n`` have arrived (bounded)."""
        async with asyncio.timeout(timeout):
            while len(self.calls) < n:
                await asyncio.sleep(0.02)
        return self.calls

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[Receiver]:
        app = Starlette(routes=[Route("/hook", self._hook, methods=["POST"])])
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        while not server.started:
            assert not task.done(), "the receiver did not start"
            await asyncio.sleep(0.02)
        try:
            yield self
        finally:
            self.released.set()
            server.should_exit = True
            await task


def verifies(secret: str, call: Call) -> bool:
    """The Standard Webhooks check, written out: HMAC-SHA256 of "id.timestamp.body" under the
    secret, base64, against each ``v1,`` signature of the header."""
    h = call.headers
    signed = f"{h['webhook-id']}.{h['webhook-timestamp']}.".encode() + call.body
    expected = base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest())
    given = [s.split(",", 1)[1] for s in h["webhook-signature"].split() if s.startswith("v1,")]
    return any(hmac.compare_digest(expected.decode(), s) for s in given)


@pytest.fixture
def make_settings(backend: str, tiny_model_dir: Path, redis_url: str | None):
    def make(**kw: object) -> Settings:
        return settings_for(backend, tiny_model_dir, redis_url, **(FAST | kw))

    return make


async def test_a_delivery_is_signed_and_verifies_with_the_secret(make_settings) -> None:
    async with Receiver().serving() as rx, running_app(make_settings()) as client:
        answer = await client.post("/generate", json={"steps": 2, "webhook": {"url": rx.url}})
        assert answer.status_code == 200, answer.text
        (call,) = await rx.until(1)
    job_id = answer.json()["id"]
    assert call.headers["webhook-id"] == f"{job_id}:job.done"
    assert call.headers["content-type"] == "application/json"
    assert verifies(SECRET, call)
    assert not verifies(SECRET.replace("0", "1"), call)  # another secret does not verify
    assert not verifies(SECRET, Call(call.headers, call.body.replace(b"done", b"dona")))
    body = json.loads(call.body)
    assert body["type"] == "job.done" and body["timestamp"].endswith("Z")
    data = body["data"]
    assert data["id"] == job_id and data["status"] == "done" and data["error"] is None
    assert data["result"]["steps_full"] + data["result"]["steps_cached"] == 2
    assert "images" not in data["result"]


async def test_a_500_is_retried_under_the_same_id(make_settings) -> None:
    async with Receiver(["500", "ok"]).serving() as rx, running_app(make_settings()) as client:
        answer = await client.post("/generate", json={"steps": 2, "webhook": {"url": rx.url}})
        first, second = await rx.until(2)
        metrics = parse_metrics((await client.get("/metrics")).text)
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.headers["webhook-id"] == f"{answer.json()['id']}:job.done"
    assert first.body == second.body and verifies(SECRET, second)
    model = answer.json()["request"]["model"]
    name = "skipdit_webhook_deliveries_total"
    if make_settings().redis_url is None:  # on Redis the worker in the API process may deliver
        assert sample(metrics, name, model=model, outcome="retried") == 1
        assert sample(metrics, name, model=model, outcome="delivered") == 1


async def test_an_attempt_past_the_timeout_is_retried_under_the_same_id(make_settings) -> None:
    settings = make_settings(webhook_timeout_s=1.0)
    async with Receiver(["hold", "ok"]).serving() as rx, running_app(settings) as client:
        answer = await client.post("/generate", json={"steps": 2, "webhook": {"url": rx.url}})
        first, second = await rx.until(2)
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert second.headers["webhook-id"] == f"{answer.json()['id']}:job.done"
    assert first.body == second.body and verifies(SECRET, second)


async def test_ids_tell_events_and_jobs_apart_and_redeliveries_repeat_theirs(
    make_settings,
) -> None:
    hook = {"events": ["started", "done"]}
    async with Receiver(["500"]).serving() as rx, running_app(make_settings()) as client:
        jobs = []
        for seed in (1, 2):
            body = {"steps": 2, "seed": seed, "async": True, "webhook": hook | {"url": rx.url}}
            jobs.append((await client.post("/generate", json=body)).json()["id"])
        calls = await rx.until(5)  # 2 jobs x (started, done), one of them twice
        await asyncio.sleep(0.5)  # nothing more arrives: no event is delivered twice after a 2xx
        assert len(rx.calls) == 5
    ids = [call.headers["webhook-id"] for call in calls]
    assert set(ids) == {f"{j}:job.{kind}" for j in jobs for kind in ("started", "done")}
    (again,) = [i for i in set(ids) if ids.count(i) == 2]  # the one answered 500 first
    twice = [call.body for call in calls if call.headers["webhook-id"] == again]
    assert twice[0] == twice[1]
    types = {json.loads(call.body)["type"]: json.loads(call.body)["data"] for call in calls}
    assert types["job.started"]["status"] == "running" and types["job.done"]["status"] == "done"


async def test_a_dead_letter_after_the_retry_budget(make_settings) -> None:
    settings = make_settings(webhook_max_attempts=3)
    async with Receiver(then="500").serving() as rx, running_app(settings) as client:
        answer = await client.post("/generate", json={"steps": 2, "webhook": {"url": rx.url}})
        model = answer.json()["request"]["model"]
        async with asyncio.timeout(60):
            while True:
                metrics = parse_metrics((await client.get("/metrics")).text)
                if sample(metrics, "skipdit_webhook_dead_letters", model=model):
                    break
                await asyncio.sleep(0.05)
        svc = client._transport.app.state.service  # type: ignore[attr-defined]
        dead = await svc.backend.webhook_dead_letters(model)
        await asyncio.sleep(0.3)  # no attempt after the dead letter
    assert len(rx.calls) == 3
    assert {call.headers["webhook-id"] for call in rx.calls} == {f"{answer.json()['id']}:job.done"}
    assert sample(metrics, "skipdit_webhook_dead_letters", model=model) == 1
    (entry,) = dead
    assert entry["id"] == f"{answer.json()['id']}:job.done" and int(entry["attempts"]) == 3
    assert entry["error"] == "HTTP 500" and entry["url"] == rx.url
    assert json.loads(entry["body"])["type"] == "job.done"
    if settings.redis_url is None:  # on Redis the worker in the API process may deliver
        name = "skipdit_webhook_deliveries_total"
        assert sample(metrics, name, model=model, outcome="dead_letter") == 1
        assert sample(metrics, name, model=model, outcome="retried") == 2


@pytest.fixture
def workers(redis_server: RedisServer, tiny_model_dir: Path) -> Iterator[Workers]:
    w = Workers(redis_server.url, tiny_model_dir, f"h{uuid.uuid4().hex[:8]}")
    yield w
    w.stop_all()


@pytest.mark.slow
async def test_a_delivery_outlives_the_worker_killed_in_the_middle_of_it(workers: Workers) -> None:
    """Worker a ends the job and starts delivering; the receiver holds the request open while
    a is SIGKILLed; worker b, started then, delivers it once a's lease has passed."""
    env = {"SKIPDIT_WEBHOOK_SECRET": SECRET, "SKIPDIT_WEBHOOK_TIMEOUT_S": "2",
           "SKIPDIT_WEBHOOK_POLL_S": "0.05", "SKIPDIT_WEBHOOK_BACKOFF_S": "0.05"}  # fmt: skip
    settings = api_settings(workers, webhook_secret=SECRET, webhook_deliver=False)
    async with Receiver(["hold"]).serving() as rx, running_app(settings) as client:
        workers.start("a", **env)
        body = {"steps": 2, "async": True, "webhook": {"url": rx.url}}
        job_id = (await client.post("/generate", json=body)).json()["id"]
        await rx.until(1)  # a's attempt, held open
        workers.procs["a"].send_signal(signal.SIGKILL)
        await asyncio.to_thread(workers.procs["a"].wait, 10)
        workers.start("b", **env)
        first, second = await rx.until(2, timeout=120)
        record = await wait_for(client, job_id, lambda r: r["status"] == "done")
        keys, r = Keys(workers.prefix), redis_client(settings)
        async with asyncio.timeout(30):  # b's 200 ends the hook: the outbox empties
            while r.zcard(keys.hooks_due):
                await asyncio.sleep(0.05)
    assert record["worker"] == "a"
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == f"{job_id}:job.done"
    assert first.body == second.body and verifies(SECRET, second)
    assert r.hlen(keys.hooks) == 0 and r.xlen(keys.hook_dead(str(workers.model_dir))) == 0


async def test_bad_webhooks_are_422s_naming_the_field(tiny_model_dir: Path) -> None:
    settings = settings_for("memory", tiny_model_dir, None, **FAST, webhook_hosts="Hooks.Local")
    cases = {
        "ftp://hooks.local/x": "webhook.url",
        "http://user:pw@hooks.local/x": "webhook.url",
        "hooks.local/x": "webhook.url",
        "http://hooks.local:99999/x": "webhook.url",
        "http://elsewhere.example/x": "webhook.url",  # not an allowed host
    }
    async with running_app(settings) as client:
        answers = {
            url: await client.post("/generate", json={"steps": 2, "webhook": {"url": url}})
            for url in cases
        }
        events = [
            await client.post(
                "/generate",
                json={"steps": 2, "webhook": {"url": "http://hooks.local/x", "events": kinds}},
            )
            for kinds in ([], ["queued"], ["done", "step"])
        ]
        allowed = await client.post(
            "/generate", json={"steps": 2, "async": True, "webhook": {"url": "http://hooks.local"}}
        )
    for url, field in cases.items():
        assert answers[url].status_code == 422, (url, answers[url].text)
        assert answers[url].json()["error"]["field"] == field, url
    for answer in events:
        assert answer.status_code == 422
        assert answer.json()["error"]["field"].startswith("webhook.events")
    assert allowed.status_code == 202, allowed.text
    off = settings_for("memory", tiny_model_dir, None)  # no secret: webhooks are off
    async with running_app(off) as client:
        refused = await client.post(
            "/generate", json={"steps": 2, "webhook": {"url": "http://hooks.local/x"}}
        )
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "webhook"
    with pytest.raises(ValidationError, match="SKIPDIT_WEBHOOK_SECRET"):
        settings_for("memory", tiny_model_dir, None, webhook_secret="short")


def test_the_header_signature_matches_the_written_out_check() -> None:
    hook = Hook("job:job.done", "http://x", "m", '{"a": 1}', 0.0)
    call = Call(headers(secret_key(SECRET), hook, 1_700_000_000), hook.body.encode())
    assert verifies(SECRET, call)
    raw = b"0123456789abcdef0123456789abcdef"
    whsec = "whsec_" + base64.b64encode(raw).decode()  # Standard Webhooks' form: a base64 key
    signed = headers(secret_key(whsec), hook, 1_700_000_000)["webhook-signature"]
    assert signed == headers(raw, hook, 1_700_000_000)["webhook-signature"]
