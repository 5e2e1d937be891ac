"""Skip-Latte: the network against a transcription of the official forward, its pair wiring,
official and our checkpoint formats, the pipeline on videos, and the cache policies on video
(the contract every policy passes on video too: test_cache_contract)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model import cache, registry
from model.cache import POLICIES, Mode
from model.cache.skip_cache import default_depth
from model.errors import FieldError
from model.networks.checkpoint import (
    CheckpointError,
    infer_config,
    load_official,
    load_pretrained,
    save_pretrained,
)
from model.networks.presets import build, preset
from model.networks.skip_dit import DiTConfig, SkipDiT
from model.networks.skip_latte import LatteConfig, SkipLatte, init_from_image
from model.sampling.graphs import BucketedForward
from model.sampling.pipeline import Pipeline, step_samplers
from service.request import GenerateParams, resolve
from tests.helpers import BATCH_TOL, generate, info_of, randomized, start, tiny, tiny_video
from tests.model.helpers import tiny_vae

VIDEO_POLICIES = sorted(n for n, p in POLICIES.items() if p.applies_to(preset("digits-video-tiny")))


@pytest.fixture(scope="module")
def video() -> SkipLatte:
    return tiny_video()


@pytest.fixture(scope="module")
def video_pipeline(video: SkipLatte) -> Pipeline:
    return Pipeline(video, default_guidance=2.0)


def _inputs(model: SkipLatte, batch: int = 3, seed: int = 1):
    c = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *c.sample_shape, generator=g)  # (B, C, F, H, W)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, c.num_classes + 1, (batch,), generator=g)
    return x, t, y


# ----------------------------------------------------------------------------- network


def official_forward(m: SkipLatte, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
    """Skip-DiT's ``Latte_skip.forward`` (class-to-video/models/latte.py) transcribed with
    reshapes for einops: x (B, F, C, H, W) -> (B, F, C_out, H, W)."""
    b, f = x.shape[:2]
    h = m.x_embedder(x.flatten(0, 1)) + m.pos_embed  # '(b f) t d'
    n, d = h.shape[1:]
    emb = m.t_embedder(t) + m.y_embedder(y)
    c_spatial, c_temp = emb.repeat_interleave(f, 0), emb.repeat_interleave(n, 0)
    skips, depth = [], len(m.blocks)
    for i in range(0, depth, 2):
        if i >= depth // 2:
            j = (i - depth // 2) // 2  # the official (i - 14) // 2 at depth 28
            h = m.skip_linears[j](m.skip_norms[j](torch.cat([h, skips.pop()], dim=-1)))
        h = m.blocks[i](h, c_spatial)
        h = h.reshape(b, f, n, d).permute(0, 2, 1, 3).reshape(b * n, f, d)  # '(b t) f d'
        if i == 0:
            h = h + m.temp_embed
        h = m.blocks[i + 1](h, c_temp)
        h = h.reshape(b, n, f, d).permute(0, 2, 1, 3).reshape(b * f, n, d)  # '(b f) t d'
        if i < depth // 2:
            skips.append(h)
    h = m.final_layer(h, c_spatial)
    p, ch, g = m.config.patch_size, m.config.out_channels, m.config.input_size // 2
    h = torch.einsum("nhwpqc->nchpwq", h.reshape(b * f, g, g, p, p, ch))
    return h.reshape(b, f, ch, g * p, g * p)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_forward_is_the_official_forward_with_channels_first(learn_sigma: bool) -> None:
    model = tiny_video(learn_sigma=learn_sigma, patch_size=2)
    x, t, y = _inputs(model)
    with torch.no_grad():
        ours = model(x, t, y)  # (B, C_out, F, H, W)
        theirs = official_forward(model, x.transpose(1, 2), t, y)  # (B, F, C_out, H, W)
    assert ours.shape == (3, model.config.out_channels, *model.config.sample_shape[1:])
    torch.testing.assert_close(ours, theirs.transpose(1, 2), rtol=1e-6, atol=1e-6)


def test_parameter_counts_follow_from_the_image_networks() -> None:
    def count(config: LatteConfig) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in SkipLatte(config).parameters())

    # DiT-XL/2 (675,129,632) with 101 + 1 class rows instead of 1000 + 1, plus temp_embed.
    latte = 675_129_632 - (1000 - 101) * 1152 + 16 * 1152
    assert count(preset("Latte-XL/2", long_skip=False)) == latte
    assert count(preset("Latte-XL/2")) == latte + 7 * 2_659_968  # one LSC per pair pairing
    assert preset("Latte-XL/2").units == 14
    assert len(SkipLatte(preset("digits-video-tiny")).blocks) == 8


def test_pair_p_feeds_pair_p_minus_1_minus_p_main_path_first(video: SkipLatte) -> None:
    pairs, hidden = video.config.units, video.config.hidden_size
    x, t, y = _inputs(video)
    b, f = x.shape[0], video.config.num_frames
    outputs: dict[int, torch.Tensor] = {}  # pair -> output (B*F, T, D), spatial layout
    fused: dict[int, torch.Tensor] = {}  # skip index -> fusion input (B*F, T, 2D)

    def temporal_out(p: int):
        def hook(m, a, o: torch.Tensor) -> None:  # o: (B*T, F, D)
            n = o.shape[0] // b
            outputs[p] = o.reshape(b, n, f, -1).transpose(1, 2).reshape(b * f, n, -1)

        return hook

    handles = [video.blocks[2 * p + 1].register_forward_hook(temporal_out(p)) for p in range(pairs)]
    handles += [
        norm.register_forward_pre_hook(lambda m, a, j=j: fused.__setitem__(j, a[0].clone()))
        for j, norm in enumerate(video.skip_norms)
    ]
    try:
        with torch.no_grad():
            video(x, t, y)
    finally:
        for h in handles:
            h.remove()
    assert sorted(fused) == list(range(pairs // 2))
    for p in range(pairs // 2):
        q = pairs - 1 - p  # the pair p feeds
        j = q - pairs // 2
        torch.testing.assert_close(fused[j][..., hidden:], outputs[p], rtol=0, atol=0)  # skip
        torch.testing.assert_close(fused[j][..., :hidden], outputs[q - 1], rtol=0, atol=0)  # main


def test_config_checks_and_exposes_pairs() -> None:
    config = preset("digits-video-tiny")
    assert (config.kind, config.units, config.num_frames) == ("video", 4, 4)
    assert config.num_tokens == 4 * 16 and config.sample_shape == (1, 4, 8, 8)
    assert config.hidden_shape == (4, 16, 32)
    image = DiTConfig()
    assert (image.kind, image.units, image.num_frames, image.sample_shape) == (
        "image", 28, 1, (4, 32, 32),
    )  # fmt: skip
    with pytest.raises(ValueError, match="depth"):
        LatteConfig(depth=6)  # 3 pairs cannot pair up
    assert LatteConfig(depth=6, long_skip=False).units == 3


# ----------------------------------------------------------------------------- checkpoints


def official_latte_keys(depth: int, long_skip: bool) -> set[str]:
    """The key names of official class-to-video Latte / Skip-Latte (Vchitect/Latte and
    OpenSparseLLMs/Skip-DiT ``models/latte.py``), written out independently."""
    wb = ("weight", "bias")
    keys = {"pos_embed", "temp_embed", "y_embedder.embedding_table.weight"}
    keys |= {f"x_embedder.proj.{p}" for p in wb}
    keys |= {f"t_embedder.mlp.{i}.{p}" for i in (0, 2) for p in wb}
    keys |= {f"final_layer.{m}.{p}" for m in ("adaLN_modulation.1", "linear") for p in wb}
    for i in range(depth):
        for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            keys |= {f"blocks.{i}.{m}.{p}" for p in wb}
    if long_skip:
        for j in range(depth // 4):  # one per pair of pairs
            keys |= {f"skip_norms.{j}.{p}" for p in wb}
            keys |= {f"skip_linears.{j}.linear.{p}" for p in wb}
    return keys


@pytest.mark.parametrize("long_skip", [True, False])
def test_network_uses_the_official_latte_key_layout(long_skip: bool) -> None:
    model = tiny_video(long_skip=long_skip)
    assert set(model.state_dict()) == official_latte_keys(8, long_skip)


@pytest.mark.parametrize("long_skip", [True, False])
def test_latte_config_is_read_off_official_shapes(long_skip: bool) -> None:
    config = preset("Latte-XL/2", long_skip=long_skip)
    with torch.device("meta"):
        state = SkipLatte(config).state_dict()
    assert infer_config(state) == config


def test_official_state_dict_round_trips(tmp_path: Path) -> None:
    model = tiny_video(seed=3, learn_sigma=True)
    path = tmp_path / "skip-latte-tiny.pt"
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, path)  # plain fp32 dict
    loaded = load_official(path, num_heads=2)
    assert isinstance(loaded, SkipLatte) and loaded.config == model.config
    assert loaded.config.guided_channels is None  # Latte's sampler guides every channel
    x, t, y = _inputs(model)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x, t, y), model(x, t, y))


def test_wrong_latte_layout_names_the_keys(tmp_path: Path) -> None:
    state = tiny_video().state_dict()
    state["skip_linears.0.lin.weight"] = state.pop("skip_linears.0.linear.weight")
    del state["blocks.5.attn.qkv.bias"]
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        load_official(tmp_path / "bad.pt", num_heads=2)
    message = str(err.value)
    assert "missing keys ['blocks.5.attn.qkv.bias', 'skip_linears.0.linear.weight']" in message
    assert "unexpected keys ['skip_linears.0.lin.weight']" in message


def test_image_style_skip_pairing_is_refused_by_name(tmp_path: Path) -> None:
    """Skips per block (depth/2 of them) instead of per pair (depth/4): unexpected keys."""
    state = tiny_video().state_dict()
    for j in (2, 3):
        state |= {f"skip_norms.{j}.{p}": state[f"skip_norms.0.{p}"] for p in ("weight", "bias")}
    torch.save(state, tmp_path / "per-block.pt")
    with pytest.raises(CheckpointError, match=r"unexpected keys \['skip_norms.2.bias'"):
        load_official(tmp_path / "per-block.pt", num_heads=2)


def test_our_format_records_the_kind_and_old_files_load_as_images(tmp_path: Path) -> None:
    model = tiny_video()
    save_pretrained(model, tmp_path / "v", card={"default_guidance": 4.0})
    meta = json.loads((tmp_path / "v" / "config.json").read_text())
    assert meta["kind"] == "video"
    loaded, card = load_pretrained(tmp_path / "v")
    assert isinstance(loaded, SkipLatte) and loaded.config == model.config and card
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    save_pretrained(tiny(), tmp_path / "i")
    meta = json.loads((tmp_path / "i" / "config.json").read_text())
    assert meta.pop("kind") == "image"
    (tmp_path / "i" / "config.json").write_text(json.dumps(meta))  # as written before video
    image, _ = load_pretrained(tmp_path / "i")
    assert type(image) is SkipDiT and image.config == tiny().config


def test_registry_describes_and_loads_video_models(tmp_path: Path) -> None:
    info = registry.describe("random:Latte-XL/2")
    assert (info.kind, info.num_frames, info.latent, info.image_size) == ("video", 16, True, 256)
    assert info.config == preset("Latte-XL/2") and info.random_weights
    assert "random:Latte-XL/2" in registry.known_names()
    image = registry.describe("random:digits-tiny")
    assert (image.kind, image.num_frames) == ("image", 1)
    loaded = registry.load("random:digits-video-tiny")
    assert isinstance(loaded.pipeline.model, SkipLatte) and loaded.info.kind == "video"
    save_pretrained(tiny_video(), tmp_path / "v")
    assert registry.describe(str(tmp_path / "v")).kind == "video"
    defaults = registry.describe(str(tmp_path / "v")).cache_defaults()
    assert "toca" not in defaults and defaults["skip_cache"]["depth"] == 1


# ----------------------------------------------------------------------------- pipeline


def test_pixel_video_result_holds_each_samples_frames(video_pipeline: Pipeline) -> None:
    (result,) = generate(video_pipeline, [GenerateParams(steps=3, num_images=2, seed=4)])
    assert result.latents.shape == (2, 1, 4, 8, 8)
    assert result.images.shape == (2, 4, 8, 8, 1) and result.images.dtype == torch.uint8
    frame = ((result.latents[1, :, 2].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(result.images[1, 2], frame.permute(1, 2, 0))  # sample 1, frame 2


def test_latent_video_decodes_frame_by_frame() -> None:
    pipeline = Pipeline(tiny_video(in_channels=4, learn_sigma=True), tiny_vae())
    (result,) = generate(pipeline, [GenerateParams(steps=3, num_images=2, sampler="ddpm")])
    assert result.images.shape == (2, 4, 16, 16, 3)
    with torch.no_grad():
        pixels = pipeline.vae.decode(result.latents[1, :, 3][None] / 0.18215).sample
    expected = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    torch.testing.assert_close(result.images[1, 3], expected[0], rtol=0, atol=1)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm++"])
def test_batched_scheduler_update_on_videos_is_diffusers_step(sampler: str) -> None:
    pipeline = Pipeline(tiny_video(learn_sigma=sampler == "ddpm"))
    requests = [
        GenerateParams(steps=5, seed=1, sampler=sampler, guidance_scale=3),
        GenerateParams(steps=5, seed=2, num_images=2, sampler=sampler, guidance_scale=1),
    ]
    ours, ref = [start(pipeline, p) for p in requests], [start(pipeline, p) for p in requests]
    shape = (pipeline.model.config.out_channels, *pipeline.model.config.sample_shape[1:])
    gen = torch.Generator().manual_seed(0)
    while not ours[0].done:
        outs = [torch.randn(job.rows, *shape, generator=gen).tanh() for job in ours]
        step_samplers(ours, outs)
        for job, twin, out in zip(ours, ref, outs, strict=True):
            twin.advance(out, Mode.FULL, 0.0)
            assert torch.equal(job.latents, twin.latents)


def test_batched_video_requests_equal_their_solo_runs(video_pipeline: Pipeline) -> None:
    requests = [
        GenerateParams(steps=6, seed=1, class_label=2, cache_interval=1),
        GenerateParams(steps=6, seed=2, class_label=5, num_images=2, cache_interval=3),
        GenerateParams(steps=5, seed=3, sampler="dpm++", cache_interval=2, guidance_scale=1),
    ]
    batched = generate(video_pipeline, requests)
    for params, result in zip(requests, batched, strict=True):
        (alone,) = generate(video_pipeline, [params])
        torch.testing.assert_close(result.latents, alone.latents, **BATCH_TOL)


# ----------------------------------------------------------------------------- caching on video


def test_policies_that_do_not_apply_to_video_are_refused_by_name() -> None:
    assert VIDEO_POLICIES == ["delta_dit", "fbcache", "fora", "none", "skip_cache", "teacache"]
    with pytest.raises(FieldError) as err:
        cache.build("toca", preset("digits-video-tiny"))
    assert err.value.field == "policy" and "video" in str(err.value)
    with pytest.raises(FieldError) as err:
        resolve(GenerateParams(cache_policy="toca"), info_of(Pipeline(tiny_video())))
    assert err.value.field == "cache_policy"


def test_skip_cache_defaults_are_the_papers_video_ones_in_pairs() -> None:
    assert default_depth(preset("Latte-XL/2")) == default_depth(preset("digits-video-tiny")) == 1
    config = POLICIES["skip_cache"].default_config(preset("Latte-XL/2"))
    assert (config.depth, config.t_start, config.t_end) == (1, 900.0, 50.0)
    assert POLICIES["skip_cache"].default_config(preset("Latte-XL/2"), depth=7).depth == 7
    with pytest.raises(FieldError) as err:
        cache.build("skip_cache", preset("Latte-XL/2"), depth=8)  # 8 of 14 pairs
    assert err.value.field == "depth" and "[1, 7]" in str(err.value)


def test_two_intervals_batched_equal_their_solo_runs(video_pipeline: Pipeline) -> None:
    a = GenerateParams(steps=10, seed=1, class_label=1, cache_interval=2)
    b = GenerateParams(steps=10, seed=2, class_label=7, cache_interval=3, cache_depth=2)
    together = generate(video_pipeline, [a, b])
    for params, batched in zip([a, b], together, strict=True):
        (alone,) = generate(video_pipeline, [params])
        assert alone.stats.steps[Mode.CACHED] > 0
        torch.testing.assert_close(batched.latents, alone.latents, **BATCH_TOL)


# ----------------------------------------------------------------------------- fast paths


@pytest.mark.slow
def test_triton_kernels_give_the_torch_networks_forwards() -> None:
    plain, fused = tiny_video(), tiny_video()
    assert fused.use_kernels("triton") == "triton"
    x, t, y = _inputs(plain)
    key = plain.config.units - 1
    with torch.no_grad():
        want, captured = plain.capturing(x, t, y, {key})
        got, got_captured = fused.capturing(x, t, y, {key})
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_captured[key], captured[key], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            fused.forward_cached(x, t, y, captured[key], 1),
            plain.forward_cached(x, t, y, captured[key], 1),
            rtol=1e-5,
            atol=1e-5,
        )


def test_padded_bucket_runner_serves_video(video: SkipLatte) -> None:
    runner = BucketedForward(video, "off", (4,), depths=(1, 2))
    runner.warmup()
    x, t, y = _inputs(video)
    keys = runner.capture_keys
    with torch.no_grad():
        want, captured = video.capturing(x, t, y, keys)
        got, got_captured = runner.full(x, t, y, keys)
        torch.testing.assert_close(got, want, **BATCH_TOL)
        for k in keys:
            torch.testing.assert_close(got_captured[k], captured[k], **BATCH_TOL)
        deep = captured[video.config.units - 2]
        torch.testing.assert_close(
            runner.cached(x, t, y, deep, 2), video.forward_cached(x, t, y, deep, 2), **BATCH_TOL
        )


def test_a_video_started_from_an_image_model_draws_each_frame_as_the_image_model() -> None:
    """Latte's image init: spatial blocks, embedders, fusions and final layer come from the
    image network and temporal blocks start as identity, so once the (fixed) temporal
    embedding is left out every frame is the image network's output for that frame."""
    image = randomized(build(preset("digits-tiny")), seed=3).eval()
    video = init_from_image(build(preset("digits-video-tiny")), image).eval()
    with torch.no_grad():
        video.temp_embed.zero_()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 4, 8, 8, generator=g)  # (B, C, F, H, W)
    t, y = torch.tensor([500, 20]), torch.tensor([3, 10])
    with torch.no_grad():
        clips = video(x, t, y).transpose(1, 2).flatten(0, 1)  # (B*F, C, H, W)
        frames = image(x.transpose(1, 2).flatten(0, 1), t.repeat_interleave(4),
                       y.repeat_interleave(4))  # fmt: skip
    torch.testing.assert_close(clips, frames, atol=1e-5, rtol=1e-5)
    narrow = build(preset("digits-tiny", hidden_size=64, num_heads=2))
    with pytest.raises(ValueError, match="hidden_size"):
        init_from_image(build(preset("digits-video-tiny")), narrow)
