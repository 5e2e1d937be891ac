"""Loading and saving weights, strictly.

Formats read:
- our own directory: ``config.json`` (the network's kind, ``image``, ``text-image`` or
  ``video``, its config and a model card; a file without ``kind`` is an image model) +
  ``model.safetensors``;
- the official DiT release (``DiT-XL-2-256x256.pt``): a plain state dict;
- the official Skip-DiT release (``DiT-XL-2-skip.pt``): ``{model, ema, opt, args}``; ``ema`` is
  used for inference;
- the official class-to-video Latte / Skip-Latte weights: a plain state dict (or ``{ema, ...}``)
  in the official key layout, told from an image DiT by its ``temp_embed``;
- the official text-to-video Latte-T2V(-skip) weights (diffusers key names): recognised here,
  loaded by ``model.networks.latte_t2v_checkpoint.load_official_t2v``.
Official files are memory-mapped: only the tensors used are ever read (the EMA weights of a
training checkpoint, none at all to describe one). Their state dicts carry no config: it is read
off the tensor shapes (heads from the preset with the same depth and width, or given), plus the
official sampler's guidance. Every load compares key sets and shapes and raises with the names
that differ. Latent models decode with a diffusers AutoencoderKL from a local directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import zipfile
from collections.abc import Collection
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model.networks.presets import CONFIGS, PRESETS, Config, build
from model.networks.skip_dit import DiTConfig, SkipDiT
from model.networks.skip_latte import LatteConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# The official samplers guide eps channels 0-2 of the 4 latent channels only (facebookresearch/DiT
# and Skip-DiT ``forward_with_cfg``: "for exact reproducibility").
OFFICIAL_GUIDED_CHANNELS = 3
VAE_DOWNSCALE = 8  # sd-vae-ft-mse: image pixels per latent pixel, along each side


_M = TypeVar("_M", bound=nn.Module)


class CheckpointError(ValueError):
    """A checkpoint does not fit the network; the message names the keys that differ."""


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    check_keys(state, {k: tuple(v.shape) for k, v in expected.items()}, "checkpoint")


def check_keys(
    state: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, ...]],
    what: str,
    ignored: Collection[str] = (),
) -> None:
    """Raise CheckpointError naming every missing, unexpected (not in ``ignored``) and
    mis-shaped key of ``state`` against the expected ``shapes``; ``what`` starts the message."""
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes) - set(ignored))
    misshaped = [
        f"{k}: checkpoint {tuple(state[k].shape)} != model {shapes[k]}"
        for k in sorted(set(shapes) & set(state))
        if tuple(state[k].shape) != shapes[k]
    ]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if misshaped:
            parts.append(f"mis-shaped keys {misshaped}")
        raise CheckpointError(f"{what} does not match the model: " + "; ".join(parts))


def load_state(model: _M, state: dict[str, torch.Tensor]) -> _M:
    check_state_dict(model, state)
    model.load_state_dict(state, strict=True)
    return model


# ----------------------------------------------------------------------------- our format


def save_pretrained(
    model: SkipDiT, directory: str | Path, card: dict[str, Any] | None = None
) -> Path:
    """Write ``config.json`` (config + card) and ``model.safetensors`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "kind": model.config.file_kind,
        "config": dataclasses.asdict(model.config),
        "card": card or {},
    }
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, directory / WEIGHTS_FILE)
    return directory


def read_pretrained_meta(directory: str | Path) -> tuple[Config, dict[str, Any]]:
    meta = json.loads((Path(directory) / CONFIG_FILE).read_text())
    kind = meta.get("kind", DiTConfig.kind)  # written before video models existed: an image
    if kind not in CONFIGS:
        raise CheckpointError(f"{directory}/{CONFIG_FILE}: unknown kind {kind!r}")
    config_cls = CONFIGS[kind]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(meta["config"]) - fields)
    if unknown:
        raise CheckpointError(f"{directory}/{CONFIG_FILE}: unknown config fields {unknown}")
    return config_cls(**meta["config"]), meta.get("card", {})


def load_pretrained(directory: str | Path) -> tuple[SkipDiT, dict[str, Any]]:
    """Our directory format -> (model, card)."""
    config, card = read_pretrained_meta(directory)
    model = load_state(build(config), load_file(Path(directory) / WEIGHTS_FILE))
    return model, card


# ----------------------------------------------------------------------------- official format


def _heads_for(kind: str, depth: int, hidden: int) -> int | None:
    for make in PRESETS.values():
        c = make()
        if (c.kind, c.depth, c.hidden_size) == (kind, depth, hidden):
            return c.num_heads
    return None


def infer_config(state: dict[str, torch.Tensor], num_heads: int | None = None) -> Config:
    """Read a DiTConfig (a LatteConfig where there is a ``temp_embed``: (1, F, D)) off an
    official state dict's shapes."""
    if "adaln_single.linear.weight" in state:
        raise CheckpointError(
            "a Latte-T2V (text-to-video) state dict: load it with "
            "model.networks.latte_t2v_checkpoint.load_official_t2v"
        )
    try:
        proj = state["x_embedder.proj.weight"]  # (D, C, p, p)
        tokens = state["pos_embed"].shape[1]
        table = state["y_embedder.embedding_table.weight"]  # (classes + 1, D)
        final = state["final_layer.linear.weight"]  # (p*p*C_out, D)
        fc1 = state["blocks.0.mlp.fc1.weight"]  # (D*ratio, D)
    except KeyError as e:
        raise CheckpointError(
            f"not a class-conditional DiT or Latte state dict: missing key {e.args[0]!r}"
        ) from None
    hidden, channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    video = "temp_embed" in state
    kind = LatteConfig.kind if video else DiTConfig.kind
    heads = num_heads or _heads_for(kind, depth, hidden)
    if heads is None:
        raise CheckpointError(
            f"num_heads: no {kind} preset has depth {depth} and hidden size {hidden}; "
            "pass num_heads"
        )
    fields: dict[str, Any] = {
        "depth": depth,
        "hidden_size": hidden,
        "num_heads": heads,
        "patch_size": patch,
        "mlp_ratio": fc1.shape[0] / hidden,
        "input_size": round(tokens**0.5) * patch,
        "in_channels": channels,
        "num_classes": table.shape[0] - 1,  # the official table always has the null-class row
        "learn_sigma": final.shape[0] == 2 * channels * patch * patch,
        "long_skip": any(k.startswith("skip_norms.") for k in state),
    }
    if video:
        return LatteConfig(**fields, num_frames=state["temp_embed"].shape[1])
    return DiTConfig(**fields)


def official_config(state: dict[str, torch.Tensor], num_heads: int | None = None) -> Config:
    """The config of an official release: its shapes plus the official sampler's guidance
    (Latte's sampler guides all channels: ``forward_with_cfg`` mixes ``model_out[:, :, :4]``)."""
    config = infer_config(state, num_heads)
    if config.kind == DiTConfig.kind and config.in_channels > OFFICIAL_GUIDED_CHANNELS:
        config = config.replace(guided_channels=OFFICIAL_GUIDED_CHANNELS)
    return config


def official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The inference weights of an official DiT or Skip-DiT ``.pt`` file, memory-mapped.

    Nothing is read until used: the tensors are views of a private (copy-on-write) mapping of
    the file, which lives as long as any of them. Of a training checkpoint ``{model, ema, opt,
    args}`` only ``ema`` is kept; the other entries are mapped but never touched. A dict with
    no ``ema`` but a ``model`` or ``state_dict`` state dict gives that one.
    """
    path = Path(path)
    mmap = zipfile.is_zipfile(path)  # the legacy (pre-1.6) format cannot be mapped: read whole
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    if isinstance(obj, dict) and "ema" in obj:  # training checkpoint: {model, ema, opt, args}
        return obj["ema"]
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            return obj[wrapper]
    raise CheckpointError(
        f"{path}: neither a state dict nor a dict with an 'ema', 'model' or 'state_dict' one"
    )


def load_official(path: str | Path, num_heads: int | None = None) -> SkipDiT:
    """An official ``.pt`` as a network whose parameters are the file's mapped EMA tensors.

    Built on the meta device and assigned, not copied: resident memory grows only by the EMA
    pages as they are read, once. Moving the network to another device or dtype copies it and
    releases the mapping.
    """
    state = official_state_dict(path)
    with torch.device("meta"):
        model = build(official_config(state, num_heads))  # shapes only: no memory, no init
    check_state_dict(model, state)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def load_vae(directory: str | Path) -> Any:
    """A diffusers AutoencoderKL (e.g. sd-vae-ft-mse) from a local directory; never downloads."""
    from diffusers import AutoencoderKL

    if not Path(directory).is_dir():
        raise CheckpointError(f"vae: {directory} is not a directory")
    return AutoencoderKL.from_pretrained(str(directory), local_files_only=True)
