"""The batched scheduler update against diffusers' own per-request ``scheduler.step``."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from model.sampling.pipeline import make_scheduler
from model.sampling.samplers import Member, batch_key, coefficient_table, step_batch

# Every scheduler make_scheduler builds: sampler x learned sigma x pixel space (clipping).
CONFIGS = list(itertools.product(["ddim", "ddpm", "dpm++"], [False, True], [False, True]))

# (steps, images, first iteration): different step counts (DPM++ treats < 15 and >= 15
# differently at the end), batch sizes, and joins, so one update mixes step indices.
REQUESTS = [(5, 1, 0), (16, 2, 0), (9, 1, 3), (25, 1, 7), (12, 2, 20)]


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


def _twins(sampler: str, learn_sigma: bool, pixel: bool, shape: tuple[int, ...]) -> list[Twin]:
    twins = []
    for seed, (steps, images, begin) in enumerate(REQUESTS):
        ours, ref = (make_scheduler(sampler, learn_sigma, pixel) for _ in range(2))
        ours.set_timesteps(steps)
        ref.set_timesteps(steps)
        x = torch.randn(images, *shape, generator=torch.Generator().manual_seed(seed))
        gens = [torch.Generator().manual_seed(100 + seed) for _ in range(2)]
        twins.append(Twin(steps, images, begin, ours, ref, *gens, x, x.clone()))
    return twins


def _model_output(twin: Twin, channels: int, learn_sigma: bool) -> torch.Tensor:
    """(n, C or 2C, H, W): eps then (learned sigma) variance values in [-1, 1]."""
    gen = torch.Generator().manual_seed(1000 * twin.begin + twin.step)
    eps = torch.randn(twin.images, *twin.latents.shape[1:], generator=gen)
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


def _run(sampler: str, learn_sigma: bool, pixel: bool, shape: tuple[int, ...], **tol) -> int:
    """Step every twin to the end; compare after every update. Returns updates that mixed
    step indices. Request 1 takes its step 4 through diffusers' ``step`` on our scheduler:
    the batched path leaves the scheduler as ``step`` would (history, step index)."""
    twins, mixed = _twins(sampler, learn_sigma, pixel, shape), 0
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


@pytest.mark.parametrize(("sampler", "learn_sigma", "pixel"), CONFIGS)
def test_batched_update_is_bitwise_diffusers_step(
    sampler: str, learn_sigma: bool, pixel: bool
) -> None:
    # (4, 8, 8): 256 values a sample, a multiple of any CPU vector width, so exp/log of the
    # learned variance take the same vectorised code path in both (see the odd shape below).
    assert batch_key(make_scheduler(sampler, learn_sigma, pixel)) is not None
    mixed = _run(sampler, learn_sigma, pixel, (4, 8, 8), rtol=0, atol=0)
    assert mixed > 5


@pytest.mark.parametrize(("sampler", "learn_sigma", "pixel"), CONFIGS)
def test_batched_update_matches_diffusers_step_on_odd_shapes(
    sampler: str, learn_sigma: bool, pixel: bool
) -> None:
    # 75 values a sample: CPU kernels run some of them in scalar tails (a transcendental may
    # then round 1 ulp differently); the affine updates stay bitwise.
    _run(sampler, learn_sigma, pixel, (3, 5, 5), rtol=1e-6, atol=1e-6)


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
