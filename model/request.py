"""What a generation request may ask for: one schema shared by the CLI and the HTTP API.

Static ranges live in the pydantic fields; checks that depend on the loaded model (class label
range, guidance needs a null class, cache depth) live in ``check_for`` and raise FieldError.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from model import cache
from model.errors import FieldError
from model.skip_dit import DiTConfig

Sampler = Literal["ddim", "ddpm", "dpm++"]
MAX_SEED = 2**63 - 1


class GenerateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Model name or local path; None = default.")
    class_label: int = Field(0, ge=0, description="Class to generate, < the model's num_classes.")
    num_images: int = Field(1, ge=1, le=16, description="Images generated from one seed.")
    steps: int = Field(50, ge=1, le=1000, description="Sampler steps.")
    sampler: Sampler = "ddim"
    guidance_scale: float | None = Field(
        None, ge=1.0, le=20.0, description="Classifier-free guidance; 1 = off; None: model default."
    )
    seed: int = Field(0, ge=0, le=MAX_SEED)
    cache_policy: Literal["none", "skip_cache"] = "skip_cache"
    cache_interval: int = Field(1, ge=1, le=1000, description="Full step every N steps; 1 = off.")
    cache_depth: int | None = Field(None, ge=1, description="Blocks run fresh at each end (K).")
    cache_t_start: float | None = Field(None, ge=0, le=1000, description="t >= this: full step.")
    cache_t_end: float | None = Field(None, ge=0, le=1000, description="t <= this: full step.")

    def check_for(self, model: DiTConfig) -> None:
        """Model-dependent checks; raises FieldError naming the field."""
        if self.class_label >= model.num_classes:
            raise FieldError(
                "class_label", f"must be in [0, {model.num_classes - 1}], got {self.class_label}"
            )
        if self.guidance_scale is not None and self.guidance_scale > 1 and not model.has_null_class:
            raise FieldError("guidance_scale", "this model has no null class: must be 1")
        self.cache_for(model)

    def guidance_for(self, model: DiTConfig, default: float) -> float:
        """The guidance scale this request runs with (``default``: the model card's)."""
        if self.guidance_scale is not None:
            return self.guidance_scale
        return default if model.has_null_class else 1.0

    def rows_for(self, model: DiTConfig, default_guidance: float) -> int:
        """Batch rows the request takes: its images, doubled by guidance."""
        return self.num_images * (2 if self.guidance_for(model, default_guidance) > 1 else 1)

    def cache_for(self, model: DiTConfig) -> cache.RequestCache:
        """A fresh per-request cache as this request asks for it."""
        if self.cache_policy == "none":
            extra = {
                "cache_interval": self.cache_interval != 1,
                "cache_depth": self.cache_depth is not None,
                "cache_t_start": self.cache_t_start is not None,
                "cache_t_end": self.cache_t_end is not None,
            }
            for name, given in extra.items():
                if given:
                    raise FieldError(name, "not allowed with cache_policy 'none'")
            return cache.build("none", model)
        options: dict[str, float] = {"interval": self.cache_interval}
        if self.cache_depth is not None:
            options["depth"] = self.cache_depth
        if self.cache_t_start is not None:
            options["t_start"] = self.cache_t_start
        if self.cache_t_end is not None:
            options["t_end"] = self.cache_t_end
        return cache.build(self.cache_policy, model, **options)
