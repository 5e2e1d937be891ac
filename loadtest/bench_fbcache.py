"""First-Block-Cache with concurrent requests: our per-request fbcache against diffusers'
batched First-Block-Cache, on the same network, side by side in one run.

    python -m loadtest.bench_fbcache [--requests 10] [--steps 50] [--rounds 5] \
        [--diffusers-threshold 0.05] [--thresholds 0.02 0.03 0.05 0.08 0.12]

The network is the shipped vanilla ``digits-dit``, converted into diffusers'
``DiTTransformer2DModel`` with its own weights, key by key (diffusers' DiT embeds the timestep
with a frequency shift of 1 where the DiT paper's code, and ours, use 0: set to 0 here; the run
prints how far the two networks' outputs are apart). Both sample DDIM-50 with guidance 1.5,
``--requests`` class-conditional requests at once:

- diffusers: the requests and their unconditional twins as one batch per step; its hook decides
  for the whole batch (one decision per step from the batch's mean change), as a diffusers
  pipeline does;
- ours: the requests through one ``Pipeline.generate`` (step-level batching), each deciding
  from its own rows; every request that computes joins one forward of the remaining blocks.

Our threshold is the smallest of ``--thresholds`` whose cached share is at least diffusers'
(the metrics differ: theirs compares block 0's residual, ours its output), so the comparison is
at equal or more skipping on their side. Rounds interleave the four loops (ours and theirs,
uncached and cached); each line prints both times and our speed relative to theirs (their
seconds / ours: above 1 is faster). Times are the denoising loop only, on this process's
threads; CPU figures are what a CI machine gives, not a GPU's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from loadtest import diffusers_dit
from model import registry
from model.cache import Mode
from model.networks.skip_dit import SkipDiT
from model.sampling.pipeline import Pipeline, synchronize


class DiffusersLoop:
    """diffusers' DiT sampled with DDIM and guidance, the requests in one batch per step;
    ``threshold``: diffusers' First-Block-Cache applied (None: uncached)."""

    def __init__(self, network: SkipDiT, steps: int, guidance: float, threshold: float | None):
        from diffusers import DDIMScheduler
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        self.dit, self.steps, self.guidance = diffusers_dit.convert(network), steps, guidance
        self.null = network.config.num_classes
        self.scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        self.computed = 0  # forwards of the last block: steps fully computed
        self.dit.transformer_blocks[-1].ff.register_forward_hook(self._count)
        if threshold is not None:
            apply_first_block_cache(self.dit, FirstBlockCacheConfig(threshold=threshold))
        self.cached = threshold is not None

    def _count(self, *_: object) -> None:
        self.computed += 1

    @torch.no_grad()
    def run(self, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, float]:
        """(samples, share of steps that skipped the remaining blocks)."""
        from diffusers.hooks import HookRegistry
        from diffusers.models.cache_utils import CacheMixin

        cfg = self.dit.config
        g = torch.Generator().manual_seed(seed)
        n = len(labels)
        x = torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
        classes = torch.cat([labels, torch.full_like(labels, self.null)])
        self.scheduler.set_timesteps(self.steps)
        HookRegistry.check_if_exists_or_initialize(self.dit).reset_stateful_hooks()
        self.computed = 0
        with CacheMixin.cache_context(self.dit, "cond"):  # type: ignore[arg-type]
            for t in self.scheduler.timesteps:
                both = torch.cat([x, x])
                out = self.dit(both, timestep=t.expand(2 * n), class_labels=classes).sample
                cond, uncond = out.chunk(2)
                eps = uncond + self.guidance * (cond - uncond)
                x = self.scheduler.step(eps, t, x).prev_sample
        return x, 1 - self.computed / self.steps


def ours(pipeline: Pipeline, labels: torch.Tensor, steps: int, threshold: float | None) -> float:
    """One ``generate`` of the requests; returns the share of request-steps that skipped."""
    policy, params = ("fbcache", {"threshold": threshold}) if threshold else ("none", {})
    plans = [
        pipeline.plan(class_label=int(c), steps=steps, seed=i, policy=policy, params=params)
        for i, c in enumerate(labels)
    ]
    results = pipeline.generate(plans)
    cached = sum(r.stats.steps[Mode.CACHED] for r in results)
    return cached / sum(sum(r.stats.steps.values()) for r in results)


def timed(fn: Callable[[], object]) -> float:
    began = time.perf_counter()
    fn()
    synchronize(torch.device("cpu"))
    return time.perf_counter() - began


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=10)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--diffusers-threshold", type=float, default=0.05)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.02, 0.03, 0.05, 0.08, 0.12])
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipeline = registry.load("digits-dit").pipeline
    network = pipeline.model
    guidance = pipeline.default_guidance
    labels = torch.arange(args.requests) % network.config.num_classes
    plain = DiffusersLoop(network, args.steps, guidance, None)
    fbc = DiffusersLoop(network, args.steps, guidance, args.diffusers_threshold)

    t = torch.full((4,), 500.0)
    x = torch.randn(4, 1, network.config.input_size, network.config.input_size)
    y = torch.arange(4)
    with torch.no_grad():
        gap = (plain.dit(x, timestep=t, class_labels=y).sample - network(x, t, y)).abs().max()
    print(f"digits-dit as diffusers' DiT: max |output difference| {gap:.2e}")

    _, their_share = fbc.run(labels, seed=0)
    chosen, share = args.thresholds[-1], 0.0
    for th in sorted(args.thresholds):
        share = ours(pipeline, labels, args.steps, th)
        print(f"ours threshold {th}: cached share {share:.1%}")
        if share >= their_share:
            chosen = th
            break
    print(
        f"diffusers threshold {args.diffusers_threshold}: cached share {their_share:.1%}; "
        f"ours at threshold {chosen} ({share:.1%})\n"
    )
    print(f"{args.requests} requests, DDIM-{args.steps}, guidance {guidance}, "
          f"{torch.get_num_threads()} threads\n")  # fmt: skip
    print("| round | diffusers s | ours s | ours vs diffusers | diffusers FBC s | ours fbcache s |"
          " ours vs diffusers (cached) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    plain_ratios, cached_ratios = [], []
    for r in range(args.rounds):
        d_plain = timed(lambda: plain.run(labels, seed=0))
        o_plain = timed(lambda: ours(pipeline, labels, args.steps, None))
        d_fbc = timed(lambda: fbc.run(labels, seed=0))
        o_fbc = timed(lambda: ours(pipeline, labels, args.steps, chosen))
        plain_ratios.append(d_plain / o_plain)
        cached_ratios.append(d_fbc / o_fbc)
        print(f"| {r} | {d_plain:.3f} | {o_plain:.3f} | {d_plain / o_plain:.2f}x | {d_fbc:.3f} "
              f"| {o_fbc:.3f} | {d_fbc / o_fbc:.2f}x |", flush=True)  # fmt: skip
    print(
        f"\nmedian speed of ours relative to diffusers: uncached "
        f"{statistics.median(plain_ratios):.2f}x, First-Block-Cache "
        f"{statistics.median(cached_ratios):.2f}x (above 1: ours faster)"
    )


if __name__ == "__main__":
    main()
