"""What a model is, read without its weights (``describe``), and what serving derives from it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from model import cache, registry
from model.errors import FieldError
from model.networks.checkpoint import WEIGHTS_FILE, save_pretrained
from model.networks.skip_dit import preset
from model.registry import ModelInfo
from model.sampling.pipeline import DEFAULT_GUIDANCE
from tests.helpers import tiny


def test_our_format_is_described_from_its_config_json_alone(tmp_path: Path) -> None:
    card = {"default_guidance": 2.5, "class_names": ["zero", "one"]}
    save_pretrained(tiny(), tmp_path / "m", card=card)
    (tmp_path / "m" / WEIGHTS_FILE).unlink()  # describe must not need the weights
    info = registry.describe(str(tmp_path / "m"))
    assert info == ModelInfo(str(tmp_path / "m"), tiny().config, card, random_weights=False)
    assert info.image_size == 8 and info.default_guidance == 2.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.name = "other"  # type: ignore[misc]


def test_shipped_models_describe_as_before_with_all_channels_guided() -> None:
    info = registry.describe()
    assert info.name == registry.SHIPPED_DEFAULT and not info.random_weights
    assert info.config == preset("digits-small")
    assert info.config.guided_channels is None and info.image_size == 16
    assert info.default_guidance == info.card["default_guidance"]
    assert registry.load().info == info  # load starts from describe


def test_official_release_is_described_from_its_shapes(tmp_path: Path) -> None:
    model = tiny(in_channels=4, learn_sigma=True)
    path = tmp_path / "DiT-skip.pt"
    torch.save({"model": {}, "ema": model.state_dict(), "args": argparse.Namespace()}, path)
    info = registry.describe(str(path))
    assert info.config == model.config.replace(guided_channels=3)
    assert info.card == {} and not info.random_weights
    assert info.latent and info.image_size == 8 * 8  # latents decoded by an 8x VAE
    assert info.default_guidance == DEFAULT_GUIDANCE


def test_random_preset_says_so() -> None:
    info = registry.describe("random:digits-tiny")
    assert info.random_weights and info.config == preset("digits-tiny")
    loaded = registry.load("random:digits-tiny")
    assert loaded.random_weights and loaded.pipeline.model.config == info.config


@pytest.mark.parametrize(
    ("prompt", "label"),
    [("7", 7), ("class 7", 7), ("Digit 7", 7), ("  digit3 ", 3), ("One", 1), ("zero", 0)],
)
def test_prompt_names_a_class(prompt: str, label: int) -> None:
    info = ModelInfo("m", tiny().config, {"class_names": ["zero", "one"]}, False)
    assert info.label_from_prompt(prompt) == label


@pytest.mark.parametrize("prompt", ["10", "a cat", "class", "-1", "seven"])
def test_other_prompts_are_a_prompt_error(prompt: str) -> None:
    info = ModelInfo("m", tiny().config, {}, False)
    with pytest.raises(FieldError) as err:
        info.label_from_prompt(prompt)
    assert err.value.field == "prompt" and "0..9" in str(err.value)


def test_cache_defaults_cover_every_policy_as_json() -> None:
    info = registry.describe("digits-skip-dit")
    defaults = info.cache_defaults()
    assert set(defaults) == set(cache.POLICIES)
    json.dumps(defaults, allow_nan=False)  # infinity is written as null
    skip = cache.POLICIES["skip_cache"].default_config(info.config)
    assert math.isinf(skip.t_start) and defaults["skip_cache"]["t_start"] is None
    assert defaults["skip_cache"]["depth"] == skip.depth == 1
    assert defaults["none"] == {}
