"""Hunyuan-DiT (diffusers' ``HunyuanDiT2DModel``) as a network our cache policies run on.

Hunyuan-DiT already has long skips: of its D blocks, blocks ``0..D/2-2`` push their outputs,
blocks ``D/2-1`` and ``D/2`` neither push nor pop, and each block ``k > D/2`` first replaces its
input by ``skip_linear(skip_norm(cat[x, skip]))`` (main path first, 2D -> D, the LayerNorm in
fp32), the same operator as Skip-DiT's LSC, so block ``j`` feeds block ``D-1-j`` as in Skip-DiT.
Skip-Cache therefore applies as it is (K <= D/2-1: every one of the last K blocks fuses).

``HunyuanSkipDiT`` holds the diffusers model as its submodule ``transformer`` and runs that
model's own modules, block by block, so that the policies of ``model.cache`` see what they see
on a ``SkipDiT``: ``config.units``, ``embed``, ``run_blocks`` (long skips pushed and popped on a
list the caller owns), ``head``, ``modulated_input``, ``forward``, ``capturing`` and
``forward_cached``. Blocks run through their own ``forward`` (diffusers' code, hooks fire),
except where a policy replaces or records a block's branches (FORA): that block runs the same
operations written out here, so that its self-attention or feed-forward can be swapped.

Conditioning: ``encode`` turns what diffusers' forward takes besides the latents and timestep
(a ``HunyuanPrompt``: the BERT and mT5 states and masks, image meta size, style, RoPE) into a
``HunyuanContext`` once per request: the projected, padded text every block cross-attends to
and the timestep-free part of the adaLN conditioning. Steps pass that context where a class
model passes its labels. The arithmetic is diffusers', in its order: bit for bit its forward.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection, Hashable, Iterable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar, Self

import torch
from diffusers.models.embeddings import get_2d_rotary_pos_embed
from torch import nn

from model.networks.conditions import HunyuanContext
from model.networks.skip_dit import (
    Branch,
    BranchOverride,
    DiTConfig,
    Record,
    SkipDiT,
    branch_recorder,
)

if TYPE_CHECKING:  # diffusers' transformers package imports every model it has (seconds)
    from diffusers import HunyuanDiT2DModel
    from diffusers.models.transformers.hunyuan_transformer_2d import HunyuanDiTBlock

# Hunyuan-DiT's base resolution, 512 pixels, in latents (VAE factor 8): the RoPE grid is
# fitted into it (``HunyuanDiTPipeline``'s ``base_size = 512 // 8 // patch_size``).
BASE_LATENT_SIZE = 512 // 8

# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class HunyuanDiTConfig(DiTConfig):
    """What our policies and pipeline read of a Hunyuan-DiT, taken from the diffusers model's
    config (``of``). ``input_size`` is its default latent size (``sample_size``); the network
    runs any size divisible by the patch (RoPE, no fixed position table). ``text_len`` /
    ``text_len_t5``: the BERT and mT5 token counts it was built for (fixed: its learned
    padding has one row per token). The class fields of ``DiTConfig`` are unused: guidance's
    unconditional rows are the negative prompt's."""

    depth: int = 40
    hidden_size: int = 1408
    num_heads: int = 16
    input_size: int = 128
    learn_sigma: bool = True
    num_classes: int = 1
    class_dropout_prob: float = 0.0
    text_len: int = 77
    text_len_t5: int = 256
    style_and_meta_size: bool = True  # v1.0-v1.1; v1.2 has neither

    file_kind: ClassVar[str] = "hunyuan-dit"
    conditioning: ClassVar[str] = "text"

    def _checks(self) -> dict[str, bool]:
        # At least one long skip: blocks D/2+1.. fuse, so D >= 4.
        return super()._checks() | {"depth": self.depth >= 4 and self.depth % 2 == 0}

    @classmethod
    def of(cls, transformer: HunyuanDiT2DModel) -> Self:
        return cls.of_config(transformer.config)

    @classmethod
    def of_config(cls, saved: Mapping[str, Any]) -> Self:
        """From a ``HunyuanDiT2DModel`` config (its ``config.json``, read without weights):
        the keys it leaves out take the class's defaults, as loading it would."""
        from diffusers import HunyuanDiT2DModel

        defaults = {
            name: p.default
            for name, p in inspect.signature(HunyuanDiT2DModel.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
        c = SimpleNamespace(**(defaults | {k: v for k, v in saved.items() if k in defaults}))
        inner = c.num_attention_heads * c.attention_head_dim
        if c.hidden_size != inner:  # pos_embed and blocks would not meet
            raise ValueError(f"hidden_size {c.hidden_size} != heads * head dim {inner}")
        return cls(
            depth=c.num_layers,
            hidden_size=inner,
            num_heads=c.num_attention_heads,
            patch_size=c.patch_size,
            mlp_ratio=c.mlp_ratio,
            input_size=c.sample_size,
            in_channels=c.in_channels,
            learn_sigma=c.learn_sigma,
            text_len=c.text_len,
            text_len_t5=c.text_len_t5,
            style_and_meta_size=c.use_style_cond_and_image_meta_size,
        )

    @property
    def max_cache_depth(self) -> int:
        """The largest Skip-Cache K: blocks D-K..D-1 must all fuse (block D/2 does not)."""
        return self.depth // 2 - 1

    @property
    def max_tokens(self) -> int:
        """The prompt tokens a request's report counts against: BERT's (the shorter length)."""
        return self.text_len

    @property
    def has_null_class(self) -> bool:
        """Guidance is always possible: its unconditional rows are the negative prompt's."""
        return True


# ----------------------------------------------------------------------------- conditioning


def rotary_embedding(
    config: HunyuanDiTConfig, height: int, width: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 2-D RoPE (cos, sin), (T, head dim) each, of a latent of ``height`` x ``width``, as
    ``HunyuanDiTPipeline`` computes it: the token grid fitted into the base grid."""
    # The pipeline module imports transformers (its text encoders): only when called.
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import (
        get_resize_crop_region_for_grid,
    )

    p = config.patch_size
    grid = (height // p, width // p)
    crops = get_resize_crop_region_for_grid(grid, BASE_LATENT_SIZE // p)
    head_dim = config.hidden_size // config.num_heads
    cos, sin = get_2d_rotary_pos_embed(head_dim, crops, grid, device=device, output_type="pt")
    return cos, sin


@dataclass(frozen=True)
class HunyuanPrompt:
    """What diffusers' ``HunyuanDiT2DModel.forward`` takes besides the latents and timestep,
    under its names, row-aligned (B rows: guidance's negative-prompt rows are rows too).
    Masks: 1 on real tokens. ``image_meta_size`` (original size, target size, crop top-left)
    and ``style`` only for a model with ``style_and_meta_size``."""

    encoder_hidden_states: torch.Tensor  # (B, text_len, C): BERT
    text_embedding_mask: torch.Tensor  # (B, text_len)
    encoder_hidden_states_t5: torch.Tensor  # (B, text_len_t5, C_t5): mT5
    text_embedding_mask_t5: torch.Tensor  # (B, text_len_t5)
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor]  # (T, head dim) each: rotary_embedding
    image_meta_size: torch.Tensor | None = None  # (B, 6)
    style: torch.Tensor | None = None  # (B,) style indices

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of diffusers' forward."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class HunyuanStep:
    """One step's conditioning of a batch (what ``embed`` returns as c): the adaLN embedding
    ``temb`` (B, D), the context, and the token grid (rows, columns) the head unpatchifies to.
    Indexing picks rows."""

    temb: torch.Tensor  # (B, D)
    context: HunyuanContext
    grid: tuple[int, int]

    def __getitem__(self, rows: Any) -> HunyuanStep:
        return HunyuanStep(self.temb[rows], self.context[rows], self.grid)


# ----------------------------------------------------------------------------- model


class HunyuanSkipDiT(nn.Module):
    """A diffusers ``HunyuanDiT2DModel`` behind our network interface. x: (B, C, H, W)
    latents; t: (B,) timesteps (any dtype: cast to the latents', as the pipeline feeds them);
    y: a ``HunyuanContext`` of B rows. Output (B, C_out, H, W), C_out = 2C with learned sigma."""

    def __init__(self, transformer: HunyuanDiT2DModel):
        super().__init__()
        self.transformer = transformer
        self.config = HunyuanDiTConfig.of(transformer)

    @property
    def blocks(self) -> nn.ModuleList:
        """diffusers' ``HunyuanDiTBlock``s, in order: the units ``run_blocks`` indexes."""
        blocks: nn.ModuleList = self.transformer.blocks
        return blocks

    def _block(self, k: int) -> HunyuanDiTBlock:
        """Block k, typed (its submodules are diffusers')."""
        return self.blocks[k]

    # -- conditioning

    def encode(self, prompt: HunyuanPrompt) -> HunyuanContext:
        """The text side of diffusers' forward, once per request: the mT5 projection, the
        learned padding, the pooled mT5 with image meta size and style."""
        tr = self.transformer
        dtype = tr.pos_embed.proj.weight.dtype  # the pipeline's timestep dtype (the latents')
        emb = tr.time_extra_emb
        t5 = prompt.encoder_hidden_states_t5  # (B, L5, C_t5)
        extra = emb.pooler(t5)  # (B, pooled)
        if self.config.style_and_meta_size:
            if prompt.image_meta_size is None or prompt.style is None:
                raise ValueError("this Hunyuan-DiT takes image_meta_size and style")
            size = emb.size_proj(prompt.image_meta_size.view(-1)).to(dtype)  # (B*6, 256)
            style = emb.style_embedder(prompt.style)  # (B, D)
            extra = torch.cat([extra, size.view(-1, 6 * 256), style], dim=1)
        extra = emb.extra_embedder(extra)  # (B, D)
        b, n, _ = t5.shape
        t5 = tr.text_embedder(t5.view(-1, t5.shape[-1])).view(b, n, -1)  # (B, L5, C)
        text = torch.cat([prompt.encoder_hidden_states, t5], dim=1)  # (B, L, C)
        mask = torch.cat([prompt.text_embedding_mask, prompt.text_embedding_mask_t5], dim=-1)
        text = torch.where(mask.unsqueeze(2).bool(), text, tr.text_embedding_padding)
        return HunyuanContext(text, extra, prompt.image_rotary_emb)

    # -- pieces

    def embed(
        self, x: torch.Tensor, t: torch.Tensor, y: HunyuanContext
    ) -> tuple[torch.Tensor, HunyuanStep]:
        """Latents (B, C, H, W) -> tokens (B, T, D) and the step's conditioning."""
        tr = self.transformer
        p = self.config.patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        tokens = tr.pos_embed(x)  # (B, T, D)
        emb = tr.time_extra_emb
        t_emb = emb.timestep_embedder(emb.time_proj(t.to(x.dtype)).to(x.dtype))  # (B, D)
        return tokens, HunyuanStep(t_emb + y.extra, y, grid)

    def modulated_input(self, tokens: torch.Tensor, c: HunyuanStep) -> torch.Tensor:
        """What block 0's self-attention reads: its normalised input shifted by ``temb``."""
        norm: torch.Tensor = self._block(0).norm1(tokens, c.temb)  # (B, T, D)
        return norm

    def head(self, x: torch.Tensor, c: HunyuanStep) -> torch.Tensor:
        """Final norm, projection and unpatchify: (B, T, D) -> (B, C_out, H, W)."""
        tr = self.transformer
        x = tr.proj_out(tr.norm_out(x, c.temb.to(torch.float32)))  # (B, T, p*p*C_out)
        (gh, gw), p, ch = c.grid, self.config.patch_size, self.config.out_channels
        x = x.reshape(x.shape[0], gh, gw, p, p, ch)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], ch, gh * p, gw * p)

    def run_blocks(
        self,
        x: torch.Tensor,
        c: HunyuanStep,
        blocks: Iterable[int],
        skips: list[torch.Tensor],
        capture: Collection[Hashable] = (),
        captured: dict[Hashable, torch.Tensor] | None = None,
        branches: BranchOverride | None = None,
    ) -> torch.Tensor:
        """Run the given block indices in order: blocks ``k < D/2-1`` push their output on
        ``skips``, blocks ``k > D/2`` pop theirs and fuse it first (inside the block).

        ``capture`` keys: ``k`` records the hidden state entering block k (before its fusion)
        and ``("attn", k)`` / ``("mlp", k)`` its self-attention and feed-forward outputs, into
        ``captured``. ``branches(k)`` may replace those two branches of block k.
        """
        half = self.config.units // 2
        into = captured if captured is not None else {}
        for k in blocks:
            if k in capture:
                into[k] = x
            attn, mlp = branches(k) if branches is not None else (None, None)
            record = branch_recorder(k, capture, into)
            skip = skips.pop() if k > half else None
            if attn is None and mlp is None and record is None:
                x = self.blocks[k](
                    x,
                    encoder_hidden_states=c.context.text,
                    temb=c.temb,
                    image_rotary_emb=c.context.rope,
                    skip=skip,
                )  # (B, T, D)
            else:
                x = self._block_branches(k, x, c, skip, attn, mlp, record)
            if k < half - 1:
                skips.append(x)
        return x

    def _block_branches(
        self,
        k: int,
        x: torch.Tensor,
        c: HunyuanStep,
        skip: torch.Tensor | None,
        attn: Branch | None,
        mlp: Branch | None,
        record: Record | None,
    ) -> torch.Tensor:
        """``HunyuanDiTBlock.forward`` of block k, its operations in its order, with the
        self-attention (``attn``) and feed-forward (``mlp``) branches replaceable and their
        outputs shown to ``record``."""
        block = self._block(k)
        rope = c.context.rope
        if skip is not None:
            x = block.skip_linear(block.skip_norm(torch.cat([x, skip], dim=-1)))  # (B, T, D)
        norm = block.norm1(x, c.temb)  # (B, T, D)
        a = attn(norm) if attn is not None else block.attn1(norm, image_rotary_emb=rope)
        if record is not None:
            record("attn", a)
        x = x + a
        cross = block.attn2(
            block.norm2(x), encoder_hidden_states=c.context.text, image_rotary_emb=rope
        )
        x = x + cross
        m = (mlp or block.ff)(block.norm3(x))  # (B, T, D)
        if record is not None:
            record("mlp", m)
        out: torch.Tensor = x + m
        return out

    # -- entry points

    # The full forward and the capturing one are Skip-DiT's, over this network's embed,
    # run_blocks, modulated_input and head: forward(x, t, y, branches) -> (B, C_out, H, W);
    # capturing(x, t, y, capture, branches) -> (output, captured: ``run_blocks``' keys plus
    # "final" and "modulated").
    forward = SkipDiT.forward
    capturing = SkipDiT.capturing

    def forward_cached(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: HunyuanContext,
        deep: torch.Tensor,
        depth: int,
    ) -> torch.Tensor:
        """Skip-Cache's cached step: blocks 0..depth-1 fresh (pushing their outputs), then
        ``deep`` (the hidden state that entered block D-depth on the last full step) goes
        through blocks D-depth..D-1, each fusing the fresh shallow output it pairs with.
        ``deep``: (B, T, D)."""
        d, most = self.config.units, self.config.max_cache_depth
        if not 1 <= depth <= most:
            raise ValueError(f"cache depth must be in [1, {most}] for depth {d}, got {depth}")
        tokens, c = self.embed(x, t, y)
        skips: list[torch.Tensor] = []
        self.run_blocks(tokens, c, range(depth), skips)  # pushes what D-depth..D-1 pop
        h = self.run_blocks(deep, c, range(d - depth, d), skips)
        return self.head(h, c)
