"""TeaCache and adaptive Skip-Cache through the HTTP API: a model card's calibration reaches the
requests and /models, and each policy's images are the pipeline's on every queue backend."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model import registry
from model.cache import Mode
from model.networks.checkpoint import save_pretrained
from service.request import GenerateParams
from tests.helpers import generate, tiny
from tests.service.helpers import running_app, settings_for

# A constant rescaled change of 0.3 a step: at threshold 0.5 TeaCache skips every other step,
# whatever the inputs do (the identity default would decide by the inputs' change).
COEFFICIENTS = [0.0, 0.0, 0.0, 0.0, 0.3]


@pytest.fixture(scope="module")
def calibrated_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    card = {"name": "tiny-tea", "default_guidance": 2.0, "teacache": {"coefficients": COEFFICIENTS}}
    return save_pretrained(tiny(), tmp_path_factory.mktemp("models") / "tiny-tea", card=card)


def pixels(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))), dtype=np.int16)


@pytest.mark.parametrize(
    "body",
    [
        {"cache_policy": "teacache", "cache_threshold": 0.5},
        {"cache_policy": "skip_cache", "cache_interval": 4, "cache_threshold": 0.05},
    ],
)
async def test_generate_runs_the_policy_with_the_cards_calibration(
    backend: str, calibrated_dir: Path, redis_url: str | None, body: dict
) -> None:
    body = {"class_label": 2, "steps": 10, "seed": 3, "num_images": 2, **body}
    settings = settings_for(backend, calibrated_dir, redis_url)
    async with running_app(settings) as client:
        response = await client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    result = response.json()["result"]
    assert result["steps_full"] + result["steps_cached"] == 10
    assert result["steps_cached"] > 0 and result["steps_full"] > 1
    pipeline = registry.load(str(calibrated_dir)).pipeline
    (direct,) = generate(pipeline, [GenerateParams(**body)])
    assert direct.stats.steps[Mode.CACHED] == result["steps_cached"]
    if body["cache_policy"] == "teacache":  # the card's polynomial decided: steps 1, 3, 5, 7
        assert result["steps_cached"] == 4
    for encoded, expected in zip(response.json()["images"], direct.images, strict=True):
        got = pixels(encoded)
        assert np.abs(got - expected[..., 0].numpy().astype(np.int16)).max() <= 1


async def test_models_lists_the_policies_and_the_cards_coefficients(calibrated_dir: Path) -> None:
    async with running_app(settings_for("memory", calibrated_dir, None)) as client:
        (model,) = (await client.get("/models")).json()["data"]
    assert {"teacache", "skip_cache", "fbcache"} <= set(model["cache_policies"])
    defaults = model["cache_defaults"]
    assert defaults["teacache"]["coefficients"] == COEFFICIENTS
    assert defaults["skip_cache"]["threshold"] is None  # adaptive is off unless asked


async def test_teacache_refuses_fields_it_does_not_take(calibrated_dir: Path) -> None:
    body = {"steps": 4, "cache_policy": "teacache", "cache_interval": 3}
    async with running_app(settings_for("memory", calibrated_dir, None)) as client:
        response = await client.post("/generate", json=body)
    assert response.status_code == 422 and "cache_interval" in response.text
