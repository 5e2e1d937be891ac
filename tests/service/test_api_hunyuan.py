"""A diffusers Hunyuan-DiT directory served through the HTTP API: the tiny random
``HunyuanDiTPipeline`` of ``tests.helpers.tiny_hunyuan_dir``, real HTTP against the app with its
embedded worker on the memory backend. ``/models`` shows it as a text model with its card's
Skip-Cache default; a prompt (and a negative prompt) comes back as an RGB image of its size, the
model layer's own run of that request; fields it cannot take are 422s naming them; an uncached
image is the same for the same request and another for another prompt; a directory missing a
part does not boot."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from model import registry
from model.registry import LoadedModel
from service.request import GenerateParams, resolve
from service.settings import Settings
from tests.helpers import HUNYUAN_PROMPTS, HUNYUAN_TEXT_LEN, tiny_hunyuan_dir
from tests.service.helpers import pixels, running_app, settings_for

SIZE = 64  # its 8x8 latents through the VAE's factor 8


@pytest.fixture(scope="module")
def hunyuan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_hunyuan_dir(tmp_path_factory.mktemp("hunyuan"))


@pytest.fixture(scope="module")
def hunyuan(hunyuan_dir: Path) -> LoadedModel:
    """The model as the model layer runs it alone: what the served images must equal."""
    return registry.load(str(hunyuan_dir))


@pytest.fixture
def settings(hunyuan_dir: Path) -> Settings:
    return settings_for("memory", hunyuan_dir, None, models=[str(hunyuan_dir)])


def solo(model: LoadedModel, body: dict[str, Any]) -> np.ndarray:
    """The first image of ``body`` run alone on the model layer (RGB pixels, int16)."""
    fields = {k: v for k, v in body.items() if k in GenerateParams.model_fields}
    (result,) = model.pipeline.generate([resolve(GenerateParams(**fields), model.info)])
    assert result.images is not None
    return result.images[0].numpy().astype(np.int16)


def decoded(encoded: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(encoded)))
    image.load()
    return image


async def test_models_shows_it_as_a_text_model_with_skip_cache_by_default(
    settings: Settings, hunyuan_dir: Path
) -> None:
    async with running_app(settings) as client:
        (model,) = (await client.get("/models")).json()["data"]
    assert (model["id"], model["kind"], model["default"]) == (str(hunyuan_dir), "image", True)
    assert (model["conditioning"], model["max_tokens"]) == ("text", HUNYUAN_TEXT_LEN)
    assert (model["default_sampler"], model["default_guidance"]) == ("ddim", 5.0)
    assert model["default_cache"] == {
        "policy": "skip_cache",
        "config": {"interval": 2, "depth": 1, "t_start": 700.0, "t_end": 50.0, "threshold": None},
        "source": "card",
    }
    assert model["cache_policies"] == ["fbcache", "fora", "none", "skip_cache", "teacache"]
    assert model["limits"]["prompt"]["max_tokens"] == HUNYUAN_TEXT_LEN
    assert "class_label" not in model["limits"]
    assert model["random_weights"] is False


async def test_a_prompt_and_a_negative_prompt_come_back_as_its_rgb_images(
    settings: Settings, hunyuan: LoadedModel
) -> None:
    """4 DDIM steps at t = 751, 501, 251, 1 under the default Skip-Cache (interval 2, full at
    t >= 700 and t <= 50): one cached step, at 501."""
    plain = {"prompt": HUNYUAN_PROMPTS[0], "steps": 4, "seed": 3}
    negative = plain | {"negative_prompt": HUNYUAN_PROMPTS[1]}
    async with running_app(settings) as client:
        responses = [await client.post("/generate", json=body) for body in (plain, negative)]
    images = []
    for body, response in zip((plain, negative), responses, strict=True):
        assert response.status_code == 200, response.text
        out = response.json()
        assert out["status"] == "done" and out["content_type"] == "image/png"
        assert (out["result"]["cache_policy"], out["result"]["steps_cached"]) == ("skip_cache", 1)
        assert out["result"]["prompt_tokens"] == 8  # 6 words, [CLS] and [SEP]
        image = decoded(out["images"][0])
        assert (image.mode, image.size) == ("RGB", (SIZE, SIZE))
        assert np.abs(pixels(base64.b64decode(out["images"][0])) - solo(hunyuan, body)).max() <= 1
        images.append(pixels(base64.b64decode(out["images"][0])))
    assert responses[1].json()["result"]["negative_prompt_tokens"] == 9
    assert np.abs(images[0] - images[1]).max() > 1  # the negative prompt reached the run


REFUSALS = [  # (body, field)
    ({"prompt": HUNYUAN_PROMPTS[0], "class_label": 3}, "class_label"),
    ({"class_label": 3}, "class_label"),
    ({"prompt": HUNYUAN_PROMPTS[0], "cache_depth": 3}, "cache_depth"),  # max: 2 of 6 blocks
    ({"prompt": HUNYUAN_PROMPTS[0], "cache_policy": "toca"}, "cache_policy"),
    ({"prompt": HUNYUAN_PROMPTS[0], "cache_policy": "delta_dit"}, "cache_policy"),
    ({"prompt": HUNYUAN_PROMPTS[0], "sampler": "flow_euler"}, "sampler"),
]


async def test_fields_it_cannot_take_are_422s_naming_them(settings: Settings) -> None:
    wrong = []
    async with running_app(settings) as client:
        for body, field in REFUSALS:
            response = await client.post("/generate", json=body)
            error = response.json().get("error", {})
            if response.status_code != 422 or error.get("field") != field:
                wrong.append((body, field, response.status_code, error))
            elif not error["message"].startswith(f"{field}: "):
                wrong.append((body, field, "message", error["message"]))
        deepest = await client.post(
            "/generate", json={"prompt": HUNYUAN_PROMPTS[0], "steps": 2, "cache_depth": 2}
        )
    assert not wrong, wrong
    assert deepest.status_code == 200, deepest.text  # the bound itself runs


async def test_an_uncached_image_repeats_for_the_same_request_and_not_for_another_prompt(
    settings: Settings,
) -> None:
    body = {"prompt": HUNYUAN_PROMPTS[0], "steps": 3, "seed": 5, "cache_policy": "none"}
    other = body | {"prompt": HUNYUAN_PROMPTS[2]}
    async with running_app(settings) as client:
        responses = [await client.post("/generate", json=b) for b in (body, body, other)]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    first, again, another = (r.json()["images"][0] for r in responses)
    assert responses[0].json()["result"]["steps_cached"] == 0
    assert again == first  # the same PNG bytes
    assert np.abs(pixels(base64.b64decode(another)) - pixels(base64.b64decode(first))).max() > 1


def test_a_directory_missing_a_part_does_not_boot_naming_the_part(
    hunyuan_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "hunyuan"
    shutil.copytree(hunyuan_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ValidationError) as error:
        settings_for("memory", broken, None, models=[str(broken)])
    assert "SKIPDIT_MODELS" in str(error.value)
    assert f"Hunyuan-DiT directory {str(broken)!r} is missing: vae/ (its AutoencoderKL)" in str(
        error.value
    )
