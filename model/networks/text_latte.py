"""A text-conditioned Skip-Latte: Latte-T2V (arXiv 2401.03048) with Skip-DiT's long skips.

The structure of the official Skip-DiT text-to-video model (OpenSparseLLMs/Skip-DiT
``text-to-video/models/latte_t2v_skip.py``, ``LatteT2V_skip``, on diffusers 0.24): Skip-Latte's
alternating (spatial, temporal) block pairs, long skips between pairs, with PixArt-alpha's text
conditioning (``model.networks.text_dit``):

- spatial block (one frame's tokens): PixArt-alpha's block: self-attention, cross-attention to
  the projected text (unmodulated, unnormalised; a key padding mask), MLP, adaLN-single;
- temporal block (one spatial position across the frames): the same without cross-attention;
- adaLN-single: one ``t_block`` over the timestep embedding, shared by every block of both
  kinds, plus each block's own ``scale_shift_table``; the final layer reads the timestep
  embedding itself (PixArt's ``T2IFinalLayer``);
- the fixed sin-cos temporal embedding is added once, after the first spatial block (not at all
  for a single frame);
- long skips as in Skip-Latte: pairs ``0..P/2-1`` push their outputs; before pair
  ``p >= P/2`` the hidden state, in its spatial layout, is replaced by
  ``Linear(LayerNorm_fp32(cat[x, skip]))``, main path first: pair p feeds pair P-1-p.

Everything but the blocks and the conditioning is Skip-Latte's (units = pairs, ``embed``,
``run_blocks``, ``head``, ``forward``, ``capturing``, ``forward_cached``), so every cache policy
that runs on a Skip-Latte runs here. Text enters once per request, as in ``TextSkipDiT``:
``encode_text`` projects it and computes each spatial block's cross-attention keys and values.
A step's rows are frames ((B*F, T, D)) but the keys and values stay per sample: cross-attention
is per query token, so each sample's F*T tokens attend to its text at once (the official code
repeats the text F times; the result is the same). Official checkpoints load through
``model.networks.latte_t2v_checkpoint`` (their diffusers key names differ from these).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from model.networks import text_dit
from model.networks.skip_latte import LatteConfig, SkipLatte, sincos_pos_embed_1d
from model.networks.text_dit import (
    CrossAttention,
    TextCondition,
    TextDiTBlock,
    TextDiTConfig,
    TextSkipDiT,
)

# ----------------------------------------------------------------------------- conditioning


@dataclass(frozen=True)
class FrameTextCondition(TextCondition):
    """adaLN-single's conditioning of a video batch. ``repeat_interleave`` gives the timestep
    parts one row per frame (spatial blocks) or per spatial position (temporal blocks), as
    Skip-Latte repeats its class conditioning; the text keeps one row per sample."""

    def repeat_interleave(self, repeats: int, dim: int = 0) -> FrameTextCondition:
        t = self.t.repeat_interleave(repeats, dim)  # (B*repeats, D)
        return FrameTextCondition(t, self.t6.repeat_interleave(repeats, dim), self.text)

    def __getitem__(self, rows: Any) -> FrameTextCondition:
        return FrameTextCondition(self.t[rows], self.t6[rows], self.text[rows])


def temporal_embedding(dim: int, frames: int) -> torch.Tensor:
    """(1, F, D): Latte's fixed sin-cos embedding of the frame index; zero for one frame (the
    official forward adds it only when there are frames to tell apart)."""
    if frames == 1:
        return torch.zeros(1, 1, dim)
    return sincos_pos_embed_1d(dim, frames)[None]


# ----------------------------------------------------------------------------- blocks


class FrameCrossAttention(CrossAttention):
    """Cross-attention of frame rows (B*F, T, D) to their sample's text (B rows of keys and
    values): each sample's F*T tokens attend at once."""

    def forward(
        self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor
    ) -> torch.Tensor:
        rows, n, d = x.shape
        per_sample = x.reshape(kv[0].shape[0], -1, d)  # (B, F*T, D)
        return super().forward(per_sample, kv, mask).reshape(rows, n, d)  # (B*F, T, D)


class SpatialTextBlock(TextDiTBlock):
    """Latte-T2V's spatial block: PixArt-alpha's, its cross-attention over frame rows."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        self.cross_attn = FrameCrossAttention(hidden_size, num_heads)


class TemporalTextBlock(TextDiTBlock):
    """Latte-T2V's temporal block: PixArt-alpha's block without cross-attention (the official
    ``BasicTransformerBlock_``): self-attention over the frames and MLP, adaLN-single."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__(hidden_size, num_heads, mlp_ratio, cross=False)
        self.index = -1  # no text: no keys and values in a TextContext


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True)
class TextLatteConfig(LatteConfig, TextDiTConfig):
    """Skip-Latte's fields (``depth`` counts blocks: ``depth / 2`` pairs) and the text fields
    of ``TextDiTConfig``. Defaults: the official Latte-T2V (28 pairs of width 1152, 16 heads,
    16 frames of 64x64 latents, T5-XXL text of 120 tokens)."""

    depth: int = 56
    input_size: int = 64
    num_classes: int = 1
    class_dropout_prob: float = 0.0

    file_kind: ClassVar[str] = "text-video"
    conditioning: ClassVar[str] = "text"

    def _checks(self) -> dict[str, bool]:
        # rotary positions are built for one frame's token grid: images only, for now
        return super()._checks() | {"positions": self.positions == "absolute"}


class TextSkipLatte(SkipLatte, TextSkipDiT):
    """Latte-T2V / Latte-T2V-skip. x: (B, C, F, H, W); t: (B,) timesteps; y: a
    ``TextContext`` of B rows (``encode_text``). Blocks alternate: ``blocks[2p]`` spatial,
    ``blocks[2p+1]`` temporal."""

    block_cls: ClassVar[type[TextDiTBlock]] = TemporalTextBlock
    config: TextLatteConfig

    def __init__(self, config: TextLatteConfig):
        super().__init__(config)  # every block temporal: the spatial ones replace them here
        d = config.hidden_size
        for p in range(config.units):
            block = SpatialTextBlock(d, config.num_heads, config.mlp_ratio)
            block.index = p  # its keys and values in a TextContext
            block.attn.kernels = self.kernels
            self.blocks[2 * p] = block
        self.temp_embed.data.copy_(temporal_embedding(d, config.num_frames))
        self.init_backbone()  # the text network's initialisation, over the spatial blocks too
        self._init_text()

    @property
    def text_blocks(self) -> list[TextDiTBlock]:
        """The blocks that cross-attend to the text: the spatial ones, in order."""
        return [block for block in self.blocks if isinstance(block, SpatialTextBlock)]

    def condition(self, t: torch.Tensor, y: Any) -> FrameTextCondition:  # type: ignore[override]
        c = super().condition(t, y)
        return FrameTextCondition(c.t, c.t6, c.text)

    def modulated_input(self, tokens: torch.Tensor, c: Any) -> torch.Tensor:
        """Block 0's modulated input of tokens (B, F, T, D)."""
        block = self.text_blocks[0]
        shift, scale = block.modulation(c)[:2]  # (B, 1, D) each: *_msa
        return block.norm1(tokens) * (1 + scale[:, None]) + shift[:, None]


# ----------------------------------------------------------------------------- presets

PRESETS: dict[str, Callable[..., TextLatteConfig]] = {
    # The official Latte-T2V(-skip): 28 pairs, hidden 1152, 16 heads of 72, 4 latent channels
    # in, 8 out, 512x512 px (64x64 latents), 16 frames, T5-XXL (4096 wide, 120 tokens).
    "Latte-T2V-XL/2": lambda **kw: TextLatteConfig(**kw),
    # The text-to-video digits model: digits-t2i's network (6 spatial blocks, each now paired
    # with a temporal one: the image model's weights initialise the spatial blocks, Latte's
    # image initialisation) over 8 frames of its 32x32 canvas.
    "digits-t2v": lambda **kw: TextLatteConfig(
        **{
            **dataclasses.asdict(text_dit.PRESETS["digits-t2i"]()),
            "depth": 12,
            "num_frames": 8,
            **kw,
        }
    ),
    # Smallest useful shape, for tests: digits-t2i-tiny's over 4 frames, 4 pairs.
    "digits-t2v-tiny": lambda **kw: TextLatteConfig(
        **{
            **dataclasses.asdict(text_dit.PRESETS["digits-t2i-tiny"]()),
            "depth": 8,
            "num_frames": 4,
            **kw,
        }
    ),
}
