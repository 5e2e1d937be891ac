"""Cache policies, attached to the network from outside. ``POLICIES`` maps policy names."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from model.cache.base import CachePolicy, Mode, RequestCache
from model.cache.delta_dit import DeltaDiT
from model.cache.fbcache import FBCache
from model.cache.fora import Fora
from model.cache.none import NoCache
from model.cache.skip_cache import SkipCache
from model.cache.teacache import TeaCache
from model.cache.toca import ToCa
from model.errors import FieldError
from model.networks.skip_dit import DiTConfig

POLICIES: dict[str, CachePolicy] = {
    p.name: p for p in (NoCache(), SkipCache(), Fora(), DeltaDiT(), ToCa(), FBCache(), TeaCache())
}


def configure(name: str, model: DiTConfig, **params: Any) -> Any:
    """The checked config of policy ``name`` for one run on ``model``: the policy's defaults for
    the model, ``params`` (its own parameter names) over them. Raises FieldError naming the
    parameter, ``policy`` for an unknown policy or one that does not apply to the model."""
    if name not in POLICIES:
        raise FieldError("policy", f"unknown policy {name!r}; known: {sorted(POLICIES)}")
    return POLICIES[name].configure(model, **params)


def as_json(config: Any) -> dict[str, Any]:
    """A policy config as JSON shows it: its fields, infinity as None."""
    return {
        k: None if isinstance(v, float) and math.isinf(v) else v
        for k, v in dataclasses.asdict(config).items()
    }


def build(name: str, model: DiTConfig, **params: Any) -> RequestCache:
    """A fresh per-request cache of policy ``name`` with ``configure``'s config."""
    return RequestCache(POLICIES[name], configure(name, model, **params))


__all__ = ["POLICIES", "CachePolicy", "Mode", "RequestCache", "as_json", "build", "configure"]
