"""No cache: every step runs the whole network. The reference every policy is measured against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from model.cache.base import CachePolicy, Mode
from model.errors import FieldError
from model.skip_dit import DiTConfig


@dataclass(frozen=True)
class NoCacheConfig:
    """No knobs."""


@dataclass
class NoCacheState:
    def reset(self) -> None:
        pass


def decide(step: int, t: int, config: NoCacheConfig) -> Mode:
    return Mode.FULL


class NoCache(CachePolicy):
    name = "none"

    def default_config(self, model: DiTConfig, **overrides: Any) -> NoCacheConfig:
        if overrides:
            raise FieldError("cache_policy", f"'none' takes no options, got {sorted(overrides)}")
        return NoCacheConfig()

    def new_state(self) -> NoCacheState:
        return NoCacheState()

    def decide(self, step: int, t: int, config: NoCacheConfig, state: NoCacheState) -> Mode:
        return decide(step, t, config)
