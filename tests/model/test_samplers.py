"""The batched scheduler update against diffusers' own per-request ``scheduler.step``; flow
matching through a pipeline."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SchedulerMixin,
)

from model.cache import Mode
from model.sampling.pipeline import Pipeline, make_scheduler, step_samplers
from model.sampling.samplers import Member, batch_key, coefficient_table, step_batch
from service.request import GenerateParams
from tests.helpers import BATCH_TOL, generate, start
from tests.model.helpers import run_with_modes

# Every scheduler make_scheduler builds: sampler x learned sigma x pixel space (clipping).
CONFIGS = list(itertools.product(["ddim", "ddpm", "dpm++"], [False, True], [False, True]))

# (steps, images, first iteration): different step counts (DPM++ treats < 15 and >= 15
# differently at the end), batch sizes, and joins, so one update mixes step indices.
REQUESTS = [(5, 1, 0), (16, 2, 0), (9, 1, 3), (25, 1, 7), (12, 2, 20)]

Make = Callable[[int], SchedulerMixin]  # request i of REQUESTS -> a fresh scheduler for it

# One flow scheduler per request, all in one batch: shifts and sigma options change only the
# sigmas, which each one's table holds, so they share one batch key.
FLOW: list[Callable[[], SchedulerMixin]] = [
    lambda: make_scheduler("flow_euler", False, False),
    lambda: make_scheduler("flow_euler", False, False, shift=3.0),
    lambda: FlowMatchEulerDiscreteScheduler(shift=6.0, shift_terminal=0.05),
    lambda: FlowMatchEulerDiscreteScheduler(shift=3.0, use_karras_sigmas=True),
    lambda: FlowMatchEulerDiscreteScheduler(invert_sigmas=True),
]


def _made(sampler: str, learn_sigma: bool, pixel: bool) -> Make:
    return lambda _: make_scheduler(sampler, learn_sigma, pixel)


def _flow(i: int) -> SchedulerMixin:
    return FLOW[i]()


@dataclass
class Twin:
    """One request twice: stepped in batches (ours) and by diffusers alone (ref)."""

    steps: int
    images: int
    begin: int
    ours: object  # scheduler
    ref: object
    ours_gen: torch.Generator
    ref_gen: torch.Generator
    latents: torch.Tensor  # (n, C, H, W) batched path
    ref_latents: torch.Tensor
    step: int = 0


def _twins(make: Make, shape: tuple[int, ...], dtype: torch.dtype) -> list[Twin]:
    twins = []
    for seed, (steps, images, begin) in enumerate(REQUESTS):
        ours, ref = make(seed), make(seed)
        ours.set_timesteps(steps)
        ref.set_timesteps(steps)
        x = torch.randn(images, *shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
        gens = [torch.Generator().manual_seed(100 + seed) for _ in range(2)]
        twins.append(Twin(steps, images, begin, ours, ref, *gens, x, x.clone()))
    return twins


def _model_output(twin: Twin, channels: int, learn_sigma: bool) -> torch.Tensor:
    """(n, C or 2C, H, W): eps then (learned sigma) variance values in [-1, 1]."""
    gen = torch.Generator().manual_seed(1000 * twin.begin + twin.step)
    eps = torch.randn(twin.images, *twin.latents.shape[1:], generator=gen).to(twin.latents.dtype)
    if not learn_sigma:
        return eps
    shape = (twin.images, channels, *twin.latents.shape[2:])
    return torch.cat([eps, torch.rand(shape, generator=gen) * 2 - 1], dim=1)


def _ref_step(twin: Twin, out: torch.Tensor) -> torch.Tensor:
    learned = twin.ref.config.get("variance_type") == "learned_range"
    model_output = out if learned else out[:, : twin.latents.shape[1]]
    t = twin.ref.timesteps[twin.step]
    return twin.ref.step(model_output, t, twin.ref_latents, generator=twin.ref_gen).prev_sample


def _batched_step(batch: list[Twin], outs: list[torch.Tensor]) -> torch.Tensor:
    c = batch[0].latents.shape[1]
    members = [
        Member(t.ours, t.step, coefficient_table(t.ours), t.ours_gen, t.images) for t in batch
    ]
    learned = batch[0].ours.config.get("variance_type") == "learned_range"
    eps = torch.cat([o[:, :c] for o in outs])  # (R, C, H, W)
    variance = torch.cat([o[:, c:] for o in outs]) if learned else None
    sample = torch.cat([t.latents for t in batch])
    return step_batch(members, sample, eps, variance)


def _run(
    make: Make,
    learn_sigma: bool,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    **tol: float,
) -> int:
    """Step every twin to the end; compare after every update. Returns updates that mixed
    step indices. Request 1 takes its step 4 through diffusers' ``step`` on our scheduler:
    the batched path leaves the scheduler as ``step`` would (history, step index)."""
    twins, mixed = _twins(make, shape, dtype), 0
    for iteration in itertools.count():
        batch = [t for t in twins if t.begin <= iteration and t.step < t.steps]
        if not batch and all(t.step == t.steps for t in twins):
            return mixed
        mixed += len({t.step for t in batch}) > 1
        outs = [_model_output(t, shape[0], learn_sigma) for t in batch]
        for t, out in zip(batch, outs, strict=True):
            t.ref_latents = _ref_step(t, out)
        alone = [i for i, t in enumerate(batch) if t is twins[1] and t.step == 4]
        if alone:
            (i,) = alone
            solo = Twin(**{**twins[1].__dict__, "ref": twins[1].ours, "ref_gen": twins[1].ours_gen})
            solo.ref_latents = solo.latents
            twins[1].latents = _ref_step(solo, outs[i])
            batch, outs = batch[:i] + batch[i + 1 :], outs[:i] + outs[i + 1 :]
        if batch:
            new = _batched_step(batch, outs)
            for t, part in zip(batch, new.split([t.images for t in batch]), strict=True):
                t.latents = part
        for t in twins:
            if t.begin <= iteration and t.step < t.steps:
                t.step += 1
                torch.testing.assert_close(t.latents, t.ref_latents, **tol)
                assert getattr(t.ours, "step_index", None) == getattr(t.ref, "step_index", None)


@pytest.mark.parametrize(("sampler", "learn_sigma", "pixel"), CONFIGS)
def test_batched_update_is_bitwise_diffusers_step(
    sampler: str, learn_sigma: bool, pixel: bool
) -> None:
    # (4, 8, 8): 256 values a sample, a multiple of any CPU vector width, so exp/log of the
    # learned variance take the same vectorised code path in both (see the odd shape below).
    assert batch_key(make_scheduler(sampler, learn_sigma, pixel)) is not None
    mixed = _run(_made(sampler, learn_sigma, pixel), learn_sigma, (4, 8, 8), rtol=0, atol=0)
    assert mixed > 5


@pytest.mark.parametrize(("sampler", "learn_sigma", "pixel"), CONFIGS)
def test_batched_update_matches_diffusers_step_on_odd_shapes(
    sampler: str, learn_sigma: bool, pixel: bool
) -> None:
    # 75 values a sample: CPU kernels run some of them in scalar tails (a transcendental may
    # then round 1 ulp differently); the affine updates stay bitwise.
    _run(_made(sampler, learn_sigma, pixel), learn_sigma, (3, 5, 5), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4, 8, 8), (3, 5, 5)])
def test_batched_flow_update_is_bitwise_diffusers_step(
    dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    # The FLOW schedulers (different shifts and sigma options) at different step counts and
    # step indices in one update. The Euler update is affine: bitwise on any shape, and in half
    # precision too (dt rounds to the velocity's dtype, as in diffusers).
    assert {batch_key(_flow(i)) for i in range(len(FLOW))} == {("flow_euler",)}
    assert _run(_flow, False, shape, dtype, rtol=0, atol=0) > 5


def test_pixel_space_clips_the_x0_prediction_in_the_batched_update() -> None:
    # Only the scheduler's clip setting differs; an eps that predicts x0 far outside [-1, 1].
    results = []
    for pixel in (False, True):
        s = make_scheduler("ddim", False, pixel)
        s.set_timesteps(10)
        member = Member(s, 2, coefficient_table(s), torch.Generator(), 1)
        sample = torch.full((1, 1, 2, 2), 3.0)
        results.append(step_batch([member], sample, -torch.ones_like(sample), None))
    assert not torch.equal(*results)


@pytest.mark.parametrize(
    "scheduler",
    [
        DDPMScheduler(variance_type="fixed_large"),
        DDPMScheduler(prediction_type="v_prediction"),
        DDIMScheduler(thresholding=True),
        DPMSolverMultistepScheduler(solver_order=3),
        DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"),
        FlowMatchEulerDiscreteScheduler(stochastic_sampling=True),
    ],
)
def test_configurations_without_a_batched_update_step_per_request(scheduler: object) -> None:
    assert batch_key(scheduler) is None


def test_tables_are_shared_between_equal_schedules() -> None:
    a, b, c = (make_scheduler("ddpm", True, False) for _ in range(3))
    a.set_timesteps(20)
    b.set_timesteps(20)
    c.set_timesteps(21)
    assert coefficient_table(a) is coefficient_table(b)
    assert coefficient_table(c).shape[0] == 21


# ----------------------------------------------------------------------------- flow in a pipeline


def test_flow_requests_batched_equal_each_alone(tiny_flow_pipeline: Pipeline) -> None:
    # Different step counts, images, guidance and a cache in the same forwards.
    requests = [
        GenerateParams(steps=6, seed=1, sampler="flow_euler"),
        GenerateParams(steps=9, seed=2, class_label=3, num_images=2),  # the model's default
        GenerateParams(steps=5, seed=3, sampler="flow_euler", guidance_scale=1, cache_interval=2),
    ]
    batched = generate(tiny_flow_pipeline, requests)
    for params, result in zip(requests, batched, strict=True):
        (alone,) = generate(tiny_flow_pipeline, [params])
        assert result.images is not None and result.images.shape == (params.num_images, 8, 8, 1)
        torch.testing.assert_close(result.latents, alone.latents, **BATCH_TOL)
    noise = start(tiny_flow_pipeline, requests[0]).latents
    assert not torch.allclose(batched[0].latents, noise, atol=0.1)  # it moved


def test_an_oracle_velocity_keeps_a_flow_job_on_its_straight_path(
    tiny_flow_pipeline: Pipeline,
) -> None:
    # For a one-image data set the ideal velocity at x is (x - target) / sigma, sigma = t / 1000:
    # every step must then land on (1 - sigma') * target + sigma' * noise. It holds only where
    # the job's timestep is sigma * 1000 untruncated, its input unscaled and its step exact.
    target = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    job = start(tiny_flow_pipeline, GenerateParams(steps=50, guidance_scale=1))
    noise, sigmas = job.latents.clone(), job.scheduler.sigmas
    assert job.timestep == 1000.0  # pure noise
    while not job.done:
        x, t, _ = job.model_input()
        assert t.dtype == torch.float32 and torch.equal(t, torch.full_like(t, job.timestep))
        step_samplers([job], [(x - target) / (job.timestep / 1000)])
        sigma = sigmas[job.step]
        expected = (1 - sigma) * target + sigma * noise
        torch.testing.assert_close(job.latents, expected, rtol=0, atol=1e-5)
    assert job.step == 50 and sigmas[-1] == 0


def test_cache_windows_read_flow_timesteps_untruncated(tiny_flow_pipeline: Pipeline) -> None:
    # Step 5 of 8 is at t = 286.43: with t_end = 286 it is outside the window (cached by the
    # interval); a truncated t (286) would put it inside (full).
    scheduler = make_scheduler("flow_euler", False, False)
    scheduler.set_timesteps(8)
    t5 = float(scheduler.timesteps[5])
    assert not t5.is_integer()
    params = GenerateParams(
        steps=8,
        sampler="flow_euler",
        cache_policy="skip_cache",
        cache_interval=2,
        cache_t_end=math.floor(t5),
    )
    _, (modes,) = run_with_modes(tiny_flow_pipeline, [params])
    full, cached = Mode.FULL, Mode.CACHED
    assert modes == [full, cached, full, cached, full, cached, full, full]


def test_a_shift_is_refused_where_the_sampler_has_none() -> None:
    assert make_scheduler("flow_euler", False, False, shift=3.0).config.shift == 3.0
    with pytest.raises(ValueError, match="shift"):
        make_scheduler("ddim", False, False, shift=3.0)
