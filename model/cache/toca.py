"""ToCa (token-wise feature caching, arXiv 2410.05317): refresh only some tokens on cached steps.

A full step every ``interval`` steps stores every block's attention and MLP outputs per token
(as FORA does). On a cached step each block recomputes its branches for a ``ratio`` of the
tokens and reuses the stored outputs for the rest, writing the fresh ones back. Tokens are chosen
per request by staleness (steps since a token was last recomputed), so every token is refreshed
in turn; ties go to a fixed token order. Attention of a refreshed token still sees the keys and
values of all tokens.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from model.cache.base import CachePolicy, Mode, tensor_bytes
from model.errors import FieldError
from model.skip_dit import Attention, DiTConfig, SkipDiT


@dataclass(frozen=True)
class ToCaConfig:
    """interval: a full step every ``interval`` steps (1 = no caching).
    ratio: fraction of tokens each block recomputes on a cached step; lower is faster and
    drifts further (ToCa's image settings refresh roughly 10-30% of tokens)."""

    interval: int = 3
    ratio: float = 0.25

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise FieldError("cache_interval", f"must be >= 1, got {self.interval}")
        if not 0 < self.ratio <= 1:
            raise FieldError("cache_ratio", f"must be in (0, 1], got {self.ratio}")


@dataclass
class ToCaState:
    branches: dict[Hashable, torch.Tensor] | None = None  # ("attn"|"mlp", k) -> (rows, T, D)
    staleness: torch.Tensor | None = None  # (rows, T) steps since each token was recomputed

    def reset(self) -> None:
        self.branches = self.staleness = None


def decide(step: int, t: int, config: ToCaConfig, state: ToCaState) -> Mode:
    if state.branches is None or step % config.interval == 0:
        return Mode.FULL
    return Mode.CACHED


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


class ToCa(CachePolicy):
    name = "toca"
    config_cls = ToCaConfig
    state_cls = ToCaState
    decide_rule = staticmethod(decide)
    request_fields: ClassVar[dict[str, str]] = {
        "cache_interval": "interval",
        "cache_ratio": "ratio",
    }

    def capture_blocks(self, config: ToCaConfig, model: DiTConfig) -> tuple[Hashable, ...]:
        return tuple((kind, k) for k in range(model.depth) for kind in ("attn", "mlp"))

    def on_full(
        self, config: ToCaConfig, state: ToCaState, captured: dict[Hashable, torch.Tensor]
    ) -> None:
        state.branches = {key: value.clone() for key, value in captured.items()}
        rows, tokens = next(iter(captured.values())).shape[:2]
        state.staleness = torch.zeros(rows, tokens, dtype=torch.long)

    def cached_group_key(self, config: ToCaConfig) -> tuple[Any, ...]:
        return (self.name, config.ratio)

    def run_cached(
        self,
        model: SkipDiT,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        config: ToCaConfig,
        states: Sequence[ToCaState],
    ) -> torch.Tensor:
        stored = {key: torch.cat([s.branches[key] for s in states]) for key in states[0].branches}
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
            block = model.blocks[k]

            def attn(h: torch.Tensor) -> torch.Tensor:
                return refresh(("attn", k), partial_attention(block.attn, h, idx))

            def mlp(h: torch.Tensor) -> torch.Tensor:
                picked = torch.gather(h, 1, idx[..., None].expand(-1, -1, h.shape[-1]))
                return refresh(("mlp", k), block.mlp(picked))

            return attn, mlp

        out = model(x, t, y, branches=branches)
        staleness = (staleness + 1).scatter(1, idx, 0)
        offset = 0
        for state in states:
            rows = slice(offset, offset + state.staleness.shape[0])
            offset = rows.stop
            state.branches = {key: value[rows] for key, value in stored.items()}
            state.staleness = staleness[rows].cpu()
        return out

    def state_bytes(self, state: ToCaState) -> int:
        return tensor_bytes((state.branches or {}).values())  # staleness counters not counted
