"""Hunyuan-DiT through diffusers (``model.networks.hunyuan``): a tiny random
``HunyuanDiT2DModel`` (6 blocks, width 16, 8x8 latents) behind our network interface. Uncached it
is diffusers' forward bit for bit, as the diffusers pipeline feeds it too; our cache policies run
on it through the engine's group forward; Skip-Cache's cached step runs blocks 0..K-1 and
D-K..D-1 and fuses its stored deep feature through the blocks' own skip_norm / skip_linear as
diffusers' forward does; FORA, first-block cache and TeaCache run, and at never-caching
settings equal no cache."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline

from model.cache import POLICIES, Mode, RequestCache, build
from model.networks.hunyuan import (
    HunyuanContext,
    HunyuanDiTConfig,
    HunyuanPrompt,
    HunyuanSkipDiT,
    rotary_embedding,
)
from model.sampling.pipeline import forward_group
from tests.helpers import BATCH_TOL, randomized

DEPTH = 6  # blocks 0..1 push, 2 and 3 neither, 4..5 fuse: Skip-Cache K in {1, 2}
TEXT_LEN, TEXT_LEN_T5, TEXT_DIM, T5_DIM = 5, 6, 16, 16
# Hunyuan-DiT's own Skip-Cache settings (DESIGN.md): K = 1, full at t >= 700 and t <= 50.
HUNYUAN_SKIP_CACHE = {"depth": 1, "t_start": 700.0, "t_end": 50.0}


def tiny_transformer(
    style_and_meta_size: bool = True, num_layers: int = DEPTH
) -> HunyuanDiT2DModel:
    """Random, then every weight perturbed: diffusers' init leaves each LayerNorm's affine at
    1 and 0, which would make its norm2 and norm3 (and the skip norms' affine) untestable."""
    torch.manual_seed(0)
    transformer = HunyuanDiT2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        patch_size=2,
        sample_size=8,
        hidden_size=16,
        num_layers=num_layers,
        cross_attention_dim=TEXT_DIM,
        cross_attention_dim_t5=T5_DIM,  # its attention pool has 8 heads
        pooled_projection_dim=8,
        text_len=TEXT_LEN,
        text_len_t5=TEXT_LEN_T5,
        use_style_cond_and_image_meta_size=style_and_meta_size,
    )
    return randomized(transformer, scale=0.1)


@pytest.fixture(scope="module")
def model() -> HunyuanSkipDiT:
    return HunyuanSkipDiT(tiny_transformer())


def prompt_of(model: HunyuanSkipDiT, rows: int, seed: int = 1) -> HunyuanPrompt:
    """Random text states for ``rows`` rows, every row's masks with padding of its own length,
    image meta sizes of different images, style 0 (the only one of a 1-style model)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.arange(rows)
    mask = (torch.arange(TEXT_LEN) < TEXT_LEN - 1 - lengths[:, None] % 3).long()  # (rows, L)
    mask_t5 = (torch.arange(TEXT_LEN_T5) < 2 + lengths[:, None] % 4).long()  # (rows, L5)
    meta = torch.tensor([[1024.0, 768, 64, 64, 0, 0], [512, 512, 64, 64, 8, 0]])[lengths % 2]
    styled = model.config.style_and_meta_size
    return HunyuanPrompt(
        encoder_hidden_states=torch.randn(rows, TEXT_LEN, TEXT_DIM, generator=g),
        text_embedding_mask=mask,
        encoder_hidden_states_t5=torch.randn(rows, TEXT_LEN_T5, T5_DIM, generator=g),
        text_embedding_mask_t5=mask_t5,
        image_rotary_emb=rotary_embedding(model.config, 8, 8),
        image_meta_size=meta if styled else None,
        style=torch.zeros(rows, dtype=torch.long) if styled else None,
    )


def latents(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


@contextmanager
def blocks_run(model: HunyuanSkipDiT) -> Iterator[list[int]]:
    """The indices of the diffusers blocks that run, in order (forward hooks)."""
    ran: list[int] = []
    handles = [
        block.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
        for i, block in enumerate(model.transformer.blocks)
    ]
    try:
        yield ran
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------- the network


def test_the_config_is_read_from_the_diffusers_model(model: HunyuanSkipDiT) -> None:
    config = model.config
    assert (config.units, config.depth, config.hidden_size, config.num_heads) == (6, 6, 16, 2)
    assert (config.out_channels, config.sample_shape, config.max_cache_depth) == (8, (4, 8, 8), 2)
    assert (config.text_len, config.text_len_t5, config.conditioning) == (5, 6, "text")
    for layers in (2, 5):  # no long skip to pair; an odd one that diffusers cannot pair
        with pytest.raises(ValueError, match="depth"):
            HunyuanDiTConfig.of(tiny_transformer(num_layers=layers))


@pytest.mark.parametrize("styled", [True, False], ids=["v1.1-style-meta", "v1.2"])
@torch.no_grad()
def test_forward_is_diffusers_forward_bit_for_bit(styled: bool) -> None:
    """fp32, 3 rows at different timesteps (integers, as our DDPM-family jobs feed them; the
    diffusers pipeline feeds floats), text masks with padding of different lengths."""
    model = HunyuanSkipDiT(tiny_transformer(styled))
    prompt = prompt_of(model, 3)
    assert not prompt.text_embedding_mask.all() and not prompt.text_embedding_mask_t5.all()
    x, t = latents(3, seed=2), torch.tensor([999, 500, 3])
    expected = model.transformer(x, t.float(), **prompt.kwargs()).sample
    assert torch.equal(model(x, t, model.encode(prompt)), expected)


@torch.no_grad()
def test_forward_is_what_the_diffusers_pipeline_computes() -> None:
    """Every transformer call of ``HunyuanDiTPipeline`` (guidance: negative and positive rows,
    its RoPE, image meta size, style and float timesteps) recomputed by the adapter from the
    same inputs, through ``rotary_embedding`` and ``encode``: bit for bit."""
    transformer = tiny_transformer()
    model = HunyuanSkipDiT(transformer)
    torch.manual_seed(0)
    vae = AutoencoderKL(  # 3 downsamplings: the pipeline's latent factor 8 (64 px -> 8x8)
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
    )
    pipe = HunyuanDiTPipeline(
        vae=vae, text_encoder=None, tokenizer=None, transformer=transformer,
        scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    positive, negative = prompt_of(model, 2, seed=1), prompt_of(model, 2, seed=2)
    calls: list[tuple[tuple, dict[str, Any], torch.Tensor]] = []
    hook = transformer.register_forward_hook(
        lambda m, args, kwargs, out: calls.append((args, kwargs, out[0])), with_kwargs=True
    )
    try:
        pipe(
            prompt_embeds=positive.encoder_hidden_states,
            prompt_attention_mask=positive.text_embedding_mask,
            prompt_embeds_2=positive.encoder_hidden_states_t5,
            prompt_attention_mask_2=positive.text_embedding_mask_t5,
            negative_prompt_embeds=negative.encoder_hidden_states,
            negative_prompt_attention_mask=negative.text_embedding_mask,
            negative_prompt_embeds_2=negative.encoder_hidden_states_t5,
            negative_prompt_attention_mask_2=negative.text_embedding_mask_t5,
            height=64, width=64, num_inference_steps=2, guidance_scale=4.0,
            original_size=(1024, 768), use_resolution_binning=False, output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
    finally:
        hook.remove()
    assert len(calls) == 2
    cos, sin = rotary_embedding(model.config, 8, 8)
    for (x, t), kwargs, out in calls:
        assert x.shape == (4, 4, 8, 8) and t.dtype == torch.float32
        assert torch.equal(kwargs["image_rotary_emb"][0], cos)
        assert torch.equal(kwargs["image_rotary_emb"][1], sin)
        fields = {k: v for k, v in kwargs.items() if k in HunyuanPrompt.__dataclass_fields__}
        context = model.encode(HunyuanPrompt(**fields))
        assert torch.equal(model(x, t, context), out)


@torch.no_grad()
def test_the_modulated_input_is_what_block_0_self_attention_reads(model: HunyuanSkipDiT) -> None:
    """TeaCache's signal: block 0's normalised input shifted by its adaLN embedding."""
    read: list[torch.Tensor] = []
    hook = model.transformer.blocks[0].attn1.register_forward_pre_hook(
        lambda m, args: read.append(args[0])
    )
    try:
        x, t = latents(2, seed=2), torch.tensor([700, 300])
        _, captured = model.capturing(x, t, model.encode(prompt_of(model, 2)), ["modulated"])
    finally:
        hook.remove()
    assert torch.equal(captured["modulated"], read[0])


# ----------------------------------------------------------------------------- Skip-Cache


@torch.no_grad()
def stored_at_an_older_step(model: HunyuanSkipDiT, depth: int) -> RequestCache:
    """A Skip-Cache request whose full step ran at other latents and timestep than the cached
    step the tests run (``latents(2, seed=4)`` at t = 500): its deep feature is the hidden
    state that entered block D-depth there."""
    context = model.encode(prompt_of(model, 2))
    cache = build("skip_cache", model.config, interval=2, depth=depth)
    keys = cache.capture_blocks(model.config)
    assert keys == (DEPTH - depth,)
    captured = model.capturing(latents(2, seed=3), torch.tensor([600, 600]), context, keys)[1]
    cache.policy.on_full(cache.config, cache.state, captured)
    return cache


@pytest.mark.parametrize("depth", [1, 2])
@torch.no_grad()
def test_skip_cache_cached_step_runs_only_the_first_and_last_k_blocks(
    model: HunyuanSkipDiT, depth: int
) -> None:
    context = model.encode(prompt_of(model, 2))
    cache = build("skip_cache", model.config, interval=2, depth=depth)
    x, t = latents(2, seed=3), torch.tensor([500, 500])
    with blocks_run(model) as full:
        _, captured = model.capturing(x, t, context, cache.capture_blocks(model.config))
    cache.policy.on_full(cache.config, cache.state, captured)
    with blocks_run(model) as cached:
        cache.policy.run_cached(model, x, t, context, cache.config, [cache.state])
    assert full == list(range(DEPTH))
    assert cached == [*range(depth), *range(DEPTH - depth, DEPTH)]


@pytest.mark.parametrize("depth", [1, 2])
@torch.no_grad()
def test_skip_cache_cached_step_fuses_the_deep_feature_as_diffusers_does(
    model: HunyuanSkipDiT, depth: int
) -> None:
    """The reference runs diffusers' own modules by hand, as its forward does, with the stored
    deep feature injected in front of block D-K: every one of blocks D-K..D-1 gets the skip
    diffusers would give it (block j's output feeds block D-1-j) through its skip_norm and
    skip_linear."""
    cache = stored_at_an_older_step(model, depth)
    x, t, deep = latents(2, seed=4), torch.tensor([500, 500]), cache.state.deep
    context = model.encode(prompt_of(model, 2))
    out = cache.policy.run_cached(model, x, t, context, cache.config, [cache.state])
    tr, prompt = model.transformer, prompt_of(model, 2)
    hidden = tr.pos_embed(x)
    temb = tr.time_extra_emb(
        t.float(), prompt.encoder_hidden_states_t5, prompt.image_meta_size, prompt.style,
        hidden_dtype=torch.float32,
    )  # fmt: skip
    t5 = tr.text_embedder(prompt.encoder_hidden_states_t5.view(-1, T5_DIM)).view(2, -1, TEXT_DIM)
    text = torch.cat([prompt.encoder_hidden_states, t5], dim=1)
    mask = torch.cat([prompt.text_embedding_mask, prompt.text_embedding_mask_t5], dim=-1)
    text = torch.where(mask.unsqueeze(2).bool(), text, tr.text_embedding_padding)
    kw = {"temb": temb, "encoder_hidden_states": text, "image_rotary_emb": prompt.image_rotary_emb}
    shallow = []
    for layer in range(depth):
        hidden = tr.blocks[layer](hidden, **kw)
        shallow.append(hidden)
    hidden = deep
    for layer in range(DEPTH - depth, DEPTH):
        assert tr.blocks[layer].skip_linear is not None
        hidden = tr.blocks[layer](hidden, skip=shallow[DEPTH - 1 - layer], **kw)
    hidden = tr.proj_out(tr.norm_out(hidden, temb))
    expected = torch.einsum("nhwpqc->nchpwq", hidden.reshape(2, 4, 4, 2, 2, 8)).reshape(2, 8, 8, 8)
    assert torch.equal(out, expected)
    assert not torch.allclose(out, model(x, t, context), **BATCH_TOL)  # the deep one is older


@torch.no_grad()
def test_skip_cache_depth_leaves_every_cached_deep_block_a_skip(model: HunyuanSkipDiT) -> None:
    """Block D/2 has no long skip: K = D/2 would feed it the stale feature with nothing fresh."""
    deep = stored_at_an_older_step(model, 2).state.deep
    x, t = latents(2, seed=4), torch.tensor([500, 500])
    context = model.encode(prompt_of(model, 2))
    for depth in (0, DEPTH // 2):
        with pytest.raises(ValueError, match=r"cache depth must be in \[1, 2\]"):
            model.forward_cached(x, t, context, deep, depth)


# ----------------------------------------------------------------------------- denoising loops


@dataclass
class Request:
    """What the engine's group forward reads of a job (``model.sampling.graphs.Cached``)."""

    cache: RequestCache
    rows: int
    adapter: None = None  # no LoRA adapter (Hunyuan-DiT takes none)


@torch.no_grad()
def denoise(
    model: HunyuanSkipDiT, policy: str, steps: int = 8, **params: Any
) -> tuple[torch.Tensor, list[Mode]]:
    """A 2-row request denoised by DDIM through ``forward_group`` (the engine's eager forward
    of one mode group) and the policy's ``on_full``, as ``denoise_step`` runs them; the final
    latents and the mode each step really ran in."""
    context = model.encode(prompt_of(model, 2))
    request = Request(build(policy, model.config, **params), rows=2)
    cache = request.cache
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(steps)
    x, modes = latents(2, seed=5), []
    for step, t in enumerate(scheduler.timesteps):
        mode = cache.decide(step, int(t))
        full = mode is Mode.FULL
        out, captured = forward_group(model, [request], full, x, t.repeat(2), context)
        if full:
            wanted = cache.capture_blocks(model.config)
            cache.policy.on_full(cache.config, cache.state, {k: captured[k] for k in wanted})
        modes.append(cache.policy.realized_mode(cache.state, mode))
        assert torch.isfinite(out).all()
        x = scheduler.step(out[:, :4], t, x).prev_sample  # eps; learned sigma unused by DDIM
    return x, modes


@pytest.fixture(scope="module")
def uncached(model: HunyuanSkipDiT) -> torch.Tensor:
    return denoise(model, "none")[0]


def test_skip_cache_at_interval_1_is_no_cache(
    model: HunyuanSkipDiT, uncached: torch.Tensor
) -> None:
    for depth in (1, 2):
        out, modes = denoise(model, "skip_cache", interval=1, depth=depth, t_end=0.0)
        assert modes == [Mode.FULL] * 8
        assert torch.equal(out, uncached)
    # and the loop can tell: at interval 2 it caches and drifts
    out, modes = denoise(model, "skip_cache", interval=2, **HUNYUAN_SKIP_CACHE)
    assert modes.count(Mode.CACHED) == 2  # t = 625, 375 (875, 750 >= 700; 0-250: 2 of 4 full)
    assert not torch.equal(out, uncached)


# policy -> settings at which it never caches
NEVER = {
    "fora": {"interval": 1},
    "fbcache": {"threshold": 0.0},
    "teacache": {"threshold": 0.0},
}
# policy -> settings at which it caches on this network (t_end 0: only the last step is late)
CACHING = {
    "skip_cache": {"interval": 3, "depth": 2, "t_end": 0.0},
    "skip_cache-adaptive": {"interval": 4, "depth": 1, "threshold": 0.5, "t_end": 0.0},
    "fora": {"interval": 3},
    "fbcache": {"threshold": 0.5, "t_end": 0.0},
    "teacache": {"threshold": 0.5, "t_end": 0.0},
}


@pytest.mark.parametrize("policy", sorted(NEVER))
def test_policies_at_never_caching_settings_are_no_cache(
    model: HunyuanSkipDiT, uncached: torch.Tensor, policy: str
) -> None:
    out, modes = denoise(model, policy, **NEVER[policy])
    assert modes == [Mode.FULL] * 8
    assert torch.equal(out, uncached)


@pytest.mark.parametrize("case", sorted(CACHING))
def test_policies_cache_and_stay_finite(
    model: HunyuanSkipDiT, uncached: torch.Tensor, case: str
) -> None:
    out, modes = denoise(model, case.split("-")[0], **CACHING[case])  # finite: checked inside
    assert out.shape == uncached.shape and torch.isfinite(out).all()
    assert modes[0] is Mode.FULL and Mode.CACHED in modes
    if case == "skip_cache-adaptive":  # and its would-be cached step 1 refreshed (moved > 0.5)
        assert modes[1] is Mode.FULL
    assert not torch.equal(out, uncached)


STEP_CONFIGS = {
    "skip_cache": {"interval": 2, "depth": 2},
    "fora": {},
    "fbcache": {"threshold": 0.5},
    "teacache": {"threshold": 0.5},
}


@pytest.mark.parametrize("policy", sorted(STEP_CONFIGS))
@torch.no_grad()
def test_a_cached_step_at_the_full_steps_inputs_reproduces_it(
    model: HunyuanSkipDiT, policy: str
) -> None:
    """Each block a cached step runs outputs what it did on the full step (so each reads its
    own stored tensors: FORA's branches through the written-out block, Skip-Cache's deep
    feature), and the output is the full step's. FORA computes no self-attention and no
    feed-forward."""
    p = POLICIES[policy]
    config = p.configure(model.config, **STEP_CONFIGS[policy])
    state = p.new_state()
    x, t, context = latents(2, seed=6), torch.tensor([400, 400]), model.encode(prompt_of(model, 2))
    outputs: list[tuple[int, torch.Tensor]] = []
    branches: list[str] = []
    handles = [
        block.register_forward_hook(lambda m, a, o, i=i: outputs.append((i, o.clone())))
        for i, block in enumerate(model.transformer.blocks)
    ] + [
        module.register_forward_hook(lambda *a, name=name: branches.append(name))
        for block in model.transformer.blocks
        for name, module in (("attn", block.attn1), ("mlp", block.ff))
    ]
    try:
        full, captured = model.capturing(x, t, context, p.capture_blocks(config, model.config))
        p.on_full(config, state, captured)
        reference = dict(outputs)
        outputs.clear()
        branches.clear()
        cached = p.run_cached(model, x, t, context, config, [state])
    finally:
        for h in handles:
            h.remove()
    assert p.realized_mode(state, Mode.CACHED) is Mode.CACHED
    for i, out in outputs:
        assert torch.equal(out, reference[i]), f"block {i}"
    if policy in ("skip_cache", "fora"):
        assert torch.equal(cached, full)
    else:  # the residual added back: first + (final - first), within rounding
        torch.testing.assert_close(cached, full, **BATCH_TOL)
    if policy == "fora":
        assert branches == []
        assert len(captured) == 2 * DEPTH and captured["attn", 0].shape == (2, 16, 16)


# policy -> a config under which a cached step at a full step's own inputs reuses, and one at
# moved inputs (other latents, 300 timesteps on) recomputes
DECIDING = {
    "fbcache": {"threshold": 0.3},
    "teacache": {"threshold": 0.3},
    "skip_cache": {"interval": 3, "depth": 1, "threshold": 0.3},  # adaptive
}


@pytest.mark.parametrize("policy", sorted(DECIDING))
@torch.no_grad()
def test_requests_in_one_cached_group_run_as_they_run_alone(
    model: HunyuanSkipDiT, policy: str
) -> None:
    """Two requests (2 rows each, their own text) in one cached forward: A at its full step's
    inputs reuses its store, B at moved inputs recomputes, on its own rows of the step's
    conditioning; each gets what it gets alone."""
    p = POLICIES[policy]
    config = p.configure(model.config, **DECIDING[policy])
    contexts = [model.encode(prompt_of(model, 2, seed=s)) for s in (1, 2)]
    full_at = [(latents(2, seed=7), torch.tensor([500, 500])) for _ in range(2)]
    now = [full_at[0], (latents(2, seed=8), torch.tensor([200, 200]))]

    def stored() -> list[Any]:
        states = []
        for (x, t), context in zip(full_at, contexts, strict=True):
            state = p.new_state()
            _, captured = model.capturing(x, t, context, p.capture_blocks(config, model.config))
            p.on_full(config, state, captured)
            states.append(state)
        return states

    alone = [
        p.run_cached(model, x, t, context, config, [state])
        for (x, t), context, state in zip(now, contexts, stored(), strict=True)
    ]
    states = stored()
    together = p.run_cached(
        model,
        torch.cat([x for x, _ in now]),
        torch.cat([t for _, t in now]),
        HunyuanContext.cat(contexts),
        config,
        states,
    )
    assert [p.realized_mode(s, Mode.CACHED) for s in states] == [Mode.CACHED, Mode.FULL]
    for own, out in zip(together.split(2), alone, strict=True):
        torch.testing.assert_close(own, out, **BATCH_TOL)
