"""Video requests over real HTTP: ``POST /generate`` on a video model (mp4, gif, webp), the
OpenAI-style ``/v1/videos`` lifecycle, an image and a video model served side by side, and the
422s of fields that do not fit the model's kind. What goes through a queue runs on every
``backend`` (memory, Redis, Redis Cluster)."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest
from PIL import Image

from service.request import GenerateParams
from tests.helpers import generate
from tests.service.helpers import (
    assert_solo,
    mp4_frames,
    parse_metrics,
    pipeline_of,
    running_app,
    sample,
    settings_for,
    webp_frames,
)

FRAMES, SIDE = 4, 8  # digits-video-tiny: 4 frames of 8x8 grey


@pytest.fixture
def both(tiny_video_model_dir: Path, tiny_model_dir: Path) -> list[str]:
    """The served names: the tiny Skip-Latte (default, first) and the tiny Skip-DiT."""
    return [str(tiny_video_model_dir), str(tiny_model_dir)]


async def wait_video(client: httpx.AsyncClient, video_id: str, check: Any) -> dict:
    """The video object once ``check`` holds (bounded wait)."""
    async with asyncio.timeout(60):
        while True:
            response = await client.get(f"/v1/videos/{video_id}")
            assert response.status_code == 200, response.text
            if check(response.json()):
                return response.json()
            await asyncio.sleep(0.02)


async def test_generate_mp4_decodes_to_the_pipelines_frames(
    backend: str, both: list[str], redis_url: str | None
) -> None:
    """The served MP4s, decoded, are the pipeline's own frames within H.264's loss (crf 18,
    yuv420p); a second sample of the seed is another clip."""
    video = both[0]
    body = {"class_label": 4, "steps": 6, "seed": 3, "cache_interval": 2, "num_images": 2}
    settings = settings_for(backend, Path(video), redis_url, models=both)
    async with running_app(settings) as client:
        response = await client.post("/generate", json=body | {"output_format": "mp4"})
        assert response.status_code == 200, response.text
        out = response.json()
        job = (await client.post("/generate", json=body | {"async": True})).json()
        await client.get(f"/jobs/{job['id']}/events")  # until it ends
        second = await client.get(f"/jobs/{job['id']}/result", params={"index": 1})
    assert out["content_type"] == "video/mp4" and out["request"]["output_format"] == "mp4"
    assert out["result"]["num_frames"] == FRAMES and out["result"]["fps"] == 8.0
    served = [base64.b64decode(x) for x in out["images"]]
    assert second.status_code == 200 and second.headers["content-type"] == "video/mp4"
    assert second.content == served[1]  # mp4 is the video default
    (solo,) = generate(pipeline_of(video), [GenerateParams(**body)])
    clips = solo.images[..., 0].numpy().astype(np.int16)[..., None]  # (2, F, H, W, 1)
    for i, data in enumerate(served):
        frames = np.stack(mp4_frames(data)).astype(np.int16)  # (F, H, W, 3)
        assert frames.shape == (FRAMES, SIDE, SIDE, 3)
        error = [np.abs(frames - clip).mean() for clip in clips]
        # Noise-like 8x8 frames are H.264's worst case: 3-4 levels of 255 on average here,
        # against about 95 between the seed's two clips.
        assert error[i] <= 6 and error[1 - i] > 3 * error[i], error


async def test_lossless_webp_frames_are_the_pipelines_and_gif_holds_every_frame(
    both: list[str],
) -> None:
    video = both[0]
    body = {"model": video, "class_label": 2, "steps": 5, "seed": 9, "cache_interval": 2}
    async with running_app(settings_for("memory", Path(video), None, models=both)) as client:
        webp = (await client.post("/generate", json=body | {"output_format": "webp"})).json()
        gif = (await client.post("/generate", json=body | {"output_format": "gif"})).json()
    assert webp["content_type"] == "image/webp" and gif["content_type"] == "image/gif"
    params = GenerateParams(**{k: v for k, v in body.items() if k != "model"})
    (solo,) = generate(pipeline_of(video), [params])
    expected = solo.images[0, ..., 0].numpy().astype(np.int16)  # (F, H, W)
    got = webp_frames(base64.b64decode(webp["images"][0]))
    assert got.shape == (FRAMES, SIDE, SIDE) and np.abs(got - expected).max() <= 1
    assert expected.std() > 0  # the perturbed network draws something, not a flat clip
    animated = Image.open(io.BytesIO(base64.b64decode(gif["images"][0])))
    assert animated.n_frames == FRAMES and animated.size == (SIDE, SIDE)


async def test_image_and_video_requests_interleaved_each_batch_with_their_own_kind(
    backend: str, both: list[str], redis_url: str | None
) -> None:
    video, image = both
    bodies = []
    for i in range(8):
        body = {"class_label": i, "steps": 6, "seed": 20 + i, "cache_interval": 1 + i % 3}
        bodies.append(body | {"model": video if i % 2 else image})
    settings = settings_for(backend, Path(video), redis_url, models=both)
    async with running_app(settings) as client:
        responses = await asyncio.gather(*(client.post("/generate", json=x) for x in bodies))
        metrics = parse_metrics((await client.get("/metrics")).text)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    for body, response in zip(bodies, responses, strict=True):
        out = response.json()
        assert out["result"]["model"] == body["model"]
        if body["model"] == image:
            assert out["content_type"] == "image/png"
            assert_solo(pipeline_of(image), body, out["images"][0])
        else:
            assert out["content_type"] == "video/mp4"
            assert len(mp4_frames(base64.b64decode(out["images"][0]))) == FRAMES
    for name in both:  # each engine ran exactly its own kind's request-steps
        own = sum(x["steps"] for x in bodies if x["model"] == name)
        assert sample(metrics, "skipdit_batch_size_sum", model=name) == own
        assert sample(metrics, "skipdit_requests_total", model=name, status="done") == 4
        assert sample(metrics, "skipdit_batch_size_sum", model=name) > sample(
            metrics, "skipdit_batch_size_count", model=name
        )  # requests of one kind did batch together


BAD = [  # (path, body, field); "video"/"image" stand for the served model of that kind
    ("/generate", {"model": "image", "num_frames": 1}, "num_frames"),
    ("/generate", {"model": "image", "fps": 8}, "fps"),
    ("/generate", {"model": "image", "output_format": "mp4"}, "output_format"),
    ("/generate", {"model": "image", "output_format": "gif"}, "output_format"),
    ("/generate", {"model": "video", "num_frames": 5}, "num_frames"),
    ("/generate", {"model": "video", "output_format": "png"}, "output_format"),
    ("/generate", {"model": "video", "output_format": "jpeg"}, "output_format"),
    ("/generate", {"model": "video", "fps": 0}, "fps"),
    ("/generate", {"model": "video", "fps": 61}, "fps"),
    ("/generate", {"model": "video", "output_format": "avi"}, "output_format"),
    ("/v1/videos", {"prompt": "3", "model": "image"}, "model"),
    ("/v1/videos", {"prompt": "3", "seconds": 0.05}, "seconds"),  # 80 fps
    ("/v1/videos", {"prompt": "3", "seconds": "0"}, "seconds"),
    ("/v1/videos", {"prompt": "3", "size": "16x16"}, "size"),
    ("/v1/videos", {"prompt": "a cat"}, "prompt"),
    ("/v1/videos", {"prompt": "3", "steps": 0}, "steps"),
    ("/v1/videos", {"prompt": "3", "cache_interval": 0}, "cache_interval"),
    ("/v1/videos", {"prompt": "3", "seed": -1}, "seed"),
    ("/v1/images/generations", {"prompt": "3", "model": "video"}, "model"),
]


async def test_fields_that_do_not_fit_the_models_kind_are_422s_naming_them(
    both: list[str],
) -> None:
    names = dict(zip(("video", "image"), both, strict=True))
    async with running_app(settings_for("memory", Path(both[0]), None, models=both)) as client:
        for path, body, field in BAD:
            named = body | ({"model": names[body["model"]]} if "model" in body else {})
            if path != "/v1/images/generations":
                named = {"steps": 2} | named
            response = await client.post(path, json=named)
            assert response.status_code == 422, (path, body, response.text)
            error = response.json()["error"]
            assert error["field"] == field and field in error["message"], (path, body, error)
        fixed = await client.post("/generate", json={"num_frames": 5, "steps": 2})
    assert "fixed length" in fixed.json()["error"]["message"]  # why the count is the model's


async def test_v1_videos_lifecycle(backend: str, both: list[str], redis_url: str | None) -> None:
    video, image = both
    settings = settings_for(backend, Path(video), redis_url, models=both, max_inflight=1)
    async with running_app(settings) as client:
        slow = {"prompt": "7", "steps": 1000}
        running = (await client.post("/v1/videos", json=slow)).json()
        queued = (await client.post("/v1/videos", json=slow | {"prompt": "digit 3"})).json()
        started = await wait_video(client, running["id"], lambda v: 0 < v["progress"] < 100)
        waiting = (await client.get(f"/v1/videos/{queued['id']}")).json()
        early = await client.get(f"/v1/videos/{queued['id']}/content")
        dropped = (await client.delete(f"/v1/videos/{queued['id']}")).json()
        stopped = (await client.delete(f"/v1/videos/{running['id']}")).json()
        ended = await wait_video(client, running["id"], lambda v: v["status"] == "failed")
        never = (await client.get(f"/jobs/{queued['id']}")).json()
        job = {"prompt": "1", "seconds": "1", "steps": 4, "seed": 5, "cache_interval": 2}
        made = (await client.post("/v1/videos", json=job)).json()
        done = await wait_video(client, made["id"], lambda v: v["status"] == "completed")
        content = await client.get(f"/v1/videos/{made['id']}/content")
        record = (await client.get(f"/jobs/{made['id']}")).json()
        picture = (await client.post("/generate", json={"model": image, "steps": 2})).json()
        not_video = await client.get(f"/v1/videos/{picture['id']}")
        unknown = [await client.get("/v1/videos/nope"), await client.delete("/v1/videos/nope")]
    assert running["object"] == "video" and running["status"] == "queued"
    assert running["model"] == video and running["progress"] == 0
    assert running["size"] == f"{SIDE}x{SIDE}" and running["seconds"] == "0.5"  # 4 frames, 8 fps
    assert isinstance(running["created_at"], int) and "error" not in running
    assert started["status"] == "in_progress"
    assert waiting["status"] == "queued"  # max_inflight=1: the first one holds the worker
    assert early.status_code == 409 and early.json()["error"]["code"] == "not_ready"
    assert dropped["deleted"] is True and dropped["status"] == "failed"
    assert dropped["error"]["code"] == "cancelled"
    assert stopped["deleted"] is True and stopped["id"] == running["id"]
    assert ended["error"]["code"] == "cancelled" and 0 < ended["progress"] < 100
    assert never["status"] == "cancelled" and never["started_at"] is None
    assert done["progress"] == 100 and done["seconds"] == "1"
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    frames = mp4_frames(content.content)
    assert len(frames) == FRAMES and frames[0].shape == (SIDE, SIDE, 3)
    with av.open(io.BytesIO(content.content)) as container:
        assert container.streams.video[0].average_rate == 4  # 4 frames in 1 second
    assert record["status"] == "done" and record["request"]["class_label"] == 1
    assert record["result"]["num_frames"] == FRAMES and record["result"]["fps"] == 4.0
    assert not_video.status_code == 404
    assert [r.status_code for r in unknown] == [404, 404]
