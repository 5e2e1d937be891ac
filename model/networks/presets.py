"""The networks this project serves, by kind: ``image`` (Skip-DiT / DiT,
``model.networks.skip_dit``) and ``video`` (Skip-Latte / Latte, ``model.networks.skip_latte``). One
place that maps a config to its network, a kind to its config class, and a preset name to its
config."""

from __future__ import annotations

from collections.abc import Callable

from model.networks import skip_dit, skip_latte
from model.networks.dydit import DyDiT
from model.networks.skip_dit import DiTConfig, SkipDiT
from model.networks.skip_latte import LatteConfig, SkipLatte

Config = DiTConfig | LatteConfig

CONFIGS: dict[str, type[Config]] = {DiTConfig.kind: DiTConfig, LatteConfig.kind: LatteConfig}
NETWORKS: dict[str, type[SkipDiT]] = {DiTConfig.kind: SkipDiT, LatteConfig.kind: SkipLatte}
# Image and video preset names are disjoint (video names start with "Latte-" or "digits-video").
PRESETS: dict[str, Callable[..., Config]] = {**skip_dit.PRESETS, **skip_latte.PRESETS}


def build(config: Config) -> SkipDiT:
    """A freshly initialised network of the config's kind (SkipLatte is a SkipDiT whose units
    are (spatial, temporal) block pairs; a dynamic config gives a DyDiT, image only)."""
    if config.dynamic:
        return DyDiT(config)
    return NETWORKS[config.kind](config)


def preset(name: str, **overrides: object) -> Config:
    """An image or video preset config by name."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name](**overrides)
