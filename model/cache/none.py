"""No cache: every step runs the whole network. The reference every policy is measured against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from model.cache.base import CachePolicy, Mode
from model.errors import FieldError
from model.networks.skip_dit import DiTConfig


@dataclass(frozen=True)
class NoCacheConfig:
    """No knobs."""

    def check(self) -> None:
        """Nothing to check."""


@dataclass
class NoCacheState:
    def reset(self) -> None:
        pass


def decide(step: int, t: float, config: NoCacheConfig, state: NoCacheState) -> Mode:
    return Mode.FULL


class NoCache(CachePolicy[NoCacheConfig, NoCacheState]):
    name = "none"
    config_cls = NoCacheConfig
    state_cls = NoCacheState
    decide_rule = staticmethod(decide)

    def captured_modes(self, config: NoCacheConfig) -> frozenset[Mode]:
        return frozenset({Mode.FULL})  # every step a plain forward

    def default_config(self, model: DiTConfig, **overrides: Any) -> NoCacheConfig:
        if overrides:
            raise FieldError("policy", f"'none' takes no options, got {sorted(overrides)}")
        return super().default_config(model)
