"""Skip-Cache (Skip-DiT, arXiv 2411.17616): reuse the deep feature, recompute the shallow blocks.

On a full step the hidden state entering block D-K (before its long-skip fusion) is stored. On a
cached step only blocks 0..K-1 run fresh; their outputs reach blocks D-K..D-1 through the long
skips while the stored deep feature replaces everything between. "Block" is the network's unit
(``config.units``): a block of the image DiT, a (spatial, temporal) pair of Skip-Latte, so K and
D count pairs for video. Cost of a cached step is about
(2K blocks + K fusions + embed + final) / (D blocks + D/2 fusions + embed + final). Full and
cached steps follow the shared interval rule (``model.cache.interval``) plus a timestep window.

Adaptive Skip-Cache (``threshold`` set): on a would-be cached step the shallow blocks run once
for the whole group, and each request compares its fresh shallow output (the hidden state
entering unit K) with the one stored at its last full step: relative L1 over its own rows, as
fbcache measures block 0. A request at or over ``threshold`` is stale: its rows continue from
their fresh shallow output through the middle units K..D-K-1, which refreshes its deep feature
(and its stored shallow output), exactly what a full step would have stored; the deep units then
run for every row of the group, each on its own deep feature. One forward per group, rows split
after unit K-1 and rejoined before unit D-K; no shallow work is repeated. A refreshed request's
step counts as FULL (``realized_mode``). The interval stays: a full step at least every
``interval`` steps (``step % interval == 0``), so the interval is the maximum gap between full
steps. ``threshold`` None is the fixed schedule, bit for bit; 0 recomputes every step (no cache,
within batch tolerance). Its cached groups run eagerly (``model.sampling.pipeline``): a captured
cached forward has no row split.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import torch

from model.cache.base import CachedBatch, Mode, relative_changes, tensor_bytes
from model.cache.interval import IntervalConfig, IntervalPolicy, interval_mode
from model.errors import FieldError
from model.networks.skip_dit import DiTConfig, SkipDiT


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
    threshold: adaptive Skip-Cache (not in the paper): a would-be cached step recomputes the
        middle units of a request whose shallow output moved by at least this much (relative
        L1) since its last full step. None = off (the paper's fixed schedule); 0 = every step
        full; inf (a config value, not a request's) never refreshes: the fixed schedule through
        the adaptive forward. Lower is closer to uncached and slower; ``interval`` still bounds
        the gap.
    """

    interval: int = 2
    depth: int = 4
    t_start: float = math.inf
    t_end: float = 20.0
    threshold: float | None = None

    def check(self) -> None:
        super().check()
        if self.depth < 1:
            raise FieldError("depth", f"must be >= 1, got {self.depth}")
        if self.t_end >= self.t_start:
            raise FieldError("t_end", f"must be below t_start ({self.t_start}), got {self.t_end}")
        if self.threshold is not None and not (
            0 <= self.threshold <= 1 or self.threshold == math.inf
        ):
            raise FieldError("threshold", f"must be in [0, 1] or inf, got {self.threshold}")

    def full_at(self, step: int, t: float) -> bool:
        """Every ``interval``-th step, and every step with t >= t_start, t <= t_end."""
        return super().full_at(step, t) or t >= self.t_start or t <= self.t_end


@dataclass
class SkipCacheState:
    deep: torch.Tensor | None = None  # (rows, *hidden_shape): hidden state entering unit D-K
    # Adaptive only: the hidden state entering unit K at the last full step, the request's own
    # threshold (set with it: groups mix thresholds), and whether this step refreshed.
    shallow: torch.Tensor | None = None  # (rows, *hidden_shape)
    threshold: float | None = None
    refreshed: bool = False

    def reset(self) -> None:
        self.deep = self.shallow = self.threshold = None
        self.refreshed = False


def decide(step: int, t: float, config: SkipCacheConfig, state: SkipCacheState) -> Mode:
    """The paper's rule: full when step % N == 0, no deep feature yet, t >= t_start, t <= t_end."""
    return interval_mode(step, t, config, cached=state.deep is not None)


# The paper's defaults by network (``file_kind``) where it gives its own, else by model kind:
# K as (k of n units), t_start, t_end.
PAPER_DEFAULTS: dict[str, tuple[tuple[int, int], float, float]] = {
    "image": ((4, 28), math.inf, 20.0),  # DiT-XL/2 DDPM-250: K=4 of 28 blocks
    "video": ((1, 14), 900.0, 50.0),  # Latte-XL/2 class-to-video: K=1 of 14 pairs
    "text-video": ((1, 28), 700.0, 50.0),  # Latte-T2V-skip DDIM-50: K=1 of 28 pairs (1.49x)
    "hunyuan-dit": ((1, 40), 700.0, 50.0),  # Hunyuan-DiT (its own long skips): K=1 of 40
}


def paper_defaults(model: DiTConfig) -> tuple[tuple[int, int], float, float]:
    """The paper's settings for ``model``: its network's own, else its kind's."""
    return PAPER_DEFAULTS.get(model.file_kind) or PAPER_DEFAULTS[model.kind]


def default_depth(model: DiTConfig) -> int:
    """The paper's K as a fraction of the model's units: at least 1, at most the model's
    ``max_cache_depth``."""
    (k, of), _, _ = paper_defaults(model)
    return max(1, min(model.max_cache_depth, round(model.units * k / of)))


# Its state is no StoredState (one deep tensor, not a store): it overrides what reads one.
class SkipCache(IntervalPolicy[SkipCacheConfig, Any]):
    name = "skip_cache"
    config_cls = SkipCacheConfig
    state_cls = SkipCacheState
    decide_rule = staticmethod(decide)

    def captured_modes(self, config: SkipCacheConfig) -> frozenset[Mode]:
        """The fixed schedule: both; adaptive (a threshold): none, it splits its cached rows
        after block K-1 and its full steps capture block K too, inside the forward."""
        return frozenset() if config.threshold is not None else frozenset(Mode)

    def default_config(self, model: DiTConfig, **overrides: Any) -> SkipCacheConfig:
        _, t_start, t_end = paper_defaults(model)
        paper = SkipCacheConfig(depth=default_depth(model), t_start=t_start, t_end=t_end)
        config = replace(paper, **overrides)
        if config.depth > model.max_cache_depth:
            unit = "depth" if model.kind == "image" else "block pairs"
            raise FieldError(
                "depth",
                f"must be in [1, {model.max_cache_depth}] for a model of {unit} {model.units}, "
                f"got {config.depth}",
            )
        return config

    def planned_modes(self, config: SkipCacheConfig, timesteps: Sequence[int]) -> list[Mode]:
        """Exact for the fixed schedule; adaptive: every step FULL, the upper bound."""
        if config.threshold is not None:
            return [Mode.FULL] * len(timesteps)
        return super().planned_modes(config, timesteps)

    def capture_blocks(self, config: SkipCacheConfig, model: DiTConfig) -> tuple[Hashable, ...]:
        deep = model.units - config.depth
        return (deep,) if config.threshold is None else tuple(sorted({config.depth, deep}))

    def on_full(
        self,
        config: SkipCacheConfig,
        state: SkipCacheState,
        captured: dict[Hashable, torch.Tensor],
    ) -> None:
        # Own storage: do not pin the whole batch's tensor. The deep unit D-K >= K.
        units = cast(dict[int, torch.Tensor], captured)  # Skip-Cache captures unit indices only
        state.deep = units[max(units)].clone()
        if config.threshold is not None:
            state.shallow = captured[config.depth].clone()
            state.threshold = config.threshold

    def cached_group_key(self, config: SkipCacheConfig) -> tuple[Hashable, ...]:
        if config.threshold is None:
            return (self.name, config.depth)
        return (self.name, config.depth, "adaptive")  # thresholds mix: each state keeps its own

    def forward_cached(
        self, model: SkipDiT, batch: CachedBatch, config: SkipCacheConfig
    ) -> torch.Tensor:
        deep = torch.cat([s.deep for s in batch.states])  # (B, T, D)
        if config.threshold is None:
            return model.forward_cached(batch.x, batch.t, batch.y, deep, config.depth)
        return adaptive_forward(model, batch, deep, config.depth)

    def realized_mode(self, state: SkipCacheState, decided: Mode) -> Mode:
        return Mode.FULL if state.refreshed else decided

    def state_bytes(self, state: SkipCacheState) -> int:
        return tensor_bytes((state.deep, state.shallow))


def stale_rows(
    shallow: torch.Tensor, states: Sequence[SkipCacheState], slices: Sequence[slice]
) -> torch.Tensor:
    """Rows of the requests whose shallow output moved by >= their threshold (relative L1 over
    each request's own rows, one host sync for the group); marks each state refreshed or not."""
    # Adaptive states: their last full step stored the shallow output (and the threshold).
    stored = [cast(torch.Tensor, s.shallow) for s in states]
    changes = relative_changes(shallow, stored, slices)
    stale: list[int] = []
    for state, rows, change in zip(states, slices, changes, strict=True):
        state.refreshed = change >= cast(float, state.threshold)
        if state.refreshed:
            stale += range(rows.start, rows.stop)
    return torch.tensor(stale, dtype=torch.long, device=shallow.device)


def adaptive_forward(
    model: SkipDiT, batch: CachedBatch, deep: torch.Tensor, depth: int
) -> torch.Tensor:
    """One cached forward of an adaptive group: units 0..K-1 for every row, K..D-K-1 for the
    stale rows only (refreshing their deep feature), D-K..D-1 for every row. deep: (B, T, D)."""
    d = model.config.units
    tokens, c = model.embed(batch.x, batch.t, batch.y)
    skips: list[torch.Tensor] = []  # the outputs of units 0..K-1 (long skips only)
    shallow = model.run_blocks(tokens, c, range(depth), skips)  # (B, T, D): entering unit K
    states = batch.states
    slices = batch.row_slices(len(s.deep) for s in states)
    stale = stale_rows(shallow, states, slices)
    if len(stale):
        own_skips = [skip[stale] for skip in skips]  # units K.. push and pop their own
        fresh = model.run_blocks(shallow[stale], c[stale], range(depth, d - depth), own_skips)
        deep = deep.index_copy(0, stale, fresh)  # (B, T, D): stale rows refreshed
        for state, rows in zip(states, slices, strict=True):
            if state.refreshed:
                state.deep, state.shallow = deep[rows].clone(), shallow[rows].clone()
    h = model.run_blocks(deep, c, range(d - depth, d), skips)  # pops units K-1..0's outputs
    return model.head(h, c)
