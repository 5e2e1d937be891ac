"""A text-conditioned Skip-DiT: the PixArt-alpha / Latte-T2V block with our long skips.

Each block: self-attention, cross-attention to the text tokens (a key padding mask), MLP, with
adaLN-single: one timestep MLP (``t_block``) shared by every block, plus a learned per-block
scale-shift table added to its output. The long skips and their LSC fusion are Skip-DiT's,
unchanged (``SkipDiT.fuse``), so every cache policy that runs on a Skip-DiT runs here.

Text enters once per request: ``encode_text`` projects the text encoder's output
(``y_embedder``, PixArt's caption projection) and computes every block's cross-attention keys and
values from it, into a ``TextContext``. Steps then pass that context where a class model passes
its labels (``forward(x, t, context)``); no step projects the text again, cached steps neither.
Module and parameter names follow PixArt-alpha's code (``t_block``, ``scale_shift_table``,
``cross_attn.q_linear`` / ``kv_linear``, ``y_embedder.y_proj``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from model.networks.conditions import TextContext
from model.networks.skip_dit import (
    Attention,
    Branch,
    DiTBlock,
    DiTConfig,
    Mlp,
    Record,
    SkipDiT,
)

# ----------------------------------------------------------------------------- conditioning


@dataclass(frozen=True)
class TextCondition:
    """adaLN-single's conditioning of a batch, row-aligned: the timestep embedding (B, D) the
    final layer reads, its shared projection ``t_block`` (B, 6D) every block reads, and the
    text. Indexing picks rows."""

    t: torch.Tensor
    t6: torch.Tensor
    text: TextContext

    def __getitem__(self, rows: Any) -> TextCondition:
        return TextCondition(self.t[rows], self.t6[rows], self.text[rows])


# ----------------------------------------------------------------------------- block


class CrossAttention(nn.Module):
    """Queries from the image tokens, keys and values from the text (computed once: ``kv``)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(hidden_size, hidden_size)
        self.kv_linear = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        # (1, T, D): positions the queries add (``add_query_positions``); none by default
        self.query_pos: torch.Tensor | None
        self.register_buffer("query_pos", None, persistent=False)

    def add_query_positions(self, table: torch.Tensor) -> None:
        """Queries read ``table`` (1, T, D), the absolute positions of a sample's T tokens (a
        network whose ``positions`` is "rope", where the tokens themselves carry none), so
        where the text's words go is decided by where a token is. A computed table: not in the
        state dict."""
        self.query_pos = table

    def kv(
        self, text: torch.Tensor, values: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected text (B, L, D) -> keys, values (B, H, L, Dh) each. ``values`` (B, L, D):
        the values are projected from these instead (a network whose ``text_values`` is
        "embeddings"); ``kv_linear``'s key and value halves are independent rows."""
        b, n, d = text.shape
        kv = self.kv_linear(text).reshape(b, n, 2, self.num_heads, d // self.num_heads)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        if values is not None:
            w_v, b_v = self.kv_linear.weight[d:], self.kv_linear.bias[d:]
            v = F.linear(values, w_v, b_v).reshape(b, n, self.num_heads, -1).transpose(1, 2)
        return k, v

    def forward(
        self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor
    ) -> torch.Tensor:
        """x (B, T, D), this block's keys and values, mask (B, L) -> (B, T, D)."""
        b, n, d = x.shape
        queries = x
        if self.query_pos is not None:  # (1, T, D): per frame when x holds F frames' tokens
            queries = x + self.query_pos.repeat(1, n // self.query_pos.shape[1], 1)
        q = self.q_linear(queries).reshape(b, n, self.num_heads, d // self.num_heads)
        q = q.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, *kv, attn_mask=mask[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class TextDiTBlock(DiTBlock):
    """PixArt-alpha's block: self-attention and MLP modulated by adaLN-single, cross-attention
    (unmodulated, unnormalised, as in PixArt) between them. The branches a cache may replace or
    record are ``attn`` and ``mlp``, as in a DiT block; cross-attention always runs."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, cross: bool = True):
        nn.Module.__init__(self)
        self.index = 0  # position in the network (its keys and values in a TextContext)
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        # cross=False: no cross-attention (Latte-T2V's temporal blocks)
        self.cross_attn = CrossAttention(hidden_size, num_heads) if cross else None
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def modulation(self, c: TextCondition) -> tuple[torch.Tensor, ...]:
        """shift/scale/gate of attention, then of the MLP: (B, 1, D) each."""
        b = c.t6.shape[0]
        table = self.scale_shift_table[None] + c.t6.reshape(b, 6, -1)  # (B, 6, D)
        return table.chunk(6, dim=1)

    def forward(  # type: ignore[override]  # a TextCondition, not a tensor c
        self,
        x: torch.Tensor,
        c: TextCondition,
        attn: Branch | None = None,
        mlp: Branch | None = None,
        record: Record | None = None,
    ) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)
        a = (attn or self.attn)(self.norm1(x) * (1 + scale_msa) + shift_msa)  # (B, T, D)
        if record is not None:
            record("attn", a)
        x = x + gate_msa * a
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, c.text.kv[self.index], c.text.mask)
        m = (mlp or self.mlp)(self.norm2(x) * (1 + scale_mlp) + shift_mlp)  # (B, T, D)
        if record is not None:
            record("mlp", m)
        return x + gate_mlp * m


class CaptionEmbedder(nn.Module):
    """The text encoder's hidden states (B, L, C_text) -> (B, L, D) (PixArt's ``y_proj``)."""

    def __init__(self, text_dim: int, hidden_size: int):
        super().__init__()
        self.y_proj = Mlp(text_dim, hidden_size, hidden_size)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.y_proj(text)


class T2IFinalLayer(nn.Module):
    """PixArt's final layer: norm, shift and scale from a learned table plus t, linear."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # (B, 1, D)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


# ----------------------------------------------------------------------------- model

TEXT_VALUES = ("hidden", "embeddings")  # TextDiTConfig.text_values
POSITIONS = ("absolute", "rope")  # TextDiTConfig.positions


@dataclass(frozen=True)
class TextDiTConfig(DiTConfig):
    """A text-conditioned Skip-DiT. ``text_dim``: the text encoder's hidden size;
    ``max_tokens``: prompts are tokenized to at most this many tokens; ``pooled_text``: the
    masked mean of the projected text tokens, through a linear layer (``text_pool``), is added
    to the timestep embedding, so the whole prompt also modulates every block (as Hunyuan-DiT
    adds its pooled T5 and SD3 its pooled CLIP; PixArt-alpha has none). The class fields of
    ``DiTConfig`` are unused: the unconditional branch of guidance is the empty prompt.

    ``positions``: "absolute" (DiT's and PixArt's): the fixed sin-cos table is added to the
    tokens. "rope": the tokens carry no position; self-attention rotates queries and keys by a
    2-D rotary embedding (relative positions, as Hunyuan-DiT's and FLUX's), and only the
    cross-attention queries add the absolute table: where the text puts a thing depends on
    absolute position, how it is drawn only on relative ones.

    ``text_values``: "hidden" (PixArt's): cross-attention keys and values both come from the
    encoder's last hidden states. "embeddings": keys from the last hidden states, values (and
    the pooled text) from the encoder's input token embeddings, which carry each word alone;
    the encoder's output is then its last hidden states and its input embeddings side by side
    (``text_width`` = 2 ``text_dim``): where a digit goes is bound through the keys, what is
    drawn there comes from the word alone.

    Both options are experiments on the digits model's held-out (digit, place) combinations;
    neither has helped there yet (docs/development.md, "Held-out combinations")."""

    text_dim: int = 4096
    max_tokens: int = 120
    pooled_text: bool = False
    text_values: str = "hidden"
    positions: str = "absolute"
    num_classes: int = 1
    class_dropout_prob: float = 0.0
    caption_dropout_prob: float = 0.1  # training: a caption is replaced by the empty prompt

    file_kind: ClassVar[str] = "text-image"
    conditioning: ClassVar[str] = "text"

    def _checks(self) -> dict[str, bool]:
        return super()._checks() | {
            "text_dim": self.text_dim >= 1,
            "max_tokens": self.max_tokens >= 1,
            "text_values": self.text_values in TEXT_VALUES,
            "positions": self.positions in POSITIONS,
        }

    @property
    def text_width(self) -> int:
        """Features of the text encoder's output ``encode_text`` takes (``text_values``)."""
        return self.text_dim * (2 if self.text_values == "embeddings" else 1)

    @property
    def has_null_class(self) -> bool:
        """Guidance is always possible: its unconditional branch is the empty prompt."""
        return True


class TextSkipDiT(SkipDiT):
    """Skip-DiT conditioned on text. x: (B, C, H, W); t: (B,) timesteps; y: a ``TextContext``
    of B rows (``encode_text``)."""

    block_cls: ClassVar[type[DiTBlock]] = TextDiTBlock
    config: TextDiTConfig

    def __init__(self, config: TextDiTConfig):
        super().__init__(config)
        d = config.hidden_size
        del self.y_embedder  # the class embedding: text instead (PixArt's name and key layout)
        self.y_embedder = CaptionEmbedder(config.text_dim, d)  # type: ignore[assignment]
        # text_values "embeddings": the values' projection of the input token embeddings
        self.v_embedder = (
            CaptionEmbedder(config.text_dim, d) if config.text_values == "embeddings" else None
        )
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.text_pool = nn.Linear(d, d) if config.pooled_text else None
        self.final_layer = T2IFinalLayer(  # type: ignore[assignment]  # PixArt's, t-modulated
            d, config.patch_size, config.out_channels
        )
        for i, block in enumerate(self.text_blocks):
            block.index = i
        self._init_text()
        if config.positions == "rope":
            self.use_rope()

    def use_rope(self) -> None:
        """``positions`` "rope": the tokens' absolute table moves to the cross-attention
        queries (``pos_embed`` zero: the tokens carry none) and every self-attention rotates
        by the 2-D rotary embedding of the token grid."""
        from diffusers.models.embeddings import get_2d_rotary_pos_embed

        grid = self.config.input_size // self.config.patch_size
        head_dim = self.config.hidden_size // self.config.num_heads
        cos, sin = get_2d_rotary_pos_embed(head_dim, ((0, 0), (grid, grid)), (grid, grid))
        table = self.pos_embed.detach().clone()  # (1, T, D): the sin-cos table
        for cross in self.cross_attentions:
            cross.add_query_positions(table)
        for block in self.text_blocks:
            block.attn.use_rope(cos.float(), sin.float())
        with torch.no_grad():
            self.pos_embed.zero_()

    def _init_weights(self) -> None:
        """The backbone's (``SkipDiT._init_weights``' shared part); the text parts: below."""
        self.init_backbone()

    def _init_text(self) -> None:
        """PixArt-alpha's: t_block small, cross-attention outputs and final layer zero, so each
        block starts as its self-attention and MLP on the timestep alone."""
        parts = (self.y_embedder, self.v_embedder, self.t_block, self.text_pool, self.final_layer)
        for module in parts:
            for m in module.modules() if module is not None else ():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
        t_linear = self.t_block[1]
        assert isinstance(t_linear, nn.Linear)
        nn.init.normal_(t_linear.weight, std=0.02)
        for cross in self.cross_attentions:
            nn.init.zeros_(cross.proj.weight)
            nn.init.zeros_(cross.proj.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def text_blocks(self) -> list[TextDiTBlock]:
        """``blocks``, typed."""
        return [block for block in self.blocks if isinstance(block, TextDiTBlock)]

    @property
    def cross_attentions(self) -> list[CrossAttention]:
        """The text blocks' cross-attentions, in ``TextContext.kv`` order."""
        return [b.cross_attn for b in self.text_blocks if b.cross_attn is not None]

    def encode_text(self, hidden: torch.Tensor, mask: torch.Tensor) -> TextContext:
        """The text encoder's output (B, L, ``text_width``) and mask (B, L) -> every block's
        keys and values (and the pooled text): the one place text is projected. Run once per
        request."""
        hidden = hidden.to(self.x_embedder.proj.weight.dtype)
        if hidden.shape[-1] != self.config.text_width:
            raise ValueError(
                f"text features {hidden.shape[-1]}, the network takes {self.config.text_width}"
            )
        text = self.y_embedder(hidden[..., : self.config.text_dim])  # (B, L, D)
        values = None
        if self.v_embedder is not None:
            values = self.v_embedder(hidden[..., self.config.text_dim :])  # (B, L, D)
        kv = tuple(cross.kv(text, values) for cross in self.cross_attentions)
        real = mask.to(torch.bool)
        pooled = None
        if self.text_pool is not None:
            pool = text if values is None else values
            weights = real.to(pool.dtype).unsqueeze(-1)  # (B, L, 1)
            mean = (pool * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, D)
            pooled = self.text_pool(mean)
        return TextContext(kv, real, pooled)

    def condition(self, t: torch.Tensor, y: Any) -> TextCondition:  # type: ignore[override]
        t_emb = self.t_embedder(t)  # (B, D)
        if y.pooled is not None:
            t_emb = t_emb + y.pooled
        return TextCondition(t_emb, self.t_block(t_emb), y)

    def head(self, x: torch.Tensor, c: Any) -> torch.Tensor:
        return self.unpatchify(self.final_layer(x, c.t))

    def modulated_input(self, tokens: torch.Tensor, c: Any) -> torch.Tensor:
        shift, scale = self.text_blocks[0].modulation(c)[:2]  # (B, 1, D) each: *_msa
        return self.text_blocks[0].norm1(tokens) * (1 + scale) + shift


# ----------------------------------------------------------------------------- presets

PRESETS: dict[str, Callable[..., TextDiTConfig]] = {
    # PixArt-alpha's transformer (XL/2, T5-XXL text, 120 tokens) with long skips.
    "PixArt-XL/2": lambda **kw: TextDiTConfig(
        **{"depth": 28, "hidden_size": 1152, "num_heads": 16, "learn_sigma": True, **kw}
    ),
    # The text-to-image digits model (skipdit train --preset digits-t2i): 32x32 pixels, 1
    # channel, patch 2 (256 tokens: a 16 px digit spans 8x8 tokens of 2x2 pixels, as in the
    # 16x16 class models; patch 4 left digits as speckled blobs after 2,000 steps), a small
    # jointly trained T5 encoder of width 128.
    "digits-t2i": lambda **kw: TextDiTConfig(
        **{
            "depth": 6,
            "hidden_size": 128,
            "num_heads": 4,
            "patch_size": 2,
            "input_size": 32,
            "in_channels": 1,
            "learn_sigma": False,
            "text_dim": 128,
            "max_tokens": 24,
            "pooled_text": True,
            **kw,
        }
    ),
    # The same network with PixArt-alpha's conditioning only (text through cross-attention, no
    # pooled text): the first stage of the staged digits-t2i runs (docs/development.md).
    "digits-t2i-pixart": lambda **kw: PRESETS["digits-t2i"](**{"pooled_text": False, **kw}),
    # The digits network with values from the input token embeddings (``text_values``).
    "digits-t2i-factored": lambda **kw: PRESETS["digits-t2i"](
        **{"text_values": "embeddings", **kw}
    ),
    # Factored values and rotary positions (``positions``): drawing the same anywhere.
    "digits-t2i-rope": lambda **kw: PRESETS["digits-t2i"](
        **{"text_values": "embeddings", "positions": "rope", **kw}
    ),
    # Smallest useful shape, for tests: the digits canvas in 4x4 patches of 8 pixels.
    "digits-t2i-tiny": lambda **kw: TextDiTConfig(
        **{
            "depth": 4,
            "hidden_size": 32,
            "num_heads": 2,
            "patch_size": 8,
            "input_size": 32,
            "in_channels": 1,
            "learn_sigma": False,
            "text_dim": 16,
            "max_tokens": 8,
            "pooled_text": True,
            **kw,
        }
    ),
}
