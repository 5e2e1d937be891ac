"""What a generation request may ask for: one schema shared by the CLI and the HTTP API.

Static ranges live in the pydantic fields; checks that depend on the loaded model (class label
range, guidance needs a null class, cache depth) live in ``check_for`` and raise FieldError.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from model import cache
from model.errors import FieldError
from model.networks import Config

Sampler = Literal["ddim", "ddpm", "dpm++"]
MAX_SEED = 2**63 - 1
CachePolicyName = Literal[tuple(cache.POLICIES)]  # type: ignore[valid-type]


class GenerateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Model name or local path; None = default.")
    class_label: int = Field(0, ge=0, description="Class to generate, < the model's num_classes.")
    num_images: int = Field(1, ge=1, le=16, description="Images generated from one seed.")
    num_frames: int | None = Field(
        None, ge=1, description="Frames per video (video models only); None: the model's."
    )
    steps: int = Field(50, ge=1, le=1000, description="Sampler steps.")
    sampler: Sampler = "ddim"
    guidance_scale: float | None = Field(
        None, ge=1.0, le=20.0, description="Classifier-free guidance; 1 = off; None: model default."
    )
    seed: int = Field(0, ge=0, le=MAX_SEED)
    dynamic: bool | None = Field(
        None,
        description="DyDiT models only: route heads, channel groups and tokens by timestep "
        "and content (true, their default) or run the whole network (false).",
    )
    cache_policy: CachePolicyName = "skip_cache"
    cache_interval: int = Field(1, ge=1, le=1000, description="Full step every N steps; 1 = off.")
    cache_depth: int | None = Field(None, ge=1, description="Blocks run fresh at each end (K).")
    cache_t_start: float | None = Field(None, ge=0, le=1000, description="t >= this: full step.")
    cache_t_end: float | None = Field(None, ge=0, le=1000, description="t <= this: full step.")
    cache_threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        description="fbcache: reuse when block 0's output moved less than this; teacache: "
        "skip while the accumulated, rescaled change of block 0's input stays below this; "
        "skip_cache: adaptive, recompute a cached step whose shallow output moved this much "
        "(unset: fixed interval).",
    )
    cache_ratio: float | None = Field(
        None, gt=0, le=1, description="toca: fraction of tokens recomputed on cached steps."
    )

    def check_for(self, model: Config) -> None:
        """Model-dependent checks; raises FieldError naming the field."""
        if self.class_label >= model.num_classes:
            raise FieldError(
                "class_label", f"must be in [0, {model.num_classes - 1}], got {self.class_label}"
            )
        if self.guidance_scale is not None and self.guidance_scale > 1 and not model.has_null_class:
            raise FieldError("guidance_scale", "this model has no null class: must be 1")
        if self.dynamic is not None and not model.dynamic:
            raise FieldError("dynamic", "this model has no DyDiT routers: leave it unset")
        self.check_frames(model)
        self.cache_for(model)

    def check_frames(self, model: Config) -> None:
        """``num_frames`` names a video model's own frame count; an image model takes none."""
        if self.num_frames is None:
            return
        if model.kind != "video":
            raise FieldError("num_frames", "this is an image model: it makes no frames")
        if self.num_frames != model.num_frames:
            raise FieldError(
                "num_frames",
                f"must be {model.num_frames}, got {self.num_frames}: the model's temporal "
                "embedding has a fixed length (Latte)",
            )

    def guidance_for(self, model: Config, default: float) -> float:
        """The guidance scale this request runs with (``default``: the model card's)."""
        if self.guidance_scale is not None:
            return self.guidance_scale
        return default if model.has_null_class else 1.0

    def rows_for(self, model: Config, default_guidance: float) -> int:
        """Batch rows the request takes: its images, doubled by guidance."""
        return self.num_images * (2 if self.guidance_for(model, default_guidance) > 1 else 1)

    def check_budget(self, model: Config, default_guidance: float, max_tokens: int) -> None:
        """The request must fit a batch of ``max_tokens`` (rows x tokens per row) on its own, or
        no step could ever run it; raises FieldError naming ``num_images``."""
        tokens = self.rows_for(model, default_guidance) * model.num_tokens
        if tokens > max_tokens:
            raise FieldError(
                "num_images",
                f"{self.num_images} images need {tokens} tokens per step; the batch budget is "
                f"{max_tokens}",
            )

    def cache_for(
        self, model: Config, overrides: Mapping[str, Mapping[str, Any]] | None = None
    ) -> cache.RequestCache:
        """A fresh per-request cache as this request asks for it. ``overrides``: policy name ->
        config fields the model sets over the policy's defaults (its card's calibration, e.g.
        TeaCache's coefficients); the request's own fields win over both."""
        policy = cache.POLICIES[self.cache_policy]
        if self.dynamic is False:  # a DyDiT's static twin runs it: the same network, unrouted
            model = model.replace(dynamic=False)
        options = dict((overrides or {}).get(self.cache_policy, {}))
        for name in (
            n for n in type(self).model_fields if n.startswith("cache_") and n != "cache_policy"
        ):
            value = getattr(self, name)
            if name in policy.request_fields:
                if value is not None:
                    options[policy.request_fields[name]] = value
            elif value is not None and value != type(self).model_fields[name].default:
                raise FieldError(name, f"not allowed with cache_policy {self.cache_policy!r}")
        return cache.build(self.cache_policy, model, **options)
