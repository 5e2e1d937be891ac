"""TeaCache (Timestep Embedding Aware Cache, arXiv 2411.19108): skip the whole block stack while
the accumulated, rescaled change of block 0's modulated input stays small.

Each step looks at what block 0's attention reads: its normalised input modulated by the
timestep and class conditioning (``SkipDiT.modulated_input``). Its relative L1 change since the
request's previous step, ``mean|now - prev| / mean|prev|``, is rescaled by a 4th-order polynomial
(``coefficients``, highest power first, as ``np.poly1d``) into an estimate of the change of the
model's output, and accumulated over steps. While the sum stays below ``threshold`` every block
is skipped and the residual of the block stack stored at the request's last computed step
(hidden state entering the final layer minus the embedded tokens) is added to the fresh tokens;
once it reaches the threshold the stack runs and the sum starts again from 0. The first step and
every step with t <= t_end compute. This is the official code's rule (ali-vilab/TeaCache, its
DiT-like models), kept per request: the previous input, the sum and the residual are each
request's own, and each request's change is measured on its own rows (its conditional and
unconditional rows together), never on a batch-wide mean.

The polynomial is model-specific: ``skipdit calibrate-teacache`` (``model.training.calibrate``)
fits it for a model and stores it in the model card, and the pipeline applies it to every TeaCache
request of that model (``Pipeline.cache_overrides``). The default, ``(0, 0, 0, 1, 0)``, is the
identity: the raw input change.

Why the first step is FULL from ``decide`` and a capture key supplies its modulated input: the
shared contract asks a fresh state for a FULL step, and a full step must leave what the next
step compares with. Block 0's modulated input needs the conditioning, which only the forward
has, so the full forward captures it (``"modulated"``) along with the embedded tokens and the
final hidden state. Every later step is CACHED from ``decide``, meaning "may skip": the cached
forward embeds the group once, decides per request, runs the block stack once for all rows
that must compute (gathered, then scattered back) and adds the residual for the rest.
``realized_mode`` reports what ran; ``planned_modes`` is the all-FULL upper bound.

Requests with different thresholds share one cached forward: each state keeps the config its
request runs with (set at its first full step), and its decision reads only that.

"Block" is the network's unit: for Skip-Latte the stack of (spatial, temporal) pairs, block 0
its first spatial block (its modulation broadcast over frames).
"""

from __future__ import annotations

import math
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

IDENTITY = (0.0, 0.0, 0.0, 1.0, 0.0)  # poly1d: x


@dataclass(frozen=True)
class TeaCacheConfig:
    """threshold: the accumulated, rescaled input change under which steps reuse the residual.
    0 = never reuse (no cache). Higher skips more steps and drifts further; the official
    thresholds run 0.1-0.6 depending on the model (on calibrated coefficients).
    t_end: steps with t <= t_end always compute (the official code always computes the last).
    coefficients: the rescaling polynomial, highest power first (``np.poly1d``); fitted per
    model by ``skipdit calibrate-teacache`` and read from the model card."""

    threshold: float = 0.1
    t_end: float = 20.0
    coefficients: tuple[float, ...] = IDENTITY

    def __post_init__(self) -> None:
        coefficients = tuple(float(c) for c in self.coefficients)
        object.__setattr__(self, "coefficients", coefficients)  # a list from JSON: hashable

    def check(self) -> None:
        """Raise FieldError (naming the parameter) unless every value is in range."""
        if not 0 <= self.threshold <= 1:
            raise FieldError("threshold", f"must be in [0, 1], got {self.threshold}")
        if not self.coefficients or not all(math.isfinite(c) for c in self.coefficients):
            raise FieldError("coefficients", f"must be finite numbers, got {self.coefficients}")

    def rescale(self, change: float) -> float:
        """The polynomial at ``change`` (Horner, highest power first)."""
        value = 0.0
        for c in self.coefficients:
            value = value * change + c
        return value


@dataclass
class TeaCacheState:
    config: TeaCacheConfig | None = None  # the request's own, set at its first full step
    previous: torch.Tensor | None = None  # (rows, T, D): block 0's modulated input, last step
    residual: torch.Tensor | None = None  # (rows, T, D): final hidden - tokens, last computed
    accumulated: float = 0.0  # rescaled change since the last computed step
    last_mode: Mode = Mode.FULL

    def reset(self) -> None:
        self.config = self.previous = self.residual = None
        self.accumulated = 0.0
        self.last_mode = Mode.FULL


def decide(step: int, t: float, config: TeaCacheConfig, state: TeaCacheState) -> Mode:
    """CACHED means 'may skip': the cached forward decides from block 0's modulated input."""
    if state.previous is None or config.threshold <= 0 or t <= config.t_end:
        return Mode.FULL
    return Mode.CACHED


class TeaCache(CachePolicy[TeaCacheConfig, TeaCacheState]):
    name = "teacache"
    config_cls = TeaCacheConfig
    state_cls = TeaCacheState
    decide_rule = staticmethod(decide)

    def capture_blocks(self, config: TeaCacheConfig, model: DiTConfig) -> tuple[Hashable, ...]:
        return (0, "final", "modulated")  # hidden entering block 0: the embedded tokens

    def on_full(
        self, config: TeaCacheConfig, state: TeaCacheState, captured: dict[Hashable, torch.Tensor]
    ) -> None:
        state.config = config
        state.previous = captured["modulated"].clone()
        state.residual = captured["final"] - captured[0]
        state.accumulated = 0.0
        state.last_mode = Mode.FULL

    def cached_group_key(self, config: TeaCacheConfig) -> tuple[str]:
        return (self.name,)  # each state decides by its own config

    def forward_cached(
        self, model: SkipDiT, batch: CachedBatch, config: TeaCacheConfig
    ) -> torch.Tensor:
        tokens, c = model.embed(batch.x, batch.t, batch.y)  # (B, T, D), (B, D)
        now = model.modulated_input(tokens, c)  # (B, T, D)
        states = batch.states
        # Cached rows only: a full step (``on_full``) has stored every previous input.
        stored = [cast(torch.Tensor, s.previous) for s in states]
        slices = batch.row_slices(len(p) for p in stored)
        computing: list[tuple[TeaCacheState, slice]] = []
        hidden = torch.empty_like(tokens)
        for state, rows, change in zip(
            states, slices, relative_changes(now, stored, slices), strict=True
        ):
            state.previous = now[rows].clone()
            state.accumulated += state.config.rescale(change)
            if state.accumulated < state.config.threshold:
                hidden[rows] = tokens[rows] + state.residual
                state.last_mode = Mode.CACHED
            else:
                computing.append((state, rows))
                state.accumulated = 0.0
                state.last_mode = Mode.FULL
        if computing:  # one run of the block stack for every row that computes
            index = gather_index([rows for _, rows in computing], tokens.device)
            stack = model.run_blocks(tokens[index], c[index], range(model.config.units), [])
            hidden[index] = stack
            offset = 0
            for state, rows in computing:
                own = slice(offset, offset + rows.stop - rows.start)
                offset = own.stop
                state.residual = stack[own] - tokens[rows]
        return model.head(hidden, c)

    def realized_mode(self, state: TeaCacheState, decided: Mode) -> Mode:
        return state.last_mode if decided is Mode.CACHED else decided

    def state_bytes(self, state: TeaCacheState) -> int:
        return tensor_bytes((state.previous, state.residual))
