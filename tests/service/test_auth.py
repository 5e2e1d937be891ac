"""API keys over real HTTP (httpx against the app, the OpenAI client, a real redis-server):
401 without a known key, 403 on another key's job, 429 per key, open probes, no key in logs."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import openai
import pytest

from service.api.auth import KeyRing
from service.errors import RateLimited
from service.settings import Settings
from tests.service.helpers import running_app, settings_for

KEY_A = "key-a-0123456789abcdef"
KEY_B = "key-b-fedcba9876543210"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
SLOW = {"class_label": 3, "steps": 400, "async": True}  # long enough to still be running


@pytest.fixture
def make_settings(backend: str, tiny_model_dir: Path, redis_url: str | None):
    def make(**kw: object) -> Settings:
        kw.setdefault("api_keys", f"{KEY_A},{KEY_B}")
        return settings_for(backend, tiny_model_dir, redis_url, **kw)

    return make


# Probes, discovery, scrapes; result URLs, whose signed token is the credential (test_result_urls).
OPEN = ("/healthz", "/readyz", "/models", "/metrics", "/files/{token}")
BODIES = {
    "/generate": {"class_label": 1, "steps": 2},
    "/v1/images/generations": {"prompt": "3"},
    "/v1/videos": {"prompt": "3"},
}


async def test_every_generation_and_job_route_needs_a_known_key(make_settings) -> None:
    async with running_app(make_settings()) as client:
        job = (await client.post("/generate", json={"steps": 2, "async": True}, headers=A)).json()
        # Every route the app declares (its OpenAPI paths): a new route is covered too.
        declared = client._transport.app.openapi()["paths"]
        routes = [
            (method.upper(), path.format(job_id=job["id"], video_id=job["id"]), BODIES.get(path))
            for path, operations in declared.items()
            if path not in OPEN
            for method in operations
        ]
        paths = {(method, path) for method, path, _ in routes}
        assert {("GET", f"/v1/videos/{job['id']}/content"),
                ("DELETE", f"/v1/videos/{job['id']}")} <= paths  # fmt: skip
        assert len(routes) >= 10 and set(BODIES) <= {p for _, p, _ in routes}
        assert set(OPEN) <= set(declared)
        for headers in (
            {},
            {"Authorization": "Bearer not-a-key-0123456789"},
            {"Authorization": KEY_A},
        ):
            for method, path, body in routes:
                r = await client.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (method, path, headers)
                assert r.json()["error"]["code"] == "unauthorized"
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
        for path in ("/healthz", "/readyz", "/models", "/metrics"):
            assert (await client.get(path)).status_code == 200, path
        done = await client.post("/generate", json={"class_label": 1, "steps": 2}, headers=A)
        assert done.status_code == 200 and "owner" not in done.json()


async def test_a_job_is_visible_only_to_the_key_that_submitted_it(make_settings) -> None:
    async with running_app(make_settings()) as client:
        mine = await client.post("/generate", json={"class_label": 4, "steps": 3, "async": True},
                                 headers=A)  # fmt: skip
        assert mine.status_code == 202
        job = mine.json()["id"]
        paths = [f"/jobs/{job}", f"/jobs/{job}/result", f"/jobs/{job}/events"]
        for method, path in [*(("GET", p) for p in paths), ("DELETE", f"/jobs/{job}")]:
            r = await client.request(method, path, headers=B)
            assert r.status_code == 403, path
            assert r.json()["error"] == {
                "code": "forbidden", "message": f"job {job} belongs to another API key",
                "field": "job_id",
            }  # fmt: skip
        events = await client.get(f"/jobs/{job}/events", headers=A)  # runs until the job ends
        assert events.status_code == 200 and "event: done" in events.text
        assert (await client.get(f"/jobs/{job}/result", headers=A)).status_code == 200
        # The same Idempotency-Key from two keys names two jobs, each its own key's.
        same = {"Idempotency-Key": "order-17"}
        body = {"class_label": 1, "steps": 2, "async": True}
        a1 = (await client.post("/generate", json=body, headers=A | same)).json()["id"]
        a2 = (await client.post("/generate", json=body, headers=A | same)).json()["id"]
        b1 = (await client.post("/generate", json=body, headers=B | same)).json()["id"]
        assert a1 == a2 != b1
        assert (await client.get(f"/jobs/{b1}", headers=B)).status_code == 200


async def test_each_key_has_its_own_rate_and_queued_caps(make_settings) -> None:
    settings = make_settings(key_burst=2, key_rate_per_s=0.05, key_max_queued=10)
    async with running_app(settings) as client:
        body = {"class_label": 2, "steps": 2, "async": True}
        for _ in range(2):
            assert (await client.post("/generate", json=body, headers=A)).status_code == 202
        over = await client.post("/generate", json=body, headers=A)
        assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limited"
        assert int(over.headers["Retry-After"]) >= 1
        assert (await client.post("/generate", json=body, headers=B)).status_code == 202
        bad = await client.post("/generate", json={"steps": 0}, headers=B)
        assert bad.status_code == 422  # checked before it costs a token: B has one left
        assert (await client.post("/generate", json=body, headers=B)).status_code == 202

    async with running_app(make_settings(key_max_queued=1)) as client:
        first = (await client.post("/generate", json=SLOW, headers=A)).json()["id"]
        full = await client.post("/generate", json=SLOW, headers=A)
        assert full.status_code == 429 and "SKIPDIT_KEY_MAX_QUEUED" in full.text
        assert int(full.headers["Retry-After"]) >= 1
        other = (await client.post("/generate", json=SLOW, headers=B)).json()["id"]  # B's own cap
        for job, headers in ((first, A), (other, B)):
            await client.delete(f"/jobs/{job}", headers=headers)
            await client.get(f"/jobs/{job}/events", headers=headers)  # until it has ended
        again = await client.post("/generate", json=SLOW, headers=A)
        assert again.status_code == 202  # the cancelled job no longer counts
        await client.delete(f"/jobs/{again.json()['id']}", headers=A)


async def test_the_openai_clients_api_key_is_the_bearer_key(make_settings) -> None:
    async with running_app(make_settings()) as client:
        transport = client._transport  # the app's ASGI transport
        http = httpx.AsyncClient(transport=transport, base_url="http://test")
        good = openai.AsyncOpenAI(api_key=KEY_B, base_url="http://test/v1", http_client=http)
        images = await good.images.generate(prompt="7", n=2)
        assert len(images.data) == 2 and images.data[0].b64_json
        bad = openai.AsyncOpenAI(
            api_key="sk-wrong-0123456789abc", base_url="http://test/v1", http_client=http,
            max_retries=0,
        )  # fmt: skip
        with pytest.raises(openai.AuthenticationError):
            await bad.images.generate(prompt="7")


async def test_metrics_can_need_a_key_and_keys_never_reach_the_logs(
    make_settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running_app(make_settings(metrics_need_key=True)) as client:
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers=A)).status_code == 200
        await client.post("/generate", json={"class_label": 5, "steps": 2}, headers=A)
        await client.get("/jobs/nope", headers={"Authorization": "Bearer " + KEY_B[::-1]})
    assert "API keys required (2 configured)" in caplog.text
    for secret in (KEY_A, KEY_B, KEY_B[::-1]):
        assert secret not in caplog.text
    assert KEY_A not in repr(make_settings())


def test_keys_come_from_a_file_and_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text(f"# one key a line\n{KEY_A}\n\n  {KEY_B}  \n")
    settings = Settings(api_keys_file=path)
    assert [k.get_secret_value() for k in settings.api_keys] == [KEY_A, KEY_B]
    with pytest.raises(ValueError, match="key #1 is shorter than 16 characters"):
        Settings(api_keys="short")
    with pytest.raises(ValueError, match="SKIPDIT_API_KEYS_FILE: cannot read"):
        Settings(api_keys_file=tmp_path / "missing.txt")


def test_the_bucket_refills_at_the_rate() -> None:
    now = [0.0]
    ring = KeyRing(Settings(api_keys=KEY_A).api_keys, rate_per_s=2.0, burst=3, clock=lambda: now[0])
    caller = ring.identify(f"Bearer {KEY_A}")
    for _ in range(3):
        ring.take(caller)
    with pytest.raises(RateLimited, match="over 2 submissions a second") as raised:
        ring.take(caller)
    assert raised.value.retry_after == pytest.approx(0.5)
    now[0] = 0.5  # one token back
    ring.take(caller)
    with pytest.raises(RateLimited, match="retry after"):
        ring.take(caller)
