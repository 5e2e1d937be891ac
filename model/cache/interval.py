"""What the interval policies share: a full step every N steps, cached steps between.

Skip-Cache, FORA, Delta-DiT and ToCa all follow one rule: a step is FULL when nothing is cached
yet or when the config's schedule asks for one (``step % interval == 0``; Skip-Cache adds its
t_start/t_end window), CACHED otherwise. Each policy file keeps only what is its own: what a full
step stores and how a cached step uses it.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, cast

import torch

from model.cache.base import CachePolicy, Mode, tensor_bytes
from model.errors import FieldError


@dataclass(frozen=True)
class IntervalConfig:
    """interval: a full step every ``interval`` steps (1 = no caching). Larger is faster and
    drifts further from the uncached sample. Each policy's config sets its paper's default."""

    interval: int

    def check(self) -> None:
        """Raise FieldError (naming the parameter) unless every value is in range."""
        if self.interval < 1:
            raise FieldError("interval", f"must be >= 1, got {self.interval}")

    def full_at(self, step: int, t: float) -> bool:
        """Whether the schedule asks for a full step at step ``step`` (0-based), timestep ``t``."""
        return step % self.interval == 0


def interval_mode(step: int, t: float, config: IntervalConfig, cached: bool) -> Mode:
    """The shared rule: FULL while nothing is ``cached`` or where the schedule says so."""
    return Mode.CACHED if cached and not config.full_at(step, t) else Mode.FULL


@dataclass
class StoredState:
    """A request's copy of what its last full step captured: key -> (rows, ...) tensors."""

    stored: dict[Hashable, torch.Tensor] | None = None  # None until the first full step

    def reset(self) -> None:
        self.stored = None


def decide(step: int, t: float, config: IntervalConfig, state: StoredState) -> Mode:
    """The rule of every policy that keeps a StoredState (FORA, Delta-DiT, ToCa)."""
    return interval_mode(step, t, config, cached=state.stored is not None)


def stack(states: Sequence[StoredState]) -> dict[Hashable, torch.Tensor]:
    """The requests' stores concatenated key by key, rows in the order of ``states``."""
    # Cached rows only: a full step (``on_full``) has filled every store.
    stores = [cast(dict[Hashable, torch.Tensor], s.stored) for s in states]
    return {key: torch.cat([s[key] for s in stores]) for key in stores[0]}


IntervalConfigT = TypeVar("IntervalConfigT", bound=IntervalConfig)
StoredStateT = TypeVar("StoredStateT", bound=StoredState)


class IntervalPolicy(CachePolicy[IntervalConfigT, StoredStateT]):
    """Base of the interval policies. Its defaults keep a StoredState; a policy whose state is
    shaped otherwise (Skip-Cache keeps a single tensor) overrides ``on_full``/``state_bytes``."""

    decide_rule: ClassVar[staticmethod[[int, float, Any, Any], Mode]] = staticmethod(decide)

    def planned_modes(self, config: IntervalConfigT, timesteps: Sequence[int]) -> list[Mode]:
        """Exact: step 0 is always full (0 % N == 0) and leaves the cache filled for good."""
        return [interval_mode(i, t, config, cached=i > 0) for i, t in enumerate(timesteps)]

    def on_full(
        self,
        config: IntervalConfigT,
        state: StoredStateT,
        captured: dict[Hashable, torch.Tensor],
    ) -> None:
        # Own storage: do not pin the whole batch's tensors.
        state.stored = {key: value.clone() for key, value in captured.items()}

    def state_bytes(self, state: StoredStateT) -> int:
        return tensor_bytes((state.stored or {}).values())
