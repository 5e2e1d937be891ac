"""Serving a diffusers Hunyuan-DiT directory (``model.registry``): a tiny random
``HunyuanDiTPipeline`` (``tests.helpers.tiny_hunyuan_dir``: a 6-block ``HunyuanDiT2DModel``, a
BERT and a T5 encoder from configs, their tokenizers, a tiny VAE, Hunyuan's v-prediction DDPM
schedule) saved with ``save_pretrained`` and loaded from that directory alone. Our uncached
generation of a prompt is diffusers' pipeline's for the same prompt and seed; the card's default
is Skip-Cache with the paper's Hunyuan settings, which at interval 1 is no cache; requests batch
in one step and get what they get alone; a cache depth the model cannot cache is refused naming
the field. Through the loaded pipeline, every policy that applies is no cache at a setting that
never caches and caches at one that does; those that cannot run on it are refused; a directory
missing a part is refused naming the part, before any weights are read."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, HunyuanDiTPipeline

from model import registry
from model.cache import POLICIES, Mode
from model.cache.skip_cache import SkipCacheConfig
from model.errors import FieldError
from model.registry import LoadedModel
from model.sampling.plan import RunPlan
from service.request import GenerateParams, cache_default, resolve
from tests.helpers import (
    BATCH_TOL,
    HUNYUAN_PROMPTS,
    HUNYUAN_TEXT_LEN,
    tiny_hunyuan_dir,
)

PROMPTS = HUNYUAN_PROMPTS[:2]


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_hunyuan_dir(tmp_path_factory.mktemp("hunyuan"))


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
    assert (info.conditioning, info.max_tokens, info.kind) == ("text", HUNYUAN_TEXT_LEN, "image")
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
    # each alone: rows batched with other rows need not be bit-equal on every CPU's BLAS
    results = [loaded.pipeline.generate([plan])[0] for plan in (plain, off, cached)]
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


# policy -> request fields at which it never caches; at which it caches some of 10 DDIM steps
NEVER = {
    "skip_cache": {"cache_interval": 1},
    "fora": {"cache_interval": 1},
    "fbcache": {"cache_threshold": 0},
    "teacache": {"cache_threshold": 0},
}
CACHING = {
    "skip_cache": {"cache_interval": 3, "cache_depth": 2, "cache_t_start": 1000},
    "fora": {"cache_interval": 3},
    "fbcache": {"cache_threshold": 0.5, "cache_t_end": 0},
    "teacache": {"cache_threshold": 0.5, "cache_t_end": 0},  # the card's (identity) coefficients
}
REFUSED = ("delta_dit", "toca")  # with the reasons their refused_networks give


def test_the_policies_that_apply_are_the_ones_run_here(loaded: LoadedModel) -> None:
    assert set(loaded.info.cache_defaults()) == {"none", *NEVER} == {"none", *CACHING}
    assert set(POLICIES) == {"none", *NEVER, *REFUSED}


@pytest.fixture(scope="module")
def uncached(loaded: LoadedModel) -> torch.Tensor:
    (result,) = loaded.pipeline.generate([run(loaded, PROMPTS[0], steps=10, cache_policy="none")])
    return result.latents


@pytest.mark.parametrize("policy", sorted(NEVER))
def test_each_policy_at_a_never_caching_setting_is_no_cache_exactly(
    loaded: LoadedModel, uncached: torch.Tensor, policy: str
) -> None:
    plan = run(loaded, PROMPTS[0], steps=10, cache_policy=policy, **NEVER[policy])
    (result,) = loaded.pipeline.generate([plan])
    assert result.stats.steps[Mode.CACHED] == 0
    assert torch.equal(result.latents, uncached)


@pytest.mark.parametrize("policy", sorted(CACHING))
def test_each_policy_caches_stays_finite_and_batches_as_alone(
    loaded: LoadedModel, uncached: torch.Tensor, policy: str
) -> None:
    """Through the loaded pipeline (its text encoders, schedule and VAE): some steps cached,
    finite latents and images, another result than no cache; two requests batched under the
    policy get what each gets alone (their states never mix)."""
    plans = [
        run(loaded, prompt, steps=10, seed=seed, cache_policy=policy, **CACHING[policy])
        for prompt, seed in zip(PROMPTS, (0, 4), strict=True)
    ]
    alone = [loaded.pipeline.generate([plan])[0] for plan in plans]
    cached = alone[0].stats.steps[Mode.CACHED]
    assert 0 < cached < 10, cached
    assert torch.isfinite(alone[0].latents).all()
    assert alone[0].images is not None and alone[0].images.shape == (1, 64, 64, 3)
    assert not torch.allclose(alone[0].latents, uncached, **BATCH_TOL)
    together = loaded.pipeline.generate(plans)
    for batched, solo in zip(together, alone, strict=True):
        torch.testing.assert_close(batched.latents, solo.latents, **BATCH_TOL)


@pytest.mark.parametrize("policy", REFUSED)
def test_the_policies_it_cannot_run_are_refused_naming_the_field(
    loaded: LoadedModel, policy: str
) -> None:
    with pytest.raises(FieldError, match="does not apply to hunyuan-dit models") as refused:
        run(loaded, PROMPTS[0], cache_policy=policy)
    assert refused.value.field == "cache_policy"


# a part removed from the directory -> what the error names
MISSING = {
    "transformer/config.json": "transformer/config.json (its HunyuanDiT2DModel)",
    "transformer/diffusion_pytorch_model.safetensors": "transformer/*.safetensors or *.bin",
    "scheduler/scheduler_config.json": "scheduler/scheduler_config.json (its noise schedule)",
    "text_encoder": "text_encoder/ (its BERT text encoder)",
    "text_encoder_2/model.safetensors": "text_encoder_2/*.safetensors or *.bin (its mT5",
    "tokenizer": "tokenizer/ (its BERT tokenizer)",
    "tokenizer_2/tokenizer.json": "tokenizer_2/ with one of tokenizer.json",
    "vae": "vae/ (its AutoencoderKL)",
    "vae/config.json": "vae/config.json (its AutoencoderKL)",
}


@pytest.mark.parametrize("part", sorted(MISSING))
def test_a_directory_missing_a_part_is_refused_naming_the_model_and_the_part(
    directory: Path, tmp_path: Path, part: str
) -> None:
    """At describe (what a deployment's settings check at boot), before any weights are read;
    load describes first."""
    copy = tmp_path / "hunyuan"
    shutil.copytree(directory, copy)
    removed = copy / part
    shutil.rmtree(removed) if removed.is_dir() else removed.unlink()
    for read in (registry.describe, registry.load):
        with pytest.raises(FieldError) as error:
            read(str(copy))
        assert error.value.field == "model"
        assert f"Hunyuan-DiT directory {str(copy)!r} is missing: " in error.value.message
        assert MISSING[part] in error.value.message
        assert error.value.message.count("(its ") == 1  # that part only
