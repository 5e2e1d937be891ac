"""Skip-DiT: a DiT with long skip connections (arXiv 2411.17616), and the vanilla DiT.

Read top-down: helpers, embedders, block, long-skip fusion, final layer, model, presets.
Parameter and module names follow the official DiT / Skip-DiT code so that official
checkpoints load key for key.

Long skips (``long_skip=True``): blocks ``0..D/2-1`` push their outputs on a stack; before each
block ``k >= D/2`` the hidden state is *replaced* by
``Linear_{2d->d}(LayerNorm_{2d, fp32}(cat[x, stack.pop()]))`` (main path first, skip second), so
block ``j`` feeds block ``D-1-j``. With ``long_skip=False`` this is the vanilla DiT.

The network holds no request state. Besides the plain ``forward`` it offers the two primitives a
feature cache needs (policies live in ``model.cache`` and call these from outside):
``capturing(..., capture)`` also returns hidden states entering chosen blocks (and block 0's
modulated input), and ``forward_cached`` runs only the first and last ``depth`` blocks around a
stored deep feature.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Self, cast

import torch
import torch.nn.functional as F
from torch import nn

from kernels import attention, dispatch, lsc_fusion
from kernels.dispatch import Kernels, Resolved
from model.networks.conditions import Condition

# ----------------------------------------------------------------------------- helpers


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding, (grid*grid, dim); height half first (MAE/DiT)."""
    if dim % 4:
        raise ValueError(f"hidden_size must be divisible by 4 for 2-D sincos embedding, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    coords = torch.arange(grid, dtype=torch.float64)
    gw, gh = torch.meshgrid(coords, coords, indexing="xy")  # (grid, grid) each; w varies fastest

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega  # (grid*grid, dim/4)
        return torch.cat([out.sin(), out.cos()], dim=1)  # (grid*grid, dim/2)

    # DiT feeds meshgrid(w, h) and encodes grid[0] (the w-major grid) first.
    return torch.cat([embed_1d(gw), embed_1d(gh)], dim=1).float()


# A block branch: normalized, modulated tokens (B, T, D) -> branch output (B, T, D).
Branch = Callable[[torch.Tensor], torch.Tensor]
# Per block index: replacements for its (attn, mlp) branches, None to keep the module.
BranchOverride = Callable[[int], tuple[Branch | None, Branch | None]]
# Sees a block's branch outputs: (branch name "attn" | "mlp", its output (B, T, D)).
Record = Callable[[str, torch.Tensor], None]

# ----------------------------------------------------------------------------- embedders


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, T, D) with a strided conv, T = (H/p) * (W/p)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, T, D)


class TimestepEmbedder(nn.Module):
    """Scalar diffusion timesteps -> (B, D) via sinusoidal frequencies and a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    @staticmethod
    def frequencies(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # (B, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.frequencies(t, self.frequency_size)
        first = cast(nn.Linear, self.mlp[0])
        return self.mlp(freq.to(first.weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class labels -> (B, D). Row ``num_classes`` is the null class used for guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(
        self, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device, generator=generator)
            labels = torch.where(drop < self.dropout_prob, self.num_classes, labels)
        return self.embedding_table(labels)


# ----------------------------------------------------------------------------- block


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm layout)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.kernels = Kernels()  # its network's, shared (SkipDiT.__init__)
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def use_rope(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotate queries and keys by a rotary embedding (cos, sin), (T, Dh) each, of the token
        positions (diffusers' ``apply_rotary_emb``): attention scores then depend on where two
        tokens are relative to each other. Computed tables, not weights: not in the state
        dict."""
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        rope = getattr(self, "rope_cos", None)
        if self.kernels.triton and rope is None:  # reads q, k, v in place; no permute copies
            return self.proj(attention.attention(qkv))  # (B, T, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, Dh)
        if rope is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            tables = (self.rope_cos, self.rope_sin)
            q, k = apply_rotary_emb(q, tables), apply_rotary_emb(k, tables)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, Dh)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """hidden_size -> mlp_hidden -> out_size (default: hidden_size), tanh GELU between."""

    def __init__(self, hidden_size: int, mlp_hidden: int, out_size: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, out_size or hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        attn: Branch | None = None,
        mlp: Branch | None = None,
        record: Record | None = None,
    ) -> torch.Tensor:
        """``attn``/``mlp`` replace the branch modules (a cache may reuse their outputs);
        ``record(name, out)`` sees each branch's output ("attn", then "mlp")."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(
            c
        ).chunk(6, dim=1)  # each (B, D)
        a = (attn or self.attn)(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, T, D)
        if record is not None:
            record("attn", a)
        x = x + gate_msa.unsqueeze(1) * a
        m = (mlp or self.mlp)(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, T, D)
        if record is not None:
            record("mlp", m)
        return x + gate_mlp.unsqueeze(1) * m


# ----------------------------------------------------------------------------- long-skip fusion


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (the fused width 2d is wide)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class SkipLinear(nn.Module):
    """Linear 2d -> d of a long skip (a module of its own to match the official key names)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(2 * hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


# ----------------------------------------------------------------------------- final layer


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, p*p*C_out)


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True)
class DiTConfig:
    """Everything that fixes the network's shape, and how its sampler guides it. Passed whole;
    saved as config.json."""

    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    patch_size: int = 2
    mlp_ratio: float = 4.0
    input_size: int = 32  # spatial size of the model input (latent or pixel), square
    in_channels: int = 4
    num_classes: int = 1000
    class_dropout_prob: float = 0.1  # > 0 adds the null-class row used for guidance
    learn_sigma: bool = True  # output 2*C channels: eps then variance interpolation
    long_skip: bool = True  # Skip-DiT; False gives the vanilla DiT
    # DyDiT (``model.networks.dydit``): per-block routers pick attention heads and MLP channel
    # groups by timestep and tokens for the MLP; False: the static network.
    dynamic: bool = False
    # Eps channels that classifier-free guidance mixes, from channel 0; None: all of them. The
    # official DiT / Skip-DiT samplers guide channels 0-2 of 4 ("for exact reproducibility"); their
    # published samples and FIDs come from that sampler.
    guided_channels: int | None = None

    kind: ClassVar[str] = "image"  # what a sample is: "image" here, "video" for Skip-Latte
    file_kind: ClassVar[str] = "image"  # config.json's "kind": which config class reads it
    conditioning: ClassVar[str] = "class"  # what a sample is conditioned on: "class" | "text"
    num_frames: ClassVar[int] = 1  # an image is one frame

    def __post_init__(self) -> None:
        bad = [name for name, ok in self._checks().items() if not ok]
        if bad:
            raise ValueError(f"invalid {type(self).__name__} field(s) {bad}: {self}")

    def _checks(self) -> dict[str, bool]:
        """Field name -> whether its value is consistent."""
        checks = {
            "depth": self.depth >= 1,
            "hidden_size": self.hidden_size % self.num_heads == 0 and self.hidden_size % 4 == 0,
            "input_size": self.input_size % self.patch_size == 0,
            "num_classes": self.num_classes >= 1,
            "dynamic": not self.dynamic or self.num_heads >= 2,  # head 0 is always on
            "guided_channels": self.guided_channels is None
            or 1 <= self.guided_channels <= self.in_channels,
        }
        if self.long_skip:
            checks["depth"] = self.depth >= 2 and self.depth % 2 == 0
        return checks

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def has_null_class(self) -> bool:
        return self.class_dropout_prob > 0

    @property
    def units(self) -> int:
        """What ``run_blocks`` indexes, long skips pair and Skip-Cache's K counts: blocks here
        (Skip-Latte: (spatial, temporal) block pairs)."""
        return self.depth

    @property
    def max_cache_depth(self) -> int:
        """The largest Skip-Cache K (units run fresh at each end of a cached step): every one
        of units D-K..D-1 must fuse a long skip, so K <= D/2 here (Hunyuan-DiT: D/2-1)."""
        return self.units // 2

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One sample: (C, H, W)."""
        return (self.in_channels, self.input_size, self.input_size)

    @property
    def hidden_shape(self) -> tuple[int, ...]:
        """One sample's hidden state between units (what captures and caches hold): (T, D)."""
        return (self.num_tokens, self.hidden_size)

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)


class SkipDiT(nn.Module):
    """DiT / Skip-DiT. x: (B, C, H, W); t: (B,) timesteps, one per sample; y: (B,) labels.

    Skip-Latte (``model.networks.skip_latte``) subclasses it: everything here that counts blocks
    counts ``config.units`` (blocks here, block pairs there), and the per-frame token grid is
    ``input_size / patch_size`` on each side."""

    block_cls: ClassVar[type[DiTBlock]] = DiTBlock

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(config.num_classes, d, config.class_dropout_prob)
        grid = config.input_size // config.patch_size  # tokens per side of one frame
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, d), requires_grad=False)
        self.blocks = nn.ModuleList(
            self.block_cls(d, config.num_heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(d, config.patch_size, config.out_channels)
        # The kernel backend that runs (``use_kernels``): one object, every attention's.
        self.kernels = Kernels()
        for block in self.dit_blocks:
            block.attn.kernels = self.kernels
        self._init_weights()
        if config.long_skip:
            # Created after the DiT init, as in the official code: default nn init for these.
            n = config.units // 2
            self.skip_norms = nn.ModuleList(FP32LayerNorm(2 * d, eps=1e-6) for _ in range(n))
            self.skip_linears = nn.ModuleList(SkipLinear(d) for _ in range(n))

    def _init_weights(self) -> None:
        self.init_backbone()
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        # adaLN-Zero: every block starts as the identity
        for modulation in [b.adaLN_modulation for b in self.dit_blocks] + [
            self.final_layer.adaLN_modulation
        ]:
            last = cast(nn.Linear, modulation[-1])
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def init_backbone(self) -> None:
        """DiT's initialisation of what every variant shares: xavier linears, zero biases, the
        fixed position embedding, the patch embedding, the timestep MLP."""

        def basic(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(basic)
        grid = self.config.input_size // self.config.patch_size
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.config.hidden_size, grid)[None])
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(cast(torch.Tensor, self.x_embedder.proj.bias))
        for i in (0, 2):
            nn.init.normal_(cast(nn.Linear, self.t_embedder.mlp[i]).weight, std=0.02)

    @property
    def dit_blocks(self) -> list[DiTBlock]:
        """``blocks``, typed."""
        return cast(list[DiTBlock], list(self.blocks))

    # -- pieces

    def embed(
        self, x: torch.Tensor, t: torch.Tensor, y: Condition
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.x_embedder(x) + self.pos_embed  # (B, T, D), strides of (B, D, T)
        if self.kernels.triton:  # the kernels read rows of D: make the stream row-major
            tokens = tokens.contiguous()  # (the torch path keeps its layout: same bits as ever)
        return tokens, self.condition(t, y)

    def condition(self, t: torch.Tensor, y: Condition) -> torch.Tensor:
        """adaLN's conditioning c: timestep plus label embedding, (B, D)."""
        assert isinstance(y, torch.Tensor), "a class model's condition is its labels"
        return self.t_embedder(t) + self.y_embedder(y)

    def fuse(self, k: int, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Long-skip fusion before unit ``k >= units/2``: replaces x, main path first."""
        j = k - self.config.units // 2
        if self.kernels.triton:  # one GEMM; the concat and the normalised tensor never exist
            return lsc_fusion.lsc_fusion(x, skip, self._folded[j])  # (B, T, D)
        linear, norm = self.skip_linears[j], self.skip_norms[j]
        return linear(norm(torch.cat([x, skip], dim=-1)))  # (B, T, D)

    # -- kernels

    def use_kernels(self, backend: str = "auto") -> Resolved:
        """Choose the kernel backend (``auto | triton | torch``, see ``kernels.dispatch``) for
        the device the weights are on; returns the one that runs. Triton folds each long skip's
        LayerNorm affine into its linear here, once: call again after moving or casting the
        network or changing its weights. Raises KernelUnavailable for a backend that cannot run."""
        self.kernels.backend = dispatch.resolve(backend, self.x_embedder.proj.weight.device)
        self._folded = []
        if self.kernels.triton and self.config.long_skip:
            with torch.no_grad():
                pairs = zip(self.skip_norms, self.skip_linears, strict=True)
                self._folded = [
                    lsc_fusion.fold(cast(nn.LayerNorm, norm), cast(SkipLinear, skip).linear)
                    for norm, skip in pairs
                ]
        return self.kernels.backend

    def modulated_input(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """What block 0's attention branch reads: its normalised input, shifted and scaled by
        its adaLN modulation of c. tokens: (B, T, D), video (B, F, T, D); c: (B, D), broadcast
        over every token axis."""
        block = self.dit_blocks[0]
        shift, scale = block.adaLN_modulation(c).chunk(6, dim=1)[:2]  # (B, D) each: *_msa
        per_row = (c.shape[0], *[1] * (tokens.dim() - 2), c.shape[1])  # (B, 1, D); (B, 1, 1, D)
        return block.norm1(tokens) * (1 + scale.view(per_row)) + shift.view(per_row)

    def head(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Final layer and unpatchify: (B, T, D) -> (B, C_out, H, W)."""
        return self.unpatchify(self.final_layer(x, c))

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C_out) -> (B, C_out, H, W)."""
        p, ch = self.config.patch_size, self.config.out_channels
        g = self.config.input_size // p
        x = x.reshape(x.shape[0], g, g, p, p, ch)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], ch, g * p, g * p)

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
        """Run the given block indices in order, pushing/popping long skips on ``skips``.

        ``capture`` keys: ``k`` records the hidden state entering block k (before its fusion)
        and ``("attn", k)`` / ``("mlp", k)`` that block's branch outputs, into ``captured``.
        ``branches(k)`` may replace block k's branch modules.
        """
        half = self.config.units // 2
        into = captured if captured is not None else {}
        for k in blocks:
            if k in capture:
                into[k] = x
            attn, mlp = branches(k) if branches is not None else (None, None)
            record = branch_recorder(k, capture, into)
            if self.config.long_skip and k >= half:
                x = self.fuse(k, x, skips.pop())
            x = self.blocks[k](x, c, attn, mlp, record)  # (B, T, D)
            if self.config.long_skip and k < half:
                skips.append(x)
        return x

    # -- entry points

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: Condition,
        branches: BranchOverride | None = None,
    ) -> torch.Tensor:
        """Full forward: (B, C_out, H, W) (video: (B, C_out, F, H, W))."""
        return self.capturing(x, t, y, (), branches)[0]

    def capturing(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: Condition,
        capture: Iterable[Hashable],
        branches: BranchOverride | None = None,
    ) -> tuple[torch.Tensor, dict[Hashable, torch.Tensor]]:
        """Full forward and what it captured: ``capture`` keys as in ``run_blocks``, plus
        ``"final"`` (the hidden state entering the final layer) and ``"modulated"``
        (``modulated_input`` of the embedded tokens)."""
        want = set(capture)
        tokens, c = self.embed(x, t, y)
        captured: dict[Hashable, torch.Tensor] = {}
        if "modulated" in want:
            captured["modulated"] = self.modulated_input(tokens, c)
        h = self.run_blocks(tokens, c, range(self.config.units), [], want, captured, branches)
        if "final" in want:
            captured["final"] = h
        return self.head(h, c), captured

    def forward_cached(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: Condition,
        deep: torch.Tensor,
        depth: int,
    ) -> torch.Tensor:
        """Cached step: blocks 0..depth-1 fresh, then ``deep`` (the hidden state that entered
        block D-depth on the last full step) goes through blocks D-depth..D-1, each fused with
        the fresh shallow output it pairs with. ``deep``: (B, T, D)."""
        d, most = self.config.units, self.config.max_cache_depth
        if not 1 <= depth <= most:
            raise ValueError(f"cache depth must be in [1, {most}] for depth {d}, got {depth}")
        tokens, c = self.embed(x, t, y)
        skips: list[torch.Tensor] = []
        if self.config.long_skip:  # without long skips the shallow blocks feed nothing
            # Pushes the outputs of blocks 0..depth-1: exactly what blocks D-depth..D-1 pop.
            self.run_blocks(tokens, c, range(depth), skips)
        h = self.run_blocks(deep, c, range(d - depth, d), skips)
        return self.head(h, c)


def branch_recorder(
    k: int, capture: Collection[Hashable], into: dict[Hashable, torch.Tensor]
) -> Record | None:
    """Records what block k reports (its branch outputs, ``(name, k)``) that ``capture`` asks
    for into ``into``; None if it asks for nothing of block k."""
    names = {key[0] for key in capture if isinstance(key, tuple) and key[1] == k}
    if not names:
        return None

    def record(name: str, out: torch.Tensor) -> None:
        if name in names:
            into[name, k] = out

    return record


def recording(branch: Branch, into: dict[Hashable, torch.Tensor], key: Hashable) -> Branch:
    """``branch``, its output also recorded into ``into[key]`` (Skip-Latte's branch captures)."""

    def run(h: torch.Tensor) -> torch.Tensor:
        into[key] = out = branch(h)
        return out

    return run


# ----------------------------------------------------------------------------- presets

PRESETS: dict[str, Callable[..., DiTConfig]] = {
    "XL/2": lambda **kw: DiTConfig(**{"depth": 28, "hidden_size": 1152, "num_heads": 16, **kw}),
    "L/2": lambda **kw: DiTConfig(**{"depth": 24, "hidden_size": 1024, "num_heads": 16, **kw}),
    "B/2": lambda **kw: DiTConfig(**{"depth": 12, "hidden_size": 768, "num_heads": 12, **kw}),
    "S/2": lambda **kw: DiTConfig(**{"depth": 12, "hidden_size": 384, "num_heads": 6, **kw}),
    # Pixel-space digit models (1 channel, 10 classes) shipped by this project.
    "digits-small": lambda **kw: DiTConfig(
        **{
            "depth": 6,
            "hidden_size": 192,
            "num_heads": 6,
            "input_size": 16,
            "in_channels": 1,
            "num_classes": 10,
            "learn_sigma": False,
            **kw,
        }
    ),
    # Twice as deep at the same width: does the long skips' benefit under Skip-Cache need depth?
    "digits-deep": lambda **kw: PRESETS["digits-small"](**{"depth": 12, **kw}),
    # Smallest useful shape, for tests.
    "digits-tiny": lambda **kw: DiTConfig(
        **{
            "depth": 4,
            "hidden_size": 32,
            "num_heads": 2,
            "input_size": 8,
            "in_channels": 1,
            "num_classes": 10,
            "learn_sigma": False,
            **kw,
        }
    ),
}


def preset(name: str, **overrides: object) -> DiTConfig:
    """A preset config by name, e.g. ``preset("XL/2", long_skip=False)``."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name](**overrides)
