"""Cache policies, attached to the network from outside. ``POLICIES`` maps request names."""

from __future__ import annotations

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
from model.skip_dit import DiTConfig

POLICIES: dict[str, CachePolicy] = {
    p.name: p for p in (NoCache(), SkipCache(), Fora(), DeltaDiT(), ToCa(), FBCache(), TeaCache())
}


def build(name: str, model: DiTConfig, **options: Any) -> RequestCache:
    """A fresh per-request cache for policy ``name`` with the model's defaults plus ``options``.

    Raises FieldError naming the offending field (``cache_policy`` for a policy that does not
    apply to the model's kind).
    """
    if name not in POLICIES:
        raise FieldError("cache_policy", f"unknown policy {name!r}; known: {sorted(POLICIES)}")
    policy = POLICIES[name]
    refusal = policy.refusal_for(model)
    if refusal is not None:
        raise FieldError("cache_policy", refusal)
    return RequestCache(policy, policy.default_config(model, **options))


__all__ = ["POLICIES", "CachePolicy", "Mode", "RequestCache", "build"]
