"""DyDiT (Dynamic Diffusion Transformer, arXiv 2410.03456) on our Skip-DiT / DiT.

Read top-down: routing helpers, routers, block, model, FLOPs accounting.

- **Timestep-wise Dynamic Width (TDW).** Each block has two routers, ``Linear(d -> H-1)`` over
  its attention heads and ``Linear(d -> H-1)`` over its MLP hidden channels in H groups (the
  official code's split: DiT-XL/2 has 16 groups of 288). Both read the **timestep embedding**,
  not c, so the masks depend on t alone; head 0 and group 0 are always on.
- **Spatial-wise Dynamic Token (SDT).** A token router ``MLP(d -> d/16 -> 1)`` reads the hidden
  state after attention; tokens it scores <= 0.5 skip the block's MLP.
- **Training** (``module.training``): masks are Gumbel-sigmoid samples, hard in the forward and
  soft in the backward (straight-through), applied by multiplication so gradients reach the
  routers. **Inference**: ``sigmoid > 0.5``. Rows whose masks are equal run their kept heads and
  groups as one dense matmul on sliced weights; the MLP runs on the kept tokens only (gathered,
  then scattered back), so a row's output never depends on its batch-mates.
- The long-skip fusions, the embedders and the final layer stay dense.

A ``DyDiT`` is a ``SkipDiT`` whose conditioning is a ``Routed`` (c plus the timestep embedding,
row-aligned): cache policies split and run it exactly as they do a static network. ``dense()``
is the same weights without routing (what a ``dynamic: false`` request runs). With every router
on, a block takes the static path: the network equals its base bit for bit.

Parameter names follow the official DyDiT code (``attn_rate.router``, ``mlp_rate.router``,
``token_selection.mlp_head``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from model.networks import flops
from model.networks.skip_dit import Branch, DiTBlock, DiTConfig, Record, SkipDiT, modulate

TAU = 5.0  # Gumbel-sigmoid temperature in training (official default)
HEAD_BIAS = 15.0  # router biases at the start of fine-tuning: every head and group on
TOKEN_BIAS = 35.0  # the token router's: every token on
USAGE = "usage"  # capture key ("usage", k): block k's kept shares (B, 3), heads/groups/tokens

# ----------------------------------------------------------------------------- routing helpers


def gate(logits: torch.Tensor, training: bool) -> torch.Tensor:
    """Keep or drop from router logits. Inference: ``sigmoid > 0.5`` (bool). Training: a
    Gumbel-sigmoid sample at temperature TAU, 0/1 in the forward, its soft value's gradient in
    the backward (float)."""
    if not training:
        return logits > 0
    e1, e2 = torch.empty_like(logits).exponential_(), torch.empty_like(logits).exponential_()
    soft = torch.sigmoid((logits - e1.log() + e2.log()) / TAU)  # logistic noise: g1 - g2
    hard = (soft > 0.5).to(soft.dtype)
    return hard + soft - soft.detach()


def patterns(mask: torch.Tensor) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
    """Rows grouped by their mask: [(row indices, or None for every row; the mask (n,))]."""
    unique, inverse = torch.unique(mask, dim=0, return_inverse=True)
    if len(unique) == 1:
        return [(None, unique[0])]
    return [((inverse == i).nonzero().squeeze(1), pattern) for i, pattern in enumerate(unique)]


@dataclass(frozen=True)
class Routed:
    """DyDiT's conditioning of a batch, row-aligned: adaLN's c and the timestep embedding the
    width routers read. Indexing picks rows, as on a tensor."""

    c: torch.Tensor  # (B, D): timestep + label embedding
    t_emb: torch.Tensor  # (B, D): timestep embedding

    def __getitem__(self, rows: Any) -> Routed:
        return Routed(self.c[rows], self.t_emb[rows])


def plain(c: torch.Tensor | Routed) -> torch.Tensor:
    """adaLN's c (B, D) of a static or a routed conditioning."""
    return c.c if isinstance(c, Routed) else c


# ----------------------------------------------------------------------------- routers


class Router(nn.Module):
    """``Linear(d -> n)`` logits over n switchable heads or channel groups."""

    def __init__(self, hidden_size: int, channels: int):
        super().__init__()
        self.router = nn.Linear(hidden_size, channels)

    def forward(self, t_emb: torch.Tensor, training: bool) -> torch.Tensor:
        """(B, D) -> keep mask (B, n+1): column 0 (head or group 0) always on."""
        keep = gate(self.router(t_emb), training)  # (B, n)
        return torch.cat([torch.ones_like(keep[:, :1]), keep], dim=1)


class TokenSelect(nn.Module):
    """``MLP(d -> d/16 -> 1)`` logits per token."""

    def __init__(self, hidden_size: int):
        super().__init__()
        inner = max(1, hidden_size // 16)
        self.mlp_head = nn.Sequential(nn.Linear(hidden_size, inner), nn.ReLU(), nn.Linear(inner, 1))

    def forward(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        """(B, T, D) -> keep mask (B, T)."""
        return gate(self.mlp_head(x).squeeze(-1), training)


# ----------------------------------------------------------------------------- block


class DyDiTBlock(DiTBlock):
    """A DiT block with TDW and SDT routers. Given a plain c it is the static block."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        self.attn_rate = Router(hidden_size, num_heads - 1)
        self.mlp_rate = Router(hidden_size, num_heads - 1)
        self.token_selection = TokenSelect(hidden_size)

    def start_on(self) -> None:
        """Fine-tuning's start: every head, group and token on, whatever the input."""
        for rate in (self.attn_rate, self.mlp_rate):
            nn.init.zeros_(rate.router.weight)
            nn.init.constant_(rate.router.bias, HEAD_BIAS)
        last = cast(nn.Linear, self.token_selection.mlp_head[-1])  # the 1-logit linear
        nn.init.zeros_(last.weight)
        nn.init.constant_(last.bias, TOKEN_BIAS)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor | Routed,
        attn: Branch | None = None,
        mlp: Branch | None = None,
        record: Record | None = None,
    ) -> torch.Tensor:
        """As ``DiTBlock.forward``; routed when c is ``Routed``. A replaced branch (a cache's)
        runs as given; the token mask still gates the MLP branch's output."""
        if not isinstance(c, Routed):
            return super().forward(x, c, attn, mlp, record)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(
            c.c
        ).chunk(6, dim=1)  # each (B, D)
        heads = self.attn_rate(c.t_emb, self.training)  # (B, H)
        groups = self.mlp_rate(c.t_emb, self.training)  # (B, H)
        h = modulate(self.norm1(x), shift_msa, scale_msa)  # (B, T, D)
        a = attn(h) if attn is not None else self.routed_attention(h, heads)  # (B, T, D)
        if record is not None:
            record("attn", a)
        x = x + gate_msa.unsqueeze(1) * a
        tokens = self.token_selection(x, self.training)  # (B, T)
        h = modulate(self.norm2(x), shift_mlp, scale_mlp)  # (B, T, D)
        if mlp is not None:
            m = mlp(h) * tokens.unsqueeze(-1).to(h.dtype)
        else:
            m = self.routed_mlp(h, groups, tokens)  # (B, T, D)
        if record is not None:
            record("mlp", m)
            usage = torch.stack([mask.float().mean(1) for mask in (heads, groups, tokens)], 1)
            record(USAGE, usage)  # (B, 3)
        return x + gate_mlp.unsqueeze(1) * m

    # -- attention: kept heads

    def routed_attention(self, h: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """Attention over each row's kept heads (heads: (B, H)). h: (B, T, D)."""
        if self.training:
            return self._masked_attention(h, heads)
        out = torch.empty_like(h)
        for rows, keep in patterns(heads):
            part = h if rows is None else h[rows]
            done = self.attn(part) if bool(keep.all()) else self._sliced_attention(part, keep)
            if rows is None:
                return done
            out[rows] = done
        return out

    def _masked_attention(self, h: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """Every head computed, each scaled by its mask entry (training: dense, differentiable)."""
        b, n, d = h.shape
        qkv = self.attn.qkv(h).reshape(b, n, 3, self.attn.num_heads, -1)  # (B, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, Dh)
        out = F.scaled_dot_product_attention(q, k, v) * heads[:, :, None, None].to(h.dtype)
        return self.attn.proj(out.transpose(1, 2).reshape(b, n, d))

    def _sliced_attention(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Attention with only the heads in ``keep`` (H,): their slices of qkv and proj."""
        b, n, d = h.shape
        heads = self.attn.num_heads
        idx = keep.nonzero().squeeze(1)  # (h,)
        qkv_w = self.attn.qkv.weight.view(3, heads, -1, d)[:, idx].reshape(-1, d)  # (3h*Dh, D)
        qkv_b = self.attn.qkv.bias.view(3, heads, -1)[:, idx].reshape(-1)
        qkv = F.linear(h, qkv_w, qkv_b).reshape(b, n, 3, len(idx), -1)  # (B, T, 3, h, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, T, Dh)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        proj_w = self.attn.proj.weight.view(d, heads, -1)[:, idx].reshape(d, -1)  # (D, h*Dh)
        return F.linear(out, proj_w, self.attn.proj.bias)  # (B, T, D)

    # -- MLP: kept channel groups, kept tokens

    def routed_mlp(
        self, h: torch.Tensor, groups: torch.Tensor, tokens: torch.Tensor
    ) -> torch.Tensor:
        """The MLP over each row's kept groups (groups: (B, G)) and kept tokens (tokens:
        (B, T)); dropped tokens get 0. h: (B, T, D)."""
        if self.training:
            width = groups.repeat_interleave(self.mlp.fc1.out_features // groups.shape[1], 1)
            hidden = self.mlp.act(self.mlp.fc1(h)) * width[:, None, :].to(h.dtype)  # (B, T, M)
            return self.mlp.fc2(hidden) * tokens.unsqueeze(-1).to(h.dtype)
        out = torch.zeros_like(h)
        for rows, keep in patterns(groups):
            part, kept = (h, tokens) if rows is None else (h[rows], tokens[rows])
            if bool(kept.all()):
                done = self._sliced_mlp(part, keep)  # (b, T, D)
            else:
                done = torch.zeros_like(part)
                done[kept] = self._sliced_mlp(part[kept], keep)  # kept tokens (n, D)
            if rows is None:
                return done
            out[rows] = done
        return out

    def _sliced_mlp(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The MLP with only the channel groups in ``keep`` (G,). h: (..., D)."""
        if bool(keep.all()):
            return self.mlp(h)
        fc1, fc2 = self.mlp.fc1, self.mlp.fc2
        d, groups = fc1.in_features, keep.numel()
        idx = keep.nonzero().squeeze(1)  # (g,)
        w1 = fc1.weight.view(groups, -1, d)[idx].reshape(-1, d)  # (g*M/G, D)
        b1 = fc1.bias.view(groups, -1)[idx].reshape(-1)
        w2 = fc2.weight.view(d, groups, -1)[:, idx].reshape(d, -1)  # (D, g*M/G)
        return F.linear(self.mlp.act(F.linear(h, w1, b1)), w2, fc2.bias)


# ----------------------------------------------------------------------------- model


class DyDiT(SkipDiT):
    """A Skip-DiT / DiT with DyDiT routers in every block (``config.dynamic``)."""

    block_cls = DyDiTBlock

    def __init__(self, config: DiTConfig):
        if not config.dynamic:
            raise ValueError("DyDiT needs a config with dynamic=True")
        super().__init__(config)
        for block in cast(Iterable[DyDiTBlock], self.blocks):  # block_cls
            block.start_on()

    @classmethod
    def from_base(cls, base: SkipDiT) -> DyDiT:
        """Fine-tuning's start: ``base``'s weights, routers that keep everything."""
        if base.config.dynamic:
            raise ValueError("from_base needs a static base network, got a DyDiT")
        model = cls(base.config.replace(dynamic=True))
        missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
        if unexpected or not all(is_router(k) for k in missing):
            raise ValueError(f"not a static base network: {missing=} {unexpected=}")
        return model.to(next(base.parameters()))

    def condition(self, t: torch.Tensor, y: torch.Tensor) -> Routed:  # type: ignore[override]  # Routed c: DyDiT's blocks and head take either
        t_emb = self.t_embedder(t)  # (B, D)
        return Routed(t_emb + self.y_embedder(y), t_emb)

    def head(self, x: torch.Tensor, c: torch.Tensor | Routed) -> torch.Tensor:
        return super().head(x, plain(c))

    def modulated_input(self, tokens: torch.Tensor, c: torch.Tensor | Routed) -> torch.Tensor:
        return super().modulated_input(tokens, plain(c))

    def dense(self) -> SkipDiT:
        """The same weights (shared, not copied) as a static network: no routing."""
        twin = SkipDiT.__new__(SkipDiT)
        nn.Module.__init__(twin)
        twin.config = self.config.replace(dynamic=False)
        for name, child in self.named_children():
            twin.add_module(name, child)
        twin.register_parameter("pos_embed", self.pos_embed)
        twin.kernels = self.kernels  # the blocks' own: they are shared too
        return twin.train(self.training)

    def usage_capture(self) -> set[tuple[str, int]]:
        """Capture keys of every block's kept shares (for ``capturing``)."""
        return {(USAGE, k) for k in range(self.config.depth)}

    def usage(self, captured: dict[Any, torch.Tensor]) -> torch.Tensor:
        """Kept shares of heads, groups and tokens per row and block from a forward that
        captured ``usage_capture()``: (B, depth, 3), differentiable in training."""
        return torch.stack([captured[USAGE, k] for k in range(self.config.depth)], 1)


def is_router(key: str) -> bool:
    """Whether a parameter name is a DyDiT router's."""
    return any(f".{name}." in key for name in ("attn_rate", "mlp_rate", "token_selection"))


# ----------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class FlopModel:
    """Per-row FLOPs of a forward (2 per multiply-add, as ``model.networks.flops`` counts them)."""

    base: float  # the static network (no routers)
    fixed: float  # what never shrinks: embedders, adaLN, fusions, final layer, routers
    attn: float  # one block's attention, every head: qkv, scores and values, proj
    mlp: float  # one block's MLP, every group and token

    def ratio(self, usage: torch.Tensor) -> torch.Tensor:
        """usage (B, depth, 3): kept shares of heads, groups and tokens -> FLOPs / base (B,)."""
        heads, groups, tokens = usage.unbind(-1)  # each (B, depth)
        blocks = self.attn * heads + self.mlp * groups * tokens
        return (self.fixed + blocks.sum(1)) / self.base


def flop_model(model: DyDiT) -> FlopModel:
    """The FLOPs of ``model``'s parts: attention and MLP from their shapes, the static total
    counted op by op over one row's forward."""
    cfg = model.config
    t, d = cfg.num_tokens, cfg.hidden_size
    attn = 8 * t * d * d + 4 * t * t * d  # qkv 6TD^2 + proj 2TD^2 + QK^T and AV 4T^2 D
    block = cast(DyDiTBlock, model.blocks[0])  # block_cls
    mlp = 4 * t * d * block.mlp.fc1.out_features
    inner = cast(nn.Linear, block.token_selection.mlp_head[0]).out_features
    routers = 2 * 2 * d * (cfg.num_heads - 1) + 2 * t * (d * inner + inner)  # per block
    x = torch.zeros(1, *cfg.sample_shape, device=model.pos_embed.device)
    zero = torch.zeros(1, dtype=torch.long, device=x.device)
    training = model.training
    with torch.no_grad():
        base = flops.count(lambda: model.dense().eval()(x, zero, zero))
    model.train(training)
    return FlopModel(base=base, fixed=base - cfg.depth * (attn + mlp - routers), attn=attn, mlp=mlp)
