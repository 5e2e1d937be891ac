"""Text prompts through the HTTP API: a tiny text-to-image model (flow objective, 8 prompt
tokens) served beside a tiny class model, real HTTP against the app with its embedded worker.
Prompts pass through as text and the served image is the model's own run of that prompt;
``/models`` says how each model is conditioned; bad prompts are 422s naming the field;
truncation is reported; the prompt-embedding cache shows in ``/metrics``."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from model import registry
from model.registry import LoadedModel
from service.request import GenerateParams, resolve
from tests.helpers import tiny_text_model
from tests.service.helpers import parse_metrics, pixels, running_app, sample, settings_for

LONG = "a 7 on the left and a 2 on the right and a 3 at the top"  # more than 8 tokens
HITS, MISSES = "skipdit_prompt_cache_hits_total", "skipdit_prompt_cache_misses_total"


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_text_model(tmp_path_factory.mktemp("t2i") / "t2i")


@pytest.fixture(scope="module")
def text_model(text_dir: Path) -> LoadedModel:
    """The text model as the model layer runs it alone: what the served images must equal."""
    return registry.load(str(text_dir))


@pytest.fixture
def settings(text_dir: Path, tiny_model_dir: Path) -> Iterator[Any]:
    """The text model (the default) and the class model (eps objective) in one deployment."""
    yield settings_for("memory", text_dir, None, models=[str(text_dir), str(tiny_model_dir)])


def solo(model: LoadedModel, body: dict[str, Any]) -> np.ndarray:
    """The first image of ``body`` run alone on the model layer (grey pixels, int16)."""
    fields = {k: v for k, v in body.items() if k in GenerateParams.model_fields and k != "model"}
    (result,) = model.pipeline.generate([resolve(GenerateParams(**fields), model.info)])
    assert result.images is not None
    return result.images[0, ..., 0].numpy().astype(np.int16)


def assert_image_of(model: LoadedModel, body: dict[str, Any], encoded: str) -> None:
    assert np.abs(pixels(base64.b64decode(encoded)) - solo(model, body)).max() <= 1


async def test_a_prompt_runs_on_the_text_model_natively_and_openai_style(
    settings, text_model: LoadedModel
) -> None:
    native = {"prompt": "a 4 at the top", "steps": 4, "seed": 3}
    negative = {"prompt": "a large 5", "negative_prompt": "a small 3", "steps": 4}
    async with running_app(settings) as client:
        got = await client.post("/generate", json=native)
        openai = await client.post(
            "/v1/images/generations", json={"prompt": "a large 5", "negative_prompt": "a small 3"}
        )
    assert got.status_code == 200, got.text
    out = got.json()
    assert out["request"]["prompt"] == "a 4 at the top" and out["request"]["class_label"] is None
    assert out["request"]["sampler"] == "flow_euler"  # the flow model's default: what ran
    assert (out["result"]["prompt_tokens"], out["result"]["prompt_truncated"]) == (6, False)
    assert "negative_prompt_tokens" not in out["result"]  # none was given
    assert_image_of(text_model, native, out["images"][0])
    assert openai.status_code == 200, openai.text
    body = openai.json()
    assert body["prompt_tokens"] == 4 and body["prompt_truncated"] is False
    assert body["negative_prompt_tokens"] == 4 and body["negative_prompt_truncated"] is False
    # /v1 runs /generate's defaults (50 steps): the negative prompt reached the run
    assert_image_of(text_model, negative | {"steps": 50}, body["data"][0]["b64_json"])
    assert (
        np.abs(
            pixels(base64.b64decode(body["data"][0]["b64_json"]))
            - solo(text_model, {"prompt": "a large 5", "steps": 50})
        ).max()
        > 1
    )  # without it: another image


async def test_models_say_how_each_model_is_conditioned_and_sampled(
    settings, text_dir: Path, tiny_model_dir: Path
) -> None:
    async with running_app(settings) as client:
        text, image = (await client.get("/models")).json()["data"]
    assert (text["id"], image["id"]) == (str(text_dir), str(tiny_model_dir))
    assert (text["conditioning"], text["max_tokens"]) == ("text", 8)
    assert (text["samplers"], text["default_sampler"]) == (["flow_euler"], "flow_euler")
    assert text["default_guidance"] == 2.0 and text["default"] is True
    assert text["limits"]["prompt"] == {"min_length": 1, "max_length": 1000, "max_tokens": 8}
    assert "class_label" not in text["limits"]
    assert text["limits"]["samplers"] == ["flow_euler"]
    assert (image["conditioning"], image["max_tokens"]) == ("class", None)
    assert (image["samplers"], image["default_sampler"]) == (["ddim", "ddpm", "dpm++"], "ddim")
    assert image["limits"]["class_label"] == {"min": 0, "max": 9}
    assert "prompt" not in image["limits"]


async def test_a_repeated_prompt_hits_the_embedding_cache_in_metrics(
    settings, text_dir: Path, tiny_model_dir: Path
) -> None:
    body = {"prompt": "the digit 9 on the left", "steps": 2}

    async def counts(client: httpx.AsyncClient) -> tuple[float | None, float | None]:
        values = parse_metrics((await client.get("/metrics")).text)
        return sample(values, HITS, model=str(text_dir)), sample(
            values, MISSES, model=str(text_dir)
        )

    async with running_app(settings) as client:
        before = await counts(client)
        assert (await client.post("/generate", json=body)).status_code == 200
        first = await counts(client)
        assert (await client.post("/generate", json=body)).status_code == 200
        again = await counts(client)
        values = parse_metrics((await client.get("/metrics")).text)
    assert before == (0, 0)  # exported from the start
    assert first == (0, 2)  # the prompt and the guided branch's empty prompt: encoded
    assert again == (2, 2)  # both served from the cache
    assert sample(values, HITS, model=str(tiny_model_dir)) is None  # a class model has none


TEXT_REFUSALS = [  # (route, body, field), on the text model
    ("/generate", {"prompt": ""}, "prompt"),
    ("/generate", {"prompt": "x" * 1001}, "prompt"),
    ("/generate", {"prompt": "a 7 \x07 on the left"}, "prompt"),
    ("/generate", {"prompt": "a 7\non the left"}, "prompt"),
    ("/generate", {"prompt": "a 7", "negative_prompt": "a 3\x1b"}, "negative_prompt"),
    ("/generate", {"prompt": "a 7", "negative_prompt": "x" * 1001}, "negative_prompt"),
    ("/generate", {}, "prompt"),
    ("/generate", {"prompt": "a 7", "class_label": 3}, "class_label"),
    ("/generate", {"prompt": "a 7", "sampler": "ddim"}, "sampler"),
    ("/v1/images/generations", {"prompt": ""}, "prompt"),
    ("/v1/images/generations", {"prompt": "x" * 1001}, "prompt"),
    ("/v1/images/generations", {"prompt": "a \x07"}, "prompt"),
    ("/v1/images/generations", {"prompt": "a 7", "negative_prompt": "\x00"}, "negative_prompt"),
]
CLASS_REFUSALS = [  # on the class model
    ("/generate", {"prompt": "a red cat on a sofa"}, "prompt"),
    ("/generate", {"negative_prompt": "blurry"}, "negative_prompt"),
    ("/generate", {"sampler": "flow_euler"}, "sampler"),
    ("/v1/images/generations", {"prompt": "a red cat on a sofa"}, "prompt"),
    ("/v1/images/generations", {"prompt": "7", "negative_prompt": "8"}, "negative_prompt"),
]


async def test_bad_prompts_and_conditioning_are_422_naming_the_field(
    settings, text_dir: Path, tiny_model_dir: Path
) -> None:
    cases = [(str(text_dir), *case) for case in TEXT_REFUSALS]
    cases += [(str(tiny_model_dir), *case) for case in CLASS_REFUSALS]
    wrong = []
    async with running_app(settings) as client:
        for model, route, body, field in cases:
            response = await client.post(route, json={"model": model, **body})
            error = response.json().get("error", {})
            if response.status_code != 422 or error.get("field") != field:
                wrong.append((route, body, field, response.status_code, error))
            elif not error["message"].startswith(f"{field}: "):
                wrong.append((route, body, field, "message", error["message"]))
        # the same class model takes a class, as a label or as an OpenAI prompt
        label = await client.post("/generate", json={"model": str(tiny_model_dir), "steps": 2})
        named = await client.post(
            "/v1/images/generations", json={"model": str(tiny_model_dir), "prompt": "digit 7"}
        )
    assert not wrong, wrong
    assert label.status_code == 200 and label.json()["request"]["class_label"] == 0
    assert label.json()["request"]["sampler"] == "ddim"
    assert "prompt_tokens" not in label.json()["result"]
    assert named.status_code == 200 and "prompt_tokens" not in named.json()


async def test_a_prompt_past_max_tokens_is_cut_and_says_so(settings) -> None:
    async with running_app(settings) as client:
        native = await client.post("/generate", json={"prompt": LONG, "steps": 2})
        openai = await client.post("/v1/images/generations", json={"prompt": LONG})
    assert native.status_code == 200, native.text
    result = native.json()["result"]
    assert (result["prompt_tokens"], result["prompt_truncated"]) == (8, True)
    assert (openai.json()["prompt_tokens"], openai.json()["prompt_truncated"]) == (8, True)


async def test_requests_with_different_prompts_in_flight_together_each_get_their_own_image(
    settings, text_model: LoadedModel
) -> None:
    bodies = [
        {"prompt": "a 1 on the right", "steps": 6, "seed": 1},
        {"prompt": "two digits: 3 above 8", "steps": 6, "seed": 1, "negative_prompt": "a 0"},
        {"prompt": LONG, "steps": 5, "seed": 2, "guidance_scale": 1.0},
    ]
    async with running_app(settings) as client:
        responses = await asyncio.gather(*(client.post("/generate", json=b) for b in bodies))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    for body, response in zip(bodies, responses, strict=True):
        assert_image_of(text_model, body, response.json()["images"][0])
