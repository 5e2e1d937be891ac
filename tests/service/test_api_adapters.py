"""LoRA adapters through the HTTP API: ``/models`` lists a model's adapters, requests of two
adapters and of none sent together each get the image their request makes alone, on the
memory, Redis and Redis Cluster backends; an unknown adapter is a 422 naming ``adapter``."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model import registry
from model.networks import lora
from service.request import GenerateParams
from tests.service.helpers import running_app, settings_for


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two random adapters of the tiny served model (named by its path, as the service names
    it), written in the on-disk layout."""
    model = registry.load(str(tiny_model_dir)).pipeline.model
    root = tmp_path_factory.mktemp("adapters")
    dirs = []
    for seed, name in enumerate(["thick", "thin"]):
        adapter = lora.fresh(model, name, str(tiny_model_dir), 2,
                             generator=torch.Generator().manual_seed(seed))  # fmt: skip
        with torch.no_grad():
            for _, b in adapter.weights.values():
                b.normal_(0, 1.0, generator=torch.Generator().manual_seed(10 + seed))
        dirs.append(lora.save(adapter, root / name, {"style": name}))
    return dirs


def pixels(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))), dtype=np.int16)


BODIES = [
    {"class_label": 1, "steps": 6, "seed": 1, "adapter": "thick"},
    {"class_label": 2, "steps": 6, "seed": 2, "adapter": "thin", "adapter_scale": 1.5},
    {"class_label": 3, "steps": 6, "seed": 3},
    {"class_label": 1, "steps": 6, "seed": 1},
]


async def test_requests_of_two_adapters_and_none_each_get_their_solo_image(
    backend: str, tiny_model_dir: Path, adapter_dirs: list[Path], redis_url: str | None
) -> None:
    settings = settings_for(backend, tiny_model_dir, redis_url, adapter_dirs=adapter_dirs)
    async with running_app(settings) as client:
        models = (await client.get("/models")).json()["data"][0]
        responses = await asyncio.gather(*[client.post("/generate", json=b) for b in BODIES])
    assert [a["name"] for a in models["adapters"]] == ["thick", "thin"]
    assert models["adapters"][0]["card"] == {"style": "thick"}
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert responses[1].json()["request"]["adapter_scale"] == 1.5
    pipeline = registry.load(str(tiny_model_dir)).pipeline
    pipeline.adapters = {d.name: lora.load(d, pipeline.model) for d in adapter_dirs}
    served = [pixels(r.json()["images"][0]) for r in responses]
    params = [GenerateParams(**body) for body in BODIES]
    plans = [pipeline.plan(**_plan_fields(p)) for p in params]
    direct = [r.images[0, ..., 0].numpy() for r in pipeline.generate(plans)]
    for got, want in zip(served, direct, strict=True):
        assert np.abs(got - want).max() <= 1
    assert np.abs(served[0] - served[3]).max() > 8  # the adapter changed the image


def _plan_fields(params: GenerateParams) -> dict:
    """``Pipeline.plan``'s parameters of a request (guidance, cache: the model's defaults)."""
    fields = params.model_dump(include={"class_label", "steps", "seed", "adapter"})
    return fields | {"adapter_scale": params.adapter_scale}


async def test_an_unknown_adapter_is_422_naming_adapter(
    tiny_model_dir: Path, adapter_dirs: list[Path]
) -> None:
    settings = settings_for("memory", tiny_model_dir, None, adapter_dirs=adapter_dirs[:1])
    async with running_app(settings) as client:
        unknown = await client.post("/generate", json={"adapter": "thin"})
        scale = await client.post("/generate", json={"adapter": "thick", "adapter_scale": 3})
        base = (await client.get("/models")).json()["data"][0]
    assert unknown.status_code == 422, unknown.text
    error = unknown.json()["error"]
    assert error["field"] == "adapter" and "'thick'" in error["message"]  # the known ones
    assert scale.status_code == 422 and "adapter_scale" in scale.text
    assert [a["name"] for a in base["adapters"]] == ["thick"]


def test_settings_refuse_an_adapter_of_a_model_not_served(
    tiny_model_dir: Path, tiny_dit_model_dir: Path, adapter_dirs: list[Path]
) -> None:
    with pytest.raises(ValueError, match=r"SKIPDIT_ADAPTER_DIRS: .* not a served model"):
        settings_for("memory", tiny_dit_model_dir, None, adapter_dirs=adapter_dirs)
