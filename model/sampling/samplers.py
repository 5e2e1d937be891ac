"""Batched scheduler updates: all requests of one sampler family step in ONE tensor update.

diffusers' ``scheduler.step`` advances one request with 0-d schedule coefficients: a handful of
tiny kernels per request per step. Here every request keeps its own scheduler, but the update
runs once over the rows of all of them, with per-row coefficients (each request may be at a
different step index, with a different step count).

A family's coefficient table ``(S, k)`` holds, for each of a scheduler's S steps, the scalars
its ``step`` would compute, computed by the same 0-d tensor ops from the scheduler's own tensors
(``alphas_cumprod``, ``timesteps``, ``sigmas``); nothing is re-derived by hand. So an update is
the same float ops on the same values as diffusers' (bitwise at fp32 where the ops are exact;
see tests/model/test_samplers.py). Tables live on the CPU; each step gathers one row per
request and moves them to the device in one copy.

Flow matching (Euler) takes the same path: its table holds the step's ``dt`` from the
scheduler's own ``sigmas``, so any sigma schedule (shift, terminal stretch, Karras...) steps in
one update.

Noise (DDPM) is drawn from each request's OWN CPU generator with the shape and dtype diffusers
would use, so a request's samples do not depend on its batch mates.

``batch_key`` says which schedulers step together; ``None`` means "step this one per request
with ``scheduler.step``" (any configuration not listed below).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SchedulerMixin,
)


@dataclass
class Member:
    """One request in a batched update: its scheduler and where it stands."""

    scheduler: SchedulerMixin
    index: int  # the step index this update takes
    table: torch.Tensor  # (S, k) its ``coefficient_table``
    generator: torch.Generator  # its own randomness (DDPM noise)
    rows: int  # its samples in the batch


# The family first: ("ddim", clip) | ("ddpm", variance_type, clip) | ("dpm++",) | ("flow_euler",)
BatchKey = tuple[Any, ...]


def batch_key(scheduler: SchedulerMixin) -> BatchKey | None:
    """Schedulers with equal keys step in one update; ``None``: step per request."""
    config = scheduler.config
    if type(scheduler) is FlowMatchEulerDiscreteScheduler:
        # The shift and the other sigma options only change the sigmas, which the table reads:
        # one key for all. Stochastic sampling draws noise and is another update.
        return None if config.stochastic_sampling else ("flow_euler",)
    if config.prediction_type != "epsilon" or config.thresholding:
        return None
    clip = config.clip_sample_range if config.get("clip_sample") else None
    kind = type(scheduler)
    if kind is DDIMScheduler:
        return ("ddim", clip)
    if kind is DDPMScheduler and config.variance_type in ("fixed_small", "learned_range"):
        return ("ddpm", config.variance_type, clip)
    if kind is DPMSolverMultistepScheduler and _dpm_supported(config):
        return ("dpm++",)
    return None


def _dpm_supported(config: Any) -> bool:
    """DPM-Solver++(2M), midpoint, deterministic, on the scheduler's sigmas (as we configure)."""
    return (
        config.algorithm_type == "dpmsolver++"
        and config.solver_order == 2
        and config.solver_type == "midpoint"
        and not config.use_flow_sigmas
        and config.variance_type is None
    )


def coefficient_table(scheduler: SchedulerMixin) -> torch.Tensor:
    """(S, k) float32 CPU: the scalars ``scheduler.step`` computes at each of its S steps.

    Read-only and shared: schedulers with the same configuration and timesteps share one table
    (building one takes milliseconds, too long to repeat for every request).
    """
    key = _schedule_key(scheduler)
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) >= _MAX_TABLES:
            _TABLES.pop(next(iter(_TABLES)))  # the oldest
        family = batch_key(scheduler)
        assert family is not None, "tables are of batched schedulers only"
        kind = family[0]
        rows = {
            "ddim": _ddim_row,
            "ddpm": _ddpm_row,
            "dpm++": _dpm_row,
            "flow_euler": _flow_row,
        }[kind]
        steps = range(len(scheduler.timesteps))
        table = _TABLES[key] = torch.stack([rows(scheduler, i) for i in steps])  # (S, k)
    return table


_TABLES: dict[tuple[object, ...], torch.Tensor] = {}
_MAX_TABLES = 64


def _schedule_key(scheduler: SchedulerMixin) -> tuple[object, ...]:
    """Everything a table depends on: the configuration, the timesteps (and sigmas)."""
    config = json.dumps(dict(scheduler.config), sort_keys=True, default=_plain)
    sigmas = getattr(scheduler, "sigmas", None)
    return (
        type(scheduler).__name__,
        config,
        tuple(scheduler.timesteps.tolist()),
        None if sigmas is None else tuple(sigmas.tolist()),
    )


def _plain(value: object) -> object:
    return value.tolist() if hasattr(value, "tolist") else str(value)  # arrays in full


def step_batch(
    members: Sequence[Member],
    sample: torch.Tensor,
    eps: torch.Tensor,
    variance: torch.Tensor | None,
) -> torch.Tensor:
    """One update for all members (equal ``batch_key``), rows in member order.

    sample, eps: (R, C, H, W), R = sum of members' rows; eps is the model's prediction (flow:
    the velocity); variance: the learned-variance channels (R, C, H, W) where the scheduler
    uses them. Returns the next sample (R, C, H, W) and advances each member's scheduler state
    where it has one (DPM++ history, the flow step index).
    """
    key = batch_key(members[0].scheduler)
    assert key is not None, "members of a batched update have a batch key"
    coef = _gather(members, sample.device, dpm=key[0] == "dpm++")  # (R, k)
    if key[0] == "ddim":
        new = ddim_update(sample, eps, coef, clip=key[1])
    elif key[0] == "ddpm":
        noise = _noise(members, eps)
        learned = variance if key[1] == "learned_range" else None
        new = ddpm_update(sample, eps, coef, noise, learned, clip=key[2])
    elif key[0] == "dpm++":
        new = _dpm_step(members, sample, eps, coef)
    else:
        new = _flow_step(members, sample, eps, coef)
    return new.to(sample.dtype)  # fp32 coefficients promote half-precision rows


# ---------------------------------------------------------------------------------- gathering


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CPU -> device without waiting for the device's queue (pinned, asynchronous copy)."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def _gather(members: Sequence[Member], device: torch.device, dpm: bool) -> torch.Tensor:
    """(R, k): each member's table row at its step index, once per sample row."""
    rows = [m.table[m.index].expand(m.rows, -1) for m in members]  # (n, k) each
    if dpm:  # first-order rows (first and final steps) use no history
        second = [_dpm_second_order(m) for m in members]
        rows = [r if ok else _first_order(r) for r, ok in zip(rows, second, strict=True)]
    return _to_device(torch.cat(rows), device)  # (R, k)


def _noise(members: Sequence[Member], eps: torch.Tensor) -> torch.Tensor:
    """(R, C, H, W): each member's own draw where its step adds noise (t > 0), else zeros.

    Same shape, dtype and generator as diffusers' ``randn_tensor`` in ``DDPMScheduler.step``.
    """
    shape = eps.shape[1:]
    draws = []
    for m in members:
        if m.scheduler.timesteps[m.index] > 0:
            draws.append(torch.randn((m.rows, *shape), generator=m.generator, dtype=eps.dtype))
        else:
            draws.append(torch.zeros((m.rows, *shape), dtype=eps.dtype))
    return _to_device(torch.cat(draws), eps.device)  # (R, C, H, W)


def _col(coef: torch.Tensor, j: int, like: torch.Tensor) -> torch.Tensor:
    """Column j of (R, k) coefficients shaped to broadcast over ``like``'s rows: (R, 1, 1, 1)
    for images (R, C, H, W), (R, 1, 1, 1, 1) for videos (R, C, F, H, W)."""
    return coef[:, j].view(-1, *[1] * (like.dim() - 1))


# ---------------------------------------------------------------------------------- DDIM (eta 0)

DDIM_SQRT_BETA, DDIM_SQRT_ALPHA, DDIM_SQRT_ALPHA_PREV, DDIM_DIRECTION = range(4)


def _ddim_row(s: DDIMScheduler, i: int) -> torch.Tensor:
    """``DDIMScheduler.step`` (eta 0) at step i: its scalars, by its own ops."""
    timestep = s.timesteps[i]
    prev_timestep = timestep - s.config.num_train_timesteps // s.num_inference_steps
    alpha_prod_t = s.alphas_cumprod[timestep]
    alpha_prod_t_prev = (
        s.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else s.final_alpha_cumprod
    )
    beta_prod_t = 1 - alpha_prod_t
    std_dev_t = 0.0 * s._get_variance(timestep, prev_timestep) ** 0.5  # eta = 0
    direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5
    return torch.stack([beta_prod_t**0.5, alpha_prod_t**0.5, alpha_prod_t_prev**0.5, direction])


def ddim_update(
    sample: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor, clip: float | None
) -> torch.Tensor:
    """DDIM (eta 0): (R, C, H, W) sample, eps and (R, 4) coefficients -> previous sample."""
    pred_x0 = (sample - _col(coef, DDIM_SQRT_BETA, sample) * eps) / _col(
        coef, DDIM_SQRT_ALPHA, sample
    )
    if clip is not None:
        pred_x0 = pred_x0.clamp(-clip, clip)
    return (
        _col(coef, DDIM_SQRT_ALPHA_PREV, sample) * pred_x0
        + _col(coef, DDIM_DIRECTION, sample) * eps
    )


# ---------------------------------------------------------------------------------- DDPM

DDPM_SQRT_BETA, DDPM_SQRT_ALPHA, DDPM_X0, DDPM_SAMPLE, DDPM_STD, DDPM_MAX_LOG, DDPM_MIN_LOG = range(
    7
)
DDPM_NOISY = 7  # 1 where the step adds noise (t > 0)


def _ddpm_row(s: DDPMScheduler, i: int) -> torch.Tensor:
    """``DDPMScheduler.step`` at step i: its scalars, by its own ops (both variance kinds)."""
    t = s.timesteps[i]
    prev_t = s.previous_timestep(t)
    alpha_prod_t = s.alphas_cumprod[t]
    alpha_prod_t_prev = s.alphas_cumprod[prev_t] if prev_t >= 0 else s.one
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t
    x0_coeff = (alpha_prod_t_prev**0.5 * current_beta_t) / beta_prod_t
    sample_coeff = current_alpha_t**0.5 * beta_prod_t_prev / beta_prod_t
    variance = s._get_variance(t, variance_type="fixed_small")  # clamped beta-tilde
    return torch.stack(
        [
            beta_prod_t**0.5,
            alpha_prod_t**0.5,
            x0_coeff,
            sample_coeff,
            variance**0.5,  # fixed_small: the noise's std
            torch.log(current_beta_t),  # learned_range: max_log
            torch.log(variance),  # learned_range: min_log
            (t > 0).float(),
        ]
    )


def ddpm_update(
    sample: torch.Tensor,
    eps: torch.Tensor,
    coef: torch.Tensor,
    noise: torch.Tensor,
    learned: torch.Tensor | None,
    clip: float | None,
) -> torch.Tensor:
    """DDPM: (R, C, H, W) sample, eps, noise (zero rows where t == 0), (R, 8) coefficients
    -> previous sample. ``learned``: the model's variance channels (learned_range), else the
    fixed small variance."""
    pred_x0 = (sample - _col(coef, DDPM_SQRT_BETA, sample) * eps) / _col(
        coef, DDPM_SQRT_ALPHA, sample
    )
    if clip is not None:
        pred_x0 = pred_x0.clamp(-clip, clip)
    prev = (
        _col(coef, DDPM_X0, sample) * pred_x0 + _col(coef, DDPM_SAMPLE, sample) * sample
    )  # (R, C, H, W)
    if learned is None:
        return prev + _col(coef, DDPM_STD, sample) * noise
    frac = (learned + 1) / 2
    log_var = frac * _col(coef, DDPM_MAX_LOG, sample) + (1 - frac) * _col(
        coef, DDPM_MIN_LOG, sample
    )
    # exp of an extreme prediction may overflow (inf * 0 = nan): where diffusers adds no noise
    # (t == 0) neither do we
    noisy = _col(coef, DDPM_NOISY, sample) > 0  # (R, 1, 1, 1)
    return torch.where(noisy, prev + torch.exp(0.5 * log_var) * noise, prev)


# ------------------------------------------------------------------------------ DPM-Solver++(2M)

DPM_SIGMA, DPM_ALPHA, DPM_RATIO, DPM_B, DPM_C, DPM_E = range(6)


def _dpm_row(s: DPMSolverMultistepScheduler, i: int) -> torch.Tensor:
    """``DPMSolverMultistepScheduler.step`` at step i: its scalars, by its own ops.

    The first-order update is ``ratio * x - b * m0``; the second-order (midpoint) one subtracts
    ``e * c * (m0 - m1)`` from it. c and e are 0 where step i has no previous step.
    """
    alpha_t, sigma_t = s._sigma_to_alpha_sigma_t(s.sigmas[i + 1])
    alpha_s0, sigma_s0 = s._sigma_to_alpha_sigma_t(s.sigmas[i])
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
    lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
    h = lambda_t - lambda_s0
    b = alpha_t * (torch.exp(-h) - 1.0)
    c = e = torch.zeros(())
    if i > 0:
        alpha_s1, sigma_s1 = s._sigma_to_alpha_sigma_t(s.sigmas[i - 1])
        lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
        r0 = (lambda_s0 - lambda_s1) / h
        c, e = 1.0 / r0, 0.5 * b
    return torch.stack([sigma_s0, alpha_s0, sigma_t / sigma_s0, b, c, e])


def _dpm_second_order(m: Member) -> bool:
    """The order diffusers picks: first on the first step and on the final one (our config)."""
    s, config = m.scheduler, m.scheduler.config
    steps = len(s.timesteps)
    lower_order_final = m.index == steps - 1 and (
        config.euler_at_final
        or (config.lower_order_final and steps < 15)
        or config.final_sigmas_type == "zero"
    )
    return s.lower_order_nums >= 1 and not lower_order_final


def _first_order(row: torch.Tensor) -> torch.Tensor:
    """(n, k) row with the second-order coefficients zeroed: the update is first order."""
    row = row.clone()
    row[:, DPM_C:] = 0
    return row


def dpm_update(
    sample: torch.Tensor, x0: torch.Tensor, prev_x0: torch.Tensor, coef: torch.Tensor
) -> torch.Tensor:
    """DPM-Solver++(2M) midpoint: (R, C, H, W) sample, this step's and the previous step's x0
    predictions, (R, 6) coefficients -> next sample (float32, as diffusers computes it)."""
    x = _col(coef, DPM_RATIO, sample) * sample.float() - _col(coef, DPM_B, sample) * x0
    d1 = _col(coef, DPM_C, sample) * (x0 - prev_x0)  # 0 on first-order rows
    return x - _col(coef, DPM_E, sample) * d1


def dpm_x0(sample: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``convert_model_output`` (dpmsolver++, epsilon): the x0 prediction (R, C, H, W)."""
    return (sample - _col(coef, DPM_SIGMA, sample) * eps) / _col(coef, DPM_ALPHA, sample)


def _dpm_step(
    members: Sequence[Member], sample: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor
) -> torch.Tensor:
    """DPM++ over all members; each scheduler keeps its own history, as ``step`` leaves it."""
    x0 = dpm_x0(sample, eps, coef)  # (R, C, H, W)
    parts = x0.split([m.rows for m in members])  # views, one per member
    # m1 of a first step is a stand-in: its coefficients are 0 there
    prev = [m.scheduler.model_outputs[-1] for m in members]
    prev = [p if p is not None else part for p, part in zip(prev, parts, strict=True)]
    out = dpm_update(sample, x0, torch.cat(prev), coef)
    for m, part in zip(members, parts, strict=True):
        s = m.scheduler
        s.model_outputs = [*s.model_outputs[1:], part]  # shift the history, newest last
        s.lower_order_nums = min(s.lower_order_nums + 1, s.config.solver_order)
        s._step_index = m.index + 1  # as ``step`` leaves it: the per-request path can go on
    return out


# ------------------------------------------------------------------------ flow matching (Euler)

FLOW_DT = 0


def _flow_row(s: FlowMatchEulerDiscreteScheduler, i: int) -> torch.Tensor:
    """``FlowMatchEulerDiscreteScheduler.step`` (deterministic) at step i: its ``dt``, by its
    own op on its own sigmas (the only scalar its update reads)."""
    sigma = s.sigmas[i]
    sigma_next = s.sigmas[i + 1]
    dt = sigma_next - sigma
    return torch.stack([dt])


def flow_update(sample: torch.Tensor, velocity: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Flow Euler: (R, C, H, W) sample and velocity, (R, 1) coefficients -> next sample, in
    velocity's dtype. As diffusers: the sample upcast to fp32; dt, a 0-d tensor there, takes
    the velocity's dtype in ``dt * velocity`` (bf16/fp16 products round there)."""
    dt = _col(coef, FLOW_DT, sample).to(velocity.dtype)  # (R, 1, 1, 1)
    return (sample.float() + dt * velocity).to(velocity.dtype)


def _flow_step(
    members: Sequence[Member], sample: torch.Tensor, velocity: torch.Tensor, coef: torch.Tensor
) -> torch.Tensor:
    """Flow Euler over all members; each scheduler's step index left as ``step`` leaves it."""
    for m in members:
        m.scheduler._step_index = m.index + 1  # the per-request path can go on
    return flow_update(sample, velocity, coef)
