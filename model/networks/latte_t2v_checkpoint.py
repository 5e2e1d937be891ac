"""The official Latte-T2V(-skip) checkpoint layout, loaded strictly into ``TextSkipLatte``.

The official Skip-DiT text-to-video weights (``Latte-skip.pt``: ``{model, ema}``, from
OpenSparseLLMs/Skip-DiT ``text-to-video/models/latte_t2v_skip.py`` on diffusers 0.24) use
diffusers' names, where ours are PixArt-alpha's and a fused qkv:

- ``pos_embed.proj`` (patch conv), ``adaln_single.emb.timestep_embedder.linear_1/_2`` (timestep
  MLP), ``adaln_single.linear`` (the shared ``t_block``), ``caption_projection.linear_1/_2``;
- ``transformer_blocks.{p}`` (spatial) and ``temporal_transformer_blocks.{p}``: ``attn1.to_q``,
  ``to_k``, ``to_v``, ``to_out.0`` (self-attention), spatial only ``attn2.*`` (cross-attention,
  keys and values from the projected text), ``ff.net.0.proj`` / ``ff.net.2`` (tanh-GELU MLP),
  ``scale_shift_table`` (6, D); LayerNorms without affine (``norm_elementwise_affine=False``);
- ``skip_norms.{j}`` (2D LayerNorm, fp32), ``skip_linears.{j}.linear`` (2D -> D);
- ``scale_shift_table`` (2, D) and ``proj_out`` (the final layer).

The 2-D and temporal sin-cos embeddings are not in the file (non-persistent buffers there):
they are computed here, as the official code does, for the latent size and frame count the
caller gives (the file cannot tell them). ``caption_projection.y_embedding`` (diffusers <= 0.25
kept the training-time null caption, (120, C_text), as a buffer; unused by the forward) is
accepted and dropped; it gives ``max_tokens``. Every other key must be there with its shape:
one error names every missing, unexpected and mis-shaped key, in the file's names.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from model.networks.checkpoint import CheckpointError, check_keys, official_state_dict
from model.networks.skip_dit import sincos_pos_embed_2d
from model.networks.text_latte import (
    PRESETS,
    TextLatteConfig,
    TextSkipLatte,
    temporal_embedding,
)

# Keys the official file may hold that no parameter of ours takes (see the module docstring).
DROPPED = ("caption_projection.y_embedding",)
OFFICIAL = "Latte-T2V"  # the presets of official models (not this project's digits ones)
# Ours that the file does not hold: fixed sin-cos tables, computed.
COMPUTED = ("pos_embed", "temp_embed")


def is_official_t2v(state: dict[str, Any]) -> bool:
    """Whether a state dict is in the official Latte-T2V layout (diffusers names)."""
    return "adaln_single.linear.weight" in state or any(
        k.startswith("temporal_transformer_blocks.") for k in state
    )


def _linear(ours: str, theirs: str) -> dict[str, tuple[str, ...]]:
    return {f"{ours}.{p}": (f"{theirs}.{p}",) for p in ("weight", "bias")}


def _fused(ours: str, theirs: list[str]) -> dict[str, tuple[str, ...]]:
    """One linear of ours whose output rows are the official linears' rows, in order."""
    return {f"{ours}.{p}": tuple(f"{t}.{p}" for t in theirs) for p in ("weight", "bias")}


def _block(ours: str, theirs: str, cross: bool) -> dict[str, tuple[str, ...]]:
    names = {
        f"{ours}.scale_shift_table": (f"{theirs}.scale_shift_table",),
        **_fused(f"{ours}.attn.qkv", [f"{theirs}.attn1.to_{n}" for n in "qkv"]),
        **_linear(f"{ours}.attn.proj", f"{theirs}.attn1.to_out.0"),
        **_linear(f"{ours}.mlp.fc1", f"{theirs}.ff.net.0.proj"),
        **_linear(f"{ours}.mlp.fc2", f"{theirs}.ff.net.2"),
    }
    if cross:
        names |= {
            **_linear(f"{ours}.cross_attn.q_linear", f"{theirs}.attn2.to_q"),
            **_fused(f"{ours}.cross_attn.kv_linear", [f"{theirs}.attn2.to_{n}" for n in "kv"]),
            **_linear(f"{ours}.cross_attn.proj", f"{theirs}.attn2.to_out.0"),
        }
    return names


def official_names(config: TextLatteConfig) -> dict[str, tuple[str, ...]]:
    """Each of our parameter names -> the official keys it is made of (concatenated along dim
    0 where there are several), for every parameter but the ``COMPUTED`` tables."""
    names = {
        **_linear("x_embedder.proj", "pos_embed.proj"),
        **_linear("t_embedder.mlp.0", "adaln_single.emb.timestep_embedder.linear_1"),
        **_linear("t_embedder.mlp.2", "adaln_single.emb.timestep_embedder.linear_2"),
        **_linear("t_block.1", "adaln_single.linear"),
        **_linear("y_embedder.y_proj.fc1", "caption_projection.linear_1"),
        **_linear("y_embedder.y_proj.fc2", "caption_projection.linear_2"),
        "final_layer.scale_shift_table": ("scale_shift_table",),
        **_linear("final_layer.linear", "proj_out"),
    }
    for p in range(config.units):
        names |= _block(f"blocks.{2 * p}", f"transformer_blocks.{p}", cross=True)
        names |= _block(f"blocks.{2 * p + 1}", f"temporal_transformer_blocks.{p}", cross=False)
    if config.long_skip:
        for j in range(config.units // 2):
            names |= _linear(f"skip_norms.{j}", f"skip_norms.{j}")
            names |= _linear(f"skip_linears.{j}.linear", f"skip_linears.{j}.linear")
    return names


def official_config(
    state: dict[str, torch.Tensor],
    num_heads: int | None = None,
    input_size: int | None = None,
    num_frames: int | None = None,
) -> TextLatteConfig:
    """The config read off an official state dict's shapes. Heads, latent size and frames are
    not in the shapes: given, else the preset's of the same depth and width (heads) or the
    official defaults (64x64 latents, 16 frames)."""
    try:
        proj = state["pos_embed.proj.weight"]  # (D, C, p, p)
        out = state["proj_out.weight"]  # (p*p*C_out, D)
        caption = state["caption_projection.linear_1.weight"]  # (D, C_text)
        fc1 = state["transformer_blocks.0.ff.net.0.proj.weight"]  # (D*ratio, D)
    except KeyError as e:
        raise CheckpointError(f"not a Latte-T2V state dict: missing key {e.args[0]!r}") from None
    hidden, channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    pattern = r"(?:temporal_)?transformer_blocks\.(\d+)\."
    pairs = 1 + max(int(m.group(1)) for k in state if (m := re.match(pattern, k)))
    defaults = TextLatteConfig()
    heads = num_heads or next(
        (
            c.num_heads
            for name, make in PRESETS.items()
            if name.startswith(OFFICIAL) and ((c := make()).units, c.hidden_size) == (pairs, hidden)
        ),
        None,
    )
    if heads is None:
        raise CheckpointError(
            f"num_heads: no Latte-T2V preset has {pairs} block pairs and hidden size "
            f"{hidden}; pass num_heads"
        )
    null_caption = state.get("caption_projection.y_embedding")  # (max_tokens, C_text)
    return TextLatteConfig(
        depth=2 * pairs,
        hidden_size=hidden,
        num_heads=heads,
        patch_size=patch,
        mlp_ratio=fc1.shape[0] / hidden,
        input_size=input_size or defaults.input_size,
        in_channels=channels,
        learn_sigma=out.shape[0] == 2 * channels * patch * patch,
        long_skip=any(k.startswith("skip_norms.") for k in state),
        num_frames=num_frames or defaults.num_frames,
        text_dim=caption.shape[1],
        max_tokens=defaults.max_tokens if null_caption is None else null_caption.shape[0],
    )


def convert(state: dict[str, torch.Tensor], config: TextLatteConfig) -> dict[str, torch.Tensor]:
    """An official state dict -> ours for ``config``, strictly: raises CheckpointError naming
    every missing, unexpected and mis-shaped official key."""
    names = official_names(config)
    with torch.device("meta"):
        expected = TextSkipLatte(config).state_dict()  # our shapes, no memory
    shapes: dict[str, tuple[int, ...]] = {}
    for name, theirs in names.items():
        rows, *rest = expected[name].shape
        for key in theirs:  # fused: equal shares of our rows
            shapes[key] = (rows // len(theirs), *rest)
    check_keys(state, shapes, "Latte-T2V checkpoint", ignored=DROPPED)
    ours = {
        name: state[theirs[0]] if len(theirs) == 1 else torch.cat([state[k] for k in theirs])
        for name, theirs in names.items()
    }
    d, grid = config.hidden_size, config.input_size // config.patch_size
    dtype = state["pos_embed.proj.weight"].dtype
    ours["pos_embed"] = sincos_pos_embed_2d(d, grid)[None].to(dtype)  # (1, T, D)
    ours["temp_embed"] = temporal_embedding(d, config.num_frames).to(dtype)  # (1, F, D)
    return ours


def load_official_t2v(
    source: str | Path | dict[str, torch.Tensor],
    num_heads: int | None = None,
    input_size: int | None = None,
    num_frames: int | None = None,
) -> TextSkipLatte:
    """An official Latte-T2V(-skip) file (``{model, ema}``: the EMA weights; or a plain state
    dict) or state dict as a ``TextSkipLatte`` in eval mode. Built on the meta device and
    assigned: the file's tensors (memory-mapped) become the parameters, except the fused
    projections (qkv, kv), which are new tensors."""
    state = official_state_dict(source) if isinstance(source, str | Path) else source
    if not is_official_t2v(state):
        raise CheckpointError(
            "not a Latte-T2V state dict: no 'adaln_single.linear.weight' and no "
            "'temporal_transformer_blocks.*' keys"
        )
    config = official_config(state, num_heads, input_size, num_frames)
    ours = convert(state, config)
    with torch.device("meta"):
        model = TextSkipLatte(config)
    model.load_state_dict(ours, strict=True, assign=True)
    return model.eval()
