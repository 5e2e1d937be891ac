"""The fast path against eager at the paper's size: step costs, MFU, Skip-Cache's realised share
of its FLOP bound, diffusers' DiT beside ours, and images/s through one worker's engine.

    python -m loadtest.bench_fast_path --out OUTDIR [--preset XL/2] [--rows 16 64]

Random weights (no checkpoint of this size can be had here; a fixed schedule does the same work
whatever the weights, so speed is what a trained model gets), DDIM, guidance 1.5 (requests of
one image, two rows each). For Skip-DiT and DiT at each row count and each path
(eager: torch ops; kernels: Triton LSC fusion + attention; graphs: CUDA graphs per bucket; both;
compile: torch.compile per bucket, Skip-DiT at the smallest row count only):
- full / cached step ms (the mean of ``--timed`` steps between two device syncs) and the full
  step's MFU (2 FLOPs per multiply-add against the card's dense bf16 peak);
- for eager and both: the whole ``--steps`` loop uncached and with Skip-Cache N=2/3/4, the wall
  speedup next to the FLOP ratio (counted op by op on the eager path; Triton kernels are not
  visible to the counter) and their quotient, the share of the bound realised.
Then diffusers' ``DiTTransformer2DModel`` (XL/2 config) eager and under ``torch.compile`` against
our full forward at the same rows, and images/s through the engine a worker runs (closed loop at
``--concurrency``, a random VAE of sd-vae-ft-mse's shape decoding). Tables go to stdout and to
``OUTDIR/fast_path.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from loadtest import diffusers_dit
from model.networks.skip_dit import DiTConfig, SkipDiT, preset
from model.registry import PIXEL_CHANNELS
from model.sampling.pipeline import Pipeline, synchronize
from model.sampling.plan import RunPlan
from model.training.bench import counted_flops

# Dense bf16 peak TFLOP/s (no sparsity) by device-name fragment.
PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.0}
PATHS = {  # name -> (kernels, graphs)
    "eager": ("torch", "off"),
    "kernels": ("triton", "off"),
    "graphs": ("torch", "cuda_graphs"),
    "both": ("triton", "cuda_graphs"),
    "compile": ("torch", "compile"),
}
LOOPED = ("eager", "both")  # paths whose whole loops (and Skip-Cache speedups) are timed
INTERVALS = (2, 3, 4)


class Report:
    """Lines printed and appended to ``path`` as they come (a run cut short keeps its tables)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(line + "\n")


def random_network(name: str, vanilla: bool, seed: int = 0) -> SkipDiT:
    """Random weights, the zero-initialised adaLN gates and output layer drawn too."""
    torch.manual_seed(seed)
    network = SkipDiT(preset(name, long_skip=not vanilla))
    with torch.no_grad():
        for p in network.parameters():
            if not p.any():
                p.normal_(std=0.02)
    return network.eval()


def batch(pipeline: Pipeline, requests: int, steps: int, **cache: Any) -> list[RunPlan]:
    return [
        pipeline.plan(class_label=i % 10, seed=i, steps=steps, guidance=1.5, **cache)
        for i in range(requests)
    ]


def step_ms(pipeline: Pipeline, requests: int, timed: int, cached: bool) -> float:
    """Mean ms of ``timed`` steps, all full (no cache) or all cached (after one full step)."""
    skip = {"policy": "skip_cache", "params": {"interval": 1000, "t_end": 0}}
    cache = skip if cached else {"policy": "none"}
    jobs = [pipeline.start(p) for p in batch(pipeline, requests, timed + 3, **cache)]
    for _ in range(2):  # warm-up; the first also fills the Skip-Cache deep feature
        pipeline.step(jobs)
    synchronize(pipeline.device)
    began = time.perf_counter()
    for _ in range(timed):
        pipeline.step(jobs)
    synchronize(pipeline.device)
    return (time.perf_counter() - began) / timed * 1e3


def loop_s(pipeline: Pipeline, params: list[RunPlan]) -> float:
    """Wall seconds of a whole denoising loop (decode excluded)."""
    jobs = [pipeline.start(p) for p in params]
    synchronize(pipeline.device)
    began = time.perf_counter()
    while not jobs[0].done:
        pipeline.step(jobs)
    synchronize(pipeline.device)
    return time.perf_counter() - began


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)


def flop_counts(pipeline: Pipeline, steps: int) -> dict[str, float]:
    """FLOPs of one request's whole run per setting, counted on the eager path."""
    counts = {"none": counted_flops(pipeline, batch(pipeline, 1, steps, policy="none")[0])}
    for n in INTERVALS:
        counts[f"N={n}"] = counted_flops(
            pipeline, batch(pipeline, 1, steps, policy="skip_cache", params={"interval": n})[0]
        )
    return counts


def bench_path(
    pipeline: Pipeline, path: str, rows: int, args: argparse.Namespace, flops: dict, out: Report
) -> float:
    """One table row per path (steps, MFU) and, for looped paths, the Skip-Cache speedups;
    returns the full step ms."""
    kernels, graphs = PATHS[path]
    fast = pipeline.use_fast_path(kernels, graphs, buckets=(rows,))
    requests = rows // 2
    full, cached = (step_ms(pipeline, requests, args.timed, c) for c in (False, True))
    peak = peak_flops(pipeline.device, args.peak_tflops)
    step_flops = flops["none"] / args.steps * requests
    mfu = f"{step_flops / (full / 1e3) / peak:.0%}" if peak else "-"
    cells = [f"{full:.2f}", f"{cached:.2f}", mfu, f"{fast.warmup_seconds:.1f}"]
    if path in LOOPED:
        base = min(loop_s(pipeline, batch(pipeline, requests, args.steps, policy="none"))
                   for _ in range(args.repeats))  # fmt: skip
        for n in INTERVALS:
            params = batch(
                pipeline, requests, args.steps, policy="skip_cache", params={"interval": n}
            )
            wall = base / min(loop_s(pipeline, params) for _ in range(args.repeats))
            bound = flops["none"] / flops[f"N={n}"]
            cells.append(f"{wall:.2f}x / {bound:.2f}x = {wall / bound:.0%}")
    else:
        cells += ["-"] * len(INTERVALS)
    out(f"| {path} ({fast.kernels}, {fast.graphs}) | " + " | ".join(cells) + " |")
    return full


def bench_model(
    vanilla: bool, rows: int, args: argparse.Namespace, out: Report
) -> dict[str, float]:
    """Every path for one network and row count; returns full step ms by path and the eager
    forward alone ("forward")."""
    name = f"{'DiT' if vanilla else 'Skip-DiT'}-{args.preset}"
    network = random_network(args.preset, vanilla).to(args.device, getattr(torch, args.dtype))
    pipeline = Pipeline(network, default_guidance=1.5)
    flops = flop_counts(pipeline, args.steps)
    out(f"\n### {name}, {rows} rows ({rows // 2} requests x 1 image, guidance 1.5)\n")
    head = ["path (kernels, graphs)", "full step ms", "cached step ms", "full-step MFU"]
    head += ["warm-up s", *(f"Skip-Cache N={n}: wall / FLOPs = share" for n in INTERVALS)]
    out("| " + " | ".join(head) + " |")
    out("|" + "---|" * len(head))
    paths = [p for p in args.paths if p != "compile" or (not vanilla and rows == min(args.rows))]
    full: dict[str, float] = {}
    for path in paths:
        try:
            full[path] = bench_path(pipeline, path, rows, args, flops, out)
        except Exception as e:  # a path that cannot run here is reported, the others go on
            out(f"| {path} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} |")
    pipeline.use_fast_path("torch", "off")
    full["forward"] = forward_ms(lambda x, t, y: network(x, t, y), network.config, rows, args)
    return full


def forward_ms(
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], object],
    config: DiTConfig,
    rows: int,
    args: argparse.Namespace,
) -> float:
    """Median ms of one forward on random inputs of the model's shape."""
    shape = (rows, config.in_channels, config.input_size, config.input_size)
    dtype = getattr(torch, args.dtype)
    x = torch.randn(shape, device=args.device, dtype=dtype)
    t = torch.randint(0, 1000, (rows,), device=args.device)
    y = torch.randint(0, config.num_classes, (rows,), device=args.device)
    times = []
    with torch.inference_mode():
        for i in range(args.timed + 3):
            synchronize(x.device)
            began = time.perf_counter()
            fn(x, t, y)
            synchronize(x.device)
            if i >= 3:
                times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def bench_diffusers(
    ours: dict[int, dict[str, float]], args: argparse.Namespace, out: Report
) -> None:
    """diffusers' DiT (eager, compiled) full forward against our Skip-DiT's, same rows."""
    config = preset(args.preset)
    torch.manual_seed(0)
    dit = diffusers_dit.like(config).to(args.device, getattr(torch, args.dtype)).eval()
    compiled = torch.compile(dit, dynamic=False)
    out(f"\n### diffusers DiTTransformer2DModel ({args.preset} config, random weights)\n")
    out("| rows | diffusers eager forward ms | diffusers torch.compile forward ms "
        "| ours: eager forward ms | ours: full step ms, best path |")  # fmt: skip
    out("|---|---|---|---|---|")
    for rows in args.diffusers_rows or sorted(args.rows)[:1]:
        cells = []
        for model in (dit, compiled):
            try:
                ms = forward_ms(lambda x, t, y, m=model: m(x, t, y).sample, config, rows, args)
                cells.append(f"{ms:.2f}")
            except Exception as e:
                cells.append(f"failed: {type(e).__name__}")
        mine = ours.get(rows, {})
        best = min(((ms, p) for p, ms in mine.items() if p != "forward"), default=None)
        best_cell = f"{best[0]:.2f} ({best[1]})" if best else "-"
        out(f"| {rows} | {cells[0]} | {cells[1]} | {mine.get('forward', float('nan')):.2f} | "
            f"{best_cell} |")  # fmt: skip


def random_vae(device: str, dtype: torch.dtype) -> torch.nn.Module:
    """An AutoencoderKL of sd-vae-ft-mse's shape (random weights: decode costs the same)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=256,
    )
    return vae.to(device, dtype).eval()


def closed_loop(engine: object, concurrency: int, total: int, params: RunPlan) -> float:
    """Images/s with ``concurrency`` requests in flight until ``total`` are done."""
    from service.engine import EngineRequest, EventKind

    submitted = done = 0
    began = time.perf_counter()
    for _ in range(min(concurrency, total)):
        engine.submit(EngineRequest(str(submitted), params))  # type: ignore[attr-defined]
        submitted += 1
    while done < total:
        events, _ = engine.step()  # type: ignore[attr-defined]
        for event in events:
            if event.kind is EventKind.FAILED:
                raise RuntimeError(f"request failed: {event.error}")
            if event.kind is EventKind.DONE:
                done += 1
                if submitted < total:
                    engine.submit(EngineRequest(str(submitted), params))  # type: ignore[attr-defined]
                    submitted += 1
    return total * params.num_images / (time.perf_counter() - began)


def bench_engine(args: argparse.Namespace, out: Report) -> None:
    """Images/s through the engine one worker runs, VAE decode included."""
    from model.sampling.graphs import DEFAULT_BUCKETS
    from service.engine import Engine

    dtype = getattr(torch, args.dtype)
    network = random_network(args.preset, False).to(args.device, dtype)
    latent = network.config.in_channels not in PIXEL_CHANNELS
    vae = random_vae(args.device, dtype) if latent else None
    pipeline = Pipeline(network, vae, default_guidance=1.5)
    rows = 2 * args.concurrency
    buckets = [b for b in DEFAULT_BUCKETS if b <= rows]
    out(f"\n### Images/s through one worker's engine, {args.concurrency} requests in flight\n")
    out("| path (kernels, graphs) | warm-up s | uncached img/s | Skip-Cache N=2 | N=3 |")
    out("|---|---|---|---|---|")
    for path in ("eager", args.engine_path):
        try:
            fast = pipeline.use_fast_path(*PATHS[path], buckets=buckets)
        except Exception as e:
            out(f"| {path} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} |")
            continue
        cells = [f"{fast.warmup_seconds:.1f}"]
        for interval in (1, 2, 3):
            params = pipeline.plan(
                steps=args.steps, guidance=1.5, policy="skip_cache", params={"interval": interval}
            )
            engine = Engine(pipeline, max_batch_tokens=rows * network.config.num_tokens)
            closed_loop(engine, args.concurrency, args.concurrency, params)  # warm-up
            rate = closed_loop(engine, args.concurrency, args.total, params)
            cells.append(f"{rate:.2f}")
        out(f"| {path} ({fast.kernels}, {fast.graphs}) | " + " | ".join(cells) + " |")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="XL/2")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--rows", type=int, nargs="+", default=[16, 64], help="rows per forward")
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of the timed loops")
    p.add_argument("--timed", type=int, default=20, help="steps timed per step-cost figure")
    p.add_argument("--repeats", type=int, default=2, help="loops per setting; the fastest")
    p.add_argument("--vanilla", choices=["both", "skip", "dit"], default="both")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak override")
    p.add_argument("--concurrency", type=int, default=16, help="engine: requests in flight")
    p.add_argument("--total", type=int, default=48, help="engine: requests per measurement")
    p.add_argument("--engine-path", default="both", choices=list(PATHS))
    p.add_argument("--skip", nargs="*", default=[], choices=["diffusers", "engine"])
    p.add_argument(
        "--diffusers-rows", type=int, nargs="*", default=None, help="default: the smallest --rows"
    )
    p.add_argument("--out", type=Path, default=None, help="also write OUT/fast_path.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Smallest row count first (both networks, then diffusers' DiT), then the larger ones,
    then the engine: a run cut short loses the least asked-for figures."""
    args = parse(argv)
    out = Report(args.out / "fast_path.md" if args.out is not None else None)
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out(f"# Fast path, {args.preset}, {args.dtype} on {card}, torch {torch.__version__}\n")
    out(f"`python -m loadtest.bench_fast_path {' '.join(sys.argv[1:] if argv is None else argv)}`")
    models = {"both": (False, True), "skip": (False,), "dit": (True,)}[args.vanilla]
    ours: dict[int, dict[str, float]] = {}
    for i, rows in enumerate(sorted(args.rows)):
        for vanilla in models:
            full = bench_model(vanilla, rows, args, out)
            if not vanilla:
                ours[rows] = full
        if i == 0 and "diffusers" not in args.skip:
            bench_diffusers(ours, args, out)
    if "engine" not in args.skip:
        bench_engine(args, out)


if __name__ == "__main__":
    main()
