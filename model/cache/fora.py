"""FORA (Fast-FORward CAching, arXiv 2407.01425): reuse every block's attention and MLP outputs.

On a full step each block's attention and MLP branch outputs are stored. On a cached step every
block still runs its adaLN modulation, norms and residual adds, but both branches return the
stored tensors instead of being computed. Cheap cached steps, but the cache is large: 2 x depth
hidden states per request (Skip-Cache keeps one).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from model.cache.base import CachePolicy, Mode, tensor_bytes
from model.errors import FieldError
from model.skip_dit import DiTConfig, SkipDiT


@dataclass(frozen=True)
class ForaConfig:
    """interval: a full step every ``interval`` steps (1 = no caching). Larger is faster and
    drifts further (the Skip-DiT paper's comparison on DiT-XL/2: FID 2.45 at 1.57x)."""

    interval: int = 3

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise FieldError("cache_interval", f"must be >= 1, got {self.interval}")


@dataclass
class ForaState:
    branches: dict[Hashable, torch.Tensor] | None = None  # ("attn"|"mlp", k) -> (rows, T, D)

    def reset(self) -> None:
        self.branches = None


def decide(step: int, t: int, config: ForaConfig, state: ForaState) -> Mode:
    if state.branches is None or step % config.interval == 0:
        return Mode.FULL
    return Mode.CACHED


class Fora(CachePolicy):
    name = "fora"
    config_cls = ForaConfig
    state_cls = ForaState
    decide_rule = staticmethod(decide)
    request_fields: ClassVar[dict[str, str]] = {"cache_interval": "interval"}

    def planned_modes(self, config: ForaConfig, timesteps: Sequence[int]) -> list[Mode]:
        warm = ForaState(branches={})
        return [decide(i, t, config, warm if i else ForaState()) for i, t in enumerate(timesteps)]

    def capture_blocks(self, config: ForaConfig, model: DiTConfig) -> tuple[Hashable, ...]:
        return tuple((kind, k) for k in range(model.depth) for kind in ("attn", "mlp"))

    def on_full(
        self, config: ForaConfig, state: ForaState, captured: dict[Hashable, torch.Tensor]
    ) -> None:
        state.branches = {key: value.clone() for key, value in captured.items()}

    def cached_group_key(self, config: ForaConfig) -> tuple[str]:
        return (self.name,)  # any intervals share one forward

    def run_cached(
        self,
        model: SkipDiT,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        config: ForaConfig,
        states: Sequence[ForaState],
    ) -> torch.Tensor:
        stored = {key: torch.cat([s.branches[key] for s in states]) for key in states[0].branches}

        def branches(k: int) -> tuple[Any, Any]:
            attn, mlp = stored[("attn", k)], stored[("mlp", k)]
            return (lambda h: attn), (lambda h: mlp)

        return model(x, t, y, branches=branches)

    def state_bytes(self, state: ForaState) -> int:
        return tensor_bytes((state.branches or {}).values())
