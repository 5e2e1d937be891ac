"""Helpers the tests share (imported from here, never from another test module).

Requests in tests are written as the API takes them (``GenerateParams``, request field names)
and resolved as the API resolves them (``service.request.resolve``) against the pipeline they
run on: its card's guidance and calibration, no deployment limits, no default cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
import torch

from model.networks import presets
from model.networks.skip_dit import SkipDiT, preset
from model.networks.skip_latte import SkipLatte
from model.networks.text_dit import TextDiTConfig, TextSkipDiT
from model.registry import ModelInfo
from model.sampling.pipeline import Job, Pipeline, ProgressFn, Result
from model.sampling.plan import RunPlan
from service.api.deps import new_record
from service.messages import JobRecord, JobRequest
from service.request import GenerateParams, resolve

# The test pytest is setting up or running (tests/conftest.py sets it), or None.
running_test: pytest.Item | None = None


def require_marker(name: str, what: str) -> None:
    """Fail the running test if it does ``what`` without carrying the marker ``name``: ``-m``
    selections (``-m "not redis"`` on a machine without redis-server) rely on the markers."""
    test = running_test
    assert test is None or test.get_closest_marker(name) is not None, (
        f"{test.nodeid} {what} but is not marked {name}: add @pytest.mark.{name}"
    )


# Batched vs solo at fp32: GEMMs of different batch sizes round differently (~1 ulp per op);
# over tens of steps that reaches ~1e-5. Far below any visible change (1/255 ~ 4e-3).
BATCH_TOL = {"rtol": 1e-4, "atol": 1e-4}
# Where tests run the Triton kernels: the GPU when there is one, else this CPU under Triton's
# interpreter (tests/conftest.py sets TRITON_INTERPRET=1 only where CUDA is absent).
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


M = TypeVar("M", bound=torch.nn.Module)


def randomized(model: M, seed: int = 0, scale: float = 0.05) -> M:
    """Perturb every trainable weight so that adaLN-Zero's zero init does not make blocks the
    identity (an untouched fresh DiT outputs exactly zero, which would hide cache bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def tiny(seed: int = 0, **overrides: object) -> SkipDiT:
    """Skip-DiT ``digits-tiny``, randomized: depth 4, hidden 32, 8x8 pixels, 10 classes."""
    torch.manual_seed(seed)
    return randomized(SkipDiT(preset("digits-tiny", **overrides)), seed)


def tiny_video(seed: int = 0, **overrides: object) -> SkipLatte:
    """Skip-Latte ``digits-video-tiny``, randomized: 4 pairs (8 blocks), hidden 32, 4 frames of
    8x8 pixels, 10 classes + null class."""
    torch.manual_seed(seed)
    return randomized(SkipLatte(presets.preset("digits-video-tiny", **overrides)), seed)


def info_of(pipeline: Pipeline, card: dict[str, Any] | None = None) -> ModelInfo:
    """A ModelInfo for a pipeline built in a test, its card holding the pipeline's defaults."""
    teacache = pipeline.cache_overrides.get("teacache", {})
    own: dict[str, Any] = {"default_guidance": pipeline.default_guidance}
    if pipeline.objective != "eps":
        own |= {"objective": pipeline.objective, "shift": pipeline.shift}
    if "coefficients" in teacache:
        own["teacache"] = {"coefficients": list(teacache["coefficients"])}
    return ModelInfo("test", pipeline.model.config, own | (card or {}), random_weights=True)


def plan_of(pipeline: Pipeline, params: GenerateParams | RunPlan) -> RunPlan:
    """The plan the API would run ``params`` with on this pipeline's model."""
    if isinstance(params, RunPlan):
        return params
    return resolve(params, info_of(pipeline))


def generate(
    pipeline: Pipeline,
    requests: Sequence[GenerateParams | RunPlan],
    progress: ProgressFn | None = None,
) -> list[Result]:
    """``Pipeline.generate`` of requests written as the API takes them."""
    return pipeline.generate([plan_of(pipeline, p) for p in requests], progress=progress)


def start(pipeline: Pipeline, params: GenerateParams | RunPlan) -> Job:
    """``Pipeline.start`` of a request written as the API takes it."""
    return pipeline.start(plan_of(pipeline, params))


def job_record(pipeline: Pipeline, body: JobRequest, **fields: Any) -> JobRecord:
    """The record the API would write for ``body`` (``new_record``) on a model named
    ``body.model`` that runs on ``pipeline``; ``fields`` (``created_at``...) set over it."""
    info = dataclasses.replace(info_of(pipeline), name=body.model or "test")
    record = new_record(body, info, resolve(body, info))
    return dataclasses.replace(record, deadline=0.0, **fields)  # deadline: from created_at


def tiny_text_model(
    directory: Path,
    card: dict[str, Any] | None = None,
    preset: str = "digits-t2i-tiny",
    **config: Any,
) -> Path:
    """A tiny text-to-image model (``digits-t2i-tiny``, randomized; a 2-layer T5 encoder of width
    16; a word-level tokenizer of the scene captions, 8 tokens) exported into ``directory`` as
    training exports the shipped one: each part by its ``save_pretrained``, a card naming the
    encoder and tokenizer directories; flow objective (sampler flow_euler), guidance 2.
    ``preset``: another text network of that shape (``digits-t2v-tiny``: text-to-video, 4
    frames); ``config``: its fields overridden."""
    from model.text.build import build_t5, build_tokenizer  # the train extra: t2i's builders
    from model.training import scenes, t2i

    text = cast(TextDiTConfig, presets.preset(preset, **config))
    tokenizer = build_tokenizer(scenes.corpus(), text.max_tokens)
    torch.manual_seed(0)
    encoder = build_t5(len(tokenizer), text.text_dim, layers=2, heads=2, dropout=0.0)
    network = cast(TextSkipDiT, presets.build(text))
    trainee = t2i.Trainee(randomized(network, scale=0.1), encoder.eval())
    own = {"objective": "flow", "sampler": "flow_euler", "default_guidance": 2.0}
    return t2i.export(trainee, tokenizer, directory, own | (card or {}))


# The tiny Hunyuan-DiT's prompts: every word is in its tokenizers' vocabularies.
HUNYUAN_PROMPTS = (
    "a red cat on the left",
    "a small blue dog with the sky",
    "a big dog on the right",
)
# HunyuanDiTPipeline pads BERT to 77 tokens and mT5 to 256, whatever the model: so must its.
HUNYUAN_TEXT_LEN, HUNYUAN_TEXT_LEN_T5 = 77, 256


def tiny_hunyuan_dir(root: Path) -> Path:
    """A tiny random ``HunyuanDiTPipeline`` saved by ``save_pretrained`` into ``root/hunyuan``:
    a 6-block ``HunyuanDiT2DModel`` (width 16, 8x8 latents), a BERT and a T5 encoder of width 16
    from configs, word-level tokenizers of ``HUNYUAN_PROMPTS``, a tiny VAE (latent factor 8: 64
    px), Hunyuan-DiT's own v-prediction DDPM schedule. Weights perturbed (``randomized``)."""
    from diffusers import AutoencoderKL, DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline
    from transformers import BertConfig, BertModel, BertTokenizer

    from model.text.build import build_t5, build_tokenizer  # the train extra: t2i's builders

    width = 16
    words = sorted({word for prompt in HUNYUAN_PROMPTS for word in prompt.split()})
    torch.manual_seed(0)
    transformer = HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2,
        sample_size=8, hidden_size=16, num_layers=6, cross_attention_dim=width,
        cross_attention_dim_t5=width, pooled_projection_dim=8, text_len=HUNYUAN_TEXT_LEN,
        text_len_t5=HUNYUAN_TEXT_LEN_T5,
    )  # fmt: skip
    vocab = root / "bert-vocab.txt"
    vocab.parent.mkdir(parents=True, exist_ok=True)
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    bert_tokenizer = BertTokenizer(str(vocab), model_max_length=HUNYUAN_TEXT_LEN)
    bert = BertModel(
        BertConfig(
            vocab_size=len(bert_tokenizer), hidden_size=width, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=32, max_position_embeddings=HUNYUAN_TEXT_LEN,
        )
    )  # fmt: skip
    t5_tokenizer = build_tokenizer([" ".join(words)], HUNYUAN_TEXT_LEN_T5)
    t5 = build_t5(len(t5_tokenizer), width, layers=2, heads=2, dropout=0.0)
    vae = AutoencoderKL(  # 3 downsamplings: the pipeline's latent factor 8 (64 px -> 8x8)
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
        norm_num_groups=8, scaling_factor=0.13025,
    )  # fmt: skip
    scheduler = DDPMScheduler(  # Hunyuan-DiT's own schedule: v-prediction, scaled linear
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.03, clip_sample=False,
        prediction_type="v_prediction", steps_offset=1, timestep_spacing="leading",
    )  # fmt: skip
    pipe = HunyuanDiTPipeline(
        vae=vae, text_encoder=randomized(bert, scale=0.1), tokenizer=bert_tokenizer,
        transformer=randomized(transformer, scale=0.1), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        text_encoder_2=randomized(t5, scale=0.1), tokenizer_2=t5_tokenizer,
    )  # fmt: skip
    pipe.save_pretrained(root / "hunyuan")
    return root / "hunyuan"
