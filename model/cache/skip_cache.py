"""Skip-Cache (Skip-DiT, arXiv 2411.17616): reuse the deep feature, recompute the shallow blocks.

On a full step the hidden state entering block D-K (before its long-skip fusion) is stored. On a
cached step only blocks 0..K-1 run fresh; their outputs reach blocks D-K..D-1 through the long
skips while the stored deep feature replaces everything between. "Block" is the network's unit
(``config.units``): a block of the image DiT, a (spatial, temporal) pair of Skip-Latte, so K and
D count pairs for video. Cost of a cached step is about
(2K blocks + K fusions + embed + final) / (D blocks + D/2 fusions + embed + final). Full and
cached steps follow the shared interval rule (``model.cache.interval``) plus a timestep window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from model.cache.base import CachedBatch, Mode, tensor_bytes
from model.cache.interval import IntervalConfig, IntervalPolicy, interval_mode
from model.errors import FieldError
from model.skip_dit import DiTConfig, SkipDiT


@dataclass(frozen=True)
class SkipCacheConfig(IntervalConfig):
    """Knobs and their trade-offs.

    interval: a full step every ``interval`` steps (1 = no caching). Larger is faster and drifts
        further from the uncached image (paper, DiT-XL/2 DDPM-250: N=2 1.46x FID 2.31, N=3 1.73x
        FID 2.40, N=4 1.93x FID 2.54, against 2.29 uncached).
    depth: K, how many units run fresh at each end of a cached step (blocks; pairs for video).
        Larger K costs more per cached step and keeps more of the sample fresh. Paper: K=4 of 28
        blocks (image), K=1 of 14 pairs (video).
    t_start: steps with timestep t >= t_start are always full (early, structure-forming steps).
        Paper image default: never (inf); video: 900 (class-to-video), 700 (text-to-video).
    t_end: once t <= t_end every remaining step is full (late, detail-forming steps). Paper: 20
        for images, 50 for video.
    """

    interval: int = 2
    depth: int = 4
    t_start: float = math.inf
    t_end: float = 20.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.depth < 1:
            raise FieldError("cache_depth", f"must be >= 1, got {self.depth}")
        if self.t_end >= self.t_start:
            raise FieldError(
                "cache_t_end", f"must be below cache_t_start ({self.t_start}), got {self.t_end}"
            )

    def full_at(self, step: int, t: float) -> bool:
        """Every ``interval``-th step, and every step with t >= t_start, t <= t_end."""
        return super().full_at(step, t) or t >= self.t_start or t <= self.t_end


@dataclass
class SkipCacheState:
    deep: torch.Tensor | None = None  # (rows, *hidden_shape): hidden state entering unit D-K

    def reset(self) -> None:
        self.deep = None


def decide(step: int, t: int, config: SkipCacheConfig, state: SkipCacheState) -> Mode:
    """The paper's rule: full when step % N == 0, no deep feature yet, t >= t_start, t <= t_end."""
    return interval_mode(step, t, config, cached=state.deep is not None)


# The paper's defaults by model kind: K as (k of n units), t_start, t_end.
PAPER_DEFAULTS: dict[str, tuple[tuple[int, int], float, float]] = {
    "image": ((4, 28), math.inf, 20.0),  # DiT-XL/2 DDPM-250: K=4 of 28 blocks
    "video": ((1, 14), 900.0, 50.0),  # Latte-XL/2 class-to-video: K=1 of 14 pairs
}


def default_depth(model: DiTConfig) -> int:
    """The paper's K as a fraction of the model's units: at least 1, at most units/2."""
    (k, of), _, _ = PAPER_DEFAULTS[model.kind]
    return max(1, min(model.units // 2, round(model.units * k / of)))


class SkipCache(IntervalPolicy):
    name = "skip_cache"
    config_cls = SkipCacheConfig
    state_cls = SkipCacheState
    decide_rule = staticmethod(decide)
    request_fields = IntervalPolicy.request_fields | {
        "cache_depth": "depth",
        "cache_t_start": "t_start",
        "cache_t_end": "t_end",
    }

    def default_config(self, model: DiTConfig, **overrides: Any) -> SkipCacheConfig:
        _, t_start, t_end = PAPER_DEFAULTS[model.kind]
        paper = SkipCacheConfig(depth=default_depth(model), t_start=t_start, t_end=t_end)
        config = replace(paper, **overrides)
        if config.depth > model.units // 2:
            unit = "depth" if model.kind == "image" else "block pairs"
            raise FieldError(
                "cache_depth",
                f"must be in [1, {model.units // 2}] for a model of {unit} {model.units}, "
                f"got {config.depth}",
            )
        return config

    def capture_blocks(self, config: SkipCacheConfig, model: DiTConfig) -> tuple[int, ...]:
        return (model.units - config.depth,)

    def on_full(
        self, config: SkipCacheConfig, state: SkipCacheState, captured: dict[int, torch.Tensor]
    ) -> None:
        (state.deep,) = captured.values()
        state.deep = state.deep.clone()  # own storage: do not pin the whole batch's tensor

    def cached_group_key(self, config: SkipCacheConfig) -> tuple[str, int]:
        return (self.name, config.depth)

    def forward_cached(
        self, model: SkipDiT, batch: CachedBatch, config: SkipCacheConfig
    ) -> torch.Tensor:
        deep = torch.cat([s.deep for s in batch.states])  # (B, T, D)
        return model.forward_cached(batch.x, batch.t, batch.y, deep, config.depth)

    def state_bytes(self, state: SkipCacheState) -> int:
        return tensor_bytes((state.deep,))
