"""A text-to-video model through the HTTP API: a tiny Latte-T2V with long skips
(``digits-t2v-tiny``: 4 frames of 32x32, a 2-layer T5 encoder, flow objective) served beside a
tiny class video model, real HTTP against the app with its embedded worker on the memory
backend. ``/v1/videos`` takes real text on it and its content decodes to the model's frame
count; ``/generate`` gives the model layer's own run of the prompt (lossless WebP frames);
fields that do not fit the model are 422s naming them."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from model import registry
from model.registry import LoadedModel
from service.request import GenerateParams, resolve
from service.settings import SHIPPED_TEXT_VIDEO, Settings
from tests.helpers import tiny_text_model
from tests.service.helpers import mp4_frames, running_app, settings_for, webp_frames

FRAMES, SIDE = 4, 32  # digits-t2v-tiny


@pytest.fixture(scope="module")
def t2v_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_text_model(tmp_path_factory.mktemp("t2v") / "t2v", preset="digits-t2v-tiny")


@pytest.fixture(scope="module")
def t2v(t2v_dir: Path) -> LoadedModel:
    """The model as the model layer runs it alone: what the served frames must equal."""
    return registry.load(str(t2v_dir))


@pytest.fixture
def settings(t2v_dir: Path, tiny_video_model_dir: Path) -> Settings:
    """The text-to-video model (the default) and a class video model in one deployment."""
    return settings_for("memory", t2v_dir, None, models=[str(t2v_dir), str(tiny_video_model_dir)])


def solo(model: LoadedModel, body: dict[str, Any]) -> np.ndarray:
    """The clip of ``body`` run alone on the model layer: (F, H, W) grey pixels, int16."""
    fields = {k: v for k, v in body.items() if k in GenerateParams.model_fields and k != "model"}
    (result,) = model.pipeline.generate([resolve(GenerateParams(**fields), model.info)])
    assert result.images is not None
    return result.images[0, ..., 0].numpy().astype(np.int16)


async def video_job(settings: Settings, job: dict[str, Any]) -> tuple[httpx.Response, dict]:
    """``job`` through ``POST /v1/videos`` on the app, polled until completed: its content's
    answer and its job record."""
    async with running_app(settings) as client:
        made = await client.post("/v1/videos", json=job)
        assert made.status_code == 200, made.text
        video_id = made.json()["id"]
        async with asyncio.timeout(120):
            while (await client.get(f"/v1/videos/{video_id}")).json()["status"] != "completed":
                await asyncio.sleep(0.05)
        content = await client.get(f"/v1/videos/{video_id}/content")
        record = (await client.get(f"/jobs/{video_id}")).json()
    return content, record


async def test_models_shows_a_text_conditioned_video_model(
    settings: Settings, t2v_dir: Path
) -> None:
    async with running_app(settings) as client:
        models = {m["id"]: m for m in (await client.get("/models")).json()["data"]}
    model = models[str(t2v_dir)]
    assert (model["kind"], model["conditioning"], model["max_tokens"]) == ("video", "text", 8)
    assert model["default_sampler"] == "flow_euler"
    assert "skip_cache" in model["cache_policies"]


async def test_v1_videos_takes_a_text_prompt_and_its_content_has_the_models_frames(
    settings: Settings,
) -> None:
    job = {"prompt": "a 3 on the left", "seconds": 1, "steps": 4, "seed": 2}
    content, record = await video_job(settings, job)
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    frames = mp4_frames(content.content)
    assert len(frames) == FRAMES and frames[0].shape == (SIDE, SIDE, 3)
    assert record["request"]["prompt"] == "a 3 on the left"
    assert record["request"]["class_label"] is None
    assert record["result"]["num_frames"] == FRAMES


async def test_generate_gives_the_model_layers_clip_of_the_prompt(
    settings: Settings, t2v: LoadedModel
) -> None:
    bodies = [
        {"prompt": "a 7 at the top", "steps": 4, "seed": 1, "output_format": "webp"},
        {"prompt": "a large 5", "steps": 4, "seed": 1, "output_format": "webp"},
        {
            "prompt": "a 7 at the top",
            "negative_prompt": "a 1",
            "steps": 4,
            "seed": 1,
            "cache_interval": 2,
            "output_format": "webp",
        },
    ]
    async with running_app(settings) as client:
        answers = await asyncio.gather(*(client.post("/generate", json=b) for b in bodies))
    clips = []
    for body, answer in zip(bodies, answers, strict=True):
        assert answer.status_code == 200, answer.text
        clip = webp_frames(base64.b64decode(answer.json()["images"][0]))
        assert clip.shape == (FRAMES, SIDE, SIDE)
        assert np.abs(clip - solo(t2v, body)).max() <= 1
        clips.append(clip)
    assert np.abs(clips[0] - clips[1]).max() > 8  # the prompt reached the run


async def test_fields_that_do_not_fit_the_text_video_model_are_422s_naming_them(
    settings: Settings, tiny_video_model_dir: Path
) -> None:
    async with running_app(settings) as client:
        label = await client.post("/generate", json={"class_label": 3, "steps": 2})
        empty = await client.post("/v1/videos", json={"prompt": ""})
        text_on_class = await client.post(
            "/v1/videos", json={"prompt": "a 3 on the left", "model": str(tiny_video_model_dir)}
        )
    assert label.status_code == 422 and label.json()["error"]["field"] == "class_label"
    assert empty.status_code == 422 and empty.json()["error"]["field"] == "prompt"
    assert text_on_class.status_code == 422
    assert text_on_class.json()["error"]["field"] == "prompt"


async def test_v1_videos_without_a_model_takes_the_first_video_model_that_takes_the_prompt(
    t2v_dir: Path, tiny_video_model_dir: Path
) -> None:
    """The class video model served first: a class label goes to it, text to the text model;
    with no image model served, /v1/images names ``model``."""
    models = [str(tiny_video_model_dir), str(t2v_dir)]
    settings = settings_for("memory", t2v_dir, None, models=models)
    async with running_app(settings) as client:
        made = {
            prompt: await client.post("/v1/videos", json={"prompt": prompt, "steps": 2})
            for prompt in ("3", "a 3 moving left")
        }
        image = await client.post("/v1/images/generations", json={"prompt": "3"})
    assert [a.status_code for a in made.values()] == [200, 200], [a.text for a in made.values()]
    assert made["3"].json()["model"] == str(tiny_video_model_dir)
    assert made["a 3 moving left"].json()["model"] == str(t2v_dir)
    assert image.status_code == 422 and image.json()["error"]["field"] == "model", image.text


@pytest.mark.slow
async def test_the_shipped_text_to_video_model_is_served_by_default_and_takes_a_prompt() -> None:
    """The default deployment (no SKIPDIT_MODELS) serves ``digits-t2v-skip``: a motion prompt
    through ``/v1/videos`` completes, and its content decodes to the model's frame count."""
    frames = registry.describe(SHIPPED_TEXT_VIDEO).num_frames
    job = {"model": SHIPPED_TEXT_VIDEO, "prompt": "a 3 moving left", "steps": 4, "seed": 1}
    content, record = await video_job(Settings(), job)
    assert frames == 8 and record["request"]["model"] == SHIPPED_TEXT_VIDEO
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    decoded = mp4_frames(content.content)
    assert len(decoded) == frames and decoded[0].shape == (SIDE, SIDE, 3)
