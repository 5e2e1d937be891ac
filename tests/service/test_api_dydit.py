"""A DyDiT model through the HTTP API: /models says it routes, each request chooses routed or
static, the images are the pipeline's on every queue backend, and ``dynamic`` on a model without
routers is a 422 naming the field."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model import registry
from model.networks.checkpoint import save_pretrained
from model.networks.dydit import DyDiT
from service.request import GenerateParams
from tests.helpers import generate, tiny
from tests.service.helpers import running_app, settings_for


@pytest.fixture(scope="module")
def dydit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DyDiT whose routers drop heads, groups and tokens at some timesteps."""
    model = DyDiT.from_base(tiny())
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for block in model.blocks:
            for rate in (block.attn_rate, block.mlp_rate):
                rate.router.weight.copy_(torch.randn(rate.router.weight.shape, generator=gen))
                rate.router.bias.zero_()
            block.token_selection.mlp_head[-1].bias.zero_()
            head = block.token_selection.mlp_head[-1].weight
            head.copy_(torch.randn(head.shape, generator=gen))
    card = {"name": "tiny-dydit", "default_guidance": 2.0, "dydit": {"flops_ratio": 0.5}}
    return save_pretrained(model, tmp_path_factory.mktemp("models") / "tiny-dydit", card=card)


def pixels(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))), dtype=np.int16)


async def test_a_dydit_model_serves_routed_and_static_requests(
    backend: str, dydit_dir: Path, redis_url: str | None
) -> None:
    settings = settings_for(backend, dydit_dir, redis_url)
    bodies = [
        {"class_label": 2, "steps": 8, "seed": 3, "cache_interval": 2},
        {"class_label": 2, "steps": 8, "seed": 3, "cache_interval": 2, "dynamic": False},
    ]
    async with running_app(settings) as client:
        models = (await client.get("/models")).json()["data"][0]
        responses = [await client.post("/generate", json=body) for body in bodies]
    assert models["dynamic"] is True and models["config"]["dynamic"] is True
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    pipeline = registry.load(str(dydit_dir)).pipeline
    served = [pixels(r.json()["images"][0]) for r in responses]
    direct = [r.images[0, ..., 0].numpy() for r in generate(pipeline,
        [GenerateParams(**body) for body in bodies])]  # fmt: skip
    for got, want in zip(served, direct, strict=True):
        assert np.abs(got - want).max() <= 1
    assert not np.array_equal(direct[0], direct[1])  # routing changed the image


async def test_dynamic_on_a_model_without_routers_is_422_naming_it(tiny_model_dir: Path) -> None:
    async with running_app(settings_for("memory", tiny_model_dir, None)) as client:
        models = (await client.get("/models")).json()["data"][0]
        response = await client.post("/generate", json={"dynamic": True})
    assert models["dynamic"] is False
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == "dynamic" and "DyDiT" in error["message"]
