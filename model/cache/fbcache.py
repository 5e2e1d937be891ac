"""First-Block-Cache (as in ParaAttention / TeaCache's family): skip the step when the first
block's output barely moved.

Every eligible step runs block 0 for the request's rows and compares its output with the one
stored at the request's last fully computed step (mean absolute change relative to its mean
magnitude). Below ``threshold`` the remaining blocks are skipped and the stored residual
(final hidden state minus block-0 output) is added back; otherwise the rest of the network runs
for that request's rows alone and the stored pair is refreshed. The decision is made per request
from that request's own rows, never from a batch-wide average, so batch-mates cannot change it.

"Block" is the network's unit (``config.units``): for Skip-Latte the first (spatial, temporal)
pair, the smallest piece whose output is in the layout every later unit starts from.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import cast

import torch

from model.cache.base import (
    CachedBatch,
    CachePolicy,
    Mode,
    gather_index,
    relative_changes,
    tensor_bytes,
)
from model.errors import FieldError
from model.networks.skip_dit import DiTConfig, SkipDiT


@dataclass(frozen=True)
class FBCacheConfig:
    """threshold: relative change of block 0's output under which a step reuses the residual.
    0 = never reuse (no cache). Higher skips more steps and drifts further; 0.05-0.12 is the
    usual range for large DiTs. t_end: steps with t <= t_end always compute fully."""

    threshold: float = 0.08
    t_end: float = 20.0

    def check(self) -> None:
        """Raise FieldError (naming the parameter) unless every value is in range."""
        if not 0 <= self.threshold <= 1:
            raise FieldError("threshold", f"must be in [0, 1], got {self.threshold}")


@dataclass
class FBCacheState:
    first: torch.Tensor | None = None  # (rows, T, D): block-0 output at the last full compute
    residual: torch.Tensor | None = None  # (rows, T, D): final hidden - block-0 output
    last_mode: Mode = Mode.FULL

    def reset(self) -> None:
        self.first = self.residual = None
        self.last_mode = Mode.FULL


def decide(step: int, t: float, config: FBCacheConfig, state: FBCacheState) -> Mode:
    """CACHED means 'may skip': the forward decides from block 0's output."""
    if state.first is None or config.threshold <= 0 or t <= config.t_end:
        return Mode.FULL
    return Mode.CACHED


class FBCache(CachePolicy[FBCacheConfig, FBCacheState]):
    name = "fbcache"
    config_cls = FBCacheConfig
    state_cls = FBCacheState
    decide_rule = staticmethod(decide)

    def capture_blocks(self, config: FBCacheConfig, model: DiTConfig) -> tuple[Hashable, ...]:
        return (1, "final")  # hidden entering block 1 is block 0's output

    def on_full(
        self, config: FBCacheConfig, state: FBCacheState, captured: dict[Hashable, torch.Tensor]
    ) -> None:
        state.first = captured[1].clone()
        state.residual = captured["final"] - captured[1]
        state.last_mode = Mode.FULL

    def forward_cached(
        self, model: SkipDiT, batch: CachedBatch, config: FBCacheConfig
    ) -> torch.Tensor:
        tokens, c = model.embed(batch.x, batch.t, batch.y)
        skips: list[torch.Tensor] = []
        first = model.run_blocks(tokens, c, range(1), skips)  # (B, T, D)
        hidden = torch.empty_like(first)
        # Cached rows only: a full step (``on_full``) has stored every request's block-0 output.
        states: list[FBCacheState] = list(batch.states)
        stored = [cast(torch.Tensor, s.first) for s in states]
        slices = batch.row_slices(len(f) for f in stored)
        changes = relative_changes(first, stored, slices)
        computing: list[tuple[FBCacheState, slice]] = []
        for state, rows, change in zip(states, slices, changes, strict=True):
            # Only this request's rows decide (the group shares one config: see group key).
            if change < config.threshold:
                hidden[rows] = first[rows] + cast(torch.Tensor, state.residual)
                state.last_mode = Mode.CACHED
            else:
                computing.append((state, rows))
                state.last_mode = Mode.FULL
        if computing:  # one run of blocks 1.. for every row that computes
            index = gather_index([rows for _, rows in computing], first.device)
            own = [s[index] for s in skips]
            h = model.run_blocks(first[index], c[index], range(1, model.config.units), own)
            hidden[index] = h
            offset = 0
            for state, rows in computing:
                mine = h[offset : offset + rows.stop - rows.start]
                offset += rows.stop - rows.start
                state.first, state.residual = first[rows].clone(), mine - first[rows]
        return model.head(hidden, c)

    def realized_mode(self, state: FBCacheState, decided: Mode) -> Mode:
        return state.last_mode if decided is Mode.CACHED else decided

    def state_bytes(self, state: FBCacheState) -> int:
        return tensor_bytes((state.first, state.residual))
