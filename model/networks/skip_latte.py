"""Skip-Latte: a Latte class-to-video DiT (arXiv 2401.03048) with Skip-DiT's long skips.

Read top-down: config, model, presets. Blocks, embedders, long-skip fusion and the final layer
are the image network's (``model.networks.skip_dit``); parameter names follow the official Latte /
Skip-DiT class-to-video code (Vchitect/Latte ``models/latte.py``, OpenSparseLLMs/Skip-DiT
``class-to-video/models/latte.py``) so that official checkpoints load key for key: the image
DiT's keys plus ``temp_embed``.

Latte's blocks alternate: block 2p attends over the tokens of one frame (spatial), block 2p+1
over one spatial position across the frames (temporal); the fixed sin-cos temporal embedding is
added once, after the first spatial block. The unit of the long skips is the (spatial, temporal)
pair: pairs ``0..P/2-1`` push their outputs, and before pair ``p >= P/2`` the hidden state, in
its spatial layout, is replaced by ``Linear(LayerNorm_fp32(cat[x, skip]))`` (main path first),
so pair p feeds pair P-1-p. Skip-Cache counts K in pairs (``config.units``).

Layouts. Input x (B, C, F, H, W), output (B, C_out, F, H, W): channel dim 1 as for images (the
official code takes (B, F, C, H, W)). Between pairs, and wherever a cache policy sees a hidden
state (captures, deep features, ``run_blocks``' input and output), it is batch-first
(B, F, T, D), T tokens per frame. Branch outputs (captured or overridden) are batch-first too:
(B, F, T, D) for spatial blocks, (B, T, F, D) for temporal ones.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Iterable
from dataclasses import dataclass
from typing import ClassVar, cast

import torch
from torch import nn

from model.networks.conditions import Condition
from model.networks.skip_dit import (
    Branch,
    BranchOverride,
    DiTBlock,
    DiTConfig,
    SkipDiT,
    SkipLinear,
    recording,
)

# ----------------------------------------------------------------------------- helpers


def sincos_pos_embed_1d(dim: int, length: int) -> torch.Tensor:
    """Fixed 1-D sine-cosine embedding of positions 0..length-1, (length, dim); sines first
    (MAE's ``get_1d_sincos_pos_embed_from_grid``, Latte's temporal embedding)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (dim/2,)
    out = torch.arange(length, dtype=torch.float64)[:, None] * omega  # (length, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def _flat(module: Callable[[torch.Tensor], torch.Tensor]) -> Branch:
    """A block's branch module seen batch-first: (B, L, N, D) -> (B, L, N, D)."""
    return lambda h: module(h.flatten(0, 1)).unflatten(0, h.shape[:2])


def _batch_first(branch: Branch, batch: int) -> Branch:
    """A batch-first branch as the block calls it: (B*L, N, D) -> (B*L, N, D)."""
    return lambda h: branch(h.unflatten(0, (batch, -1))).flatten(0, 1)


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class LatteConfig(DiTConfig):
    """The image config's fields (Latte-XL/2 defaults) plus the frame count. Passed whole;
    saved as config.json (with ``kind: video``). ``depth`` counts blocks, as Latte does:
    spatial and temporal alternating, ``depth / 2`` (spatial, temporal) pairs."""

    input_size: int = 32  # spatial size of one frame of the model input (latent or pixel)
    num_classes: int = 101  # UCF-101: the official class-to-video release
    num_frames: int = 16  # type: ignore[misc]  # a field here, 1 as a class constant for images
    # guided_channels None: Latte's sampler guides all 4 eps channels.

    kind: ClassVar[str] = "video"
    file_kind: ClassVar[str] = "video"

    def _checks(self) -> dict[str, bool]:
        # DyDiT's routers are built and trained for image blocks only.
        checks = super()._checks() | {
            "num_frames": self.num_frames >= 1,
            "dynamic": not self.dynamic,
        }
        if self.long_skip:  # pairs pair up: an even number of them
            checks["depth"] = self.depth >= 4 and self.depth % 4 == 0
        return checks

    @property
    def frame_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Tokens per sample (the batch token budget counts these): frames x tokens per frame."""
        return self.num_frames * self.frame_tokens

    @property
    def units(self) -> int:
        """(spatial, temporal) pairs: what long skips pair and Skip-Cache's K counts."""
        return self.depth // 2

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One sample: (C, F, H, W)."""
        return (self.in_channels, self.num_frames, self.input_size, self.input_size)

    @property
    def hidden_shape(self) -> tuple[int, ...]:
        """One sample's hidden state between pairs: (F, T, D)."""
        return (self.num_frames, self.frame_tokens, self.hidden_size)


# ----------------------------------------------------------------------------- model


class SkipLatte(SkipDiT):
    """Latte / Skip-Latte. x: (B, C, F, H, W); t: (B,) timesteps; y: (B,) labels.

    The image network's ``forward``/``forward_cached``/``fuse``/``use_kernels`` run unchanged
    over units (pairs); this class supplies the video ``embed``, ``run_blocks`` and ``head``."""

    config: LatteConfig

    def __init__(self, config: LatteConfig):
        super().__init__(config)  # same fields, units = pairs
        d = config.hidden_size
        temporal = sincos_pos_embed_1d(d, config.num_frames)[None]  # (1, F, D)
        self.temp_embed = nn.Parameter(temporal, requires_grad=False)
        if config.long_skip:  # official Skip-Latte: its DiT init covers the skip linears too
            for skip in cast(Iterable[SkipLinear], self.skip_linears):
                nn.init.xavier_uniform_(skip.linear.weight)
                nn.init.zeros_(skip.linear.bias)

    # -- pieces

    def embed(
        self, x: torch.Tensor, t: torch.Tensor, y: Condition
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, F, H, W) -> tokens (B, F, T, D), conditioning c (B, D)."""
        b, ch, f, hh, ww = x.shape
        frames = x.transpose(1, 2).reshape(b * f, ch, hh, ww)  # (B*F, C, H, W)
        tokens = self.x_embedder(frames) + self.pos_embed  # (B*F, T, D)
        tokens = tokens.reshape(b, f, *tokens.shape[1:]).contiguous()  # (B, F, T, D)
        return tokens, self.condition(t, y)  # c: (B, D)

    def head(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Final layer and unpatchify per frame: (B, F, T, D) -> (B, C_out, F, H, W)."""
        b, f = x.shape[:2]
        frames = super().head(x.flatten(0, 1), c.repeat_interleave(f, 0))  # (B*F, C_out, H, W)
        return frames.unflatten(0, (b, f)).transpose(1, 2)  # (B, C_out, F, H, W)

    def _branches(
        self,
        k: int,
        batch: int,
        capture: Collection[Hashable],
        captured: dict[Hashable, torch.Tensor] | None,
        branches: BranchOverride | None,
    ) -> tuple[Branch | None, Branch | None]:
        """Block k's branch replacements as the block calls them (flat rows), from the
        batch-first overrides and captures policies speak."""
        out: list[Branch | None] = []
        for name, override in zip(
            ("attn", "mlp"), branches(k) if branches is not None else (None, None), strict=True
        ):
            if (name, k) in capture:
                assert captured is not None, "capture keys come with a captured dict"
                module = getattr(self.blocks[k], name)
                override = recording(override or _flat(module), captured, (name, k))
            out.append(_batch_first(override, batch) if override is not None else None)
        return out[0], out[1]

    def run_blocks(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        blocks: Iterable[int],
        skips: list[torch.Tensor],
        capture: Collection[Hashable] = (),
        captured: dict[Hashable, torch.Tensor] | None = None,
        branches: BranchOverride | None = None,
    ) -> torch.Tensor:
        """Run the given pairs in order on x (B, F, T, D), pushing/popping long skips.

        ``capture`` keys: ``p`` records the hidden state entering pair p (before its fusion),
        (B, F, T, D); ``("attn", k)`` / ``("mlp", k)`` block k's branch outputs, batch-first.
        ``branches(k)`` may replace block k's branches (batch-first in and out)."""
        b, f, n, d = x.shape
        c_spatial = c.repeat_interleave(f, 0)  # (B*F, D): one row per frame
        c_temporal = c.repeat_interleave(n, 0)  # (B*T, D): one row per spatial position
        half = self.config.units // 2
        for p in blocks:
            if p in capture:
                assert captured is not None, "capture keys come with a captured dict"
                captured[p] = x
            if self.config.long_skip and p >= half:
                rows = self.fuse(p, x.flatten(0, 1), skips.pop().flatten(0, 1))  # (B*F, T, D)
            else:
                rows = x.flatten(0, 1)  # (B*F, T, D)
            attn, mlp = self._branches(2 * p, b, capture, captured, branches)
            rows = self.blocks[2 * p](rows, c_spatial, attn, mlp)  # (B*F, T, D)
            rows = rows.view(b, f, n, d).transpose(1, 2).reshape(b * n, f, d)  # (B*T, F, D)
            if p == 0:
                rows = rows + self.temp_embed  # (B*T, F, D)
            attn, mlp = self._branches(2 * p + 1, b, capture, captured, branches)
            rows = self.blocks[2 * p + 1](rows, c_temporal, attn, mlp)  # (B*T, F, D)
            x = rows.view(b, n, f, d).transpose(1, 2).contiguous()  # (B, F, T, D)
            if self.config.long_skip and p < half:
                skips.append(x)
        return x


# ----------------------------------------------------------------------------- image init


BLOCK_PARTS = ("blocks", "skip_norms", "skip_linears")  # what init_from_image maps block-wise
# Config fields an image network must share with the video network it initialises (text
# networks: also their text fields).
SHARED = ("hidden_size", "num_heads", "patch_size", "mlp_ratio", "input_size", "in_channels",
          "num_classes", "learn_sigma", "long_skip")  # fmt: skip
TEXT_SHARED = ("text_dim", "max_tokens", "pooled_text", "text_values")


def init_from_image(video: SkipLatte, image: SkipDiT) -> SkipLatte:
    """Latte's recipe: start a video network from a trained image network of the same width.

    Every module outside the blocks (embedders, final layer, a text network's caption
    projection, ``t_block`` and pooling) and the positional embedding are copied; spatial block
    of pair p is an image block: the first P/2 pairs take the image's first P/2 blocks, the
    last P/2 pairs its last P/2 blocks, so each long skip still joins the blocks it joined in
    the image network (pair p pops what pair P-1-p pushed, as image block D-1-k pops block k)
    and takes that image skip's fusion. Temporal blocks start as the identity, so at step 0
    every frame is the image model's sample: adaLN-Zero blocks by their init, adaLN-single
    ones (text networks, whose gates come from a learned table) by zeroing their attention's
    and MLP's output projections. In place; returns video."""
    v, m = video.config, image.config
    fields = SHARED + (TEXT_SHARED if v.conditioning == "text" else ())
    differ = [f for f in fields if getattr(v, f) != getattr(m, f, None)]
    if image.config.kind != "image" or m.conditioning != v.conditioning or differ:
        raise ValueError(f"init from image: the image model must match the video's {differ}")
    half, depth = v.units // 2, m.depth
    if half > depth // 2:
        raise ValueError(
            f"init from image: {v.units} pairs need an image model of depth >= {v.units}"
        )
    blocks = [*range(half), *range(depth - half, depth)]  # image block of each spatial block
    with torch.no_grad():
        for name, module in image.named_children():
            if name not in BLOCK_PARTS:
                getattr(video, name).load_state_dict(module.state_dict())
        video.pos_embed.copy_(image.pos_embed)
        for p, k in enumerate(blocks):
            video.blocks[2 * p].load_state_dict(image.blocks[k].state_dict())
            temporal = cast(DiTBlock, video.blocks[2 * p + 1])
            if not hasattr(temporal, "adaLN_modulation"):
                for out in (temporal.attn.proj, temporal.mlp.fc2):
                    nn.init.zeros_(out.weight)
                    nn.init.zeros_(out.bias)
        if v.long_skip:
            for j, k in enumerate(blocks[half:]):
                source = k - depth // 2  # the image block's fusion
                video.skip_norms[j].load_state_dict(image.skip_norms[source].state_dict())
                video.skip_linears[j].load_state_dict(image.skip_linears[source].state_dict())
    return video


def start_video(video: SkipLatte, start: SkipDiT) -> SkipLatte:
    """A video network's start from a trained network: an image network's by Latte's recipe
    (``init_from_image``), or a video network of the same config carried on as it is.
    ValueError for a video network of another config. In place; returns video."""
    if start.config.kind != "video":
        return init_from_image(video, start)
    if start.config != video.config:
        raise ValueError("a video model of another network than the preset's")
    video.load_state_dict(start.state_dict())
    return video


# ----------------------------------------------------------------------------- presets

PRESETS: dict[str, Callable[..., LatteConfig]] = {
    # Latte-XL/2 (official ``Latte_XL_2``): 28 blocks = 14 pairs, 16 frames of 32x32 latents.
    "Latte-XL/2": lambda **kw: LatteConfig(**kw),
    # Pixel-space moving-digits video model (1 channel, 10 classes) shipped by this project.
    "digits-video-small": lambda **kw: LatteConfig(
        **{
            "depth": 8,
            "hidden_size": 192,
            "num_heads": 6,
            "input_size": 16,
            "num_frames": 8,
            "in_channels": 1,
            "num_classes": 10,
            "learn_sigma": False,
            **kw,
        }
    ),
    # Small enough for tests, deep enough that Skip-Cache has a choice: 4 pairs, 4 frames of 8x8.
    "digits-video-tiny": lambda **kw: LatteConfig(
        **{
            "depth": 8,
            "hidden_size": 32,
            "num_heads": 2,
            "input_size": 8,
            "num_frames": 4,
            "in_channels": 1,
            "num_classes": 10,
            "learn_sigma": False,
            **kw,
        }
    ),
}
