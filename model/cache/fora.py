"""FORA (Fast-FORward CAching, arXiv 2407.01425): reuse every block's attention and MLP outputs.

On a full step each block's attention and MLP branch outputs are stored. On a cached step every
block still runs its adaLN modulation, norms and residual adds, but both branches return the
stored tensors instead of being computed. Cheap cached steps, but the cache is large: 2 x depth
hidden states per request (Skip-Cache keeps one). Full and cached steps follow the shared
interval rule (``model.cache.interval``). Video models too: every block, spatial and temporal,
keeps its own branches' outputs (batch-first, ``model.networks.skip_latte``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from model.cache.base import CachedBatch
from model.cache.interval import IntervalConfig, IntervalPolicy, StoredState, stack
from model.networks.skip_dit import DiTConfig, SkipDiT


@dataclass(frozen=True)
class ForaConfig(IntervalConfig):
    """interval: a full step every ``interval`` steps (1 = no caching). Larger is faster and
    drifts further (the Skip-DiT paper's comparison on DiT-XL/2: FID 2.45 at 1.57x)."""

    interval: int = 3


@dataclass
class ForaState(StoredState):
    """stored: ("attn"|"mlp", k) -> (rows, T, D), block k's branch outputs at the last full step."""


def branch_keys(model: DiTConfig) -> tuple[tuple[str, int], ...]:
    """Every block's attention and MLP branch outputs, in block order."""
    return tuple((kind, k) for k in range(model.depth) for kind in ("attn", "mlp"))


class Fora(IntervalPolicy[ForaConfig, ForaState]):
    name = "fora"
    config_cls = ForaConfig
    state_cls = ForaState

    def capture_blocks(self, config: ForaConfig, model: DiTConfig) -> tuple[tuple[str, int], ...]:
        return branch_keys(model)

    def cached_group_key(self, config: ForaConfig) -> tuple[str]:
        return (self.name,)  # any intervals share one forward

    def forward_cached(
        self, model: SkipDiT, batch: CachedBatch, config: ForaConfig
    ) -> torch.Tensor:
        stored = stack(batch.states)

        def branches(k: int) -> tuple[Any, Any]:
            attn, mlp = stored[("attn", k)], stored[("mlp", k)]
            return (lambda h: attn), (lambda h: mlp)

        return model(batch.x, batch.t, batch.y, branches=branches)
