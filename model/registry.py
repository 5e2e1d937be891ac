"""Resolving a model name or local path to what it is (``describe``: config and card, no
weights) or to a ready Pipeline (``load``).

Names, in the order tried:
- a path: a directory in our format (``config.json`` + ``model.safetensors``), a diffusers
  ``HunyuanDiTPipeline`` directory (``model_index.json``: its transformer, two text encoders and
  tokenizers, scheduler and VAE, each in its own folder), or an official ``.pt`` file (DiT or
  Skip-DiT release, Latte / Skip-Latte class-to-video weights);
- a shipped model: a directory under ``model/weights/`` committed with this project;
- ``random:<preset>``: untrained weights of a preset (image or video, e.g. ``random:XL/2``,
  ``random:Latte-XL/2``), for smoke tests only (says so loudly).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from model import cache
from model.errors import FieldError
from model.networks.checkpoint import (
    CONFIG_FILE,
    VAE_DOWNSCALE,
    load_official,
    load_pretrained,
    load_vae,
    official_config,
    official_state_dict,
    read_pretrained_meta,
)
from model.networks.hunyuan import HunyuanDiTConfig, HunyuanSkipDiT
from model.networks.presets import PRESETS, Config, build, preset
from model.networks.skip_dit import SkipDiT
from model.networks.text_dit import TextDiTConfig
from model.sampling.pipeline import DEFAULT_GUIDANCE, Pipeline
from model.sampling.plan import samplers_of
from model.sampling.prompts import HunyuanPrompting, Prompting
from model.text.cache import EmbeddingCache
from model.text.encoder import VOCAB_FILES, TextEncoder

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"
RANDOM_PREFIX = "random:"
SHIPPED_DEFAULT = "digits-skip-dit"  # the shipped Skip-DiT, when present
# Used only if no model ships: untrained, for smoke tests only.
FALLBACK_DEFAULT = RANDOM_PREFIX + "digits-small"
PIXEL_CHANNELS = (1, 3)  # grey or RGB samples are images; any other channel count is VAE latents
# A diffusers pipeline directory: its index, and the pipeline class we serve from one.
PIPELINE_INDEX = "model_index.json"
HUNYUAN_PIPELINE = "HunyuanDiTPipeline"
# What a Hunyuan-DiT directory's card says (it has none of its own): HunyuanDiTPipeline's
# guidance scale, and Skip-Cache at interval 2 by default, whose other settings are the
# paper's for Hunyuan-DiT (``skip_cache.PAPER_DEFAULTS``: K = 1, full at t >= 700, t <= 50).
HUNYUAN_CARD: dict[str, Any] = {
    "default_guidance": 5.0,
    "default_cache": {"policy": "skip_cache", "interval": 2},
}
# What a Hunyuan-DiT directory must hold besides its index: folder -> (the part, the files it
# needs). WEIGHTS: a *.safetensors or *.bin file (whole or sharded); VOCABULARY: one of the
# tokenizer vocabulary files TextEncoder reads.
WEIGHTS, VOCABULARY = "weights", "vocabulary"
HUNYUAN_PARTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "transformer": ("its HunyuanDiT2DModel", (CONFIG_FILE, WEIGHTS)),
    "text_encoder": ("its BERT text encoder", (CONFIG_FILE, WEIGHTS)),
    "tokenizer": ("its BERT tokenizer", (VOCABULARY,)),
    "text_encoder_2": ("its mT5 text encoder", (CONFIG_FILE, WEIGHTS)),
    "tokenizer_2": ("its mT5 tokenizer", (VOCABULARY,)),
    "vae": ("its AutoencoderKL", (CONFIG_FILE, WEIGHTS)),
    "scheduler": ("its noise schedule", ("scheduler_config.json",)),
}


@dataclass(frozen=True)
class ModelInfo:
    """What serving needs to know of a model, read without its weights."""

    name: str
    config: Config
    card: dict[str, Any]
    random_weights: bool

    @property
    def kind(self) -> str:
        """What a sample is: "image" or "video"."""
        return self.config.kind

    @property
    def num_frames(self) -> int:
        """Frames per sample: 1 for image models."""
        return self.config.num_frames

    @property
    def latent(self) -> bool:
        """Samples are VAE latents (decoded by a VAE), not pixels."""
        return self.config.in_channels not in PIXEL_CHANNELS

    @property
    def image_size(self) -> int:
        """Side of the output images (video frames) in pixels."""
        return self.config.input_size * (VAE_DOWNSCALE if self.latent else 1)

    @property
    def default_guidance(self) -> float:
        return float(self.card.get("default_guidance", DEFAULT_GUIDANCE))

    @property
    def conditioning(self) -> str:
        """What a request conditions on: "class" (a class label) or "text" (a prompt)."""
        return self.config.conditioning

    @property
    def max_tokens(self) -> int | None:
        """Text models: the most prompt tokens the encoder reads (longer prompts are cut)."""
        if isinstance(self.config, TextDiTConfig | HunyuanDiTConfig):
            return self.config.max_tokens
        return None

    @property
    def objective(self) -> str:
        """What the network predicts: "eps" (noise; DDPM-family samplers) or "flow" (velocity;
        flow_euler), from the card."""
        return str(self.card.get("objective", "eps"))

    @property
    def samplers(self) -> tuple[str, ...]:
        """The samplers this model runs; the first is the default."""
        return samplers_of(self.objective)

    @property
    def shift(self) -> float:
        """flow_euler's timestep shift (the card's; 1: none)."""
        return float(self.card.get("shift", 1.0))

    def label_from_prompt(self, prompt: str) -> int:
        """Class-conditional models take the class as the prompt: a card class name, or a
        number ("7", "class 7", "digit 7"). Anything else raises FieldError('prompt', ...)."""
        names = [str(n).lower() for n in self.card.get("class_names", [])]
        text = prompt.strip().lower()
        if text in names:
            return names.index(text)
        match = re.fullmatch(r"(?:class\s*|digit\s*)?(\d+)", text)
        n = self.config.num_classes
        if match and int(match.group(1)) < n:
            return int(match.group(1))
        raise FieldError(
            "prompt",
            f"this model is class-conditional: give a class label 0..{n - 1}, got {prompt!r}",
        )

    @property
    def cache_overrides(self) -> dict[str, dict[str, Any]]:
        """Policy name -> config fields the card sets for this model: TeaCache's calibrated
        coefficients (``card["teacache"]["coefficients"]``, written by ``skipdit
        calibrate-teacache``). Every request's cache starts from them (``Pipeline``)."""
        overrides: dict[str, dict[str, Any]] = {}
        coefficients = self.card.get("teacache", {}).get("coefficients")
        if coefficients is not None:
            overrides["teacache"] = {"coefficients": tuple(coefficients)}
        return overrides

    def cache_defaults(self) -> dict[str, dict[str, Any]]:
        """Each cache policy's default config for this model (the card's overrides applied),
        JSON-ready (infinity as None); policies that do not apply to the model's kind are left
        out."""
        overrides = self.cache_overrides
        return {
            name: cache.as_json(policy.default_config(self.config, **overrides.get(name, {})))
            for name, policy in cache.POLICIES.items()
            if policy.applies_to(self.config)
        }


@dataclass
class LoadedModel:
    info: ModelInfo
    pipeline: Pipeline

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def config(self) -> Config:
        return self.info.config

    @property
    def card(self) -> dict[str, Any]:
        return self.info.card

    @property
    def random_weights(self) -> bool:
        return self.info.random_weights


def shipped_models() -> list[str]:
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(p.name for p in WEIGHTS_DIR.iterdir() if (p / CONFIG_FILE).is_file())


def default_model() -> str:
    shipped = shipped_models()
    if SHIPPED_DEFAULT in shipped:
        return SHIPPED_DEFAULT
    return shipped[0] if shipped else FALLBACK_DEFAULT


def known_names() -> list[str]:
    return shipped_models() + [RANDOM_PREFIX + p for p in PRESETS]


def source(name: str) -> tuple[str, Path | str]:
    """("pretrained", dir) | ("hunyuan", dir) | ("official", file) | ("random", preset name)."""
    path = Path(name)
    if (WEIGHTS_DIR / name / CONFIG_FILE).is_file():
        return "pretrained", WEIGHTS_DIR / name
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        return "pretrained", path
    if path.is_dir() and (path / PIPELINE_INDEX).is_file():
        pipeline = json.loads((path / PIPELINE_INDEX).read_text()).get("_class_name")
        if pipeline != HUNYUAN_PIPELINE:
            raise FieldError(
                "model", f"{name!r} is a diffusers {pipeline} directory; served: {HUNYUAN_PIPELINE}"
            )
        return "hunyuan", path
    if path.is_file():
        return "official", path
    if name.startswith(RANDOM_PREFIX) and name[len(RANDOM_PREFIX) :] in PRESETS:
        return "random", name[len(RANDOM_PREFIX) :]
    raise FieldError("model", f"unknown model {name!r}; known: {known_names()} or a local path")


def directory(name_or_path: str) -> Path:
    """The directory (``config.json`` + weights) of a shipped model or a model path in our
    format; FieldError('model', ...) for an official file or a preset, which have none."""
    kind, where = source(name_or_path)
    if kind != "pretrained":
        raise FieldError("model", f"{name_or_path!r} is not a model directory ({kind} weights)")
    return Path(where)


def describe(name_or_path: str | None = None) -> ModelInfo:
    """A model's config and card without its weights: ``config.json`` of our format, a
    Hunyuan-DiT directory's ``transformer/config.json`` (once every part it needs is there:
    ``HUNYUAN_PARTS``), the tensor shapes of a memory-mapped official ``.pt`` (no tensor data
    is read), a preset."""
    name = name_or_path or default_model()
    kind, where = source(name)
    if kind == "pretrained":
        config, card = read_pretrained_meta(where)
        return ModelInfo(name, config, card, random_weights=False)
    if kind == "hunyuan":
        _check_hunyuan_parts(name, Path(where))
        saved = json.loads((Path(where) / "transformer" / CONFIG_FILE).read_text())
        return ModelInfo(name, HunyuanDiTConfig.of_config(saved), dict(HUNYUAN_CARD), False)
    if kind == "official":
        return ModelInfo(name, official_config(official_state_dict(where)), {}, False)
    return ModelInfo(name, preset(str(where)), {}, random_weights=True)


def _check_hunyuan_parts(name: str, root: Path) -> None:
    """FieldError('model', ...) listing every part of ``HUNYUAN_PARTS`` that ``root`` lacks,
    so a deployment refuses to boot on an incomplete directory before any weights are read."""

    def holds(folder: Path, need: str) -> bool:
        if need == WEIGHTS:
            return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
        if need == VOCABULARY:
            return any((folder / file).is_file() for file in VOCAB_FILES)
        return (folder / need).is_file()

    def shown(folder: str, need: str) -> str:
        if need == WEIGHTS:
            return f"{folder}/*.safetensors or *.bin"
        if need == VOCABULARY:
            return f"{folder}/ with one of {', '.join(VOCAB_FILES)}"
        return f"{folder}/{need}"

    missing = []
    for folder, (what, needs) in HUNYUAN_PARTS.items():
        if not (root / folder).is_dir():
            missing.append(f"{folder}/ ({what})")
            continue
        missing += [f"{shown(folder, n)} ({what})" for n in needs if not holds(root / folder, n)]
    if missing:
        raise FieldError(
            "model", f"Hunyuan-DiT directory {name!r} is missing: {'; '.join(missing)}"
        )


def _network(info: ModelInfo, seed: int) -> SkipDiT:
    kind, where = source(info.name)
    if kind == "pretrained":
        return load_pretrained(where)[0]
    if kind == "official":
        return load_official(where)
    torch.manual_seed(seed)
    log.warning(
        "model %s has RANDOM, untrained weights: output is noise-like, for smoke tests only",
        info.name,
    )
    return build(info.config)


def load(
    name_or_path: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    vae_path: str | Path | None = None,
    seed: int = 0,
    embeddings: EmbeddingCache | None = None,
) -> LoadedModel:
    """Load a model by name or path. Unknown names raise FieldError('model', ...); a latent
    model without ``vae_path`` raises FieldError('vae', ...) before any weights are read. A
    text model loads its text encoder too; its prompt embeddings go to ``embeddings`` (a
    worker's shared LRU; None: a cache of its own)."""
    info = describe(name_or_path)
    if source(info.name)[0] == "hunyuan":
        return _load_hunyuan(info, device, dtype, embeddings)
    if info.latent and vae_path is None:
        raise FieldError(
            "vae",
            f"model {info.name!r} samples {info.config.in_channels}-channel latents: "
            "give the local directory of its AutoencoderKL",
        )
    prompting = _prompting(info, device, embeddings) if info.conditioning == "text" else None
    network = _network(info, seed).to(device=device, dtype=dtype)
    vae = load_vae(vae_path).to(device=device, dtype=dtype) if vae_path is not None else None
    pipeline = Pipeline(
        network,
        vae,
        info.default_guidance,
        info.cache_overrides,
        prompting=prompting,
        objective=info.objective,
        shift=info.shift,
    )
    return LoadedModel(info, pipeline)


def _load_hunyuan(
    info: ModelInfo,
    device: str | torch.device,
    dtype: torch.dtype,
    embeddings: EmbeddingCache | None,
) -> LoadedModel:
    """A HunyuanDiTPipeline directory, every part from its own folder, local files only: the
    transformer, BERT and mT5 with their tokenizers (each padded to the model's text lengths,
    as the pipeline pads them), the VAE (its own scaling factor) and the scheduler config, whose
    schedule the DDPM-family samplers run. A deployment's ``vae`` is not this model's: unused."""
    root = Path(source(info.name)[1])
    config = info.config
    assert isinstance(config, HunyuanDiTConfig), "a Hunyuan directory describes a Hunyuan-DiT"
    bert, t5 = (
        TextEncoder.load(root / encoder, root / tokenizer, length, device, fixed_length=True)
        for encoder, tokenizer, length in (
            ("text_encoder", "tokenizer", config.text_len),
            ("text_encoder_2", "tokenizer_2", config.text_len_t5),
        )
    )
    prompting = HunyuanPrompting(bert, t5, info.name, embeddings)
    from diffusers import HunyuanDiT2DModel  # here: its package imports every model (seconds)

    transformer = HunyuanDiT2DModel.from_pretrained(root / "transformer", local_files_only=True)
    network = HunyuanSkipDiT(transformer).to(device=device, dtype=dtype)
    vae = load_vae(root / "vae").to(device=device, dtype=dtype)
    schedule = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    pipeline = Pipeline(
        # Not a SkipDiT, but it has the network interface the pipeline and the policies call
        # (units, embed, run_blocks, head, capturing, forward_cached): tests/model/test_hunyuan*.
        cast(SkipDiT, network),
        vae,
        info.default_guidance,
        info.cache_overrides,
        prompting=prompting,
        objective=info.objective,
        trained_schedule=schedule,
        vae_scale=float(vae.config.scaling_factor),
    )
    return LoadedModel(info, pipeline)


def _prompting(
    info: ModelInfo, device: str | torch.device, embeddings: EmbeddingCache | None
) -> Prompting:
    """A text model's encoder and tokenizer, from the directories its card names (relative to
    the model's directory), read from local files only."""
    kind, where = source(info.name)
    missing = [key for key in ("text_encoder", "tokenizer") if key not in info.card]
    if kind != "pretrained" or missing:
        raise FieldError(
            "model",
            f"text model {info.name!r} needs a directory whose card names its text_encoder "
            f"and tokenizer directories (missing: {missing or ['a model directory']})",
        )
    root = Path(where)
    text = info.config if isinstance(info.config, TextDiTConfig) else None
    encoder = TextEncoder.load(
        root / info.card["text_encoder"],
        root / info.card["tokenizer"],
        text.max_tokens if text is not None else 0,
        device,
        with_embeddings=text is not None and text.text_values == "embeddings",
    )
    return Prompting(encoder, info.name, embeddings)
