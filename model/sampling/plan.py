"""One run resolved against its model: a frozen ``RunPlan`` holding everything the run needs,
checked once where it is made (``plan``), then stored, sent and run as it is.

The model layer's own names: ``guidance`` (not a request's ``guidance_scale``), a policy and
its config's parameters (``interval``, ``depth``...). Where a request's fields map onto these is
the API's business (``service.request``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

from model import cache
from model.errors import FieldError
from model.networks.lora import MAX_SCALE
from model.networks.presets import Config

Sampler = Literal["ddim", "ddpm", "dpm++", "flow_euler"]


@dataclass(frozen=True)
class RunPlan:
    """A checked run: which samples, how they are sampled and cached. ``cache`` is the policy's
    frozen config, already checked; nothing downstream checks or derives it again."""

    class_label: int
    num_images: int
    steps: int
    sampler: Sampler
    seed: int
    guidance: float  # classifier-free guidance scale; 1 = off
    dynamic: bool  # a DyDiT routes (True) or runs its static twin; False for other networks
    policy: str  # cache policy name (``cache.POLICIES``)
    cache: Any  # that policy's config
    tokens_per_row: int  # the model's tokens per sample (frames x patches for video)
    prompt: str | None = None  # text models: the prompt (class models: None)
    negative_prompt: str | None = None  # replaces the empty prompt of guidance's other branch
    adapter: str | None = None  # a LoRA adapter of the model, by name (``model.networks.lora``)
    adapter_scale: float = 1.0  # its low-rank term's multiplier, 0..lora.MAX_SCALE

    @property
    def uses_guidance(self) -> bool:
        return self.guidance > 1.0

    @property
    def rows(self) -> int:
        """Batch rows the run takes: its images, doubled by guidance."""
        return self.num_images * (2 if self.uses_guidance else 1)

    @property
    def tokens(self) -> int:
        """Tokens the run adds to every step's batch."""
        return self.rows * self.tokens_per_row

    def to_json(self) -> dict[str, Any]:
        """JSON-ready (a job record stores it); ``from_json`` gives the same plan back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunPlan:
        """The plan ``to_json`` wrote. It was checked where it was made: nothing is checked
        again (lists JSON made of tuples become tuples, so the config stays hashable)."""
        config_cls = cache.POLICIES[data["policy"]].config_cls
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in data["cache"].items()}
        return cls(**(data | {"cache": config_cls(**fields)}))


def guidance_of(model: Config, asked: float | None, default: float) -> float:
    """The guidance scale a run uses: the one asked for, else the card's ``default`` where the
    model has a null class to guide with, else 1 (off)."""
    if asked is not None:
        return asked
    return default if model.has_null_class else 1.0


FLOW_SAMPLERS = ("flow_euler",)
EPS_SAMPLERS = ("ddim", "ddpm", "dpm++")


def samplers_of(objective: str) -> tuple[str, ...]:
    """The samplers a model trained with ``objective`` (a card's: "eps" or "flow") runs; the
    first is its default."""
    return FLOW_SAMPLERS if objective == "flow" else EPS_SAMPLERS


def _condition(
    model: Config, class_label: int | None, prompt: str | None, negative_prompt: str | None
) -> int:
    """The class label a run carries (0 for text models), after the conditioning checks."""
    if model.conditioning == "text":
        if class_label is not None:
            raise FieldError("class_label", "this model is text-conditional: give a prompt")
        if prompt is None:
            raise FieldError("prompt", "this model is text-conditional: give a prompt")
        return 0
    if prompt is not None or negative_prompt is not None:
        field = "prompt" if prompt is not None else "negative_prompt"
        raise FieldError(
            field, f"this model is class-conditional: give class_label 0..{model.num_classes - 1}"
        )
    label = 0 if class_label is None else class_label
    if not 0 <= label < model.num_classes:
        raise FieldError("class_label", f"must be in [0, {model.num_classes - 1}], got {label}")
    return label


def _check_adapter(adapter: str | None, scale: float | None, adapters: Collection[str]) -> None:
    if adapter is not None and adapter not in adapters:
        known = sorted(adapters) or "none"
        raise FieldError("adapter", f"unknown adapter {adapter!r} for this model; known: {known}")
    if scale is not None and adapter is None:
        raise FieldError("adapter_scale", "scales an adapter: name one in adapter")
    if scale is not None and not 0 <= scale <= MAX_SCALE:
        raise FieldError("adapter_scale", f"must be in [0, {MAX_SCALE}], got {scale}")


def plan(
    model: Config,
    *,
    class_label: int | None = None,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    num_images: int = 1,
    steps: int = 50,
    sampler: Sampler | None = None,
    objective: str = "eps",
    seed: int = 0,
    guidance: float | None = None,
    default_guidance: float = 1.0,
    dynamic: bool | None = None,
    policy: str = "none",
    params: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    adapter: str | None = None,
    adapter_scale: float | None = None,
    adapters: Collection[str] = (),
) -> RunPlan:
    """The checked plan of one run on ``model``: the model-dependent checks (a class label in
    range for class models, a prompt for text models; a sampler of the model's ``objective``,
    its first by default; guidance needs a null class; routing needs a DyDiT) and the cache
    policy's config: its defaults for the model, the card's ``overrides`` for the policy
    (TeaCache's calibration) over them, ``params`` over both; an ``adapter`` among the model's
    ``adapters`` (names) at ``adapter_scale`` (default 1). ``guidance`` None: ``guidance_of``.
    Raises FieldError naming the parameter."""
    guidance = guidance_of(model, guidance, default_guidance)
    label = _condition(model, class_label, prompt, negative_prompt)
    allowed = samplers_of(objective)
    if sampler is not None and sampler not in allowed:
        raise FieldError(
            "sampler", f"this model ({objective} objective) samples with one of {list(allowed)}"
        )
    if guidance > 1 and not model.has_null_class:
        raise FieldError("guidance", "this model has no null class: must be 1")
    if dynamic is not None and not model.dynamic:
        raise FieldError("dynamic", "this model has no DyDiT routers: leave it unset")
    routed = model.dynamic and dynamic is not False
    _check_adapter(adapter, adapter_scale, adapters)
    # A DyDiT's static twin runs ``dynamic: false``: the same network, unrouted.
    options = {**(overrides or {}).get(policy, {}), **(params or {})}
    config = cache.configure(policy, model.replace(dynamic=routed), **options)
    return RunPlan(
        class_label=label,
        num_images=num_images,
        steps=steps,
        sampler=sampler or cast(Sampler, allowed[0]),
        seed=seed,
        guidance=guidance,
        dynamic=routed,
        policy=policy,
        cache=config,
        tokens_per_row=model.num_tokens,
        prompt=prompt,
        negative_prompt=negative_prompt,
        adapter=adapter,
        adapter_scale=1.0 if adapter_scale is None else adapter_scale,
    )
