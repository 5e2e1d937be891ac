"""Sampling: per-request jobs stepped together, one batched forward per step.

A ``Job`` owns everything of one request: its latents, its diffusers scheduler instance, its
random generator, its cache state and its stats. ``denoise_step`` advances any set of jobs by
one step each (they may be at different steps, use different samplers and cache intervals):
every FULL row goes through one plain forward, CACHED rows through one forward per cache
group, classifier-free guidance rows ride in the same forward as their conditional rows; then
all requests of one sampler family take their scheduler step in one batched tensor update
(``model.sampling.samplers``). A request's result does not depend on its batch-mates (same seed,
same image).

Nothing in a step waits for the device: forwards are timed with CUDA events that are read one
step late (see ``ForwardTimer``); on the CPU a forward's wall time is known at once.

``Pipeline.generate`` runs a list of requests to completion; a serving engine calls
``denoise_step`` itself to let requests join and leave between steps.

Video models (``model.networks.skip_latte``) run through the same code: a sample is (C, F, H, W)
instead of (C, H, W) (``config.sample_shape``), channel dim 1 either way, and a result's images are
the video's frames.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SchedulerMixin,
)

from kernels.dispatch import KernelUnavailable
from model.cache import POLICIES, Mode, RequestCache
from model.cache.skip_cache import default_depth
from model.errors import FieldError
from model.networks import conditions, lora
from model.networks.conditions import Condition, HunyuanContext, TextContext
from model.networks.dydit import DyDiT
from model.networks.hunyuan import HunyuanSkipDiT
from model.networks.lora import LoRA
from model.networks.skip_dit import SkipDiT
from model.networks.text_dit import TextSkipDiT
from model.sampling import selfcheck
from model.sampling.graphs import (
    DEFAULT_BUCKETS,
    BucketedForward,
    Cached,
    GroupForward,
    ModeUnavailable,
    group_capture,
    resolve_mode,
)
from model.sampling.plan import RunPlan, plan
from model.sampling.prompts import HunyuanPrompting, Prompting, PromptReport, RequestText
from model.sampling.samplers import Member, batch_key, coefficient_table, step_batch
from model.sampling.selfcheck import Verdict

if TYPE_CHECKING:  # diffusers' VAE module imports its UNets and every transformer (seconds)
    from diffusers import AutoencoderKL

log = logging.getLogger(__name__)

VAE_SCALE = 0.18215  # sd-vae-ft-mse latent scale used by DiT
DEFAULT_GUIDANCE = 1.5  # DiT's ImageNet default; a model card may choose its own
VAE_DECODE_ROWS = 16  # images (video frames) the VAE decodes at once: bounds its activations


def make_scheduler(
    sampler: str,
    learn_sigma: bool,
    pixel_space: bool,
    *,
    shift: float = 1.0,
    trained: Mapping[str, Any] | None = None,
) -> SchedulerMixin:
    """A fresh scheduler. ddim, ddpm, dpm++: DiT's training schedule (linear betas, 1000 steps,
    eps), or, given ``trained`` (a diffusers scheduler config: the model's own, e.g. a
    Hunyuan-DiT directory's ``scheduler/``), that schedule: its betas, prediction type,
    variance and timestep spacing. flow_euler: flow matching's Euler sampler (the network
    predicts the velocity; timestep = sigma * 1000), its sigmas shifted by ``shift`` (a model
    card's; 1: none)."""
    if trained is not None and sampler in ("ddim", "ddpm"):
        kind = DDIMScheduler if sampler == "ddim" else DDPMScheduler
        return kind.from_config(dict(trained))
    if trained is not None and sampler == "dpm++":
        return DPMSolverMultistepScheduler.from_config(
            dict(trained), algorithm_type="dpmsolver++", solver_order=2
        )
    if sampler == "flow_euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    if shift != 1.0:
        raise ValueError(
            f"shift: only flow_euler shifts its timesteps, got {shift} for {sampler!r}"
        )
    common = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"}
    if sampler == "ddim":
        return DDIMScheduler(**common, clip_sample=pixel_space)
    if sampler == "ddpm":
        # DDPM is the one sampler here that uses the learned variance.
        variance = "learned_range" if learn_sigma else "fixed_small"
        return DDPMScheduler(**common, clip_sample=pixel_space, variance_type=variance)
    if sampler == "dpm++":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"sampler: unknown sampler {sampler!r}")


class ForwardTimer:
    """Seconds of one group's forward.

    CPU: wall time, known when ``stop`` returns. CUDA: events recorded on the device's stream
    before and after the forward; reading them waits for the forward's end (not for later
    work), so the pipeline reads them a step late, when the next step is already queued.
    """

    def __init__(self, device: torch.device):
        self._seconds: float | None = None
        self._stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        if self._stream is None:
            self._begin = time.perf_counter()
        else:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record(self._stream)

    def stop(self) -> None:
        if self._stream is None:
            self._seconds = time.perf_counter() - self._begin
        else:
            self._end.record(self._stream)

    @property
    def ready(self) -> bool:
        return self._seconds is not None

    def seconds(self) -> float:
        if self._seconds is None:
            self._end.synchronize()  # the forward's end only
            self._seconds = self._start.elapsed_time(self._end) / 1000
        return self._seconds


@dataclass
class StepStats:
    """Steps and seconds by mode. Seconds are the time of the forwards this job rode in.

    Steps count at once. On CUDA a step's seconds arrive one step late (at the job's next
    step, or at ``settle``, which ``Pipeline.finish`` calls); on the CPU at once.
    """

    steps: dict[Mode, int] = field(default_factory=lambda: {Mode.FULL: 0, Mode.CACHED: 0})
    seconds: dict[Mode, float] = field(default_factory=lambda: {Mode.FULL: 0.0, Mode.CACHED: 0.0})
    latest: dict[Mode, float] = field(default_factory=dict)  # latest measured forward, by mode
    mode: Mode | None = None  # the latest step's mode
    _pending: list[tuple[Mode, ForwardTimer]] = field(default_factory=list, repr=False)

    @property
    def last_seconds(self) -> float:
        """The latest measured forward of the latest step's mode (on CUDA: a step late)."""
        return self.latest.get(self.mode, 0.0) if self.mode is not None else 0.0

    def add(self, mode: Mode, seconds: float) -> None:
        self.steps[mode] += 1
        self.mode = mode
        self._time(mode, seconds)

    def record(self, mode: Mode, timer: ForwardTimer) -> None:
        """Count a step now, its seconds when ``timer`` can be read without a stall."""
        self.settle()  # earlier steps: the device has moved on to this one
        self.steps[mode] += 1
        self.mode = mode
        self._pending.append((mode, timer))
        if timer.ready:
            self.settle()

    def settle(self) -> None:
        """Read every pending timer (on CUDA this waits for those forwards to end)."""
        for mode, timer in self._pending:
            self._time(mode, timer.seconds())
        self._pending.clear()

    def _time(self, mode: Mode, seconds: float) -> None:
        self.seconds[mode] += seconds
        self.latest[mode] = seconds

    @property
    def model_seconds(self) -> float:
        return self.seconds[Mode.FULL] + self.seconds[Mode.CACHED]

    def mean_seconds(self, mode: Mode) -> float | None:
        return self.seconds[mode] / self.steps[mode] if self.steps[mode] else None

    def speedup(self) -> float | None:
        """Uncached-equivalent model time / actual: every step at this job's mean full cost."""
        full = self.mean_seconds(Mode.FULL)
        if full is None or self.model_seconds == 0:
            return None
        return full * (self.steps[Mode.FULL] + self.steps[Mode.CACHED]) / self.model_seconds

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "steps_full": self.steps[Mode.FULL],
            "steps_cached": self.steps[Mode.CACHED],
            "seconds_full": self.seconds[Mode.FULL],
            "seconds_cached": self.seconds[Mode.CACHED],
            "mean_full_step_seconds": self.mean_seconds(Mode.FULL),
            "mean_cached_step_seconds": self.mean_seconds(Mode.CACHED),
            "speedup": self.speedup(),
        }


ProgressFn = Callable[["Job", Mode], None]


@dataclass
class Job:
    """The sampling state of one request."""

    plan: RunPlan
    latents: torch.Tensor  # (n, C, H, W), current sample; video (n, C, F, H, W)
    labels: torch.Tensor  # (n,) class labels
    scheduler: SchedulerMixin  # its timesteps set
    generator: torch.Generator  # this request's randomness (initial noise, sampler noise)
    cache: RequestCache
    guidance: float
    null_class: int
    guided_channels: int | None = None  # eps channels guidance mixes (DiTConfig); None: all
    # The network this job's forwards run on; None: the pipeline's. A DyDiT pipeline gives
    # ``dynamic: false`` requests its static twin (the same weights, no routing).
    network: SkipDiT | None = None
    # A text model's: its rows' text (conditional rows, then unconditional), what its prompts
    # became; None for class models.
    text: TextContext | HunyuanContext | None = None
    prompt_report: PromptReport | None = None
    # Its LoRA adapter and scale (every row of the job, guidance's included); None: the base.
    adapter: lora.Choice | None = None
    step: int = 0
    stats: StepStats = field(default_factory=StepStats)
    cancelled: bool = False
    # ``samplers.batch_key`` (None: steps per request) and its (S, k) coefficient table
    sampler_key: Hashable | None = field(init=False, default=None)
    sampler_table: torch.Tensor | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.sampler_key = batch_key(self.scheduler)
        if self.sampler_key is not None:
            self.sampler_table = coefficient_table(self.scheduler)

    @property
    def total_steps(self) -> int:
        return len(self.scheduler.timesteps)

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    @property
    def flow(self) -> bool:
        """Flow matching: float timesteps (sigma * 1000), no input scaling."""
        return isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler)

    @property
    def timestep(self) -> float:
        """This step's timestep as the network gets it: 1000 is pure noise, 0 clean. DDPM
        family: an int (999 ... 0); flow: sigma * 1000 as it is (truncating it would move the
        edges of the cache policies' windows)."""
        t = self.scheduler.timesteps[self.step]
        return float(t) if self.flow else int(t)

    @property
    def uses_guidance(self) -> bool:
        return self.guidance > 1.0

    @property
    def rows(self) -> int:
        """Rows this job adds to a batched forward (conditional + unconditional)."""
        return self.latents.shape[0] * (2 if self.uses_guidance else 1)

    def cancel(self) -> None:
        """Stop at the next step boundary."""
        self.cancelled = True

    def model_input(self) -> tuple[torch.Tensor, torch.Tensor, Condition]:
        t = self.scheduler.timesteps[self.step]
        # flow matching feeds the sample unscaled, its float timestep as it is
        x = self.latents if self.flow else self.scheduler.scale_model_input(self.latents, t)
        y: Condition = self.labels
        if self.uses_guidance:
            x = torch.cat([x, x])  # (2n, C, H, W): conditional rows, then unconditional
            y = torch.cat([self.labels, torch.full_like(self.labels, self.null_class)])
        if self.text is not None:  # its rows' text, guidance's rows included
            y = self.text
        if self.flow:
            tt = torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)
        else:
            tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        return x, tt, y

    def guide(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This job's rows of the model output -> (eps, rest) of its n samples, guided.

        Guidance mixes eps channels ``0..guided_channels-1`` of the conditional and
        unconditional rows; every other channel (rest: the learned variance, if any) comes
        from the conditional rows, as in the official DiT sampler.
        """
        n, channels = self.latents.shape[:2]
        eps, rest = out[:, :channels], out[:, channels:]  # rest: learned variance, if any
        if not self.uses_guidance:
            return eps, rest
        g = self.guided_channels or channels
        cond, uncond = eps[:n], eps[n:]  # (n, C, H, W) each
        guided = uncond[:, :g] + self.guidance * (cond[:, :g] - uncond[:, :g])  # (n, g, H, W)
        if g < channels:
            guided = torch.cat([guided, cond[:, g:]], dim=1)  # (n, C, H, W)
        return guided, rest[:n]

    def advance(self, out: torch.Tensor, mode: Mode, seconds: float) -> None:
        """Apply guidance and the per-request scheduler step to this job's rows of the model
        output (``denoise_step`` steps jobs in batches instead)."""
        self.scheduler_step(*self.guide(out))
        self.stats.add(mode, seconds)

    def scheduler_step(self, eps: torch.Tensor, rest: torch.Tensor) -> None:
        """diffusers' own ``scheduler.step`` on this job alone (the per-request path)."""
        model_output = torch.cat([eps, rest], dim=1) if self.wants_variance else eps
        t = self.scheduler.timesteps[self.step]
        self.latents = self.scheduler.step(
            model_output, t, self.latents, generator=self.generator
        ).prev_sample
        self.step += 1

    @property
    def wants_variance(self) -> bool:
        """Whether the scheduler reads the learned variance channels."""
        variance = getattr(self.scheduler.config, "variance_type", None)
        return variance in ("learned", "learned_range")

    def member(self) -> Member:
        """This job in a batched scheduler update (``sampler_key`` set: its table is too)."""
        assert self.sampler_table is not None, "member() of a job its sampler cannot batch"
        return Member(
            self.scheduler, self.step, self.sampler_table, self.generator, self.latents.shape[0]
        )


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings of asynchronous devices need it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


FULL = "full"  # the group key of FULL rows; CACHED rows group by their policy's key


def forward_group(
    model: SkipDiT,
    jobs: Sequence[Cached],
    full: bool,
    x: torch.Tensor,
    t: torch.Tensor,
    y: Condition,
) -> tuple[torch.Tensor, dict[Hashable, torch.Tensor]]:
    """The eager forward of one group: every forward of a step goes through here.

    x (rows, C, H, W), t (rows,), y (rows,): the group's jobs' rows in order. Returns the
    output (rows, C', H, W) and, for FULL groups, the block outputs the jobs' cache policies
    capture ({block: (rows, T, D)}). A captured-graph runner takes this signature.

    Jobs with a LoRA adapter add its low-rank terms to their own rows (``lora.applied``); a
    group without one runs the network as it is.
    """
    if any(job.adapter is not None for job in jobs):
        rows = lora.Rows.of([(job.adapter, job.rows) for job in jobs], x.device)
        with lora.applied(model, rows):
            return _forward_group(model, jobs, full, x, t, y)
    return _forward_group(model, jobs, full, x, t, y)


def _forward_group(
    model: SkipDiT,
    jobs: Sequence[Cached],
    full: bool,
    x: torch.Tensor,
    t: torch.Tensor,
    y: Condition,
) -> tuple[torch.Tensor, dict[Hashable, torch.Tensor]]:
    if full:
        capture = group_capture(jobs, model)
        return model.capturing(x, t, y, capture) if capture else (model(x, t, y), {})
    first = jobs[0].cache
    states = [job.cache.state for job in jobs]
    return first.policy.run_cached(model, x, t, y, first.config, states), {}


def _forward_groups(
    jobs: Sequence[Job], modes: Sequence[Mode]
) -> dict[tuple[SkipDiT | None, Hashable], list[int]]:
    """Per network: FULL jobs in one group, CACHED jobs by their policy's cached-forward key."""
    groups: dict[tuple[SkipDiT | None, Hashable], list[int]] = {}
    for i, (job, mode) in enumerate(zip(jobs, modes, strict=True)):
        key = FULL if mode is Mode.FULL else job.cache.policy.cached_group_key(job.cache.config)
        groups.setdefault((job.network, key), []).append(i)
    return groups


@torch.inference_mode()
def denoise_step(
    model: SkipDiT, jobs: Sequence[Job], forward: GroupForward = forward_group
) -> list[Mode]:
    """Advance every job by one step: one batched ``forward`` per mode group, then one batched
    scheduler update per sampler family. No host synchronisation on CUDA.

    Returns each job's mode for this step, in order.
    """
    inputs = [job.model_input() for job in jobs]
    modes = [job.cache.decide(job.step, job.timestep) for job in jobs]
    outputs: list[torch.Tensor] = [torch.empty(0)] * len(jobs)
    timers: list[ForwardTimer | None] = [None] * len(jobs)  # each job's group's, below
    device = next(model.parameters()).device

    for (network, key), members in _forward_groups(jobs, modes).items():
        group = [jobs[i] for i in members]
        x = torch.cat([inputs[i][0] for i in members])  # (rows, C, H, W)
        t = torch.cat([inputs[i][1] for i in members])  # (rows,)
        y = conditions.cat([inputs[i][2] for i in members])  # (rows,): labels or text
        timer = ForwardTimer(device)
        out, captured = forward(network or model, group, key == FULL, x, t, y)  # (rows, C', ..)
        timer.stop()
        offset = 0
        for i, job in zip(members, group, strict=True):
            modes[i] = job.cache.policy.realized_mode(job.cache.state, modes[i])
            rows = slice(offset, offset + job.rows)
            offset += job.rows
            outputs[i], timers[i] = out[rows], timer
            if key == FULL:
                wanted = job.cache.capture_blocks(model.config)
                job.cache.policy.on_full(
                    job.cache.config, job.cache.state, {k: captured[k][rows] for k in wanted}
                )

    step_samplers(jobs, outputs)
    for job, mode, timed in zip(jobs, modes, timers, strict=True):
        assert timed is not None, "every job is in a group"
        job.stats.record(mode, timed)  # CUDA: reads the previous step's timers
    return modes


def step_samplers(jobs: Sequence[Job], outputs: Sequence[torch.Tensor]) -> None:
    """Guidance and the scheduler step of every job, given its rows of the model output:
    one batched update per sampler family, diffusers' per-request step where none applies."""
    guided = [job.guide(out) for job, out in zip(jobs, outputs, strict=True)]  # (eps, rest)
    families: dict[Hashable, list[int]] = {}
    for i, job in enumerate(jobs):
        families.setdefault(job.sampler_key, []).append(i)
    for key, members in families.items():
        if key is None:
            for i in members:
                jobs[i].scheduler_step(*guided[i])
            continue
        family = [jobs[i] for i in members]
        sample = torch.cat([job.latents for job in family])  # (R, C, H, W)
        eps = torch.cat([guided[i][0] for i in members])  # (R, C, H, W)
        variance = torch.cat([guided[i][1] for i in members]) if family[0].wants_variance else None
        new = step_batch([job.member() for job in family], sample, eps, variance)  # (R, C, H, W)
        for job, latents in zip(
            family, new.split([j.latents.shape[0] for j in family]), strict=True
        ):
            job.latents = latents
            job.step += 1


@dataclass
class Result:
    plan: RunPlan
    status: str  # "done" or "cancelled"
    latents: torch.Tensor  # (n, *sample_shape): (n, C, H, W); video (n, C, F, H, W) (fp32, CPU)
    # (n, H, W, channels) uint8; video: (n, F, H, W, channels), each sample's frames in order.
    # None when cancelled.
    images: torch.Tensor | None
    stats: StepStats
    seconds: float  # wall time from start to finish, decode included
    prompt_report: PromptReport | None = None  # text models: tokens used, truncation


@dataclass(frozen=True)
class FastPath:
    """How a pipeline's steps run (``Pipeline.use_fast_path``)."""

    kernels: str  # the kernel backend that runs: triton | torch
    graphs: str  # captured steps: cuda_graphs | compile | off
    warmup_seconds: float  # capture / compile time at start
    checks: tuple[Verdict, ...] = ()  # the self-check of each component that was turned on

    @property
    def components(self) -> dict[str, bool]:
        """Each fast-path component and whether it runs (what /metrics' gauge shows)."""
        return {"kernels": self.kernels == "triton", "graphs": self.graphs != "off"}


class Pipeline:
    """A loaded network (and VAE for latent models) that turns requests into images."""

    def __init__(
        self,
        model: SkipDiT,
        vae: AutoencoderKL | None = None,
        default_guidance: float = DEFAULT_GUIDANCE,
        cache_overrides: Mapping[str, Mapping[str, Any]] | None = None,
        prompting: Prompting | HunyuanPrompting | None = None,
        objective: str = "eps",
        shift: float = 1.0,
        trained_schedule: Mapping[str, Any] | None = None,
        vae_scale: float = VAE_SCALE,
        adapters: Mapping[str, LoRA] | None = None,
    ):
        self.model = model.eval()
        # A DyDiT's static twin (the same weights, no routing): ``dynamic: false`` requests.
        self.static = model.dense() if isinstance(model, DyDiT) else model
        self.vae = vae.eval() if vae is not None else None
        # The card's defaults (``ModelInfo``), which plans for this model start from where a
        # request leaves them unset: the guidance scale, and policy name -> config fields the
        # model sets over the policy's defaults (TeaCache's calibrated coefficients).
        self.default_guidance = default_guidance
        self.cache_overrides = dict(cache_overrides or {})
        self.forward: GroupForward = forward_group  # a step group's forward, see use_fast_path
        # A text model's prompt side (its encoder and embedding cache); None for class models.
        self.prompting = prompting
        if model.config.conditioning == "text" and prompting is None:
            raise ValueError("a text model's pipeline needs its text encoder (prompting)")
        # What the card says the network was trained for: "eps" (DDPM family samplers) or
        # "flow" (flow_euler), and the flow sampler's timestep shift.
        self.objective = objective
        self.shift = shift
        # The model's own noise schedule (a diffusers scheduler config: Hunyuan-DiT's
        # ``scheduler/``), which its DDPM-family samplers run; None: DiT's (make_scheduler).
        self.trained_schedule = dict(trained_schedule) if trained_schedule is not None else None
        self.vae_scale = vae_scale  # latents = VAE latents * vae_scale (the VAE's scaling factor)
        # LoRA adapters of this network by name (``model.networks.lora.load``): a plan may
        # name one; jobs of different adapters share every step batch.
        self.adapters = dict(adapters or {})

    def plan(self, **params: Any) -> RunPlan:
        """A checked plan for this model (``model.sampling.plan.plan``'s parameters) from the
        card's defaults this pipeline holds: guidance, the policies' calibration."""
        return plan(
            self.model.config,
            default_guidance=self.default_guidance,
            overrides=self.cache_overrides,
            objective=self.objective,
            adapters=self.adapters.keys(),
            **params,
        )

    def use_fast_path(
        self,
        kernels: str = "auto",
        graphs: str = "auto",
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        on_failure: str = "fall_back",
    ) -> FastPath:
        """Choose the kernel backend (``auto | triton | torch``) and the captured steps
        (``auto | cuda_graphs | compile | off``) for this device, and prepare them now: the
        warm-up (capture or compile per batch bucket) happens here, at worker start, never in a
        request. ``auto`` is the fast path on CUDA and plain eager torch elsewhere. Raises
        KernelUnavailable / ModeUnavailable for an explicit choice that cannot run.

        Then each component that is on checks itself against the eager torch path
        (``model.sampling.selfcheck``) on a seeded batch of every bucket. One that fails is
        turned off with a log line naming it and why (``on_failure="fall_back"``), or raises
        KernelUnavailable / ModeUnavailable (``"fail"``)."""
        if on_failure not in ("fall_back", "fail"):
            raise ValueError(f"on_failure must be fall_back or fail, got {on_failure!r}")
        networks = [self.model] + ([self.static] if self.static is not self.model else [])
        depth = default_depth(self.model.config)
        checks: list[Verdict] = []

        def failed(verdict: Verdict, error: type[RuntimeError]) -> bool:
            checks.append(verdict)
            if verdict.passed:
                return False
            if on_failure == "fail":
                raise error(f"{verdict.component}: self-check failed: {verdict.reason}")
            log.warning("fast path: %s off for this worker: %s", verdict.component, verdict.reason)
            return True

        kernel_backend = self._use_kernels(kernels)
        if kernel_backend == "triton":
            verdict = selfcheck.check_kernels(networks, buckets, depth)
            if failed(verdict, KernelUnavailable):
                kernel_backend = self._use_kernels("torch")
        mode = resolve_mode(graphs, self.device)
        if self.prompting is not None and mode != "off":
            log.info("captured steps are off for text models: their text differs per request")
            mode = "off"
        self.forward, seconds = forward_group, 0.0
        if mode != "off":  # captures the static network; DyDiT's routed rows run eagerly
            runner = BucketedForward(self.static, mode, buckets, {depth})
            seconds = runner.warmup()
            if failed(selfcheck.check_graphs(runner, depth), ModeUnavailable):
                mode = "off"
            else:
                self.forward = runner.group_forward(forward_group)
        return FastPath(kernel_backend, mode, seconds, tuple(checks))

    def _use_kernels(self, backend: str) -> str:
        """Every network on ``backend`` (a DyDiT's twin has its own folded LSC weights); the
        backend that runs. Hunyuan-DiT runs diffusers' own modules: torch (triton: an error)."""
        if isinstance(self.model, HunyuanSkipDiT):
            if backend == "triton":
                raise KernelUnavailable("Hunyuan-DiT runs diffusers' own modules: no triton")
            return "torch"
        networks = [self.model] + ([self.static] if self.static is not self.model else [])
        return [network.use_kernels(backend) for network in networks][-1]

    def step(self, jobs: Sequence[Job]) -> list[Mode]:
        """``denoise_step`` of ``jobs`` on this pipeline's network and forward path."""
        return denoise_step(self.model, jobs, self.forward)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def start(self, plan: RunPlan) -> Job:
        """The job of a plan made for this model (``plan.plan``; initial noise drawn). The plan
        was checked where it was made: nothing is checked here."""
        return self.start_all([plan])[0]

    def start_all(self, plans: Sequence[RunPlan]) -> list[Job]:
        """``start`` of each plan; a text model encodes all their prompts in one batch."""
        if self.prompting is None:
            return [self._start(p, None) for p in plans]
        model, prompting = self.model, self.prompting
        if isinstance(prompting, HunyuanPrompting):
            assert isinstance(model, HunyuanSkipDiT), "Hunyuan prompting is a Hunyuan-DiT's"
            texts = prompting.texts(model, plans)
        else:
            assert isinstance(model, TextSkipDiT), "prompting is a text model's"
            texts = prompting.texts(model, plans)
        return [self._start(p, text) for p, text in zip(plans, texts, strict=True)]

    def _start(self, plan: RunPlan, text: RequestText | None) -> Job:
        config = self.model.config
        shift = self.shift if plan.sampler == "flow_euler" else 1.0
        scheduler = make_scheduler(
            plan.sampler,
            config.learn_sigma,
            self.vae is None,
            shift=shift,
            trained=self.trained_schedule,
        )
        scheduler.set_timesteps(plan.steps)
        generator = torch.Generator("cpu").manual_seed(plan.seed)
        shape = (plan.num_images, *config.sample_shape)  # (n, C, H, W) or (n, C, F, H, W)
        sigma = getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching has none: unit noise
        noise = torch.randn(shape, generator=generator) * sigma
        dtype = next(self.model.parameters()).dtype
        return Job(
            plan=plan,
            latents=noise.to(self.device, dtype),
            labels=torch.full((plan.num_images,), plan.class_label, device=self.device),
            scheduler=scheduler,
            generator=generator,
            cache=RequestCache(POLICIES[plan.policy], plan.cache),
            guidance=plan.guidance,
            null_class=config.num_classes,
            guided_channels=config.guided_channels,
            network=self.static if config.dynamic and not plan.dynamic else None,
            text=None if text is None else text.rows(plan.num_images, plan.uses_guidance),
            prompt_report=None if text is None else text.report,
            adapter=self._adapter(plan),
        )

    def _adapter(self, plan: RunPlan) -> lora.Choice | None:
        if plan.adapter is None:
            return None
        if plan.adapter not in self.adapters:
            raise FieldError("adapter", f"adapter {plan.adapter!r} is not loaded on this worker")
        return lora.Choice(self.adapters[plan.adapter], plan.adapter_scale)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) samples -> (n, H', W', channels) uint8 images; video samples
        (n, C, F, H, W) -> (n, F, H', W', channels), the VAE decoding frames as images."""
        if latents.dim() == 5:  # video: every frame an image
            n, f = latents.shape[0], latents.shape[2]
            frames = latents.transpose(1, 2).flatten(0, 1)  # (n*F, C, H, W)
            return self.decode(frames).unflatten(0, (n, f))  # (n, F, H', W', channels)
        if self.vae is not None:
            pixels = torch.cat(
                [
                    self.vae.decode(chunk.to(self.vae.dtype) / self.vae_scale).sample
                    for chunk in latents.split(VAE_DECODE_ROWS)
                ]
            )  # (n, channels, H', W')
        else:
            pixels = latents
        pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).cpu()

    def generate(
        self,
        plans: Sequence[RunPlan],
        progress: ProgressFn | None = None,
    ) -> list[Result]:
        """Run all requests together to completion. ``progress(job, mode)`` is called after
        each step of each job; it may call ``job.cancel()`` to stop that job."""
        begin = time.perf_counter()
        jobs = self.start_all(plans)
        results: dict[int, Result] = {}
        active = list(jobs)
        while active:
            modes = self.step(active)
            if progress is not None:
                for job, mode in zip(active, modes, strict=True):
                    progress(job, mode)
            for job in active:
                if job.done or job.cancelled:
                    results[id(job)] = self.finish(job, time.perf_counter() - begin)
            active = [job for job in active if id(job) not in results]
        log.debug("generated %d requests in %.3fs", len(jobs), time.perf_counter() - begin)
        return [results[id(job)] for job in jobs]

    def finish(self, job: Job, elapsed: float) -> Result:
        """The result of a job that is done (decoded) or cancelled (not decoded)."""
        start = time.perf_counter()
        images = None if job.cancelled else self.decode(job.latents)
        job.stats.settle()
        return Result(
            plan=job.plan,
            status="cancelled" if job.cancelled else "done",
            latents=job.latents.float().cpu(),
            images=images,
            stats=job.stats,
            seconds=elapsed + time.perf_counter() - start,
            prompt_report=job.prompt_report,
        )
