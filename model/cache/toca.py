"""ToCa (token-wise feature caching, arXiv 2410.05317): refresh only some tokens on cached steps.

A full step every ``interval`` steps stores every block's attention and MLP outputs per token
(as FORA does). On a cached step each block recomputes its branches for a ``ratio`` of the
tokens and reuses the stored outputs for the rest, writing the fresh ones back. Tokens are chosen
per request by staleness (steps since a token was last recomputed), so every token is refreshed
in turn; ties go to a fixed token order. Attention of a refreshed token still sees the keys and
values of all tokens.

Image models only, and not a routed DyDiT: see ``ToCa.refusal_for``.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F

from model.cache.base import CachedBatch
from model.cache.fora import branch_keys
from model.cache.interval import IntervalConfig, IntervalPolicy, StoredState, stack
from model.errors import FieldError
from model.networks.skip_dit import Attention, DiTBlock, DiTConfig, SkipDiT


@dataclass(frozen=True)
class ToCaConfig(IntervalConfig):
    """interval: a full step every ``interval`` steps (1 = no caching).
    ratio: fraction of tokens each block recomputes on a cached step; lower is faster and
    drifts further (ToCa's image settings refresh roughly 10-30% of tokens)."""

    interval: int = 3
    ratio: float = 0.25

    def check(self) -> None:
        super().check()
        if not 0 < self.ratio <= 1:
            raise FieldError("ratio", f"must be in (0, 1], got {self.ratio}")


@dataclass
class ToCaState(StoredState):
    """stored: ("attn"|"mlp", k) -> (rows, T, D), block k's branch outputs, fresh per token.
    Its memory is what ``state_bytes`` counts; the staleness counters are left out."""

    staleness: torch.Tensor | None = None  # (rows, T) steps since each token was recomputed

    def reset(self) -> None:
        super().reset()
        self.staleness = None


def partial_attention(attn: Attention, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Attention outputs of the tokens ``idx`` (B, m) only, attending to all tokens of h."""
    b, n, d = h.shape
    heads = attn.num_heads
    w_q, w_k, w_v = attn.qkv.weight.chunk(3)
    b_q, b_k, b_v = attn.qkv.bias.chunk(3)
    picked = torch.gather(h, 1, idx[..., None].expand(-1, -1, d))  # (B, m, D)
    q = F.linear(picked, w_q, b_q).view(b, -1, heads, d // heads).transpose(1, 2)
    k = F.linear(h, w_k, b_k).view(b, n, heads, d // heads).transpose(1, 2)
    v = F.linear(h, w_v, b_v).view(b, n, heads, d // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v)  # (B, H, m, Dh)
    return attn.proj(out.transpose(1, 2).reshape(b, -1, d))  # (B, m, D)


class ToCa(IntervalPolicy[ToCaConfig, ToCaState]):
    name = "toca"
    config_cls = ToCaConfig
    state_cls = ToCaState
    kinds = frozenset({"image"})
    refused_networks: ClassVar[dict[str, str]] = {
        "hunyuan-dit": "it recomputes chosen token rows inside our own DiT blocks' attention "
        "and MLP; diffusers' Hunyuan-DiT blocks (RoPE on those rows) have no such path"
    }
    refusal = (
        "ToCa picks tokens along one token axis per sample and recomputes only their rows of "
        "attention and MLP; Skip-Latte's blocks alternate between frames' token rows (spatial) "
        "and positions' frame rows (temporal), so a chosen token is not a row of every block "
        "and its partial attention and staleness bookkeeping do not carry over"
    )

    def refusal_for(self, model: DiTConfig) -> str | None:
        if model.dynamic:
            return (
                "'toca' does not apply to routed DyDiT runs: its refreshed tokens would run every "
                "head and channel of attention and MLP, not the ones the routers keep, so its "
                "cached step is not the network's step (use it with dynamic: false)"
            )
        return super().refusal_for(model)

    def capture_blocks(self, config: ToCaConfig, model: DiTConfig) -> tuple[tuple[str, int], ...]:
        return branch_keys(model)

    def on_full(
        self, config: ToCaConfig, state: ToCaState, captured: dict[Hashable, torch.Tensor]
    ) -> None:
        super().on_full(config, state, captured)
        rows, tokens = next(iter(captured.values())).shape[:2]
        state.staleness = torch.zeros(rows, tokens, dtype=torch.long)

    def cached_group_key(self, config: ToCaConfig) -> tuple[Any, ...]:
        return (self.name, config.ratio)

    def forward_cached(
        self, model: SkipDiT, batch: CachedBatch, config: ToCaConfig
    ) -> torch.Tensor:
        x, states = batch.x, batch.states
        stored = stack(states)
        staleness = torch.cat([s.staleness for s in states]).to(x.device)  # (B, T)
        tokens = staleness.shape[1]
        m = max(1, round(config.ratio * tokens))
        order = torch.arange(tokens, device=x.device) / (2 * tokens)  # fixed tie-break
        idx = (staleness + order).topk(m, dim=1).indices  # (B, m) stalest tokens

        def refresh(key: Hashable, fresh: torch.Tensor) -> torch.Tensor:
            merged = stored[key].clone()
            merged.scatter_(1, idx[..., None].expand(-1, -1, merged.shape[-1]), fresh)
            stored[key] = merged
            return merged

        def branches(k: int) -> tuple[Any, Any]:
            block = cast(DiTBlock, model.blocks[k])  # image models only: DiT blocks

            def attn(h: torch.Tensor) -> torch.Tensor:
                return refresh(("attn", k), partial_attention(block.attn, h, idx))

            def mlp(h: torch.Tensor) -> torch.Tensor:
                picked = torch.gather(h, 1, idx[..., None].expand(-1, -1, h.shape[-1]))
                return refresh(("mlp", k), block.mlp(picked))

            return attn, mlp

        out = model(x, batch.t, batch.y, branches=branches)
        staleness = (staleness + 1).scatter(1, idx, 0)
        for state, rows in zip(
            states, batch.row_slices(len(s.staleness) for s in states), strict=True
        ):
            state.stored = {key: value[rows] for key, value in stored.items()}
            state.staleness = staleness[rows].cpu()
        return out
