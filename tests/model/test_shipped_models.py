"""The models this project ships: trained weights that make the digits asked for."""

from __future__ import annotations

import pytest
import torch

from model import data, registry
from model.bench import counted_flops
from model.evaluate import accuracy, frame_accuracy, load_classifier
from model.request import GenerateParams


def test_default_model_is_the_shipped_skip_dit_with_its_dit_twin() -> None:
    assert registry.default_model() == registry.SHIPPED_DEFAULT
    assert {"digits-skip-dit", "digits-dit"} <= set(registry.shipped_models())
    info = registry.describe()
    skip, card = info.config, info.card
    plain = registry.describe("digits-dit").config
    assert skip.long_skip and not plain.long_skip and not info.random_weights
    assert skip.replace(long_skip=True) == plain.replace(long_skip=True)  # same size: twins
    assert card["steps"] > 0 and card["train_seconds"] > 0


def test_shipped_skip_dit_draws_the_requested_digit() -> None:
    loaded = registry.load()
    classifier = load_classifier()
    requests = [
        GenerateParams(class_label=c, num_images=5, steps=50, seed=1000 + c, cache_policy="none")
        for c in range(10)
    ]
    images = torch.cat([r.images for r in loaded.pipeline.generate(requests)])
    labels = torch.arange(10).repeat_interleave(5)
    assert accuracy(classifier, images, labels) >= 0.9


@pytest.mark.parametrize("interval", [1, 2])
def test_shipped_video_model_draws_the_requested_digit_in_every_frame(interval: int) -> None:
    """Every frame of 2 clips per class, uncached and with Skip-Cache N=2, each frame judged on
    the digit-sized window around its ink (``model.evaluate.frame_accuracy``)."""
    info = registry.describe("digits-video-skip")
    assert info.kind == "video" and info.card["architecture"] == "Skip-Latte"
    assert info.card["init_from"] == "digits-skip-dit" and not info.random_weights
    loaded = registry.load("digits-video-skip")
    requests = [
        GenerateParams(class_label=c, num_images=2, steps=25, seed=2000 + c,
                       cache_policy="skip_cache", cache_interval=interval)
        for c in range(10)
    ]  # fmt: skip
    clips = torch.cat([r.images for r in loaded.pipeline.generate(requests)])  # (20, F, H, W, 1)
    labels = torch.arange(10).repeat_interleave(2)
    box = data.clip_digit_size(info.image_size)
    assert frame_accuracy(load_classifier(), clips, labels, box) >= 0.8


def test_shipped_dydit_keeps_its_accuracy_at_its_flops_target() -> None:
    """digits-skip-dydit: digits-skip-dit fine-tuned with DyDiT's routers toward lambda = 0.5
    of the base network's FLOPs. Accuracy as for the base (uncached, seeds 1000-1009); FLOPs of
    a real DDIM-50 run with guidance, counted op by op, against the base's."""
    info = registry.describe("digits-skip-dydit")
    assert info.config.dynamic and info.card["from"] == "digits-skip-dit"
    target = info.card["dydit"]["flops_ratio"]
    loaded, base = registry.load("digits-skip-dydit"), registry.load("digits-skip-dit")
    requests = [
        GenerateParams(class_label=c, num_images=5, steps=50, seed=1000 + c, cache_policy="none")
        for c in range(10)
    ]
    images = torch.cat([r.images for r in loaded.pipeline.generate(requests)])
    assert accuracy(load_classifier(), images, torch.arange(10).repeat_interleave(5)) >= 0.9
    ratio = counted_flops(loaded.pipeline, requests[3]) / counted_flops(base.pipeline, requests[3])
    assert abs(ratio - target) <= 0.05
