"""Wall-clock speed of every cache policy at the paper's model sizes, on any device.

    python loadtest/bench_cache_speed.py --preset XL/2 --device cuda --dtype bfloat16 \
        --steps 50 --requests 8 [--sampler ddpm --steps 250] [--vanilla]

No trained checkpoint of these sizes can be had here, so the network gets random weights (the
zero-initialised adaLN gates and output layer drawn at random too, so that every branch does
work and changes with the input). A fixed-schedule policy does the same work whatever the
weights, so its speed is the speed it would have on trained weights; quality is not measured
(``skipdit bench`` does that on the trained digit models). fbcache decides from the weights:
its row reports the cached share it got, which is not what a trained model would give.

Times the denoising loop only (the VAE decode costs the same under every policy), best of
``--repeats`` after one warm-up run per setting, every request of the batch in each step's one
forward. The FLOP ratio is counted op by op over one request's whole run.
"""

from __future__ import annotations

import argparse
import time
from typing import get_args

import torch

from model.cache import Mode
from model.networks.skip_dit import SkipDiT, preset
from model.sampling.pipeline import Pipeline, synchronize
from model.sampling.plan import RunPlan, Sampler
from model.training.bench import counted_flops, settings


def random_network(name: str, vanilla: bool, seed: int) -> SkipDiT:
    torch.manual_seed(seed)
    network = SkipDiT(preset(name, long_skip=not vanilla))
    with torch.no_grad():
        for p in network.parameters():
            if not p.any():  # adaLN-Zero gates and the output layer: make them do something
                p.normal_(std=0.02)
    return network


def loop_seconds(pipeline: Pipeline, batch: list[RunPlan]) -> tuple[float, float]:
    """(wall seconds, cached share of steps) of one batched denoising run, decode excluded."""
    jobs = [pipeline.start(p) for p in batch]
    synchronize(pipeline.device)
    began = time.perf_counter()
    while not jobs[0].done:  # all requests have the same step count
        pipeline.step(jobs)
    synchronize(pipeline.device)
    seconds = time.perf_counter() - began
    cached = sum(j.stats.steps[Mode.CACHED] for j in jobs) / sum(j.total_steps for j in jobs)
    return seconds, cached


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="XL/2")
    p.add_argument("--vanilla", action="store_true", help="DiT without long skips")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--sampler", default="ddim", choices=get_args(Sampler))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--requests", type=int, default=8, help="requests batched, one image each")
    p.add_argument("--guidance-scale", type=float, default=1.5)
    p.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    network = random_network(args.preset, args.vanilla, args.seed)
    network = network.to(device=args.device, dtype=getattr(torch, args.dtype))
    pipeline = Pipeline(network, default_guidance=args.guidance_scale)
    config = network.config
    name = f"{'DiT' if args.vanilla else 'Skip-DiT'}-{args.preset}"
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(
        f"{name} ({sum(q.numel() for q in network.parameters()):,} parameters, depth "
        f"{config.depth}, {(config.input_size // config.patch_size) ** 2} tokens), random "
        f"weights, {args.dtype} on {device}; {args.sampler} {args.steps} steps, {args.requests} "
        f"requests x 1 image, guidance {args.guidance_scale} -> "
        f"{args.requests * 2 if args.guidance_scale > 1 else args.requests} rows per forward"
    )
    print("| setting | loop s | speedup (wall) | FLOP ratio | cached steps |")
    print("|---|---|---|---|---|")
    base_seconds = base_flops = 0.0
    for label, policy, options in settings(args.intervals, args.thresholds, config):
        batch = [
            pipeline.plan(
                class_label=c % config.num_classes,
                steps=args.steps,
                seed=args.seed + c,
                sampler=args.sampler,
                guidance=args.guidance_scale,
                policy=policy,
                params=options,
            )
            for c in range(args.requests)
        ]
        loop_seconds(pipeline, batch)  # warm-up: allocations, kernel selection
        runs = [loop_seconds(pipeline, batch) for _ in range(args.repeats)]
        seconds, cached = min(runs)
        flops = counted_flops(pipeline, batch[0])
        if policy == "none":
            base_seconds, base_flops = seconds, flops
        print(
            f"| {label} | {seconds:.3f} | {base_seconds / seconds:.2f}x "
            f"| {base_flops / flops:.2f}x | {cached:.0%} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
