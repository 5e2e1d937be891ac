"""What a generation request may ask for, and how it becomes a run: the one place where the
request's field names meet the model layer's.

``GenerateParams`` is the request schema the CLI and the HTTP API share; static ranges live in
its fields. ``resolve`` turns a request into the model layer's checked ``RunPlan`` against a
served model: its card's defaults, this deployment's default cache and limits. Every error it
raises names a request field (``FIELDS`` below maps the model's parameter names back).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

from model import cache
from model.errors import FieldError
from model.networks.lora import MAX_SCALE as MAX_ADAPTER_SCALE
from model.registry import ModelInfo
from model.sampling.plan import RunPlan, Sampler, guidance_of, plan
from model.sampling.prompts import PromptReport

if TYPE_CHECKING:
    from service.settings import Settings

MAX_SEED = 2**63 - 1
if TYPE_CHECKING:  # a Literal over a runtime tuple is no static type: a str to mypy
    CachePolicyName = str
else:  # pydantic validates against the registered policies' names
    CachePolicyName = Literal[tuple(cache.POLICIES)]

# Request field -> the policy's own parameter, per policy. A cache field a policy lacks is
# refused with that policy; errors a policy raises are renamed back to the request field.
FIELDS: dict[str, dict[str, str]] = {
    "none": {},
    "skip_cache": {
        "cache_interval": "interval",
        "cache_depth": "depth",
        "cache_t_start": "t_start",
        "cache_t_end": "t_end",
        "cache_threshold": "threshold",
    },
    "fora": {"cache_interval": "interval"},
    "delta_dit": {"cache_interval": "interval", "cache_depth": "blocks"},
    "toca": {"cache_interval": "interval", "cache_ratio": "ratio"},
    "fbcache": {"cache_threshold": "threshold", "cache_t_end": "t_end"},
    "teacache": {"cache_threshold": "threshold", "cache_t_end": "t_end"},
}
CACHE_FIELDS: tuple[str, ...] = ("cache_interval", "cache_depth", "cache_t_start", "cache_t_end")
CACHE_FIELDS += ("cache_threshold", "cache_ratio")
# The plan's parameters whose request field has another name.
PLAN_FIELDS = {"guidance": "guidance_scale", "policy": "cache_policy"}
# A request that sets cache fields but no policy, on a model whose default is no cache.
FIELDS_ONLY_POLICY = "skip_cache"
MAX_GUIDANCE = 20.0
MAX_PROMPT_CHARS = 1000  # a prompt's characters (code points); the encoder cuts at its tokens
UNSET = "unset: this deployment's default for the model (GET /models: default_cache)"


def _printable(text: str) -> str:
    """Refuse control characters (Unicode category Cc: NUL, BEL, ESC, newlines, tabs...): a
    prompt is one line of text, and a tokenizer would drop or mangle them unseen."""
    for i, char in enumerate(text):
        if unicodedata.category(char) == "Cc":
            raise PydanticCustomError(
                "control_character",
                "must not contain control characters, found {char} at index {index}",
                {"char": f"U+{ord(char):04X}", "index": i},
            )
    return text


# A text model's prompt and negative prompt: JSON strings (UTF-8), no control characters.
Prompt = Annotated[
    str, Field(min_length=1, max_length=MAX_PROMPT_CHARS), AfterValidator(_printable)
]
NegativePrompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS), AfterValidator(_printable)]


class GenerateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Model name or local path; None = default.")
    class_label: int | None = Field(
        None,
        ge=0,
        description="Class models: the class to generate, [0, num_classes - 1] (GET /models: "
        "limits); None: 0. Refused on text models.",
    )
    prompt: Prompt | None = Field(
        None,
        description="Text models: what to draw (required there; refused on class models). "
        f"1 to {MAX_PROMPT_CHARS} characters, no control characters; the encoder reads at most "
        "the model's max_tokens tokens and the result says when it cut the prompt.",
    )
    negative_prompt: NegativePrompt | None = Field(
        None,
        description="Text models: what guidance steers away from (replaces the empty prompt of "
        f"the unconditional branch); 0 to {MAX_PROMPT_CHARS} characters. None: the empty prompt.",
    )
    num_images: int = Field(
        1,
        ge=1,
        le=16,
        description="Images generated from one seed. 16 is the schema's cap; the model's limit "
        "is lower (GET /models: limits.num_images, which the batch token budget sets).",
    )
    num_frames: int | None = Field(
        None, ge=1, description="Frames per video (video models only); None: the model's."
    )
    steps: int = Field(
        50,
        ge=1,
        le=1000,
        description="Sampler steps. 1000 is the schema's cap; the deployment's limit is lower "
        "(GET /models: limits.steps).",
    )
    sampler: Sampler | None = Field(
        None,
        description="ddim, ddpm, dpm++ (noise-prediction models) or flow_euler (flow models); "
        "None: the model's default (GET /models: samplers, default_sampler).",
    )
    guidance_scale: float | None = Field(
        None,
        ge=1.0,
        le=MAX_GUIDANCE,
        description="Classifier-free guidance; 1 = off; None: the model card's. A model "
        "without a null class takes only 1 (GET /models: limits.guidance_scale).",
    )
    seed: int = Field(0, ge=0, le=MAX_SEED)
    dynamic: bool | None = Field(
        None,
        description="DyDiT models only: route heads, channel groups and tokens by timestep "
        "and content (true, their default) or run the whole network (false).",
    )
    cache_policy: CachePolicyName | None = Field(
        None,
        description=f"Feature cache; 'none' runs every step in full. {UNSET}; with cache "
        "fields but no policy: the default's policy (skip_cache where the default is none).",
    )
    cache_interval: int | None = Field(
        None, ge=1, le=1000, description=f"Full step every N steps; 1 = off. {UNSET}."
    )
    cache_depth: int | None = Field(
        None, ge=1, description="Blocks run fresh at each end (K); at most half the model's."
    )
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
    adapter: str | None = Field(
        None,
        description="A LoRA adapter of the model, by name (GET /models: adapters; the "
        "deployment's SKIPDIT_ADAPTER_DIRS); None: the base model. Requests of different "
        "adapters share each step's batch.",
    )
    adapter_scale: float | None = Field(
        None,
        ge=0,
        le=MAX_ADAPTER_SCALE,
        description="Multiplier of the adapter's effect (0: the base model, 1: as trained); "
        "needs adapter. None: 1.",
    )


@dataclass(frozen=True)
class CacheDefault:
    """What a request that names no cache field runs on a model."""

    policy: str
    params: Mapping[str, Any]  # the policy's own parameter names
    source: Literal["deployment", "card", "none"]


def cache_default(info: ModelInfo, settings: Settings | None = None) -> CacheDefault:
    """The deployment's default cache for a served model (``SKIPDIT_CACHE_DEFAULTS``), else
    its card's (``default_cache``: shipped Skip-DiT models recommend Skip-Cache), else none."""
    tables: tuple[tuple[Literal["deployment", "card"], Mapping[str, Mapping[str, Any]]], ...] = (
        ("deployment", settings.cache_defaults if settings is not None else {}),
        ("card", {info.name: info.card["default_cache"]} if "default_cache" in info.card else {}),
    )
    for source, table in tables:
        if info.name in table:
            params = dict(table[info.name])
            return CacheDefault(params.pop("policy"), params, source)
    return CacheDefault("none", {}, "none")


@dataclass(frozen=True)
class Limits:
    """A served model's limits, as ``GET /models`` publishes them and ``resolve`` holds them."""

    max_steps: int
    max_num_images: int  # the deployment's cap
    num_frames: int | None  # a video model's fixed frame count; None: an image model
    num_classes: int
    max_guidance: float  # 1: no null class, guidance is off
    default_guidance: float  # what a request leaving guidance unset runs (1: off)
    max_batch_tokens: int | None  # None: no budget (one process runs the request alone)
    tokens_per_image: int
    max_tokens: int | None = None  # a text model's prompt tokens; None: a class model
    samplers: tuple[str, ...] = ()  # the samplers the model runs, its default first

    def images_within_budget(self, guided: bool) -> int:
        """Images one request may ask for: the cap, and the batch budget (guided rows count
        twice)."""
        if self.max_batch_tokens is None:
            return self.max_num_images
        per_image = self.tokens_per_image * (2 if guided else 1)
        return min(self.max_num_images, self.max_batch_tokens // per_image)

    def published(self) -> dict[str, Any]:
        """The JSON ``GET /models`` shows: each request field's accepted range."""
        guided = self.default_guidance > 1
        images = self.images_within_budget(guided)
        view: dict[str, Any] = {
            "steps": {"min": 1, "max": self.max_steps},
            "num_images": {"min": 1, "max": images},
            "guidance_scale": {"min": 1.0, "max": self.max_guidance},
            "samplers": list(self.samplers),
            "max_batch_tokens": self.max_batch_tokens,
            "tokens_per_image": self.tokens_per_image,
        }
        if self.max_tokens is None:
            view["class_label"] = {"min": 0, "max": self.num_classes - 1}
        else:  # characters the schema takes; tokens past max_tokens are cut (and reported)
            view["prompt"] = {
                "min_length": 1,
                "max_length": MAX_PROMPT_CHARS,
                "max_tokens": self.max_tokens,
            }
        if guided and images < self.images_within_budget(False):
            view["num_images"]["without_guidance"] = self.images_within_budget(False)
        if self.num_frames is not None:
            view["num_frames"] = {"min": self.num_frames, "max": self.num_frames}
        return view


def limits(info: ModelInfo, settings: Settings | None = None) -> Limits:
    """The limits of a served model under ``settings``, within the schema's caps (None: the
    schema's caps, no batch budget: the CLI)."""
    config = info.config
    fields = GenerateParams.model_fields
    steps, images = _le(fields["steps"]), _le(fields["num_images"])  # the schema's caps
    return Limits(
        max_steps=min(steps, settings.max_steps) if settings is not None else steps,
        max_num_images=min(images, settings.max_num_images) if settings is not None else images,
        num_frames=config.num_frames if info.kind == "video" else None,
        num_classes=config.num_classes,
        max_guidance=MAX_GUIDANCE if config.has_null_class else 1.0,
        default_guidance=guidance_of(config, None, info.default_guidance),
        max_batch_tokens=settings.max_batch_tokens if settings is not None else None,
        tokens_per_image=config.num_tokens,
        max_tokens=info.max_tokens,
        samplers=info.samplers,
    )


def _le(field: Any) -> int:
    return next(m.le for m in field.metadata if getattr(m, "le", None) is not None)


def resolve(params: GenerateParams, info: ModelInfo, settings: Settings | None = None) -> RunPlan:
    """The checked plan of a request on a served model: limits, the model's own checks, the
    cache policy and its config (card and deployment defaults applied). Raises FieldError
    naming the request field."""
    bounds = limits(info, settings)
    guidance = guidance_of(info.config, params.guidance_scale, info.default_guidance)
    _check_limits(params, bounds, guidance)
    policy, options = _cache_options(params, info, cache_default(info, settings))
    try:
        return plan(
            info.config,
            class_label=params.class_label,
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            num_images=params.num_images,
            steps=params.steps,
            sampler=params.sampler,
            objective=info.objective,
            seed=params.seed,
            guidance=guidance,
            dynamic=params.dynamic,
            policy=policy,
            params=options,
            overrides=info.cache_overrides,
            adapter=params.adapter,
            adapter_scale=params.adapter_scale,
            adapters=settings.adapters_of(info.name) if settings is not None else (),
        )
    except FieldError as e:
        raise FieldError(request_field(policy, e.field), e.message) from None


def request_field(policy: str, param: str) -> str:
    """The request field of a model-layer parameter (``interval`` of skip_cache:
    ``cache_interval``; ``guidance``: ``guidance_scale``)."""
    fields = {p: f for f, p in FIELDS.get(policy, {}).items()}
    return fields.get(param) or PLAN_FIELDS.get(param, param)


def _check_limits(params: GenerateParams, bounds: Limits, guidance: float) -> None:
    if params.steps > bounds.max_steps:
        raise FieldError("steps", f"must be in [1, {bounds.max_steps}], got {params.steps}")
    images = bounds.images_within_budget(guidance > 1)
    if params.num_images > images:
        why = ""
        if images < bounds.max_num_images:
            rows = "2 rows per image, guidance on" if guidance > 1 else "1 row per image"
            why = (
                f": the batch budget is {bounds.max_batch_tokens} tokens a step, and each image "
                f"takes {bounds.tokens_per_image} tokens a row ({rows})"
            )
        raise FieldError("num_images", f"must be in [1, {images}]{why}, got {params.num_images}")
    if params.num_frames is None:
        return
    if bounds.num_frames is None:
        raise FieldError("num_frames", "this is an image model: it makes no frames")
    if params.num_frames != bounds.num_frames:
        raise FieldError(
            "num_frames",
            f"must be {bounds.num_frames}, got {params.num_frames}: the model's temporal "
            "embedding has a fixed length (Latte)",
        )


def _cache_options(
    params: GenerateParams, info: ModelInfo, default: CacheDefault
) -> tuple[str, dict[str, Any]]:
    """The policy a request runs and its parameters: the default's where the policy is the
    default's, the request's own fields over them (``plan`` puts both over the card's)."""
    given = {f: getattr(params, f) for f in CACHE_FIELDS if getattr(params, f) is not None}
    policy = params.cache_policy
    if policy is None:
        policy = default.policy if default.policy != "none" or not given else FIELDS_ONLY_POLICY
    fields = FIELDS[policy]
    for name in given:
        if name not in fields:
            raise FieldError(name, f"not allowed with cache_policy {policy!r}")
    options = dict(default.params) if policy == default.policy else {}
    return policy, options | {fields[name]: value for name, value in given.items()}


def default_config(info: ModelInfo, settings: Settings | None = None) -> tuple[CacheDefault, Any]:
    """The default cache of a served model and the checked config it runs (``GET /models``
    shows both; the settings check them at boot). Raises FieldError naming the parameter."""
    default = cache_default(info, settings)
    # The cache's config does not depend on what a run is conditioned on: on a text model,
    # the empty prompt stands for any prompt.
    run = plan(
        info.config,
        prompt="" if info.conditioning == "text" else None,
        policy=default.policy,
        params=default.params,
        overrides=info.cache_overrides,
        objective=info.objective,
    )
    return default, run.cache


def echo(run: RunPlan) -> dict[str, Any]:
    """What ran, in request fields: the class label (class models), the sampler, the guidance
    and the cache policy with its parameters (infinity as None)."""
    config = cache.as_json(run.cache)
    view: dict[str, Any] = {
        "class_label": run.class_label if run.prompt is None else None,
        "sampler": run.sampler,
        "guidance_scale": run.guidance,
        "cache_policy": run.policy,
        "adapter": run.adapter,
        "adapter_scale": run.adapter_scale if run.adapter is not None else None,
    }
    return view | {name: config.get(FIELDS[run.policy].get(name, "")) for name in CACHE_FIELDS}


PROMPT_RESULT_FIELDS = (
    "prompt_tokens",
    "prompt_truncated",
    "negative_prompt_tokens",
    "negative_prompt_truncated",
)


def prompt_result(run: RunPlan, report: PromptReport | None) -> dict[str, Any]:
    """What became of a text model's prompts, for its result: ``prompt_tokens`` (special
    tokens included) and ``prompt_truncated`` (cut at the model's max_tokens), and the same of
    the negative prompt where the request gave one. Empty for class models."""
    if report is None:
        return {}
    view: dict[str, Any] = {"prompt_tokens": report.tokens, "prompt_truncated": report.truncated}
    if run.negative_prompt is not None:
        view |= {
            "negative_prompt_tokens": report.negative_tokens,
            "negative_prompt_truncated": report.negative_truncated,
        }
    return view
