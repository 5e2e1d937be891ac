"""The networks this project serves, by kind: ``image`` (Skip-DiT / DiT,
``model.networks.skip_dit``), ``text-image`` (the text-conditioned Skip-DiT,
``model.networks.text_dit``), ``video`` (Skip-Latte / Latte, ``model.networks.skip_latte``) and
``text-video`` (Latte-T2V with long skips, ``model.networks.text_latte``).
One place that maps a config to its network, a kind to its config class, and a preset name to
its config."""

from __future__ import annotations

from collections.abc import Callable

from model.networks import skip_dit, skip_latte, text_dit, text_latte
from model.networks.dydit import DyDiT
from model.networks.skip_dit import DiTConfig, SkipDiT
from model.networks.skip_latte import LatteConfig, SkipLatte
from model.networks.text_dit import TextDiTConfig, TextSkipDiT
from model.networks.text_latte import TextLatteConfig, TextSkipLatte

Config = DiTConfig | LatteConfig | TextDiTConfig

# Keyed by ``file_kind`` (config.json's "kind").
CONFIGS: dict[str, type[Config]] = {
    c.file_kind: c for c in (DiTConfig, LatteConfig, TextDiTConfig, TextLatteConfig)
}
NETWORKS: dict[str, type[SkipDiT]] = {
    DiTConfig.file_kind: SkipDiT,
    LatteConfig.file_kind: SkipLatte,
    TextDiTConfig.file_kind: TextSkipDiT,
    TextLatteConfig.file_kind: TextSkipLatte,
}
# Preset names are disjoint (video names start with "Latte-" or "digits-video", text ones with
# "PixArt-", "digits-t2i" or "digits-t2v").
PRESETS: dict[str, Callable[..., Config]] = {
    **skip_dit.PRESETS,
    **skip_latte.PRESETS,
    **text_dit.PRESETS,
    **text_latte.PRESETS,
}


def build(config: Config) -> SkipDiT:
    """A freshly initialised network of the config's kind (SkipLatte is a SkipDiT whose units
    are (spatial, temporal) block pairs; a dynamic config gives a DyDiT, image only)."""
    if config.dynamic:
        return DyDiT(config)
    return NETWORKS[config.file_kind](config)


def preset(name: str, **overrides: object) -> Config:
    """An image, text-to-image or video preset config by name."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name](**overrides)
