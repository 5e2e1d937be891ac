"""Results as URLs (``response_format: "url"``) on every queue backend: a URL fetches the exact
bytes its job produced, with no API key, until the result expires (410 after); a token altered
anywhere is a 404 that says nothing of why; a bad ``response_format`` is a 422 naming it."""

from __future__ import annotations

import base64
import math
import time
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from service.queue.keys import Keys
from service.settings import Settings
from service.urls import FileRef, UrlSigner
from tests.service.helpers import (
    Clock,
    redis_client,
    running_app,
    serving,
    settings_for,
    wait_for,
)

SECRET = "url-secret-0123456789abcdef-0123456789"
KEY = "key-a-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@pytest.fixture
def make_settings(backend: str, tiny_model_dir: Path, redis_url: str | None):
    def make(**kw: object) -> Settings:
        kw.setdefault("url_secret", SECRET)
        return settings_for(backend, tiny_model_dir, redis_url, **kw)

    return make


def token_of(url: str) -> str:
    return url.rsplit("/files/", 1)[1]


def flipped(text: str, at: int) -> str:
    """``text`` with the character at ``at`` replaced by another of base64url's."""
    other = ALPHABET[(ALPHABET.index(text[at]) + 1) % len(ALPHABET)]
    return text[:at] + other + text[at + 1 :]


async def test_a_url_fetches_the_exact_bytes_the_job_produced(make_settings) -> None:
    body = {"class_label": 3, "steps": 4, "seed": 5, "num_images": 2, "output_format": "jpeg"}
    async with running_app(make_settings()) as client:
        sync = await client.post("/generate", json=body | {"response_format": "url"})
        assert sync.status_code == 200, sync.text
        done = sync.json()
        files = [await client.get(url) for url in done["urls"]]
        stored = [await client.get(f"/jobs/{done['id']}/result?index={i}") for i in range(2)]
        queued = await client.post(
            "/generate", json=body | {"response_format": "url", "async": True}
        )
        job = queued.json()["id"]
        finished = await wait_for(client, job, lambda r: r["status"] == "done")
        later = [await client.get(url) for url in finished["urls"]]
        openai_url = await client.post(
            "/v1/images/generations", json={"prompt": "7", "response_format": "url"}
        )
        openai_b64 = await client.post("/v1/images/generations", json={"prompt": "7"})
        image = await client.get(openai_url.json()["data"][0]["url"])
        paths = client._transport.app.openapi()["paths"]  # type: ignore[attr-defined]
    assert "images" not in done and done["content_type"] == "image/jpeg"
    assert len(done["urls"]) == 2 and len(set(done["urls"])) == 2
    assert all(url.startswith("http://test/files/") for url in done["urls"])
    assert not any(done["id"] in url for url in done["urls"])  # the URL does not name the job
    assert done["urls_expire_at"] == math.floor(done["finished_at"] + 3600)
    for file, result in zip(files, stored, strict=True):
        assert file.status_code == 200 and file.content == result.content
        assert file.headers["content-type"] == "image/jpeg"
        assert file.headers["content-disposition"].endswith('.jpg"')
        cache = file.headers["cache-control"]
        assert cache.startswith("private, max-age=") and 0 < int(cache.split("=")[1]) <= 3600
    assert files[0].content != files[1].content  # each URL names its own sample
    # Asynchronous: 202 without URLs, then GET /jobs/{id} gives them once the job is done.
    assert queued.status_code == 202 and "urls" not in queued.json()
    assert [r.content for r in later] == [r.content for r in files]  # same seed, same bytes
    assert openai_url.status_code == 200 and "b64_json" not in openai_url.json()["data"][0]
    assert image.headers["content-type"] == "image/png"
    # The same request (seed 0) as b64_json: the same bytes.
    assert image.content == base64.b64decode(openai_b64.json()["data"][0]["b64_json"])
    assert "/files/{token}" in paths


@pytest.mark.parametrize(("fmt", "kind"), [("mp4", "video/mp4"), ("gif", "image/gif")])
async def test_a_video_url_serves_the_clip_with_its_type(
    backend: str, tiny_video_model_dir: Path, redis_url: str | None, fmt: str, kind: str
) -> None:
    settings = settings_for(backend, tiny_video_model_dir, redis_url, url_secret=SECRET)
    body = {"class_label": 1, "steps": 2, "output_format": fmt, "response_format": "url"}
    async with running_app(settings) as client:
        done = (await client.post("/generate", json=body)).json()
        file = await client.get(done["urls"][0])
        stored = await client.get(f"/jobs/{done['id']}/result")
    assert done["content_type"] == kind and stored.headers["content-type"] == kind
    assert file.status_code == 200 and file.content == stored.content
    assert file.headers["content-type"] == kind
    assert file.headers["content-disposition"] == f'inline; filename="skipdit-0.{fmt}"'


async def test_a_url_expires_when_its_result_does(backend, make_settings) -> None:
    """The memory backend expires results on the clock the test moves; the URL's expiry is on
    that clock too (both backends). Redis keeps the result under a key with the TTL, whose
    expiry (the key's removal) the test does, as test_api does."""
    settings = make_settings(result_ttl_s=60)
    clock = Clock(time.time())
    body = {"class_label": 2, "steps": 2, "response_format": "url"}
    async with running_app(settings, clock) as client:
        done = (await client.post("/generate", json=body)).json()
        url = done["urls"][0]
        fresh = await client.get(url)
        if backend != "memory":  # the result goes first: its key's removal
            key = Keys(settings.redis_prefix).result(done["id"])
            r = redis_client(settings)
            assert 55_000 < r.pttl(key) <= 60_000  # the URL's 60 s, in Redis's TTL
            other = (await client.post("/generate", json=body)).json()
            r.delete(Keys(settings.redis_prefix).result(other["id"]))
            removed = await client.get(other["urls"][0])
            assert removed.status_code == 410 and removed.json()["error"]["code"] == "expired"
        clock.advance(59)
        late = await client.get(url)
        clock.advance(2)
        expired = await client.get(url)
        result = await client.get(f"/jobs/{done['id']}/result")
    assert fresh.status_code == 200 and late.status_code == 200
    assert late.content == fresh.content
    assert late.headers["cache-control"] == "private, max-age=0"  # under a second left
    assert expired.status_code == 410 and expired.json()["error"]["code"] == "expired"
    if backend == "memory":  # the result expired at the same moment
        assert result.status_code == 410


async def test_an_altered_token_is_a_404_that_says_nothing_of_why(make_settings) -> None:
    async with running_app(make_settings()) as client:
        done = (await client.post("/generate", json={"steps": 2, "response_format": "url"})).json()
        url = done["urls"][0]
        payload, signature = token_of(url).split(".")
        base = url[: -len(token_of(url))]
        foreign = UrlSigner(b"another deployment's secret, 32+ bytes")
        tokens = {
            "payload": f"{flipped(payload, len(payload) // 2)}.{signature}",
            "payload start": f"{flipped(payload, 0)}.{signature}",
            "signature": f"{payload}.{flipped(signature, len(signature) // 2)}",
            "signature end": f"{payload}.{signature[:-1]}",
            "swapped": f"{signature}.{payload}",
            "another secret": foreign.sign(FileRef(done["id"], 0, int(time.time()) + 3600)),
            "no signature": payload,
            "garbage": "not-a-token",
        }
        answers = {name: await client.get(base + token) for name, token in tokens.items()}
        genuine = await client.get(url)
    assert genuine.status_code == 200
    for name, answer in answers.items():
        assert answer.status_code == 404, name
        assert answer.json() == {"error": {"code": "not_found", "message": "no such file"}}, name


async def test_with_api_keys_a_url_needs_no_key_and_the_job_still_does(make_settings) -> None:
    """Over a real uvicorn: the URL is absolute from the request's own base URL, and a client
    that holds no key fetches it; the job's routes still need the key."""
    async with serving(make_settings(api_keys=KEY)) as port:
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=60, headers=AUTH) as owner:
            body = {"class_label": 6, "steps": 3, "response_format": "url", "async": True}
            job = (await owner.post("/generate", json=body)).json()["id"]
            done = await wait_for(owner, job, lambda r: r["status"] == "done")
            result = await owner.get(f"/jobs/{job}/result")
            openai = await owner.post(
                "/v1/images/generations", json={"prompt": "6", "response_format": "url"}
            )
        async with httpx.AsyncClient(timeout=60) as anyone:
            file = await anyone.get(done["urls"][0])
            openai_file = await anyone.get(openai.json()["data"][0]["url"])
            record = await anyone.get(f"{base}/jobs/{job}")
            stored = await anyone.get(f"{base}/jobs/{job}/result")
            refused = await anyone.post(f"{base}/generate", json=body)
    assert done["urls"][0].startswith(f"{base}/files/")
    assert file.status_code == 200 and file.content == result.content
    assert openai_file.status_code == 200 and openai_file.headers["content-type"] == "image/png"
    assert record.status_code == 401 and stored.status_code == 401 and refused.status_code == 401


async def test_public_url_is_the_base_of_every_url(make_settings) -> None:
    settings = make_settings(public_url="https://images.example.com/skipdit/")
    async with running_app(settings) as client:
        done = (await client.post("/generate", json={"steps": 2, "response_format": "url"})).json()
        path = done["urls"][0].removeprefix("https://images.example.com/skipdit")
        file = await client.get(path)  # what the proxy forwards
    assert done["urls"][0].startswith("https://images.example.com/skipdit/files/")
    assert file.status_code == 200 and file.headers["content-type"] == "image/png"


@pytest.mark.parametrize("path", ["/generate", "/v1/images/generations"])
async def test_a_bad_response_format_is_422_naming_the_field(make_settings, path: str) -> None:
    body = {"steps": 2} if path == "/generate" else {"prompt": "1"}
    async with running_app(make_settings()) as client:
        response = await client.post(path, json=body | {"response_format": "png"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == "response_format"
    assert "'b64_json'" in error["message"] and "'url'" in error["message"]


async def test_without_a_secret_urls_are_per_process_alone_and_off_with_redis(
    backend, make_settings
) -> None:
    """No SKIPDIT_URL_SECRET: the embedded deployment signs with a secret of its own process;
    with Redis (API replicas may be several) a URL request is a 422 that names the setting."""
    async with running_app(make_settings(url_secret=None)) as client:
        response = await client.post("/generate", json={"steps": 2, "response_format": "url"})
        if response.status_code == 200:
            file = await client.get(response.json()["urls"][0])
    if backend == "memory":
        assert response.status_code == 200 and file.status_code == 200
    else:
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["field"] == "response_format" and "SKIPDIT_URL_SECRET" in error["message"]


@pytest.mark.parametrize(
    ("setting", "value", "says"),
    [
        ("url_secret", "too-short", "SKIPDIT_URL_SECRET"),
        ("public_url", "images.example.com", "SKIPDIT_PUBLIC_URL"),
    ],
)
def test_url_settings_are_checked_at_boot(
    tiny_model_dir: Path, setting: str, value: str, says: str
) -> None:
    with pytest.raises(ValidationError, match=says):
        Settings(model=str(tiny_model_dir), **{setting: value})
