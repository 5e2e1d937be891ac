from __future__ import annotations

import argparse
import dataclasses
import itertools
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from model import registry
from model.cache import Mode
from model.errors import FieldError
from model.networks.checkpoint import save_pretrained
from model.networks.skip_dit import SkipDiT
from model.sampling.pipeline import (
    ForwardTimer,
    Job,
    Pipeline,
    StepStats,
    denoise_step,
    forward_group,
    make_scheduler,
    step_samplers,
)
from service.request import GenerateParams
from tests.helpers import BATCH_TOL, generate, start, tiny
from tests.model.helpers import tiny_vae

CONFIGS = list(itertools.product(["ddim", "ddpm", "dpm++"], [False, True], [True, False]))


def _solo(pipeline: Pipeline, params: GenerateParams) -> torch.Tensor:
    return generate(pipeline, [params])[0].latents


def test_batched_requests_equal_their_solo_runs(tiny_pipeline: Pipeline) -> None:
    requests = [
        GenerateParams(steps=8, seed=1, class_label=2, cache_interval=1),
        GenerateParams(steps=8, seed=2, class_label=5, num_images=2, cache_interval=3),
        GenerateParams(steps=6, seed=3, class_label=9, sampler="dpm++", cache_interval=2),
        GenerateParams(steps=7, seed=4, guidance_scale=1, sampler="ddpm", cache_interval=4),
    ]
    batched = generate(tiny_pipeline, requests)
    for params, result in zip(requests, batched, strict=True):
        torch.testing.assert_close(result.latents, _solo(tiny_pipeline, params), **BATCH_TOL)


def test_a_request_joining_mid_way_does_not_change_either_output(tiny_pipeline: Pipeline) -> None:
    a_params = GenerateParams(steps=8, seed=11, cache_interval=2)
    b_params = GenerateParams(steps=8, seed=12, class_label=4, cache_interval=3)
    a = start(tiny_pipeline, a_params)
    for _ in range(3):
        denoise_step(tiny_pipeline.model, [a])
    b = start(tiny_pipeline, b_params)
    while not b.done:
        denoise_step(tiny_pipeline.model, [j for j in (a, b) if not j.done])
    torch.testing.assert_close(a.latents, _solo(tiny_pipeline, a_params), **BATCH_TOL)
    torch.testing.assert_close(b.latents, _solo(tiny_pipeline, b_params), **BATCH_TOL)


def test_seed_decides_the_output(tiny_pipeline: Pipeline) -> None:
    one = _solo(tiny_pipeline, GenerateParams(steps=4, seed=1, sampler="ddpm"))
    again = _solo(tiny_pipeline, GenerateParams(steps=4, seed=1, sampler="ddpm"))
    other = _solo(tiny_pipeline, GenerateParams(steps=4, seed=2, sampler="ddpm"))
    assert torch.equal(one, again)
    assert not torch.allclose(one, other)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm++"])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_every_sampler_handles_learned_sigma(sampler: str, learn_sigma: bool) -> None:
    pipeline = Pipeline(tiny(learn_sigma=learn_sigma))
    params = GenerateParams(steps=5, sampler=sampler, guidance_scale=3, cache_interval=2)
    (result,) = generate(pipeline, [params])
    assert result.images.shape == (1, 8, 8, 1) and result.images.dtype == torch.uint8
    assert torch.isfinite(result.latents).all()


def test_ddpm_uses_the_learned_variance() -> None:
    model = tiny(learn_sigma=True)
    params = GenerateParams(steps=5, sampler="ddpm", guidance_scale=1)
    before = _solo(Pipeline(model), params)
    with torch.no_grad():  # move only the variance channel of the output
        model.final_layer.linear.bias[1::2] += 1.0
    assert not torch.allclose(before, _solo(Pipeline(model), params))


def test_guidance_uses_the_null_class_in_the_same_forward(tiny_pipeline: Pipeline) -> None:
    job = start(tiny_pipeline, GenerateParams(steps=3, guidance_scale=4, num_images=2))
    x, t, y = job.model_input()
    assert x.shape[0] == 4 and y.tolist() == [0, 0, 10, 10] and t.tolist() == [t[0]] * 4
    guided = _solo(tiny_pipeline, GenerateParams(steps=3, guidance_scale=4, num_images=2))
    plain = _solo(tiny_pipeline, GenerateParams(steps=3, guidance_scale=1, num_images=2))
    assert not torch.allclose(guided, plain)


def test_guidance_without_a_null_class_is_refused() -> None:
    pipeline = Pipeline(tiny(class_dropout_prob=0.0))
    with pytest.raises(FieldError) as err:
        start(pipeline, GenerateParams(guidance_scale=2))
    assert err.value.field == "guidance_scale"


def test_progress_reports_each_steps_mode_and_cancel_stops(tiny_pipeline: Pipeline) -> None:
    seen: list[tuple[int, int, Mode]] = []

    def progress(job: Job, mode: Mode) -> None:
        if job.plan.seed == 1:
            seen.append((job.step, job.total_steps, mode))
        elif job.step == 3:
            job.cancel()

    keep = GenerateParams(steps=8, seed=1, cache_interval=3)
    stop = GenerateParams(steps=8, seed=2, cache_interval=3)
    kept, stopped = generate(tiny_pipeline, [keep, stop], progress=progress)
    full, cached = Mode.FULL, Mode.CACHED
    # DDIM-8 timesteps 875..0: interval 3 plus the t <= 20 tail (last step).
    assert [m for *_, m in seen] == [full, cached, cached, full, cached, cached, full, full]
    assert [s for s, *_ in seen] == list(range(1, 9)) and {n for _, n, _ in seen} == {8}
    assert kept.status == "done" and kept.stats.steps == {full: 4, cached: 4}
    assert stopped.status == "cancelled" and stopped.images is None
    assert sum(stopped.stats.steps.values()) == 3
    torch.testing.assert_close(kept.latents, _solo(tiny_pipeline, keep), **BATCH_TOL)


def test_stats_report_cached_steps_cheaper_in_count_and_speedup(tiny_pipeline: Pipeline) -> None:
    (result,) = generate(tiny_pipeline, [GenerateParams(steps=8, cache_interval=4)])
    stats = result.stats.as_dict()
    assert stats["steps_full"] + stats["steps_cached"] == 8
    assert stats["steps_cached"] > 0 and stats["speedup"] is not None


def _save_tiny_vae(directory: Path) -> Path:
    """A 4-channel AutoencoderKL that downsamples by 2, saved for ``registry.load``."""
    tiny_vae().save_pretrained(directory)
    return directory


def test_latent_model_decodes_with_a_local_vae(tmp_path: Path) -> None:
    _save_tiny_vae(tmp_path / "vae")
    save_pretrained(tiny(in_channels=4, learn_sigma=True), tmp_path / "dit")
    with pytest.raises(FieldError) as err:
        registry.load(str(tmp_path / "dit"))
    assert err.value.field == "vae"
    loaded = registry.load(str(tmp_path / "dit"), vae_path=tmp_path / "vae")
    (result,) = generate(loaded.pipeline, [GenerateParams(steps=3, num_images=2)])
    assert result.images.shape == (2, 16, 16, 3)
    with torch.no_grad():
        pixels = loaded.pipeline.vae.decode(result.latents / 0.18215).sample
    expected = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(result.images, expected)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm++"])
def test_an_oracle_denoiser_recovers_its_target(tiny_pipeline: Pipeline, sampler: str) -> None:
    # For a one-image data set the ideal eps is known in closed form; feeding it through the
    # job's own step logic must land on that image (checks timesteps, scaling, scheduler use).
    target = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    job = start(tiny_pipeline, GenerateParams(steps=50, guidance_scale=1, sampler=sampler))
    while not job.done:
        alpha = job.scheduler.alphas_cumprod[job.timestep]
        x, _, _ = job.model_input()
        job.advance((x - alpha.sqrt() * target) / (1 - alpha).sqrt(), Mode.FULL, 0.0)
    torch.testing.assert_close(job.latents, target, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- official guidance


def official_forward_with_cfg(model_out: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """facebookresearch/DiT ``models.py`` ``DiT.forward_with_cfg`` (copied unchanged into every
    Skip-DiT class-to-image model), restated: rows are [conditional; unconditional] predictions
    for the same inputs; guidance mixes channels 0-2 only, every other channel (eps channel 3,
    the learned variance) stays each row's own. The sampler keeps the conditional half."""
    eps, rest = model_out[:, :3], model_out[:, 3:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    eps = torch.cat([half_eps, half_eps], dim=0)
    return torch.cat([eps, rest], dim=1)


def reference_sample(model: SkipDiT, params: GenerateParams) -> torch.Tensor:
    """The official sampling loop, one guided forward per step, on our scheduler and noise.
    ``params`` name their sampler and class label (unset, the API picks them)."""
    config, n = model.config, params.num_images
    assert params.sampler is not None and params.class_label is not None
    scheduler = make_scheduler(params.sampler, config.learn_sigma, pixel_space=False)
    scheduler.set_timesteps(params.steps)
    generator = torch.Generator().manual_seed(params.seed)
    shape = (n, config.in_channels, config.input_size, config.input_size)
    x = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
    y = torch.tensor([params.class_label] * n + [config.num_classes] * n)  # then the null class
    for t in scheduler.timesteps:
        half = scheduler.scale_model_input(x, t)
        with torch.no_grad():
            out = model(torch.cat([half, half]), t.repeat(2 * n), y)
        out = official_forward_with_cfg(out, params.guidance_scale)[:n]
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x


def _official_release(path: Path) -> SkipDiT:
    """A small Skip-DiT on 4-channel latents, saved in the official training-checkpoint layout."""
    model = tiny(in_channels=4, learn_sigma=True)
    state = model.state_dict()
    torch.save({"model": state, "ema": state, "opt": {}, "args": argparse.Namespace()}, path)
    return model


def test_official_release_guides_eps_channels_0_to_2_as_the_official_sampler(
    tmp_path: Path,
) -> None:
    network = _official_release(tmp_path / "DiT-skip.pt")
    loaded = registry.load(str(tmp_path / "DiT-skip.pt"), vae_path=_save_tiny_vae(tmp_path / "vae"))
    assert loaded.config.guided_channels == 3
    params = GenerateParams(
        steps=6, sampler="ddpm", guidance_scale=4, num_images=2, seed=5, cache_policy="none",
        class_label=0,
    )  # fmt: skip
    job = start(loaded.pipeline, params)
    out = torch.randn(4, 8, 8, 8)  # (2n, 2C, H, W): conditional rows, then unconditional
    eps, rest = job.guide(out)
    assert torch.equal(torch.cat([eps, rest], dim=1), official_forward_with_cfg(out, 4.0)[:2])
    assert torch.equal(eps[:, 3:], out[:2, 3:4]) and not torch.equal(eps[:, :3], out[:2, :3])

    (result,) = generate(loaded.pipeline, [params])
    torch.testing.assert_close(result.latents, reference_sample(network, params), rtol=0, atol=0)
    all_channels = Pipeline(network, loaded.pipeline.vae)  # the same weights, as our own model
    assert not torch.allclose(generate(all_channels, [params])[0].latents, result.latents)


def test_own_models_guide_every_eps_channel() -> None:
    pipeline = Pipeline(tiny(in_channels=4, learn_sigma=True))
    assert pipeline.model.config.guided_channels is None
    job = start(pipeline, GenerateParams(guidance_scale=3, num_images=2))
    out = torch.randn(4, 8, 8, 8)
    eps, rest = job.guide(out)
    cond, uncond = out[:2, :4], out[2:, :4]
    assert torch.equal(eps, uncond + 3.0 * (cond - uncond)) and torch.equal(rest, out[:2, 4:])


# ----------------------------------------------------------------------------- batched scheduler


def _twin_runs(pipeline: Pipeline, requests: list[GenerateParams], joins: list[int]) -> int:
    """Step each request twice from the same seed: batched (``step_samplers``, as
    ``denoise_step`` does) and per request (diffusers' ``scheduler.step``), on the same model
    outputs; request i joins at iteration ``joins[i]``. Asserts bitwise equal latents after
    every step; returns how many updates mixed step indices."""
    ours = [start(pipeline, p) for p in requests]
    ref = [start(pipeline, p) for p in requests]
    c = pipeline.model.config.out_channels
    mixed = 0
    for iteration in itertools.count():
        live = [i for i, job in enumerate(ours) if joins[i] <= iteration and not job.done]
        if not live:
            if all(job.done for job in ours):
                return mixed
            continue
        mixed += len({ours[i].step for i in live}) > 1
        gen = torch.Generator().manual_seed(iteration)
        outs = [torch.randn(ours[i].rows, c, 8, 8, generator=gen).tanh() for i in live]
        step_samplers([ours[i] for i in live], outs)
        for i, out in zip(live, outs, strict=True):
            ref[i].advance(out, Mode.FULL, 0.0)
            assert ours[i].step == ref[i].step
            assert torch.equal(ours[i].latents, ref[i].latents), (iteration, i)
    raise AssertionError("unreachable")


@pytest.mark.parametrize(("sampler", "learn_sigma", "pixel"), CONFIGS)
def test_batched_scheduler_update_equals_diffusers_per_request_step(
    sampler: str, learn_sigma: bool, pixel: bool
) -> None:
    # Every scheduler make_scheduler builds (DDPM: learned or fixed variance; pixel space
    # clips x0, latent space does not), requests at different step indices and step counts.
    if pixel:
        pipeline = Pipeline(tiny(learn_sigma=learn_sigma))
    else:
        pipeline = Pipeline(tiny(in_channels=4, learn_sigma=learn_sigma), tiny_vae())
    requests = [
        GenerateParams(steps=6, seed=1, sampler=sampler),
        GenerateParams(steps=16, seed=2, num_images=2, sampler=sampler, guidance_scale=1),
        GenerateParams(steps=9, seed=3, sampler=sampler, guidance_scale=4),
    ]
    job = start(pipeline, requests[0])
    assert job.sampler_key is not None and job.scheduler.config.get("clip_sample", False) is (
        pixel and sampler != "dpm++"
    )
    assert _twin_runs(pipeline, requests, joins=[0, 2, 5]) > 5


def test_sampler_families_and_a_per_request_fallback_share_one_step(
    tiny_pipeline: Pipeline,
) -> None:
    requests = [
        GenerateParams(steps=7, seed=1, sampler="ddim"),
        GenerateParams(steps=5, seed=2, sampler="ddpm", num_images=2),
        GenerateParams(steps=8, seed=3, sampler="dpm++"),
        GenerateParams(steps=6, seed=4, sampler="ddpm"),
    ]
    assert _twin_runs(tiny_pipeline, requests, joins=[0, 1, 0, 3]) > 0
    # A scheduler configuration without a batched update steps through diffusers alone.
    job = start(tiny_pipeline, requests[3])
    odd = DDPMScheduler(variance_type="fixed_large", clip_sample=True)
    odd.set_timesteps(6)
    job = dataclasses.replace(job, scheduler=odd)
    assert job.sampler_key is None and job.sampler_table is None
    ddim = start(tiny_pipeline, requests[0])
    while not job.done:
        before = job.step
        step_samplers([job, ddim], [torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)])
        assert job.step == before + 1 and torch.isfinite(job.latents).all()


# ----------------------------------------------------------------------------- timing, forward seam


class _LateTimer:
    """A timer whose forward has not ended yet (as CUDA events until the next step)."""

    ready = False

    def __init__(self, seconds: float):
        self._seconds = seconds
        self.reads = 0

    def seconds(self) -> float:
        self.reads += 1
        return self._seconds


def test_device_timings_arrive_a_step_late_and_keep_their_mode() -> None:
    stats = StepStats()
    full, cached = _LateTimer(0.5), _LateTimer(0.2)
    stats.record(Mode.FULL, full)
    assert stats.steps[Mode.FULL] == 1 and stats.seconds[Mode.FULL] == 0.0 and full.reads == 0
    stats.record(Mode.CACHED, cached)  # the next step reads the previous one's timer
    assert full.reads == 1 and cached.reads == 0
    assert stats.seconds == {Mode.FULL: 0.5, Mode.CACHED: 0.0}
    assert stats.last_seconds == 0.0  # no cached forward measured yet: never the full one's
    stats.settle()  # Pipeline.finish
    assert stats.seconds == {Mode.FULL: 0.5, Mode.CACHED: 0.2} and stats.last_seconds == 0.2


def test_cpu_timings_are_read_at_once() -> None:
    timer = ForwardTimer(torch.device("cpu"))
    timer.stop()
    stats = StepStats()
    stats.record(Mode.FULL, timer)
    assert timer.ready and stats.seconds[Mode.FULL] == stats.last_seconds == timer.seconds() > 0


def test_every_forward_of_a_step_goes_through_the_forward_seam(tiny_pipeline: Pipeline) -> None:
    calls: list[tuple[bool, int]] = []

    def counting(model, jobs, full, x, t, y):  # type: ignore[no-untyped-def]
        calls.append((full, x.shape[0]))
        return forward_group(model, jobs, full, x, t, y)

    a = start(tiny_pipeline, GenerateParams(steps=4, seed=1, cache_interval=2))
    b = start(tiny_pipeline, GenerateParams(steps=4, seed=2, cache_interval=1, guidance_scale=1))
    modes = denoise_step(tiny_pipeline.model, [a, b], forward=counting)
    assert modes == [Mode.FULL, Mode.FULL] and calls == [(True, 3)]
    modes = denoise_step(tiny_pipeline.model, [a, b], forward=counting)
    assert modes == [Mode.CACHED, Mode.FULL] and sorted(calls[1:]) == [(False, 2), (True, 1)]
