"""Resolving a model name or local path to a ready Pipeline.

Names, in the order tried:
- a path: a directory in our format (``config.json`` + ``model.safetensors``), or an official
  ``.pt`` file (DiT or Skip-DiT release);
- a shipped model: a directory under ``model/weights/`` committed with this project;
- ``random:<preset>``: untrained weights of a preset, for smoke tests only (says so loudly).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import (
    CONFIG_FILE,
    load_official,
    load_pretrained,
    load_vae,
    read_pretrained_meta,
)
from model.errors import FieldError
from model.pipeline import DEFAULT_GUIDANCE, Pipeline
from model.skip_dit import PRESETS, DiTConfig, SkipDiT, preset

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"
RANDOM_PREFIX = "random:"
SHIPPED_DEFAULT = "digits-skip-dit"  # the shipped Skip-DiT, when present
# Used only if no model ships: untrained, for smoke tests only.
FALLBACK_DEFAULT = RANDOM_PREFIX + "digits-small"


@dataclass
class LoadedModel:
    name: str
    pipeline: Pipeline
    card: dict[str, Any]
    random_weights: bool

    @property
    def config(self) -> Any:
        return self.pipeline.model.config


def shipped_models() -> list[str]:
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(p.name for p in WEIGHTS_DIR.iterdir() if (p / CONFIG_FILE).is_file())


def default_model() -> str:
    shipped = shipped_models()
    if SHIPPED_DEFAULT in shipped:
        return SHIPPED_DEFAULT
    return shipped[0] if shipped else FALLBACK_DEFAULT


def known_names() -> list[str]:
    return shipped_models() + [RANDOM_PREFIX + p for p in PRESETS]


def _source(name: str) -> tuple[str, Path | str]:
    """("pretrained", dir) | ("official", file) | ("random", preset name)."""
    path = Path(name)
    if (WEIGHTS_DIR / name / CONFIG_FILE).is_file():
        return "pretrained", WEIGHTS_DIR / name
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        return "pretrained", path
    if path.is_file():
        return "official", path
    if name.startswith(RANDOM_PREFIX) and name[len(RANDOM_PREFIX) :] in PRESETS:
        return "random", name[len(RANDOM_PREFIX) :]
    raise FieldError("model", f"unknown model {name!r}; known: {known_names()} or a local path")


def describe(name_or_path: str | None = None) -> tuple[str, DiTConfig, dict[str, Any], bool]:
    """(name, config, card, random_weights), without loading weights where avoidable."""
    name = name_or_path or default_model()
    kind, where = _source(name)
    if kind == "pretrained":
        return name, *read_pretrained_meta(where), False
    if kind == "official":
        return name, load_official(where).config, {}, False
    return name, preset(str(where)), {}, True


def load(
    name_or_path: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    vae_path: str | Path | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Load a model by name or path. Unknown names raise FieldError('model', ...)."""
    name = name_or_path or default_model()
    kind, where = _source(name)
    card: dict[str, Any] = {}
    if kind == "pretrained":
        network, card = load_pretrained(where)
    elif kind == "official":
        network = load_official(where)
    else:
        torch.manual_seed(seed)
        network = SkipDiT(preset(str(where)))
        log.warning(
            "model %s has RANDOM, untrained weights: output is noise-like, for smoke tests only",
            name,
        )
    vae = load_vae(vae_path) if vae_path is not None else None
    if vae is None and network.config.in_channels not in (1, 3):
        raise FieldError(
            "vae",
            f"model {name!r} samples {network.config.in_channels}-channel latents: "
            "give the local directory of its AutoencoderKL",
        )
    network = network.to(device=device, dtype=dtype)
    if vae is not None:
        vae = vae.to(device=device, dtype=dtype)
    guidance = float(card.get("default_guidance", DEFAULT_GUIDANCE))
    return LoadedModel(name, Pipeline(network, vae, guidance), card, kind == "random")
