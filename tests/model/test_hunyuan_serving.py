"""Serving a diffusers Hunyuan-DiT directory (``model.registry``): a tiny random
``HunyuanDiTPipeline`` (a 6-block ``HunyuanDiT2DModel``, a BERT and a T5 encoder from configs,
tokenizers built here, a tiny VAE, Hunyuan's v-prediction DDPM schedule) saved with
``save_pretrained`` and loaded from that directory alone. Our uncached generation of a prompt is
diffusers' pipeline's for the same prompt and seed; the card's default is Skip-Cache with the
paper's Hunyuan settings, which at interval 1 is no cache; requests batch in one step and get
what they get alone; a cache depth the model cannot cache is refused naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    HunyuanDiT2DModel,
    HunyuanDiTPipeline,
)
from transformers import BertConfig, BertModel, BertTokenizer

from model import registry
from model.cache import Mode
from model.cache.skip_cache import SkipCacheConfig
from model.errors import FieldError
from model.registry import LoadedModel
from model.sampling.plan import RunPlan
from model.text.build import build_t5, build_tokenizer
from service.request import GenerateParams, cache_default, resolve
from tests.helpers import BATCH_TOL, randomized

# HunyuanDiTPipeline pads BERT to 77 tokens and mT5 to 256, whatever the model: so must its.
TEXT_LEN, TEXT_LEN_T5, WIDTH = 77, 256, 16
PROMPTS = ("a red cat on the left", "a small blue dog with the sky")
WORDS = sorted({word for prompt in (*PROMPTS, "a big dog on the right") for word in prompt.split()})


def build_directory(root: Path) -> Path:
    """The tiny pipeline, each part saved by ``save_pretrained`` into ``root``."""
    torch.manual_seed(0)
    transformer = HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2,
        sample_size=8, hidden_size=16, num_layers=6, cross_attention_dim=WIDTH,
        cross_attention_dim_t5=WIDTH, pooled_projection_dim=8, text_len=TEXT_LEN,
        text_len_t5=TEXT_LEN_T5,
    )  # fmt: skip
    vocab = root / "bert-vocab.txt"
    vocab.parent.mkdir(parents=True, exist_ok=True)
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    bert_tokenizer = BertTokenizer(str(vocab), model_max_length=TEXT_LEN)
    bert = BertModel(
        BertConfig(
            vocab_size=len(bert_tokenizer), hidden_size=WIDTH, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=32, max_position_embeddings=TEXT_LEN,
        )
    )  # fmt: skip
    t5_tokenizer = build_tokenizer([" ".join(WORDS)], TEXT_LEN_T5)
    t5 = build_t5(len(t5_tokenizer), WIDTH, layers=2, heads=2, dropout=0.0)
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


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_directory(tmp_path_factory.mktemp("hunyuan"))


@pytest.fixture(scope="module")
def loaded(directory: Path) -> LoadedModel:
    return registry.load(str(directory))


def run(loaded: LoadedModel, prompt: str, **fields: object) -> RunPlan:
    """The plan the API makes of a request on the model (its card's defaults applied)."""
    return resolve(GenerateParams(prompt=prompt, **fields), loaded.info)


def latents(loaded: LoadedModel, *plans: RunPlan) -> list[torch.Tensor]:
    return [r.latents for r in loaded.pipeline.generate(list(plans))]


def test_the_directory_is_a_text_model_described_without_its_weights(directory: Path) -> None:
    info = registry.describe(str(directory))
    assert (info.conditioning, info.max_tokens, info.kind) == ("text", TEXT_LEN, "image")
    assert (info.latent, info.image_size, info.config.max_cache_depth) == (True, 64, 2)
    assert info.default_guidance == 5.0 and info.samplers[0] == "ddim"
    assert "toca" not in info.cache_defaults() and "delta_dit" not in info.cache_defaults()


@torch.no_grad()
def test_uncached_generation_is_the_diffusers_pipelines(
    directory: Path, loaded: LoadedModel
) -> None:
    """Same prompt, negative prompt, guidance, seed and DDIM over the model's own schedule:
    diffusers' initial latents are ours (one CPU generator), its text encoding, image meta
    size, style, RoPE, guidance on the first C channels and v-prediction steps too: the final
    latents agree to fp32 rounding (its rows are negative first, ours positive first)."""
    pipe = HunyuanDiTPipeline.from_pretrained(directory, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    fields = {"steps": 5, "seed": 3, "guidance_scale": 4.0, "cache_policy": "none"}
    ours = latents(loaded, run(loaded, PROMPTS[0], negative_prompt="a dog", **fields))[0]
    theirs = pipe(
        PROMPTS[0], negative_prompt="a dog", height=64, width=64, num_inference_steps=5,
        guidance_scale=4.0, use_resolution_binning=False, output_type="latent",
        generator=torch.Generator().manual_seed(3),
    ).images  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # and the comparison can tell: another negative prompt is another image
    other = latents(loaded, run(loaded, PROMPTS[0], **fields))[0]
    assert not torch.allclose(other, theirs, **BATCH_TOL)


def test_the_default_cache_is_skip_cache_with_the_papers_hunyuan_settings(
    loaded: LoadedModel,
) -> None:
    default = cache_default(loaded.info)
    assert (default.policy, default.source) == ("skip_cache", "card")
    paper = SkipCacheConfig(interval=2, depth=1, t_start=700.0, t_end=50.0)
    assert run(loaded, PROMPTS[0]).cache == paper
    shown = loaded.info.cache_defaults()["skip_cache"]
    assert (shown["depth"], shown["t_start"], shown["t_end"]) == (1, 700.0, 50.0)


def test_skip_cache_at_interval_1_is_no_cache_and_the_default_caches(
    loaded: LoadedModel,
) -> None:
    """10 DDIM steps (t = 901, 801, ..., 1): full at t >= 700 and t <= 50, cached at 601, 401
    and 201 under the default interval 2."""
    plain = run(loaded, PROMPTS[0], steps=10, cache_policy="none")
    off = run(loaded, PROMPTS[0], steps=10, cache_interval=1)
    cached = run(loaded, PROMPTS[0], steps=10)
    results = loaded.pipeline.generate([plain]) + loaded.pipeline.generate([off, cached])
    assert off.policy == cached.policy == "skip_cache"
    assert results[1].stats.steps[Mode.CACHED] == 0
    assert torch.equal(results[1].latents, results[0].latents)
    assert results[2].stats.steps[Mode.CACHED] == 3
    assert not torch.allclose(results[2].latents, results[0].latents, **BATCH_TOL)
    assert results[2].images is not None and results[2].images.shape == (1, 64, 64, 3)


def test_requests_with_different_prompts_batch_in_one_step_and_equal_each_alone(
    loaded: LoadedModel,
) -> None:
    """Both under the default Skip-Cache, so full and cached groups are batched alike."""
    plans = [run(loaded, p, steps=6, seed=s) for p, s in zip(PROMPTS, (1, 2), strict=True)]
    calls: list[int] = []
    hook = loaded.pipeline.model.transformer.pos_embed.register_forward_hook(
        lambda m, a, out: calls.append(out.shape[0])
    )
    try:
        together = latents(loaded, *plans)
    finally:
        hook.remove()
    assert calls == [4] * 6  # one forward a step: 2 requests x (prompt, negative) rows
    alone = [latents(loaded, plan)[0] for plan in plans]
    for own, solo in zip(together, alone, strict=True):
        torch.testing.assert_close(own, solo, **BATCH_TOL)
    assert not torch.allclose(alone[0], alone[1], **BATCH_TOL)


def test_a_cache_depth_the_model_cannot_cache_is_a_field_error(loaded: LoadedModel) -> None:
    """Block D/2 has no long skip: K = 3 of 6 blocks (what D/2 would allow) is refused when
    the request is resolved, naming the request's field, not when it runs."""
    assert run(loaded, PROMPTS[0], cache_depth=2).cache.depth == 2
    with pytest.raises(FieldError, match=r"must be in \[1, 2\]") as error:
        run(loaded, PROMPTS[0], cache_depth=3)
    assert error.value.field == "cache_depth"
    with pytest.raises(FieldError) as refused:
        run(loaded, PROMPTS[0], cache_policy="toca")
    assert refused.value.field == "cache_policy"
