"""A worker whose fast path fails its start-up self-check (``model.sampling.selfcheck``) turns
the failing component off, says so in /models and /metrics, and serves the eager images; with
``SKIPDIT_FAST_PATH_CHECK=fail`` the boot stops instead. Triton runs in its interpreter here,
with the LSC kernel made to differ from eager torch."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
import torch

import kernels.lsc_fusion
from kernels.dispatch import KernelUnavailable
from service.request import GenerateParams
from tests.helpers import generate
from tests.service.helpers import parse_metrics, pipeline_of, pixels, running_app, settings_for

BODY = {"class_label": 3, "steps": 6, "seed": 11, "cache_interval": 2}


@pytest.fixture
def lsc_made_to_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    real = kernels.lsc_fusion.lsc_fusion

    def wrong(*args: object, **kw: object) -> torch.Tensor:
        return real(*args, **kw) * 1.01  # type: ignore[arg-type]

    monkeypatch.setattr(kernels.lsc_fusion, "lsc_fusion", wrong)


@pytest.mark.slow
@pytest.mark.usefixtures("lsc_made_to_differ")
async def test_a_failing_component_is_turned_off_and_the_service_answers_eagerly(
    tiny_model_dir: Path,
) -> None:
    settings = settings_for("memory", tiny_model_dir, None, kernels="triton", graphs="off")
    async with running_app(settings) as client:
        runtime = (await client.get("/models")).json()["data"][0]["runtime"]
        response = await client.post("/generate", json=BODY)
        metrics = parse_metrics((await client.get("/metrics")).text)
    assert runtime["kernels"] == "torch" and runtime["graphs"] == "off"
    assert runtime["self_check"]["kernels"].startswith("off: differs from eager torch")
    name = str(tiny_model_dir)
    for component in ("kernels", "graphs"):
        labels = frozenset({"model": name, "component": component}.items())
        assert metrics[("skipdit_fast_path_component", labels)] == 0
    assert response.status_code == 200, response.text
    (eager,) = generate(pipeline_of(str(tiny_model_dir)), [GenerateParams(**BODY)])
    got = pixels(base64.b64decode(response.json()["images"][0]))
    assert np.abs(got - eager.images[0][..., 0].numpy().astype(np.int16)).max() <= 1


@pytest.mark.slow
@pytest.mark.usefixtures("lsc_made_to_differ")
async def test_fail_stops_the_boot_naming_the_component(tiny_model_dir: Path) -> None:
    settings = settings_for(
        "memory", tiny_model_dir, None, kernels="triton", graphs="off", fast_path_check="fail"
    )
    with pytest.raises(KernelUnavailable, match="kernels: self-check failed"):
        async with running_app(settings):
            pass
